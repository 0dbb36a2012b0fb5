"""The whole DAG through real Snakemake runs on config/test.yaml, and what a change reruns.

One full run (module fixture); each scenario works on a copy of that finished workspace, whose
results and .snakemake metadata are copied with their modification times.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fomaml_math.evaluation.choice import read_choice
from tests.workflow_utils import make_workspace, planned_jobs, planned_outputs, read_config, snakemake, write_config

pytestmark = pytest.mark.slow

RUN = "main/{method}/seed-0"


def runs(config: dict) -> dict[str, str]:
    """Initialisation instance -> its folder under results/ (the base, tuned per experiment, and every trained run)."""
    out = {}
    for experiment in config["experiments"]:
        out[f"{experiment['name']}/base"] = f"{experiment['name']}/base"
        for method in ("sft", "fomaml"):
            for seed in config["replicates"]["seeds"]:
                out[f"{experiment['name']}/{method}/{seed}"] = f"{experiment['name']}/{method}/seed-{seed}"
    return out


def executed(result) -> dict[str, int]:
    """Rule -> number of jobs a finished Snakemake run executed (from its log)."""
    counts: dict[str, int] = {}
    for rule in re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", result.stdout + result.stderr):
        counts[rule] = counts.get(rule, 0) + 1
    counts.pop("all", None)
    return counts


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("full"), eval__metaloop_row=True)  # with the secondary row
    snakemake(root)
    snakemake(root, "--report", "results/report.html")
    return root


@pytest.fixture()
def workspace(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ws"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


def test_full_dag_outputs(finished):
    config = read_config(finished)
    shots = config["eval"]["shots"]
    tasks = finished / "results/data/tasks"
    for label, folder in runs(config).items():
        init = label.split("/")[1]
        path = finished / f"results/{folder}/calibration.json"
        calibration = json.loads(path.read_text())
        assert calibration["init"] == init and calibration["tasks"] == sorted(config["tasks"]["names"])
        # the tuner's grid: calibration.lr_grid and fomaml.inner_lr (always tried too)
        assert calibration["lr_grid"] == sorted({*config["calibration"]["lr_grid"], config["fomaml"]["inner_lr"]})
        assert all(e["lr"] in calibration["lr_grid"] for e in calibration["chosen"] if e["shots"] > 0)
        if init != "base":  # best_dev: training kept one candidate, the selected step, and the tuner adapts it
            selected = json.loads((finished / f"results/{folder}/train_summary.json").read_text())["selected_step"]
            assert {e["checkpoint"] for e in calibration["chosen"]} == {selected}
        for k in shots:
            frame = pd.read_parquet(finished / f"results/{folder}/eval/shots-{k}.parquet")
            assert set(frame["init"]) == {init} and set(frame["shots"]) == {k}
            assert set(frame["task"]) == set(config["tasks"]["names"])
            assert set(frame["repeat"]) == ({0} if k == 0 else set(range(config["eval"]["repeats"])))
            if k > 0:  # the tuned adaptation (of k's band) is the one the evaluation adapted with
                choice = read_choice(path, k)
                assert set(frame["adapt_lr"]) == {choice.lr} and set(frame["adapt_steps"]) == {choice.num_steps}
            for task in config["tasks"]["names"]:
                rows = frame[frame["task"] == task]
                dev_pool = set(pd.read_parquet(tasks / task / "dev_pool.parquet")["id"])
                test = pd.read_parquet(tasks / task / "test.parquet")
                shot_ids = {s for joined in rows["shot_ids"] for s in joined.split(",") if s}
                assert shot_ids <= dev_pool  # shots only from dev_pool
                assert set(rows["problem_id"]) <= set(test["id"])
                assert set(test["source_split"]) == {"test"}
    for method in ("fomaml", "sft"):
        folder = finished / "results" / RUN.format(method=method)
        assert (folder / "model/config.json").exists()
        summary = json.loads((folder / "train_summary.json").read_text())
        assert summary["selection"]["criterion"] == "best_dev" and 1 <= summary["selected_step"] <= summary["steps"]
        metrics = pd.read_csv(folder / "metrics.csv")
        assert "dev/loss_after" in metrics.columns and not any(c.startswith("heldout/") for c in metrics.columns)
    control = sorted((finished / f"results/{RUN.format(method='fomaml')}/eval-control").glob("*.parquet"))
    _check_metaloop_row(finished, config)
    assert [p.name for p in control] == [f"shots-{k}.parquet" for k in shots if k > 0]
    for name in ("accuracy", "comparisons", "primary", "per_shot", "generation", "adaptation", "control"):
        assert not pd.read_csv(finished / f"results/stats/{name}.tsv", sep="\t").empty, name
    for figure in ("accuracy_vs_shots", "gain_heatmap", "training_curves", "calibration"):
        assert (finished / f"results/figures/{figure}.pdf").stat().st_size > 0
        assert (finished / f"results/figures/{figure}.png").stat().st_size > 0
    summary = (finished / "results/summary.md").read_text()
    sections = ("## Answer", "Per-shot comparisons", "Positive control", "Negative control", "Generation")
    for section in (*sections, "Adaptation effect", "Tuning"):
        assert section in summary, section
    assert "Positive control detected" in summary or "Positive control not detected" in summary
    assert (finished / "results/report.html").stat().st_size > 10_000
    assert json.loads((finished / "results/env/report.json").read_text())["ok"] is True


def _check_metaloop_row(finished: Path, config: dict) -> None:
    """The secondary row: FOMAML's k > 0 evaluations again with the inner loop it was meta-trained with, on the same
    weights' problems and shots (paired with the primary rows); in the accuracy tables and a secondary comparison."""
    folder = finished / "results" / RUN.format(method="fomaml")
    fo = config["fomaml"]
    inner = json.loads((folder / "train_summary.json").read_text())["inner_loop"]  # what meta-training used
    assert (inner["lr"], inner["num_steps"], inner["batch_size"]) == (
        fo["inner_lr"], fo["num_inner_steps"], fo["inner_batch_size"]
    )  # fmt: skip
    assert sorted(p.name for p in (folder / "eval-metaloop").glob("*.parquet")) == [
        f"shots-{k}.parquet" for k in config["eval"]["shots"] if k > 0
    ]
    assert not (finished / "results" / RUN.format(method="sft") / "eval-metaloop").exists()
    for k in [k for k in config["eval"]["shots"] if k > 0]:
        meta = pd.read_parquet(folder / f"eval-metaloop/shots-{k}.parquet")
        primary = pd.read_parquet(folder / f"eval/shots-{k}.parquet")
        keys = ["init", "task", "shots", "repeat", "problem_id", "shot_ids", "shot_seed", "train_seed"]
        pd.testing.assert_frame_equal(meta[keys], primary[keys])
        assert set(meta["adapt_protocol"]) == {"meta_inner_loop"} and set(primary["adapt_protocol"]) == {"all_shots"}
        used = set(zip(meta["adapt_optimizer"], meta["adapt_lr"], meta["adapt_steps"], strict=True))
        assert used == {(inner["optimizer"], fo["inner_lr"], fo["num_inner_steps"])}
        summary = json.loads((folder / f"eval-metaloop/shots-{k}.summary.json").read_text())
        assert summary["model"] == json.loads((folder / f"eval/shots-{k}.summary.json").read_text())["model"]
    accuracy = pd.read_csv(finished / "results/stats/accuracy.tsv", sep="\t")
    assert set(accuracy.loc[accuracy["init"] == "fomaml_metaloop", "shots"]) == {
        k for k in config["eval"]["shots"] if k
    }
    comparisons = pd.read_csv(finished / "results/stats/comparisons.tsv", sep="\t")
    assert set(comparisons.loc[comparisons["comparison"] == "fomaml_metaloop-fomaml", "family"]) == {"secondary"}
    assert set(pd.read_csv(finished / "results/stats/primary.tsv", sep="\t")["contrast"]) == {"fomaml-sft"}
    summary_md = (finished / "results/summary.md").read_text()
    assert "| Shots | Base | SFT | FOMAML | FOMAML (meta-training inner loop) |" in summary_md
    assert "## Secondary: FOMAML (meta-training inner loop)" in summary_md


def test_test_files_are_read_only_by_the_evaluation(tmp_path):
    """Of every job the DAG plans, only `evaluate` (and `evaluate_base`) reads a task's test.parquet to score it;
    the offline tiny base's pretraining reads the test problem texts only to exclude them from its corpus
    (decontamination)."""
    root = make_workspace(tmp_path, eval__metaloop_row=True)
    result = snakemake(root, "--dry-run")
    rule = None
    readers = set()
    for line in (result.stdout + result.stderr).splitlines():
        if match := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line):
            rule = match.group(1)
        elif line.strip().startswith("input:") and "/test.parquet" in line:
            readers.add(rule)
    assert readers == {"evaluate", "evaluate_base", "evaluate_metaloop", "pretrain_tiny_base"}


def test_a_second_run_does_nothing(workspace):
    assert planned_jobs(workspace) == {}


def test_b_adding_a_shot_count_reruns_only_new_evaluations_and_analysis(workspace):
    config = read_config(workspace)
    write_config(workspace, config, eval__shots=[*config["eval"]["shots"], 3])
    instances = len(runs(config))
    # one new evaluation per initialisation instance, and the negative control's new shot count
    # (and the manifest, which records the resolved config)
    assert planned_jobs(workspace) == {
        "evaluate": instances,  # the trained runs' (instances - 1) and the control's
        "evaluate_base": 1,
        "evaluate_metaloop": 1,  # the FOMAML run's secondary row at the new k
        "stats": 1,
        "figures": 1,
        "summary": 1,
        "manifest": 1,
    }
    evals = [p for p in planned_outputs(workspace) if p.endswith("shots-3.parquet")]
    expected = [f"results/{folder}/eval/shots-3.parquet" for folder in runs(config).values()]
    extra = [
        f"results/{RUN.format(method='fomaml')}/{kind}/shots-3.parquet" for kind in ("eval-control", "eval-metaloop")
    ]
    assert sorted(evals) == sorted([*expected, *extra])
    snakemake(workspace)
    assert planned_jobs(workspace) == {}


def test_c_changing_inner_lr_reruns_fomaml_and_what_follows_only(workspace):
    config = read_config(workspace)
    shots = config["eval"]["shots"]

    def choices() -> dict[tuple[str, int], object]:
        return {(f, k): read_choice(workspace / f"results/{f}/calibration.json", k) for f in runs(config).values()
                for k in shots}  # fmt: skip

    before = choices()
    write_config(workspace, config, fomaml__inner_lr=config["fomaml"]["inner_lr"] * 2)
    outputs = planned_outputs(workspace)
    assert f"results/{RUN.format(method='fomaml')}/train_summary.json" in outputs
    assert not [p for p in outputs if p.startswith(("results/data/", f"results/{RUN.format(method='sft')}/model"))]
    result = snakemake(workspace)
    ran = executed(result)
    # The rate FOMAML was trained with joins every initialisation's calibration grid (the same grid for all).
    assert ran.get("train") == 1 and ran.get("calibrate") == len(runs(config)) - 1 and ran.get("calibrate_base") == 1
    after = choices()
    fomaml_run = RUN.format(method="fomaml")
    # Evaluations rerun for FOMAML (new model, and its control) and wherever the chosen adaptation changed, only.
    changed = {key for key in after if after[key] != before[key] or key[0] == fomaml_run}
    expected_evals = len(changed) + len([k for k in shots if k > 0])
    assert ran.get("evaluate", 0) + ran.get("evaluate_base", 0) == expected_evals, (ran, changed)
    assert ran.get("evaluate_metaloop") == len([k for k in shots if k > 0])  # the new model's secondary row
    assert "split_tasks" not in ran and "ingest" not in ran
    assert planned_jobs(workspace) == {}


def test_d_deleting_a_figure_reruns_only_the_figures(workspace):
    (workspace / "results/figures/gain_heatmap.png").unlink()
    assert planned_jobs(workspace) == {"figures": 1}
    snakemake(workspace)
    assert (workspace / "results/figures/gain_heatmap.png").exists()
    assert planned_jobs(workspace) == {}


def test_e_adding_a_seed_runs_only_its_trainings_and_evaluations(workspace):
    config = read_config(workspace)
    write_config(workspace, config, replicates__seeds=[*config["replicates"]["seeds"], 7])
    outputs = planned_outputs(workspace)
    assert {p.split("/")[3] for p in outputs if p.startswith("results/main/")} == {"seed-7"}
    assert not [p for p in outputs if p.startswith(("results/data/", "results/main/base/"))]
    result = snakemake(workspace)
    ran = executed(result)
    ran.pop("calibration_choice", None)  # a new run may choose a value no run chose before: its flag file
    shots = len(config["eval"]["shots"])
    assert ran == {"train": 2, "calibrate": 2, "evaluate": 2 * shots, "evaluate_metaloop": shots - 1, "stats": 1,
                   "figures": 1, "summary": 1, "experiments": 1, "manifest": 1}  # fmt: skip
    assert (workspace / "results/main/fomaml/seed-7/eval/shots-0.parquet").exists()
    assert planned_jobs(workspace) == {}


def test_f_adding_an_experiment_runs_only_its_own_jobs(workspace):
    config = read_config(workspace)
    held_out = config["tasks"]["names"][-1]
    write_config(workspace, config, experiments=[*config["experiments"], {"name": "heldout", "meta_test": [held_out]}])
    result = snakemake(workspace)
    ran = executed(result)
    ran.pop("calibration_choice", None)  # flag files of values no run chose before
    shots = len(config["eval"]["shots"])
    seeds = len(config["replicates"]["seeds"])
    # The base is tuned per experiment, on that experiment's training tasks: the new experiment tunes and
    # evaluates its own base; the first experiment's base reruns nothing.
    assert ran == {"train": 2 * seeds, "calibrate": 2 * seeds, "calibrate_base": 1, "evaluate": 2 * seeds * shots,
                   "evaluate_base": shots, "evaluate_metaloop": seeds * (shots - 1), "stats": 1, "figures": 1,
                   "summary": 1, "experiments": 1, "manifest": 1}  # fmt: skip
    tuned = json.loads((workspace / "results/heldout/base/calibration.json").read_text())
    assert held_out not in tuned["tasks"]  # true few-shot: never the held-out task's dev data
    summary = json.loads((workspace / "results/heldout/fomaml/seed-0/train_summary.json").read_text())
    assert held_out not in summary["settings"]["train_tasks"]
    frame = pd.read_parquet(
        workspace / f"results/heldout/fomaml/seed-0/eval/shots-{config['eval']['shots'][-1]}.parquet"
    )
    assert set(frame.loc[frame["task"] == held_out, "task_role"]) == {"meta_test"}
    assert "heldout" in (workspace / "results/summary.md").read_text()
    assert planned_jobs(workspace) == {}


def test_g_a_meta_validation_task_is_tuned_on_and_nothing_else(workspace):
    """experiments[].meta_val: the tuner reads only that task's dev data; no training reads its support/query and
    no evaluation opens its test file. Those files are poisoned (mtimes kept, so the first experiment's jobs,
    which read them legitimately, do not rerun): a stage that opened one would fail."""
    config = read_config(workspace)
    meta_val = config["tasks"]["names"][-1]
    write_config(workspace, config, experiments=[*config["experiments"], {"name": "tuned", "meta_val": [meta_val]}])
    for split in ("support", "query", "test"):
        path = workspace / f"results/data/tasks/{meta_val}/{split}.parquet"
        stat = path.stat()
        path.write_bytes(b"not a parquet file: a stage opened what it must never read\n")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = snakemake(workspace)
    ran = executed(result)
    assert "split_tasks" not in ran and ran["calibrate_base"] == 1 and ran["stats"] == 1
    training = [t for t in config["tasks"]["names"] if t != meta_val]
    for run in ("tuned/base", "tuned/fomaml/seed-0", "tuned/sft/seed-0"):
        assert json.loads((workspace / f"results/{run}/calibration.json").read_text())["tasks"] == [meta_val]
    summary = json.loads((workspace / "results/tuned/fomaml/seed-0/train_summary.json").read_text())
    assert summary["settings"]["train_tasks"] == training
    frame = pd.read_parquet(workspace / "results/tuned/sft/seed-0/eval/shots-0.parquet")
    assert sorted(frame["task"].unique()) == training
    assert planned_jobs(workspace) == {}
