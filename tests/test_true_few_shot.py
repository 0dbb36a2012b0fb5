"""True few-shot (Perez, Kiela & Cho 2021): tuning, selection and monitoring never open a test file or the dev
data of a held-out task. Those files are replaced by bytes that no parquet reader accepts, so a stage that
opened one would fail; the stages run end to end on what remains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fomaml_math.config import load_config, stage_settings
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation import calibrate
from fomaml_math.training import fomaml, sft
from tests.fixtures_tiny import TASKS, shared_workspace, train_settings

HELD_OUT = "geometry"
TRAINING = [t for t in TASKS if t != HELD_OUT]
NOT_PARQUET = b"not a parquet file: a stage opened what it must never read\n"


@pytest.fixture(scope="module")
def poisoned_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tasks = tmp_path_factory.mktemp("true-few-shot") / "tasks"
    shutil.copytree(shared_workspace() / "tasks", tasks)
    for task in TASKS:
        (tasks / task / "test.parquet").write_bytes(NOT_PARQUET)
    for role in ("dev_pool", "dev_monitor"):
        (tasks / HELD_OUT / f"{role}.parquet").write_bytes(NOT_PARQUET)
    return tasks


def _tuner_settings() -> dict:
    config = load_config(Path(__file__).resolve().parents[1] / "config" / "demo.yaml")
    config["eval"].update(inner_batch_size=4, shots=[0, 3], max_new_tokens=8)
    config["calibration"].update(lr_grid=[0.01], steps_grid=[1], shots=None, draws=1, max_monitor_examples=4)
    config["fomaml"]["inner_lr"] = 0.01
    return stage_settings(config, "calibrate")


def _tune(tasks: Path, out: Path, names: list[str], *models: str) -> dict:
    argv = ["--settings", json.dumps(_tuner_settings()), "--init", "base", *models, "--tasks-dir", str(tasks),
            "--tasks", *names, "--output", str(out), "--no-progress"]  # fmt: skip
    assert calibrate.main(argv) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["fomaml", "sft"])
def test_training_and_tuning_read_only_the_training_tasks_dev_data(
    method: str, poisoned_tasks: Path, tmp_path: Path
) -> None:
    settings = train_settings(shared_workspace() / "model", method=method, tasks=TRAINING)
    settings["select"]["criterion"] = "tuned"  # monitoring at every test_freq step, a candidate each
    trainer = {"fomaml": fomaml, "sft": sft}[method]
    out = tmp_path / "run"
    assert trainer.main(["--settings", json.dumps(settings), "--tasks-dir", str(poisoned_tasks), "--output-dir",
                         str(out), "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0  # fmt: skip
    summary = json.loads((out / "train_summary.json").read_text())
    assert [c["step"] for c in summary["candidates"]] == [3, 6]
    report = _tune(
        poisoned_tasks, tmp_path / "tuned.json", TRAINING, "--train-summary", str(out / "train_summary.json")
    )
    assert report["tasks"] == TRAINING and {e["checkpoint"] for e in report["chosen"]} <= {3, 6}


def test_the_base_is_tuned_on_the_training_tasks_only(poisoned_tasks: Path, tmp_path: Path) -> None:
    report = _tune(poisoned_tasks, tmp_path / "base.json", TRAINING, "--model", str(shared_workspace() / "model"))
    assert report["tasks"] == TRAINING
    # The poison is real: naming the held-out task makes the tuner open its dev files, and it fails.
    with pytest.raises((ConfigError, OSError, ValueError)):
        _tune(poisoned_tasks, tmp_path / "leak.json", [HELD_OUT], "--model", str(shared_workspace() / "model"))
    assert not (tmp_path / "leak.json").exists()
