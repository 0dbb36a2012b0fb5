"""Both trainers read only their roles: support/query to train, dev to monitor and select, never test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fomaml_math.data.taskfiles import LeakageError
from fomaml_math.training import fomaml, sft
from tests.fixtures_tiny import TASKS, shared_workspace, train_settings

TRAINERS = {"fomaml": fomaml, "sft": sft}


def _train(method: str, tasks: Path, tmp_path: Path, **select: object) -> dict:
    settings = train_settings(shared_workspace() / "model", method=method)
    settings["select"] |= select
    settings["compute"]["keep_finished_checkpoints"] = True  # the best-dev slot is read below
    argv = ["--settings", json.dumps(settings), "--tasks-dir", str(tasks)]
    assert TRAINERS[method].main([*argv, "--output-dir", str(tmp_path / "out"), "--checkpoint-dir",
                                  str(tmp_path / "ckpt")]) == 0  # fmt: skip
    return json.loads((tmp_path / "out" / "train_summary.json").read_text())


@pytest.fixture()
def tasks_without_test(tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks"
    shutil.copytree(shared_workspace() / "tasks", tasks)
    for task in TASKS:
        (tasks / task / "test.parquet").unlink()  # a trainer that opened it would fail
    return tasks


@pytest.mark.parametrize("method", ["fomaml", "sft"])
def test_training_never_reads_test_and_selects_on_dev(method: str, tasks_without_test: Path, tmp_path: Path) -> None:
    summary = _train(method, tasks_without_test, tmp_path, criterion="best_dev")
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in records if "dev/loss_after" in r and r["step"] >= 1]
    best = min(monitored, key=lambda r: (r["dev/loss_after"], r["step"]))
    assert summary["selected_step"] == best["step"] and summary["selection"]["dev_loss"] == best["dev/loss_after"]
    assert (tmp_path / "ckpt" / "best" / "model.safetensors").is_file()
    if summary["selected_step"] != summary["steps"]:  # the kept model is the best step's, not the last
        from safetensors.torch import load_file

        best_weights = load_file(tmp_path / "ckpt" / "best" / "model.safetensors")
        final = {}
        for file in (tmp_path / "out" / "model").glob("*.safetensors"):
            final.update(load_file(file))
        assert all((final[k] == v).all() for k, v in best_weights.items() if k in final)


@pytest.mark.parametrize("method", ["fomaml", "sft"])
def test_a_dev_problem_in_training_data_stops_the_run(method: str, tasks_without_test: Path, tmp_path: Path) -> None:
    support = tasks_without_test / "geometry" / "support.parquet"
    frame = pd.read_parquet(support)
    dev_id = pd.read_parquet(tasks_without_test / "geometry" / "dev_monitor.parquet")["id"].iloc[0]
    frame.loc[0, "id"] = dev_id  # a hand-edited split file that leaks a dev problem into training
    frame.to_parquet(support, index=False)
    with pytest.raises(LeakageError, match=rf"task geometry: 1 dev/test problem id\(s\) in training data.*{dev_id}"):
        _train(method, tasks_without_test, tmp_path)
