"""Calibration of the adaptation learning rate: the choice rule, the grid, dev-only data, main()."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from fomaml_math.config import stage_settings
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.calibrate import choose, main
from fomaml_math.evaluation.choice import AdaptationChoice, read_choice
from fomaml_math.evaluation.settings import lr_grid, steps_grid
from tests.fixtures_tiny import TASKS, shared_workspace


def test_choose_takes_the_lowest_finite_loss_and_breaks_ties_low() -> None:
    points = [
        {"lr": 1e-3, "num_steps": 2, "dev_loss": 1.5},
        {"lr": 1e-2, "num_steps": 2, "dev_loss": 1.2},
        {"lr": 1e-1, "num_steps": 2, "dev_loss": math.inf},  # diverged: cannot win
        {"lr": 3e-2, "num_steps": 2, "dev_loss": 1.2},
        {"lr": 1e-2, "num_steps": 1, "dev_loss": 1.2},
    ]
    assert choose(points, "sgd") == AdaptationChoice("sgd", 1e-2, 1)
    with pytest.raises(ConfigError, match="every learning rate diverged"):
        choose([{"lr": 1.0, "num_steps": 1, "dev_loss": math.nan}], "sgd")


def test_grid_always_holds_fomamls_inner_rate(demo_config: dict) -> None:
    demo_config["calibration"]["lr_grid"] = [0.1, 0.001]
    demo_config["fomaml"]["inner_lr"] = 0.03
    settings = stage_settings(demo_config, "calibrate")
    assert lr_grid(settings) == [0.001, 0.03, 0.1]
    assert steps_grid(settings) == [demo_config["eval"]["num_inner_steps"]]


@pytest.fixture()
def settings(demo_config: dict) -> dict[str, Any]:
    workspace = shared_workspace()
    demo_config["model"]["name_or_path"] = str(workspace / "model")
    demo_config["eval"].update(inner_batch_size=4, optimizer="sgd")
    demo_config["calibration"].update(lr_grid=[0.01, 0.3], steps_grid=[1, 2], shots=[3], draws=2,
                                      max_monitor_examples=4)  # fmt: skip
    demo_config["fomaml"]["inner_lr"] = 0.01
    return stage_settings(demo_config, "calibrate")


def _run(settings: dict[str, Any], tasks: Path, out: Path) -> dict[str, Any]:
    model = shared_workspace() / "model"
    argv = ["--settings", json.dumps(settings), "--init", "base", "--model", str(model), "--tasks-dir", str(tasks),
            "--output", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_main_reads_only_dev_and_reports_the_grid(settings: dict[str, Any], tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(shared_workspace() / "tasks", tasks)
    for task in TASKS:  # calibration must not need (or read) the test split
        (tasks / task / "test.parquet").unlink()
    report = _run(settings, tasks, tmp_path / "base.json")
    assert report["tasks"] == list(TASKS) and report["optimizer"] == "sgd"
    assert {(p["lr"], p["num_steps"]) for p in report["grid"]} == {(0.01, 1), (0.01, 2), (0.3, 1), (0.3, 2)}
    assert len(report["curve"]) == 2 * 2 and len(report["per_task"]) == len(TASKS) * 4
    best = min(report["grid"], key=lambda p: p["dev_loss"])
    assert report["chosen"] == {"lr": best["lr"], "num_steps": best["num_steps"]}
    # The one reader of the choice (workflow, evaluation and analysis) gets the same record back.
    assert read_choice(tmp_path / "base.json") == AdaptationChoice("sgd", best["lr"], best["num_steps"])
    # A larger step adapts more: after two steps at 0.3 the dev loss is below the loss before adapting.
    point = next(p for p in report["grid"] if p["lr"] == 0.3 and p["num_steps"] == 2)
    assert point["dev_loss"] < point["dev_loss_before"]


def test_one_run_per_rate_equals_separate_step_counts(settings: dict[str, Any], tmp_path: Path) -> None:
    """The loss after step 1 of a 2-step run is what a 1-step adaptation gives (the curve's premise)."""
    both = _run(settings, shared_workspace() / "tasks", tmp_path / "both.json")
    settings["calibration"]["steps_grid"] = [1]
    one = _run(settings, shared_workspace() / "tasks", tmp_path / "one.json")
    for point in one["grid"]:
        match = next(p for p in both["grid"] if p["lr"] == point["lr"] and p["num_steps"] == 1)
        assert match["dev_loss"] == pytest.approx(point["dev_loss"], rel=1e-6)


def test_a_shot_count_larger_than_a_pool_stops_before_any_work(settings: dict[str, Any], tmp_path: Path) -> None:
    settings["calibration"]["shots"] = [11]  # the tiny dev_pool holds 10 problems per task
    with pytest.raises(ConfigError, match=r"calibration\.shots: 11 shots, but task 'algebra' has only 10 dev_pool"):
        _run(settings, shared_workspace() / "tasks", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
