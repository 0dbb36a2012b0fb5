"""The data stages through real Snakemake runs: build from nothing, offline; a second run does nothing."""

from __future__ import annotations

import pandas as pd
import pytest

from fomaml_math.config import MATH_TASKS
from tests.test_ingest import SAMPLE_COUNTS
from tests.workflow_utils import make_workspace, planned_jobs, snakemake

pytestmark = pytest.mark.slow


def test_data_stages_build_then_nothing_to_do(tmp_path):
    root = make_workspace(tmp_path)
    snakemake(root, "results/data/split_stats.tsv")
    stats = pd.read_csv(root / "results/data/split_stats.tsv", sep="\t")
    tasks = ["algebra", "number_theory", "prealgebra"]
    assert set(tasks) <= set(stats["task"])
    for task in tasks:
        splits = {
            s: pd.read_parquet(root / f"results/data/tasks/{task}/{s}.parquet") for s in ("support", "query", "test")
        }
        ids = [set(frame["id"]) for frame in splits.values()]
        assert all(ids) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
        row = stats.set_index("task").loc[task]
        assert [row["support"], row["query"], row["test"]] == [len(splits[s]) for s in ("support", "query", "test")]
    assert (root / "results/logs/split_tasks.log").exists()
    assert (root / "results/benchmarks/split_tasks.tsv").exists()
    assert planned_jobs(root, "results/data/split_stats.tsv") == {}


def test_local_math_sample_gives_1000_problems(tmp_path, math_sample_dir):
    root = make_workspace(
        tmp_path,
        data__source="local",
        data__local={"path": str(math_sample_dir)},
        tasks__names=list(MATH_TASKS),
    )
    snakemake(root, "results/data/split_stats.tsv")
    stats = pd.read_csv(root / "results/data/split_stats.tsv", sep="\t").set_index("task")
    per_task = stats.drop(index="all")["total"].to_dict()
    assert per_task == SAMPLE_COUNTS  # the sample's documented per-subject counts
    assert stats.loc["all", "total"] == 1000


def test_bad_config_stops_before_any_job(tmp_path):
    root = make_workspace(tmp_path, tasks__split={"support": 0.6, "query": 0.4, "test": 0.3})
    result = snakemake(root, "--dry-run", check=False)
    assert result.returncode != 0
    assert "config error at tasks.split: support + query + test must be <= 1, got 1.3" in result.stdout + result.stderr
    assert not (root / "results").exists()
