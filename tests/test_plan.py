"""The cost plan (parameter count, GPU-hours from the formula) and the run manifest."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from fomaml_math import manifest, plan
from fomaml_math.config import evaluated_tasks, load_config


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


def test_disk_counts_candidates_and_the_checkpoints_of_the_runs_in_training(repo_root: Path) -> None:
    """The peak: every run's kept 4-byte-per-parameter folders, keep_checkpoints + 1 resumable 12-byte checkpoints
    of the one training that runs at a time (4 GPUs, 4 processes), the base model, the generated text."""
    config = load_config(repo_root / "config" / "config.yaml")
    assert config["select"]["criterion"] == "tuned"
    assumptions = plan.Assumptions()
    tuned = plan.build_plan(config, assumptions, Path("/nonexistent"))
    params = tuned["parameters"]
    runs = len(config["experiments"]) * len(config["replicates"]["seeds"])
    assert tuned["candidates_per_run"] == {"fomaml": 2, "sft": 2}  # candidate_freq 2500 of 5000, 15000 of 30000
    parts = tuned["disk_parts_gb"]
    assert parts["kept weights (candidates, final models)"] == pytest.approx(runs * (2 + 2) * 4 * params / 1e9)
    assert parts["checkpoints of the runs in training"] == pytest.approx(1 * (3 + 1) * 12 * params / 1e9)
    assert parts["base model"] == pytest.approx(4 * params / 1e9)
    assert tuned["disk_gb"] == pytest.approx(sum(parts.values()))
    assert tuned["disk_gb"] <= 1000  # the paper run's budget (docs/gpu.md, "Disk")
    config["fomaml"]["candidate_freq"] = None  # every test_freq (1000) step instead: 5 candidates
    config["fomaml"]["test_freq"] = 300  # 5000 / 300: 16 full intervals and the last step
    assert plan.candidate_count(config, "fomaml") == 17
    assert plan.build_plan(config, assumptions, Path("/nonexistent"))["disk_gb"] == pytest.approx(
        tuned["disk_gb"] + runs * (17 - 2) * 4 * params / 1e9
    )
    config["compute"]["keep_finished_checkpoints"] = True  # every run's keep_checkpoints (3 + 3) on top
    kept = plan.build_plan(config, assumptions, Path("/nonexistent"))["disk_parts_gb"]
    key = "checkpoints of finished runs (compute.keep_finished_checkpoints)"
    assert kept[key] == pytest.approx(runs * (3 + 3) * 12 * params / 1e9)
    config["compute"]["keep_finished_checkpoints"] = False
    for criterion, extra in (("best_dev", 4), ("last", 0)):  # best_dev: the best slot while training
        config["select"]["criterion"] = criterion
        result = plan.build_plan(config, assumptions, Path("/nonexistent"))
        assert result["candidates_per_run"] == {"fomaml": 1, "sft": 1}
        assert result["disk_parts_gb"]["kept weights (candidates, final models)"] == pytest.approx(
            runs * 2 * 4 * params / 1e9
        )
        assert result["disk_parts_gb"]["checkpoints of the runs in training"] == pytest.approx(
            ((3 + 1) * 12 + extra) * params / 1e9
        )


def test_plan_cli_prints_jobs_hours_and_assumptions(repo_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert plan.main(["--configfile", str(repo_root / "config" / "config.yaml"), "--tasks-dir", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    expected = (
        "jobs per rule:",
        "GPU-hours (estimate):",
        "MFU 40% of 312 TFLOP/s",
        "NLL; MFU assumed; peak: datasheet",
        "vllm engine asleep while adapting (eval.vllm.sleep): 2 GiB, an assumed residual, unmeasured",
        "tokens per example (assumed",
        "disk:",
    )
    for text in (
        *expected,
        "primary contrast (fomaml - sft, mean over k > 0)",
        "MDE (pp)",
        "alternative designs",
        "GPU-hours by generation backend on a100-80gb",
        "sensitivity: primary MDE",
        "recommended design",
    ):
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


def test_plan_sizes_the_primary_contrast_from_the_assumed_components(repo_root: Path) -> None:
    """The power section is analysis.power on the configured design: hand-checked se and the family's alpha."""
    config = load_config(repo_root / "config" / "config.yaml")
    components, source = plan.assumed_components(config)
    assert source == plan.ASSUMED_SOURCE and components.seed_sd == pytest.approx(
        config["stats"]["assumed"]["seed_sd_pp"] / 100
    )
    section = plan.power_section(config, Path("/nonexistent"), components, source)
    experiments = config["experiments"]
    assert section["family_size"] == len(experiments)
    by_name = {r["experiment"]: r for r in section["experiments"]}
    held_out = next(e for e in experiments if e["meta_test"])
    row = by_name[held_out["name"]]
    # No split data: MATH's 5,000 test problems, 1/7 per subject.
    assert row["problems"] == round(5000 / 7 * len(held_out["meta_test"]))
    s, r, k = (
        len(config["replicates"]["seeds"]),
        config["eval"]["repeats"],
        len([x for x in config["eval"]["shots"] if x]),
    )
    variance = (
        2 * (components.seed_sd**2 + components.draw_sd**2 / (r * k)) / s + components.problem_var / row["problems"]
    )
    assert row["se"] == pytest.approx(math.sqrt(variance))
    assert row["alpha"] == pytest.approx(config["stats"]["alpha"] / len(experiments))
    designs = plan.alternative_designs(config, plan.Assumptions(), Path("/nonexistent"), components)
    configured = [d for d in designs if d["seeds"] == s and d["draws"] == r and d["test_subset"] == "all"]
    assert len(configured) == 1
    assert configured[0]["mde_pp"][held_out["name"]] == pytest.approx(100 * row["mde"])
    # More seeds: smaller MDE, more GPU-hours.
    more = [d for d in designs if d["seeds"] > s and d["draws"] == r and d["test_subset"] == "all"]
    assert all(d["mde_pp"][held_out["name"]] < configured[0]["mde_pp"][held_out["name"]] for d in more)
    assert all(d["gpu_hours"] > configured[0]["gpu_hours"] for d in more)


def test_the_metaloop_row_is_priced(demo_config: dict, tmp_path: Path) -> None:
    """eval.metaloop_row: one more evaluation per FOMAML run and k > 0, adapted num_inner_steps steps of
    min(k, inner_batch_size) shots, generated and scored like the others; off, nothing."""
    assumptions = plan.Assumptions(mfu=0.5, peak_tflops=100.0, decode_tokens_per_s=2500.0, example_tokens=50.0)
    on = plan.build_plan(demo_config, assumptions, tmp_path / "no-data")
    off = plan.build_plan({**demo_config, "eval": {**demo_config["eval"], "metaloop_row": False}}, assumptions,
                          tmp_path / "no-data")  # fmt: skip
    fo, ev = demo_config["fomaml"], demo_config["eval"]
    names = demo_config["tasks"]["names"]
    (experiment,) = demo_config["experiments"]
    evaluated = evaluated_tasks(demo_config, experiment["name"])  # the demo: its held-out rows only
    assert evaluated == experiment["meta_test"] and len(evaluated) < len(names) - len(experiment["meta_val"])
    params = on["parameters"]
    problems = on["assumptions"]["test_problems"] * len(evaluated) / len(names)  # assumed: equal per task
    runs = len(demo_config["experiments"]) * len(demo_config["replicates"]["seeds"])
    adapted = [k for k in ev["shots"] if k > 0]
    conditions = runs * len(adapted) * ev["repeats"]
    adapt = runs * ev["repeats"] * len(evaluated) * sum(
        6 * params * min(k, fo["inner_batch_size"]) * 50.0 * fo["num_inner_steps"] for k in adapted
    )  # fmt: skip
    flops = adapt + problems * conditions * 2 * params * 50.0
    decoded = problems * conditions * ev["max_new_tokens"] * assumptions.mean_generated_fraction
    expected = flops / (100e12 * 0.5) / 3600 + decoded / assumptions.decode_tokens_per_s / 3600
    assert on["gpu_hours"]["evaluate_metaloop"] == pytest.approx(expected)
    assert on["jobs"]["evaluate_metaloop"] == runs * len(adapted) == 12
    assert off["jobs"]["evaluate_metaloop"] == 0 and off["gpu_hours"]["evaluate_metaloop"] == 0
    assert on["gpu_hours_total"] == pytest.approx(off["gpu_hours_total"] + expected)


def test_the_negative_control_is_priced(demo_config: dict, tmp_path: Path) -> None:
    """The control: replicates.control_draws draws of one model at each control k, on its experiment's held-out
    tasks only (the demo: 8 draws x 3 tasks at 5 shots), adapted, generated and scored like the others."""
    assumptions = plan.Assumptions(mfu=0.5, peak_tflops=100.0, decode_tokens_per_s=2500.0, example_tokens=50.0)
    on = plan.build_plan(demo_config, assumptions, tmp_path / "no-data")
    replicates = {**demo_config["replicates"], "negative_control": False}
    off = plan.build_plan({**demo_config, "replicates": replicates}, assumptions, tmp_path / "no-data")
    ev, params = demo_config["eval"], on["parameters"]
    problems = on["assumptions"]["test_problems"] * 3 / len(demo_config["tasks"]["names"])  # the 3 held-out tasks
    flops = 8 * 3 * 6 * params * 5 * 50.0 * ev["num_inner_steps"] + problems * 8 * 2 * params * 50.0
    decoded = problems * 8 * ev["max_new_tokens"] * assumptions.mean_generated_fraction
    expected = flops / (100e12 * 0.5) / 3600 + decoded / assumptions.decode_tokens_per_s / 3600
    assert on["gpu_hours_total"] == pytest.approx(off["gpu_hours_total"] + expected)
    assert on["jobs"]["evaluate"] == off["jobs"]["evaluate"] + 1


def test_split_data_of_another_source_is_not_used(repo_root: Path, tmp_path: Path) -> None:
    """After `make demo`, results/data/tasks holds synthetic tasks: the paper config (hub) must not count them."""
    paper, demo = (load_config(repo_root / "config" / name) for name in ("config.yaml", "demo.yaml"))
    tasks = tmp_path / "data" / "tasks"
    tasks.mkdir(parents=True)
    (tmp_path / "data" / "ingest_report.json").write_text(json.dumps({"source": "synthetic"}))
    assert plan.split_data_for(demo, tasks) == tasks
    assert not plan.split_data_for(paper, tasks).exists()
