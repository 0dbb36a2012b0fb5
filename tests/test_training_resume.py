"""Resume: a run stopped after a checkpoint and rerun ends with bitwise the same weights and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fomaml_math.training import fomaml, sft
from fomaml_math.training.run import TrainingRun
from tests.fixtures_tiny import shared_workspace, train_settings

MODULES = {"fomaml": fomaml, "sft": sft}
TIMING = ("perf/step_time_s", "perf/tokens_per_s")


class Stop(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def _run(method: str, settings: dict, out: Path, ckpt: Path) -> int:
    argv = ["--settings", json.dumps(settings), "--tasks-dir", str(shared_workspace() / "tasks")]
    return MODULES[method].main([*argv, "--output-dir", str(out), "--checkpoint-dir", str(ckpt)])


def _records(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.parametrize("method", ["fomaml", "sft"])
def test_stop_and_rerun_gives_bitwise_identical_weights(method: str, tmp_path: Path, monkeypatch) -> None:
    settings = train_settings(shared_workspace() / "model", method=method)
    assert _run(method, settings, tmp_path / "ref", tmp_path / "ref-ckpt") == 0

    original = TrainingRun.log

    def log_then_stop(self: TrainingRun, record: dict, **kwargs) -> None:
        original(self, record, **kwargs)
        if record["step"] == 5:  # after the step-3 checkpoint, before the final one
            raise Stop

    monkeypatch.setattr(TrainingRun, "log", log_then_stop)
    with pytest.raises(Stop):
        _run(method, settings, tmp_path / "out", tmp_path / "ckpt")
    assert not (tmp_path / "out" / "train_summary.json").exists()
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith(".")] == ["step-00000003"]
    monkeypatch.setattr(TrainingRun, "log", original)
    partial = tmp_path / "ckpt" / ".step-00000006.killed.tmp"  # what a kill during a checkpoint write leaves
    partial.mkdir()

    assert _run(method, settings, tmp_path / "out", tmp_path / "ckpt") == 0
    assert not partial.exists()
    expected = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    got = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), name
    # The metrics log survives the resume: steps 4 and 5 of the stopped run were dropped and redone.
    assert _records(tmp_path / "out") == _records(tmp_path / "ref")
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    reference = json.loads((tmp_path / "ref" / "train_summary.json").read_text())
    assert summary["resumed_from"] == [3]
    assert summary["tokens"] == reference["tokens"] and summary["examples"] == reference["examples"]


def test_changed_settings_start_fresh(tmp_path: Path, capsys) -> None:
    settings = train_settings(shared_workspace() / "model")
    settings["fomaml"]["total_steps"] = 3
    settings["compute"]["keep_finished_checkpoints"] = True
    assert _run("fomaml", settings, tmp_path / "out", tmp_path / "ckpt") == 0
    settings["fomaml"]["inner_lr"] = 0.01
    assert _run("fomaml", settings, tmp_path / "out", tmp_path / "ckpt") == 0
    err = capsys.readouterr().err
    assert "starting fresh and deleting 1" in err
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["resumed_from"] == []


def test_finished_run_rerun_only_rewrites_outputs(tmp_path: Path, capsys) -> None:
    settings = train_settings(shared_workspace() / "model", method="sft")
    settings["sft"]["steps"] = 3
    settings["compute"]["keep_finished_checkpoints"] = True  # the default removes them (the next test)
    assert _run("sft", settings, tmp_path / "out", tmp_path / "ckpt") == 0
    first = (tmp_path / "out" / "model" / "model.safetensors").read_bytes()
    assert _run("sft", settings, tmp_path / "out", tmp_path / "ckpt") == 0
    assert "resuming from checkpoint" in capsys.readouterr().err
    assert (tmp_path / "out" / "model" / "model.safetensors").read_bytes() == first
    assert [r["step"] for r in _records(tmp_path / "out")] == [0, 1, 2, 3]


def test_keep_finished_checkpoints_is_not_part_of_the_resume_key() -> None:
    """Toggling what happens to a finished run's checkpoints must not make a resumable run stale."""
    from fomaml_math.training.data import resume_key

    settings = train_settings(shared_workspace() / "model")
    other = json.loads(json.dumps(settings))
    other["compute"]["keep_finished_checkpoints"] = True
    assert resume_key(settings, data="d", model="m") == resume_key(other, data="d", model="m")
    other["compute"]["gradient_checkpointing"] = True
    assert resume_key(settings, data="d", model="m") != resume_key(other, data="d", model="m")
