"""The SFT baseline: one update equals a hand computation; sampling; end-to-end outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from fomaml_math.batching import make_sft_batch, sft_loss
from fomaml_math.config import load_config, stage_settings
from fomaml_math.errors import ConfigError
from fomaml_math.training import sft
from fomaml_math.training.optim import LRSchedule
from fomaml_math.training.runtime import Runtime
from tests.fixtures_tiny import make_rows, shared_workspace, tiny_model_and_tokenizer, train_settings


def test_sft_step_equals_hand_computation() -> None:
    model, tok = tiny_model_and_tokenizer(seed=4)
    batch = make_sft_batch(tok, make_rows("algebra", "query", 6), 64)
    reference = copy.deepcopy(model)
    loss, _ = sft_loss(reference, batch)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = min(1.0, 0.5 / (float(norm) + 1e-6))
    hand = torch.optim.AdamW(reference.parameters(), lr=0.01 * LRSchedule("linear", 1, 5)(0), eps=1e-3)
    for p, g in zip(reference.parameters(), grads, strict=True):
        p.grad = g * scale
    hand.step()

    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.01, eps=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule("linear", 1, 5))
    value, grad_norm = sft.sft_step(Runtime.local(), model, params, optimizer, scheduler, batch, max_grad_norm=0.5)
    assert value == pytest.approx(float(loss.detach()), abs=1e-6)
    assert grad_norm == pytest.approx(float(norm), rel=1e-5)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_epoch_sampler_visits_every_example_once_per_epoch() -> None:
    sampler = sft.EpochSampler(seed=3, num_examples=10, batch_size=4)
    seen = [i for step in range(1, 6) for i in sampler.indices(step)]  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]
    fresh = sft.EpochSampler(seed=3, num_examples=10, batch_size=4)
    assert fresh.indices(4) == sampler.indices(4)  # the step is the sampler's whole state


def test_matched_budget_reaches_the_trainer(repo_root: Path) -> None:
    config = load_config(repo_root / "config" / "demo.yaml")
    settings = stage_settings(config, "train_sft")
    fo = config["fomaml"]
    per_step = fo["meta_batch_size"] * (fo["num_inner_steps"] * fo["inner_batch_size"] + fo["query_batch_size"])
    assert settings["sft"]["steps"] == round(fo["total_steps"] * per_step / config["sft"]["batch_size"])


def _run(settings: dict, out: Path, ckpt: Path) -> int:
    argv = ["--settings", json.dumps(settings), "--tasks-dir", str(shared_workspace() / "tasks")]
    return sft.main([*argv, "--output-dir", str(out), "--checkpoint-dir", str(ckpt)])


def test_main_writes_outputs(tmp_path: Path) -> None:
    settings = train_settings(shared_workspace() / "model", method="sft")
    assert _run(settings, tmp_path / "out", tmp_path / "ckpt") == 0
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["method"] == "sft" and summary["steps"] == 6 and summary["examples"] == 24
    assert summary["num_train_examples"] == 3 * (12 + 12)
    measured = summary["measured"]  # what plan --pilot reads (fomaml_math.measured)
    assert measured["tokens"] == summary["tokens"] > 0 and measured["processes"] == 1 and measured["gpu"] is None
    assert measured["tokens_per_s_per_gpu"] == pytest.approx(summary["tokens"] / measured["seconds"])
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(7))
    assert "dev/loss_before" in records[0] and "dev/loss_before" in records[6]
    assert records[6]["sft/loss"] < records[1]["sft/loss"]
    header = (tmp_path / "out" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "sft/loss", "sft/grad_norm", "lr", "perf/tokens_per_s"} <= set(header)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").config.model_type == "qwen3"


def test_batch_larger_than_data_fails_before_training(tmp_path: Path) -> None:
    settings = train_settings(shared_workspace() / "model", method="sft")
    settings["sft"]["batch_size"] = 100
    with pytest.raises(ConfigError, match=r"sft\.batch_size: 100"):
        _run(settings, tmp_path / "out", tmp_path / "ckpt")


def test_fp16_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    settings = train_settings(shared_workspace() / "model", method="sft")
    settings["compute"]["mixed_precision"] = "fp16"
    with pytest.raises(ConfigError, match=r"compute\.mixed_precision: fp16"):
        _run(settings, tmp_path / "out", tmp_path / "ckpt")
