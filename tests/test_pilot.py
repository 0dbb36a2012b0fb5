"""Sizing the study from a pilot: the GPU catalog, pricing per backend, what jobs record about their cost, the
upper confidence bounds of the variance components, the sensitivity table, and the shipped config/pilot.yaml."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as scipy_stats
from test_stats import synthetic_eval_frame
from workflow_utils import make_workspace, snakemake

from fomaml_math import hardware, measured, pilot, plan, sizing
from fomaml_math.analysis.power import Design, VarianceComponents, estimate_components, plan_contrast
from fomaml_math.config import load_config, validate_config
from fomaml_math.errors import ConfigError

NO_DATA = Path("/nonexistent")


@pytest.fixture()
def paper(repo_root: Path) -> dict:
    return load_config(repo_root / "config" / "config.yaml")


# ------------------------------------------------------------------------------------------------ GPU catalog
def test_the_schema_offers_exactly_the_catalog(repo_root: Path) -> None:
    schema = yaml.safe_load((repo_root / "workflow" / "schemas" / "config.schema.yaml").read_text())
    gpu = schema["properties"]["compute"]["properties"]["gpu"]
    assert gpu["enum"] == list(hardware.GPUS) and gpu["default"] == hardware.DEFAULT_GPU == "a100-80gb"
    with pytest.raises(ConfigError, match=r"compute.gpu: unknown GPU 'v100'"):
        hardware.gpu("v100")


def test_decode_assumptions_scale_with_bandwidth_and_hf_is_a_quarter_of_vllm() -> None:
    a100 = hardware.decode_assumption("a100-80gb", "vllm")
    assert a100.tokens_per_s == pytest.approx(3360.0) and not a100.measured and "A100" in a100.source
    h100 = hardware.decode_assumption("h100-80gb", "vllm")
    assert h100.tokens_per_s == pytest.approx(round(3363 * 3.35 / 2.039, -1))
    assert hardware.decode_assumption("h100-80gb", "hf").tokens_per_s == pytest.approx(
        round(3363 * 3.35 / 2.039 / 4, -1)
    )
    with pytest.raises(ConfigError, match=r"eval\.backend"):
        hardware.decode_assumption("h200", "tgi")


@pytest.mark.parametrize(
    ("device", "name"),
    [("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100 80GB PCIe", "a100-80gb"),
     ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA H100 PCIe", "h100-pcie"),
     ("NVIDIA H200", "h200"), ("NVIDIA GeForce RTX 4090", None), (None, None)],
)  # fmt: skip
def test_torch_device_names_map_to_the_catalog(device: str | None, name: str | None) -> None:
    assert measured.catalog_gpu(device) == name


# ------------------------------------------------------------------------------------------------ pricing
def test_training_is_priced_at_the_configured_gpus_peak(paper: dict) -> None:
    a100 = plan.build_plan(paper, plan.Assumptions(), NO_DATA)
    h100 = plan.build_plan({**paper, "compute": {**paper["compute"], "gpu": "h100-80gb"}}, plan.Assumptions(), NO_DATA)
    assert a100["assumptions"]["peak_tflops_per_gpu"] == 312.0 and h100["assumptions"]["peak_tflops_per_gpu"] == 989.0
    assert a100["gpu_hours"]["train_fomaml"] == pytest.approx(h100["gpu_hours"]["train_fomaml"] * 989 / 312)
    given = plan.build_plan(paper, plan.Assumptions(peak_tflops=989.0), NO_DATA)
    assert given["gpu_hours"]["train_fomaml"] == pytest.approx(h100["gpu_hours"]["train_fomaml"])


def test_json_prices_both_backends_with_their_sources(repo_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert plan.main(["--configfile", str(repo_root / "config" / "config.yaml"), "--tasks-dir", "/x", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_backend = out["gpu_hours_by_backend"]
    assert set(by_backend) == {"hf", "vllm"}
    assert out["gpu_hours"] == by_backend["hf"]["gpu_hours"]  # the paper config generates with hf
    hf, vllm = by_backend["hf"], by_backend["vllm"]
    assert hf["label"] == vllm["label"] == "assumed" and "blog.vllm.ai" in hf["source"] and "A100" in vllm["source"]
    # Same work, other decode rate: every generation row's decoded tokens agree; training does not move.
    assert hf["gpu_hours"]["train_fomaml"] == vllm["gpu_hours"]["train_fomaml"]
    tokens = hf["gpu_hours"]["evaluate_generation"] * hf["decode_tokens_per_s_per_gpu"]
    assert vllm["gpu_hours"]["evaluate_generation"] * vllm["decode_tokens_per_s_per_gpu"] == pytest.approx(tokens)
    assert vllm["gpu_hours_total"] < hf["gpu_hours_total"]
    assert out["assumptions"]["decode_label"] == "assumed" and out["assumptions"]["gpu"] == "a100-80gb"
    assert out["power"]["components"]["label"] == "assumed" and out["assumptions"]["train_label"] == "assumed"


# ------------------------------------------------------------------------------------------------ recording
def test_an_evaluation_records_its_tokens_seconds_and_device() -> None:
    infos = [{"gen_tokens": 300, "generate_s": 2.0, "n": 10}, {"gen_tokens": 100, "generate_s": 2.0, "n": 10}]
    record = measured.evaluation(infos, model="m", backend="hf", max_new_tokens=64, device="cpu")
    assert record["decode_tokens_per_s"] == 100.0 and record["mean_generated_tokens"] == 20.0
    assert record["answers"] == 20 and record["gpu"] is None and record["peak_gpu_memory_gib"] is None
    train = measured.training(model="m", tokens=8000, seconds=10.0, processes=4, device="cpu")
    assert train["tokens_per_s_per_gpu"] == 200.0


# ------------------------------------------------------------------------------------------------ upper bounds
def test_the_variance_bound_covers_at_its_level() -> None:
    """s² df / χ²_{0.2}(df) lies above σ² in 80% of normal samples (Monte Carlo, 40,000 samples of 5)."""
    rng = np.random.default_rng(3)
    samples = rng.normal(0.0, 2.0, (40_000, 5)).var(axis=1, ddof=1)
    covered = np.mean(samples * pilot.variance_factor(4) >= 4.0)
    assert covered == pytest.approx(0.80, abs=0.01)
    assert pilot.variance_factor(4) == pytest.approx(4 / scipy_stats.chi2.ppf(0.2, 4))


def test_bounds_from_a_pilot_frame_follow_the_hand_formula() -> None:
    frame = synthetic_eval_frame(experiments={"pilot": ()})  # 3 seeds per arm, k 5 and 10, 2 draws
    bound = pilot.bound_components(frame)
    point = estimate_components(frame)
    assert bound.point == point
    assert bound.seed_df == 2 * (3 - 1) and bound.cells == 2 * 2
    assert bound.draw_df == 2 * 3 * 2 * (2 - 1)
    f_seed, f_draw = pilot.variance_factor(4), pilot.variance_factor(12)
    seed_var = (point.seed_sd**2 + point.draw_sd**2 / 4) * f_seed - point.draw_sd**2 / 4
    assert bound.upper.seed_sd == pytest.approx(math.sqrt(max(0.0, seed_var)))
    assert bound.upper.draw_sd == pytest.approx(point.draw_sd * math.sqrt(f_draw))
    assert bound.upper.problem_var == point.problem_var


# ------------------------------------------------------------------------------------------------ --pilot
def _pilot_results(root: Path, config: dict, *, gpu: str | None, model: str) -> Path:
    """A finished pilot's results/ tree: real eval parquet files, eval summaries and train summaries with the
    ``measured`` entries the jobs write (the GPU facts set as a GPU run records them)."""
    frame = synthetic_eval_frame(inits=("sft", "fomaml"), experiments={"pilot": ()})
    max_new = config["eval"]["max_new_tokens"]
    for (init, seed, shots), group in frame.groupby(["init", "train_seed", "shots"]):
        run = root / "pilot" / init / f"seed-{seed}"
        (run / "eval").mkdir(parents=True, exist_ok=True)
        group.to_parquet(run / "eval" / f"shots-{shots}.parquet", index=False)
        infos = [{"gen_tokens": 1000 * len(group), "generate_s": 4.0 * len(group), "n": len(group)}]
        record = measured.evaluation(infos, model=model, backend="hf", max_new_tokens=max_new, device="cpu")
        train = measured.training(model=model, tokens=6_000_000, seconds=1000.0, processes=4, device="cpu")
        if gpu is not None:
            facts = {"gpu": gpu, "gpu_name": "NVIDIA A100-SXM4-80GB", "peak_gpu_reserved_gib": 61.5}
            record, train = {**record, **facts}, {**train, **facts, "peak_gpu_reserved_gib": 70.25}
        (run / "eval" / f"shots-{shots}.summary.json").write_text(json.dumps({"measured": record}))
        (run / "train_summary.json").write_text(json.dumps({"measured": train}))
    return root


def test_pilot_on_the_study_gpu_replaces_the_assumptions(paper: dict, tmp_path: Path, capsys) -> None:
    results = _pilot_results(tmp_path / "results", paper, gpu="a100-80gb", model=paper["model"]["name_or_path"])
    found = pilot.measurements(results, paper)
    hf = found["decode_tokens_per_s"]["hf"]
    assert hf["label"] == pilot.MEASURED and hf["value"] == pytest.approx(250.0)  # 1000 tokens per answer / 4 s
    assert found["mean_generated_tokens"]["value"] == pytest.approx(1000.0)
    assert found["train_tokens_per_s_per_gpu"]["value"] == pytest.approx(1500.0)  # 6e6 / (1000 s x 4)
    assert found["peak_gpu_memory_gib"]["train"]["value"] == 70.25
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(paper))
    argv = ["--configfile", str(config_file), "--tasks-dir", "/x", "--pilot", str(results)]
    assert plan.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    a = out["assumptions"]
    assert a["decode_label"] == a["mean_generated_tokens_label"] == a["train_label"] == "measured"
    assert a["decode_tokens_per_s_per_gpu"] == pytest.approx(250.0) and a["mean_generated_tokens"] == 1000.0
    assert out["gpu_hours_by_backend"]["vllm"]["label"] == "assumed"  # the pilot generated with hf only
    runs = len(paper["experiments"]) * len(paper["replicates"]["seeds"])
    assert out["gpu_hours"]["train_sft"] == pytest.approx(runs * a["sft_tokens_per_run"] / 1500.0 / 3600)
    variance = out["pilot"]["variance"]
    assert variance["seed_sd_pp"]["upper"] >= variance["seed_sd_pp"]["measured"]
    assert out["power"]["components"]["seed_sd_pp"] == pytest.approx(variance["seed_sd_pp"]["upper"])
    assert out["power"]["components"]["label"] == "measured (upper bounds)"
    assert plan.main(argv) == 0
    text = capsys.readouterr().out
    assert "80% upper bound (4 df), used for sizing" in text and "decoding (hf): 250 tokens/s per GPU measured" in text


def test_a_cpu_demo_is_not_transferable(paper: dict, tmp_path: Path) -> None:
    results = _pilot_results(tmp_path / "results", paper, gpu=None, model="results/models/tiny-base")
    found = pilot.measurements(results, paper)
    for entry in (found["decode_tokens_per_s"]["hf"], found["mean_generated_tokens"],
                  found["train_tokens_per_s_per_gpu"], found["peak_gpu_memory_gib"]["evaluate"]):  # fmt: skip
        assert entry["label"] == pilot.NOT_TRANSFERABLE and entry["value"] is None
        assert "tiny-base on CPU" in entry["source"]
    assumptions, decode = pilot.apply_measured(paper, plan.Assumptions(), {"hf": None, "vllm": None}, found)
    assert assumptions == plan.Assumptions() and decode == {"hf": None, "vllm": None}
    on_other_gpu = _pilot_results(tmp_path / "h200", paper, gpu="h200", model=paper["model"]["name_or_path"])
    (tmp_path / "old" / "pilot" / "sft" / "seed-0").mkdir(parents=True)  # a run from before summaries recorded it
    (tmp_path / "old" / "pilot" / "sft" / "seed-0" / "train_summary.json").write_text(json.dumps({"tokens": 1}))
    assert pilot.measurements(tmp_path / "old", paper)["train_tokens_per_s_per_gpu"]["label"] == pilot.NOT_RECORDED
    other = pilot.measurements(on_other_gpu, paper)
    assert other["decode_tokens_per_s"]["hf"]["label"] == pilot.NOT_TRANSFERABLE
    assert other["mean_generated_tokens"]["label"] == pilot.MEASURED  # the answers' length does not depend on the GPU


# ------------------------------------------------------------------------------------------------ sensitivity
def test_sensitivity_is_the_power_model_on_a_grid(paper: dict) -> None:
    components, _ = plan.assumed_components(paper)
    section = sizing.sensitivity(lambda c: plan.power_section(paper, NO_DATA, c, ""), components)
    assert section["seed_sd_pp"] == pytest.approx([100 * components.seed_sd * f for f in sizing.SD_FACTORS])
    grid = section["experiments"]["in_domain"]
    design = plan.primary_design(paper, NO_DATA, "in_domain")
    for i, seed_sd in enumerate(section["seed_sd_pp"]):
        for j, draw_sd in enumerate(section["draw_sd_pp"]):
            expected = plan_contrast(VarianceComponents.from_pp(seed_sd, draw_sd, components.problem_var), design,
                                     alpha=0.05, family_size=2, target=0.03)  # fmt: skip
            assert grid[i][j]["mde_pp"] == pytest.approx(100 * expected.mde)
            assert grid[i][j]["power_at_target"] == pytest.approx(expected.power_at_target)
    mdes = [[c["mde_pp"] for c in row] for row in grid]
    assert all(np.diff(row).min() > 0 for row in mdes) and all(
        np.diff(col).min() > 0 for col in zip(*mdes, strict=True)
    )


def test_designs_below_the_minimum_are_exploratory_and_the_recommendation_is_the_cheapest_that_reaches(
    paper: dict,
) -> None:
    components, _ = plan.assumed_components(paper)
    designs = plan.alternative_designs(paper, plan.Assumptions(), NO_DATA, components)
    assert {d["seeds"] for d in designs if d["exploratory"]} == {3}
    paper["stats"]["primary"]["min_seeds_confirmatory"] = 8  # a key stats adds; read with its default 5
    assert sizing.min_seeds_confirmatory(paper) == 8
    rows = [
        {"seeds": seeds, "draws": draws, "test_subset": "all", "mde_pp": {"a": a, "b": b}, "gpu_hours": hours}
        for seeds, draws, a, b, hours in ((5, 3, 2.9, 2.5, 900.0), (8, 3, 2.1, 2.0, 1400.0), (5, 5, 2.6, 3.4, 800.0),
                                          (3, 3, 2.0, 2.0, 100.0))
    ]  # fmt: skip
    assert sizing.recommend(rows, 3.0, 5)["gpu_hours"] == 900.0
    assert sizing.recommend(rows, 2.0, 5) == {**rows[1], "reaches_target": False}
    assert sizing.recommend(rows, 3.0, 10) is None


# ------------------------------------------------------------------------------------------------ the pilot config
def test_the_pilot_config_is_a_small_complete_study_of_the_paper_model(repo_root: Path, paper: dict) -> None:
    from snakemake.utils import update_config

    raw = yaml.safe_load((repo_root / "config" / "pilot.yaml").read_text())
    merged = copy.deepcopy(yaml.safe_load((repo_root / "config" / "config.yaml").read_text()))
    update_config(merged, copy.deepcopy(raw))
    pilot_config = validate_config(raw)
    assert validate_config(merged) == pilot_config  # complete: merged over config.yaml or alone, the same
    for key in ("model", "data", "compute", "prompt", "calibration"):
        assert pilot_config[key] == paper[key], key
    ev, study = pilot_config["eval"], paper["eval"]
    assert {k: v for k, v in ev.items() if k != "metaloop_row"} == {
        k: v for k, v in study.items() if k != "metaloop_row"
    }
    assert len(pilot_config["replicates"]["seeds"]) >= 2 and pilot_config["tasks"]["split"]["test_subset"] == "math500"
    assert pilot_config["fomaml"]["total_steps"] < paper["fomaml"]["total_steps"]
    small = plan.build_plan(pilot_config, plan.Assumptions(), NO_DATA)["gpu_hours_total"]
    study_hours = plan.build_plan(paper, plan.Assumptions(), NO_DATA)["gpu_hours_total"]
    assert small < 0.1 * study_hours


def test_the_pilot_config_dry_runs(tmp_path: Path) -> None:
    root = make_workspace(tmp_path, config_name="pilot.yaml")
    result = snakemake(root, "--dry-run", "--resources", "gpu=4")
    output = result.stdout + result.stderr
    assert "results/pilot/fomaml/seed-2" in output and "results/in_domain" not in output
    table = pd.Series(dict(line.split() for line in output.split("Job stats:")[1].split("total")[0].splitlines()[3:]))
    assert int(table["train"]) == 6 and int(table["evaluate"]) == 2 * 3 * 5


def test_design_checked_against_the_power_model(paper: dict) -> None:
    """The configured design's row is analysis.power's plan_contrast on the same design (no sizing of its own)."""
    components, _ = plan.assumed_components(paper)
    row = plan.power_section(paper, NO_DATA, components, "")["experiments"][0]
    design = Design(row["seeds"], row["draws"], row["shot_counts"], row["problems"])
    assert row["mde"] == plan_contrast(components, design, alpha=0.05, family_size=2, target=0.03).mde
