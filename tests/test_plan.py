"""The cost plan (parameter count, GPU-hours from the formula) and the run manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fomaml_math import manifest, plan
from fomaml_math.config import load_config


def test_parameter_count_by_hand_and_against_transformers() -> None:
    arch = {"vocab_size": 10, "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2, "tie_word_embeddings": True}  # fmt: skip
    # q,o: 4*2*2 each; k,v: 4*1*2 each; q/k norms 2+2; MLP 3*4*8; two RMSNorms 2*4; embeddings 10*4; final norm 4
    assert plan.parameter_count(arch) == (16 + 16 + 8 + 8 + 4) + 96 + 8 + 40 + 4 == 200
    from transformers import Qwen3Config, Qwen3ForCausalLM

    for shape in (arch, {**arch, "num_hidden_layers": 3, "hidden_size": 8, "num_attention_heads": 4}):
        model = Qwen3ForCausalLM(Qwen3Config(**shape))
        assert plan.parameter_count(shape) == sum(p.numel() for p in model.parameters())


def test_the_paper_model_is_known_offline(repo_root: Path) -> None:
    config = load_config(repo_root / "config" / "config.yaml")
    params = plan.parameter_count(plan.architecture(config))
    assert 4.0e9 < params < 4.05e9  # Qwen3-4B: "4.0B parameters"


def test_training_hours_follow_the_formula(demo_config: dict, tmp_path: Path) -> None:
    assumptions = plan.Assumptions(mfu=0.5, peak_tflops=100.0, example_tokens=50.0)
    result = plan.build_plan(demo_config, assumptions, tmp_path / "no-data")
    fo = demo_config["fomaml"]
    params = plan.parameter_count(plan.architecture(demo_config))
    arch = demo_config["model"]["tiny"]
    per_token = 6 * params + 6 * arch["num_hidden_layers"] * arch["hidden_size"] * 50.0
    tokens = fo["total_steps"] * fo["meta_batch_size"] * (fo["num_inner_steps"] * fo["inner_batch_size"]
                                                          + fo["query_batch_size"]) * 50.0  # fmt: skip
    runs = len(demo_config["experiments"]) * len(demo_config["replicates"]["seeds"])
    expected = runs * tokens * per_token / (100e12 * 0.5) / 3600
    assert result["gpu_hours"]["train_fomaml"] == pytest.approx(expected)
    assert result["jobs"]["train"] == 2 * runs and result["jobs"]["calibrate"] == 2 * runs + 1


def test_plan_cli_prints_jobs_hours_and_assumptions(repo_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert plan.main(["--configfile", str(repo_root / "config" / "config.yaml"), "--tasks-dir", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    for text in ("jobs per rule:", "GPU-hours (estimate):", "MFU 40%", "tokens per example (assumed", "disk:"):
        assert text in out, text


def test_manifest_records_commit_config_data_hash_and_versions(tmp_path: Path, demo_config: dict) -> None:
    data = tmp_path / "table.parquet"
    data.write_bytes(b"rows")
    out = tmp_path / "manifest.json"
    argv = ["--config-json", json.dumps(demo_config), "--data", str(data), "--output", str(out)]
    assert manifest.main(argv) == 0
    written = json.loads(out.read_text())
    assert written["config"] == json.loads(json.dumps(demo_config))
    expected = hashlib.sha256(str(data).encode() + b"\0" + b"rows").hexdigest()
    assert written["data"]["sha256"] == expected
    assert written["packages"]["torch"] and written["packages"]["snakemake"]
    assert isinstance(written["git"]["dirty"], bool) and len(written["git"]["commit"]) == 40
    assert written["base_model"]["source"] == "built locally"
