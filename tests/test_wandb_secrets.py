"""wandb logs offline unless a key is set, and the key is written nowhere (outputs, checkpoints, wandb files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fomaml_math.training.logs import wandb_mode
from tests.fixtures_tiny import shared_workspace, train_settings

SECRET = "wandb-secret-0123456789abcdef0123456789abcdef"


def test_online_without_key_falls_back_to_offline(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.warns(UserWarning, match="WANDB_API_KEY is not set"):
        assert wandb_mode("online") == "offline"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert wandb_mode("online") == "online"


@pytest.mark.slow
def test_offline_run_with_a_key_writes_it_nowhere(tmp_path: Path):
    settings = train_settings(shared_workspace() / "model")
    settings["wandb"] = {"mode": "offline", "project": "fomaml-math", "entity": None}
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    argv = ["--settings", json.dumps(settings), "--tasks-dir", str(shared_workspace() / "tasks")]
    env = {"WANDB_API_KEY": SECRET, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fomaml_math",
            "train-fomaml",
            *argv,
            "--output-dir",
            str(out),
            "--checkpoint-dir",
            str(ckpt),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert SECRET not in result.stdout + result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in written), "the offline wandb run wrote nothing"
    leaks = [p for p in written if SECRET.encode() in p.read_bytes()]
    assert leaks == []
