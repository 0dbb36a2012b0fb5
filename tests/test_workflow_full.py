"""The whole DAG through real Snakemake runs on config/test.yaml, and what a change reruns.

One full run (module fixture); each scenario works on a copy of that finished workspace, whose
results and .snakemake metadata are copied with their modification times.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.workflow_utils import make_workspace, planned_jobs, planned_outputs, read_config, snakemake, write_config

pytestmark = pytest.mark.slow

INITS = ("base", "sft", "fomaml")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("full"))
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
    for init in INITS:
        for k in shots:
            frame = pd.read_parquet(finished / f"results/eval/{init}/shots-{k}.parquet")
            assert set(frame["init"]) == {init} and set(frame["shots"]) == {k}
            assert set(frame["task"]) == set(config["tasks"]["names"])
            assert set(frame["repeat"]) == ({0} if k == 0 else set(range(config["eval"]["repeats"])))
    for method in ("fomaml", "sft"):
        assert (finished / f"results/models/{method}/model/config.json").exists()
        summary = json.loads((finished / f"results/models/{method}/train_summary.json").read_text())
        assert summary
    for name in ("accuracy", "comparisons", "across_tasks"):
        assert not pd.read_csv(finished / f"results/stats/{name}.tsv", sep="\t").empty
    for figure in ("accuracy_vs_shots", "gain_heatmap", "training_curves"):
        assert (finished / f"results/figures/{figure}.pdf").stat().st_size > 0
        assert (finished / f"results/figures/{figure}.png").stat().st_size > 0
    assert "FOMAML" in (finished / "results/summary.md").read_text()
    assert (finished / "results/report.html").stat().st_size > 10_000
    assert json.loads((finished / "results/env/report.json").read_text())["ok"] is True


def test_a_second_run_does_nothing(workspace):
    assert planned_jobs(workspace) == {}


def test_b_adding_a_shot_count_reruns_only_new_evaluations_and_analysis(workspace):
    config = read_config(workspace)
    write_config(workspace, config, eval__shots=[*config["eval"]["shots"], 3])
    assert planned_jobs(workspace) == {"evaluate": 3, "stats": 1, "figures": 1, "summary": 1}
    evals = [p for p in planned_outputs(workspace) if p.startswith("results/eval/") and p.endswith(".parquet")]
    assert sorted(evals) == sorted(f"results/eval/{init}/shots-3.parquet" for init in INITS)
    snakemake(workspace)
    assert planned_jobs(workspace) == {}


def test_c_changing_inner_lr_reruns_fomaml_and_what_follows_only(workspace):
    config = read_config(workspace)
    write_config(workspace, config, fomaml__inner_lr=config["fomaml"]["inner_lr"] * 2)
    shots = config["eval"]["shots"]
    jobs = planned_jobs(workspace)
    assert jobs == {"train": 1, "evaluate": len(shots), "stats": 1, "figures": 1, "summary": 1, "experiments": 1}
    outputs = planned_outputs(workspace)
    assert "results/models/fomaml/train_summary.json" in outputs
    assert not [p for p in outputs if p.startswith(("results/data/", "results/models/sft", "results/eval/base"))]
    assert not [p for p in outputs if p.startswith("results/eval/sft")]


def test_d_deleting_a_figure_reruns_only_the_figures(workspace):
    (workspace / "results/figures/gain_heatmap.png").unlink()
    assert planned_jobs(workspace) == {"figures": 1}
    snakemake(workspace)
    assert (workspace / "results/figures/gain_heatmap.png").exists()
    assert planned_jobs(workspace) == {}
