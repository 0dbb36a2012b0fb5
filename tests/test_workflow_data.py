"""The data stages through real Snakemake runs: build from nothing, offline; a second run does nothing."""

from __future__ import annotations

import pandas as pd
import pytest

from fomaml_math.data.taskfiles import SPLITS
from fomaml_math.subjects import MATH_TASKS
from tests.test_ingest import SAMPLE_COUNTS
from tests.workflow_utils import make_workspace, planned_jobs, snakemake

pytestmark = pytest.mark.slow


def test_data_stages_build_then_nothing_to_do(tmp_path):
    root = make_workspace(tmp_path)
    snakemake(root, "results/data/split_stats.tsv")
    stats = pd.read_csv(root / "results/data/split_stats.tsv", sep="\t")
    tasks = ["algebra", "number_theory", "prealgebra"]
    assert set(tasks) <= set(stats["task"])
    roles = pd.read_parquet(root / "results/data/tasks/roles.parquet")
    assert not roles["id"].duplicated().any()  # no id is in two roles
    for task in tasks:
        splits = {s: pd.read_parquet(root / f"results/data/tasks/{task}/{s}.parquet") for s in SPLITS}
        ids = {s: set(frame["id"]) for s, frame in splits.items()}
        assert all(ids.values())
        assert all(not (ids[a] & ids[b]) for a in SPLITS for b in SPLITS if a < b)
        assert set(splits["test"]["source_split"]) == {"test"}  # the source's own test problems only
        assert set(pd.concat([splits[s] for s in SPLITS if s != "test"])["source_split"]) == {"train"}
        row = stats.set_index("task").loc[task]
        assert [row[s] for s in SPLITS] == [len(splits[s]) for s in SPLITS]
        assert set(roles.loc[roles["task"] == task, "id"]) == set().union(*ids.values())
    assert (root / "results/logs/split_tasks.log").exists()
    assert (root / "results/benchmarks/split_tasks.tsv").exists()
    assert planned_jobs(root, "results/data/split_stats.tsv") == {}


def test_local_math_sample_gives_1000_problems(tmp_path, math_sample_dir):
    root = make_workspace(
        tmp_path,
        data__source="local",
        data__local={"path": str(math_sample_dir)},
        tasks__names=list(MATH_TASKS),
        model__pretrain=None,  # pretraining's corpus is synthetic: not with real MATH data
        # The sample holds MATH test problems only: the default (test = MATH test) stops; pooled works.
        tasks__split={
            "scheme": "pooled",
            "support": 0.3,
            "query": 0.4,
            "dev": 0.2,
            "test": 0.1,
            "dev_pool": 10,
            "dev_monitor": 6,
        },
    )
    snakemake(root, "results/data/split_stats.tsv")
    stats = pd.read_csv(root / "results/data/split_stats.tsv", sep="\t").set_index("task")
    per_task = stats.drop(index="all")["total"].to_dict()
    assert per_task == SAMPLE_COUNTS  # the sample's documented per-subject counts
    assert stats.loc["all", "total"] == 1000


def test_bad_config_stops_before_any_job(tmp_path):
    root = make_workspace(tmp_path, tasks__split={"scheme": "pooled", "support": 0.6, "query": 0.4, "dev": 0.15,
                                                  "test": 0.3})  # fmt: skip
    result = snakemake(root, "--dry-run", check=False)
    assert result.returncode != 0
    message = "tasks.split: with scheme pooled, support + query + dev + test must be <= 1, got 1.45"
    assert message in result.stdout + result.stderr
    assert not (root / "results").exists()


def test_math_test_default_on_the_test_only_sample_stops_naming_the_setting(tmp_path, math_sample_dir):
    root = make_workspace(tmp_path, data__source="local", data__local={"path": str(math_sample_dir)},
                          tasks__names=list(MATH_TASKS), model__pretrain=None)  # fmt: skip
    result = snakemake(root, "results/data/split_stats.tsv", check=False)
    assert result.returncode != 0
    log = (root / "results/logs/split_tasks.log").read_text()
    assert "tasks.split.scheme: pooled" in log and len([line for line in log.splitlines() if "error" in line]) == 1
    assert not (root / "results/data/tasks").exists()  # nothing half-written
