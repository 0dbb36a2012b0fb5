"""FOMAML: the meta-update equals a hand computation; the stage runs end to end and fails clearly."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fomaml_math.adapt import WeightSnapshot
from fomaml_math.batching import IGNORE_INDEX, collate, encode_example
from fomaml_math.errors import ConfigError
from fomaml_math.training import fomaml
from fomaml_math.training.optim import LRSchedule, TrainingDivergedError, make_optimizer
from fomaml_math.training.runtime import Runtime
from fomaml_math.training.settings import TrainSettings
from tests.fixtures_tiny import TASKS, make_rows, shared_workspace, tiny_model_and_tokenizer, train_settings

INNER_LR, OUTER_LR, STEPS, MAX_NORM = 0.05, 0.01, 2, 0.5


def _hand_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """Token-weighted NLL of the labelled tokens, written out independently of batching.sft_loss."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]
    mask = labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def _episodes(tok) -> list[fomaml.Episode]:
    episodes = []
    for task in TASKS[:2]:
        enc = [encode_example(tok, r["problem"], r["solution"], 64) for r in make_rows(task, "support", 12)]
        support = [collate(enc[0:3], tok.pad_token_id), collate(enc[3:7], tok.pad_token_id)]
        episodes.append(fomaml.Episode(task, support, collate(enc[7:11], tok.pad_token_id)))
    return episodes


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the gradients it was stepped with (the meta-gradient after averaging and clipping)."""

    def step(self, closure: Any = None) -> Any:
        self.seen = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


# Adam's first step is ~lr * g / (|g| + eps): with the default eps=1e-8 float noise (~1e-8) in
# near-zero gradient entries moves a weight by ~lr.  A larger eps keeps the comparison well
# conditioned; the optimizer is still torch.optim.AdamW on both sides.
ADAM_EPS = 1e-3


def test_meta_step_equals_hand_computation() -> None:
    model, tok = tiny_model_and_tokenizer(seed=2)
    episodes = _episodes(tok)
    reference = copy.deepcopy(model)

    # By hand: per task a fresh copy, k SGD steps, query gradient there; mean; clip; one AdamW step.
    total = [torch.zeros_like(p) for p in reference.parameters()]
    for episode in episodes:
        fast = copy.deepcopy(reference)
        for step in range(STEPS):
            grads = torch.autograd.grad(_hand_loss(fast, episode.support[step]), list(fast.parameters()))
            with torch.no_grad():
                for p, g in zip(fast.parameters(), grads, strict=True):
                    p -= INNER_LR * g
        grads = torch.autograd.grad(_hand_loss(fast, episode.query), list(fast.parameters()))
        total = [t + g for t, g in zip(total, grads, strict=True)]
    meta_grad = [t / len(episodes) for t in total]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in meta_grad]))
    scale = min(1.0, MAX_NORM / (float(norm) + 1e-6))
    lr0 = OUTER_LR * LRSchedule("cosine", 3, 10)(0)
    hand_opt = torch.optim.AdamW(reference.parameters(), lr=lr0, weight_decay=0.01, eps=ADAM_EPS)
    for p, g in zip(reference.parameters(), meta_grad, strict=True):
        p.grad = g * scale
    hand_opt.step()

    params = list(model.parameters())
    optimizer = RecordingAdamW(params, lr=OUTER_LR, weight_decay=0.01, eps=ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule("cosine", 3, 10))
    result = fomaml.meta_step(
        Runtime.local(),
        model,
        params,
        optimizer,
        scheduler,
        episodes,
        inner_lr=INNER_LR,
        num_inner_steps=STEPS,
        max_grad_norm=MAX_NORM,
        snapshot=WeightSnapshot(model, "cpu"),
    )
    assert result.grad_norm == pytest.approx(float(norm), rel=1e-5)
    assert result.grad_norm > MAX_NORM  # clipping was exercised
    for seen, p in zip(optimizer.seen, reference.parameters(), strict=True):
        torch.testing.assert_close(seen, p.grad, rtol=0, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert all(p.grad is None for p in model.parameters())
    assert result.support_losses.shape == (2, STEPS) and result.query_losses.shape == (2,)


def test_metric_definitions() -> None:
    result = fomaml.MetaStepResult(
        ["algebra", "geometry"], np.array([[3.0, 2.0], [5.0, 4.0]]), np.array([2.5, 3.0]), grad_norm=1.5
    )
    m = result.metrics()
    assert m["meta/loss"] == m["meta/avg_query_loss"] == 2.75
    assert m["meta/avg_support_loss"] == 3.0  # final inner step
    assert m["meta/support_loss_before"] == 4.0
    assert m["meta/avg_adaptation_gap"] == pytest.approx(((2.5 - 2.0) + (3.0 - 4.0)) / 2)
    assert m["meta/adaptation_gap_std"] == pytest.approx(np.std([0.5, -1.0]))
    assert m["meta/task_loss_variance"] == pytest.approx(np.var([2.5, 3.0]))
    assert m["geometry/adaptation_gap"] == -1.0 and m["algebra/support_loss"] == 2.0 and m["meta/grad_norm"] == 1.5


def test_sampling_is_seeded_by_step_and_distinct() -> None:
    tasks = list(TASKS)
    draws = [fomaml.sample_tasks(1, step, tasks, 2) for step in range(1, 30)]
    assert all(len(set(d)) == 2 for d in draws)
    assert draws == [fomaml.sample_tasks(1, step, tasks, 2) for step in range(1, 30)]
    assert len({tuple(d) for d in draws}) > 1


def _run(settings: dict, out: Path, ckpt: Path, tasks_dir: Path | None = None) -> int:
    tasks_dir = tasks_dir or shared_workspace() / "tasks"
    argv = ["--settings", json.dumps(settings), "--tasks-dir", str(tasks_dir)]
    return fomaml.main([*argv, "--output-dir", str(out), "--checkpoint-dir", str(ckpt)])


def test_main_writes_outputs(tmp_path: Path) -> None:
    settings = train_settings(shared_workspace() / "model")
    assert _run(settings, tmp_path / "out", tmp_path / "ckpt") == 0
    out = tmp_path / "out"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["method"] == "fomaml" and summary["settings"] == settings
    assert summary["examples"] == 6 * 2 * (2 * 4 + 4) and summary["tokens"] > 0
    assert summary["num_truncated_examples"] == 0 and summary["resumed_from"] == []
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(7))
    assert "dev/loss_after" in records[0] and "dev/loss_before" in records[3]
    for key in ("meta/loss", "meta/grad_norm", "meta/avg_adaptation_gap", "meta/task_loss_variance", "lr"):
        assert all(math.isfinite(r[key]) for r in records[1:])
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "step" and "meta/avg_support_loss" in header
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(shared_workspace() / "model")
    assert not torch.equal(trained.model.embed_tokens.weight, base.model.embed_tokens.weight)
    # The finished run's resumable checkpoints (save_freq 3: steps 3 and 6) are gone once its outputs exist
    # (compute.keep_finished_checkpoints false); kept, both are there.
    assert not [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step-")]
    settings["compute"]["keep_finished_checkpoints"] = True
    assert _run(settings, tmp_path / "kept", tmp_path / "kept-ckpt") == 0
    assert sorted(p.name for p in (tmp_path / "kept-ckpt").iterdir() if not p.name.startswith(".")) == [
        "step-00000003",
        "step-00000006",
    ]


def test_batch_larger_than_split_fails_before_training(tmp_path: Path) -> None:
    settings = train_settings(shared_workspace() / "model")
    settings["fomaml"]["query_batch_size"] = 13  # the query split has 12 rows
    with pytest.raises(ConfigError, match=r"fomaml\.query_batch_size: 13 .* algebra/query has only 12"):
        _run(settings, tmp_path / "out", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("section", "key"), [("fomaml", "max_grad_norm"), ("select", "criterion"), (None, "train_seed")]
)
def test_partial_settings_name_the_missing_key(section: str | None, key: str, tmp_path: Path) -> None:
    settings = train_settings(shared_workspace() / "model")
    del (settings[section] if section else settings)[key]  # the schema's defaults are not restated in the code
    name = f"{section}.{key}" if section else key
    with pytest.raises(ConfigError, match=rf"settings: missing key {name} \(pass the stage's full settings"):
        _run(settings, tmp_path / "out", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_world_size_must_match_settings(tmp_path: Path) -> None:
    settings = train_settings(shared_workspace() / "model")
    settings["compute"]["num_processes"] = 2
    with pytest.raises(ConfigError, match=r"compute\.num_processes: settings say 2 but 1"):
        _run(settings, tmp_path / "out", tmp_path / "ckpt")


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    original = fomaml.accumulate_meta_gradient
    calls = []

    def poisoned(*args, **kwargs):
        support, query = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            query = query.copy()
            query[0] = float("nan")
        return support, query

    monkeypatch.setattr(fomaml, "accumulate_meta_gradient", poisoned)
    settings = train_settings(shared_workspace() / "model")
    assert _run(settings, tmp_path / "out", tmp_path / "ckpt") == 1
    err = capsys.readouterr().err
    assert "non-finite value at step 5" in err and "step-00000003" in err
    assert not (tmp_path / "out" / "train_summary.json").exists()
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith(".")] == ["step-00000003"]


def test_meta_step_refuses_non_finite_gradients() -> None:
    model, tok = tiny_model_and_tokenizer(seed=2)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    optimizer, scheduler = make_optimizer(params, lr=0.01, weight_decay=0.0, schedule="constant", warmup=0, total=1)
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        fomaml.meta_step(
            Runtime.local(), model, params, optimizer, scheduler, _episodes(tok),
            inner_lr=0.05, num_inner_steps=1, max_grad_norm=1.0, snapshot=WeightSnapshot(model, "same"),
        )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bf16_autocast_path_runs(tmp_path: Path) -> None:
    """CPU autocast stands in for the GPU bf16 path: losses finite, fp32 master weights saved."""
    settings = train_settings(shared_workspace() / "model")
    settings["compute"].update(mixed_precision="bf16", gradient_checkpointing=True, snapshot_device="same")
    settings["fomaml"].update(total_steps=1, test_freq=1, save_freq=1, meta_batch_size=1)
    from accelerate.state import AcceleratorState

    # accelerate's state is a per-process singleton (a stage is one process); other tests made it "no".
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert _run(settings, tmp_path / "out", tmp_path / "ckpt") == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["meta/loss"]) for r in records[1:])
    assert records[0]["dev/loss_after"] < records[0]["dev/loss_before"] + 1.0
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "out" / "model" / "model.safetensors").values())


ADAM_INNER_LR, ADAM_STEPS = 0.01, 3


def _adam_reference(model: torch.nn.Module, episode: fomaml.Episode) -> tuple[list, list[float], float, list]:
    """By hand: a deep copy, torch.optim.Adam (foreach=False, no weight decay) on the support batches.

    Returns the weights after every inner step, the support loss of every step (before its update),
    the query loss at the adapted weights and its gradient there (the first-order meta-gradient).
    """
    from fomaml_math.batching import sft_loss

    fast = copy.deepcopy(model)
    params = list(fast.parameters())
    optimizer = torch.optim.Adam(params, lr=ADAM_INNER_LR, foreach=False, weight_decay=0.0)
    weights, losses = [], []
    for step in range(ADAM_STEPS):
        optimizer.zero_grad()
        loss, _ = sft_loss(fast, episode.support[step % len(episode.support)])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        weights.append([p.detach().clone() for p in params])
    query_loss, _ = sft_loss(fast, episode.query)
    grads = torch.autograd.grad(query_loss, params)
    return weights, losses, float(query_loss.detach()), [g.detach() for g in grads]


def test_adam_inner_loop_equals_torch_adam_step_by_step(monkeypatch) -> None:
    """FOMAML's inner loop with ``inner_optimizer: adam``: every inner step, the support losses, the query loss
    and the first-order meta-gradient equal a torch.optim.Adam reference; the meta-weights come back; a second
    task starts from fresh Adam moments (two identical episodes give identical results)."""
    model, tok = tiny_model_and_tokenizer(seed=3)
    episode = _episodes(tok)[0]
    want_weights, want_losses, want_query, want_grad = _adam_reference(model, episode)
    meta_weights = [p.detach().clone() for p in model.parameters()]

    seen: list[list[torch.Tensor]] = []
    optimizers: list[str] = []
    original = fomaml.adapted

    def recording(*args: Any, **kwargs: Any) -> Any:
        optimizers.append(kwargs["optimizer"])
        kwargs["on_step"] = lambda _: seen.append([p.detach().clone() for p in model.parameters()])
        return original(*args, **kwargs)

    monkeypatch.setattr(fomaml, "adapted", recording)
    support, query = fomaml.accumulate_meta_gradient(
        Runtime.local(),
        model,
        [episode],
        inner_lr=ADAM_INNER_LR,
        num_inner_steps=ADAM_STEPS,
        snapshot=WeightSnapshot(model, "cpu"),
        inner_optimizer="adam",
    )
    assert optimizers == ["adam"] and len(seen) == ADAM_STEPS
    for step, (got, want) in enumerate(zip(seen, want_weights, strict=True)):
        for (name, _), a, b in zip(model.named_parameters(), got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"inner step {step + 1}: {name}")
    moved = max(float((a - b).abs().max()) for a, b in zip(want_weights[-1], meta_weights, strict=True))
    assert moved > 0.5 * ADAM_INNER_LR  # Adam's first steps move weights by ~lr: the comparison is not vacuous
    assert support.shape == (1, ADAM_STEPS)
    assert support[0].tolist() == pytest.approx(want_losses, rel=1e-6)
    assert query[0] == pytest.approx(want_query, rel=1e-6)
    for (name, p), g in zip(model.named_parameters(), want_grad, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7, msg=name)  # first-order: the query gradient
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), meta_weights, strict=True))  # restored

    # Two identical episodes: the second starts from the restored weights and zero moments, so it repeats the first.
    for p in model.parameters():
        p.grad = None
    seen.clear()
    support, query = fomaml.accumulate_meta_gradient(
        Runtime.local(),
        model,
        [episode, episode],
        inner_lr=ADAM_INNER_LR,
        num_inner_steps=ADAM_STEPS,
        snapshot=WeightSnapshot(model, "cpu"),
        inner_optimizer="adam",
    )
    assert support[0].tolist() == support[1].tolist() and query[0] == query[1]
    for a, b in zip(seen[ADAM_STEPS - 1], seen[2 * ADAM_STEPS - 1], strict=True):
        assert torch.equal(a, b)
    for p, g in zip(model.parameters(), want_grad, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-5, atol=2e-7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), meta_weights, strict=True))


def test_the_configured_inner_optimizer_reaches_every_adaptation(tmp_path: Path, monkeypatch) -> None:
    """``fomaml.inner_optimizer`` goes from the settings to every task's ``adapted`` call, and into the summary."""
    optimizers: list[str] = []
    original = fomaml.adapted

    def recording(*args: Any, **kwargs: Any) -> Any:
        optimizers.append(kwargs["optimizer"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fomaml, "adapted", recording)
    settings = train_settings(shared_workspace() / "model")
    settings["fomaml"].update(inner_optimizer="adam", inner_lr=0.01, total_steps=2, test_freq=2, save_freq=2)
    assert _run(settings, tmp_path / "out", tmp_path / "ckpt") == 0
    assert optimizers == ["adam"] * 2 * settings["fomaml"]["meta_batch_size"]  # the dev monitoring uses kshot's
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["inner_loop"] == {"optimizer": "adam", "lr": 0.01, "num_steps": 2, "batch_size": 4}
    settings["fomaml"]["inner_optimizer"] = "lion"
    with pytest.raises(ConfigError, match=r"fomaml\.inner_optimizer: expected one of \['sgd', 'adam'\]"):
        _run(settings, tmp_path / "out2", tmp_path / "ckpt2")


def test_experiments_that_share_a_training_seed_do_not_share_their_data_order() -> None:
    """Leave-one-subject-out folds train with the same seed integers; their data order is keyed by the training
    tasks too, so their meta-batches differ (independent folds, as the pooled analysis assumes), while the order
    of the task list does not matter and a new seed still changes the stream."""

    def stream(tasks: list[str], seed: int = 0) -> int:
        raw = train_settings("unused", method="fomaml", tasks=tasks) | {"train_seed": seed}
        return TrainSettings.read(raw, "fomaml", lr_key="outer_lr", steps_key="total_steps").stream_seed

    fold_a, fold_b = ["geometry", "number_theory", "prealgebra"], ["algebra", "number_theory", "prealgebra"]
    assert stream(fold_a) != stream(fold_b) and stream(fold_a) != stream(fold_a, seed=1)
    assert stream(fold_a) == stream(list(reversed(fold_a)))
    # Keyed by the seed alone, the two folds draw the same task positions at every step: 2 of the 3 tasks agree.
    same = [fomaml.sample_tasks(0, s, fold_a, 2) == fomaml.sample_tasks(0, s, fold_b, 2) for s in range(50)]
    keyed = [
        fomaml.sample_tasks(stream(fold_a), s, fold_a, 2) == fomaml.sample_tasks(stream(fold_b), s, fold_b, 2)
        for s in range(50)
    ]
    assert sum(same) > sum(keyed)
