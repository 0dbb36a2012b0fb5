"""A training job killed with SIGKILL mid-way resumes under the same Snakemake command and ends
with the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.workflow_utils import make_workspace, snakemake, start_snakemake

pytestmark = pytest.mark.slow

RUN = "results/main/fomaml/seed-0"
TARGET = f"{RUN}/train_summary.json"
LONGER = {"fomaml__total_steps": 40, "fomaml__save_freq": 5}


def _weights(root: Path) -> dict:
    files = sorted((root / RUN / "model").glob("*.safetensors"))
    assert files, "final model has no safetensors weights"
    tensors: dict = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def _checkpoints(root: Path) -> list[Path]:
    folder = root / "results/checkpoints/main/fomaml/seed-0"
    return [p for p in folder.iterdir() if p.name.startswith("step-")] if folder.is_dir() else []  # not best/


def test_sigkill_then_rerun_resumes_to_identical_weights(tmp_path):
    reference = make_workspace(tmp_path / "reference", **LONGER)
    snakemake(reference, TARGET)

    killed = make_workspace(tmp_path / "killed", **LONGER)
    snakemake(killed, "results/data/split_stats.tsv", "results/env/report.json")
    process = start_snakemake(killed, TARGET)
    deadline = time.monotonic() + 300
    while not _checkpoints(killed):
        assert process.poll() is None, "training finished before the first checkpoint; make it longer"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / TARGET).exists(), "a killed job must not leave its final outputs"
    assert not (killed / RUN / "model").exists() or not any((killed / RUN / "model").glob("*.safetensors"))

    snakemake(killed, "--unlock")  # the killed Snakemake left its lock behind
    snakemake(killed, TARGET)  # the profile sets rerun-incomplete
    log = (killed / "results/logs/train/main_fomaml_seed-0.log").read_text().lower()
    assert "resum" in log, "the rerun did not resume from the checkpoint"
    expected, got = _weights(reference), _weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), f"{name} differs after resume"
    # The dev selection survived the kill too: both runs kept the same step.
    import json

    selected = [json.loads((root / TARGET).read_text())["selected_step"] for root in (reference, killed)]
    assert selected[0] == selected[1]
