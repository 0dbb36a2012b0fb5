"""Resuming a killed evaluation job: finished (task, repeat) pieces kept beside the output.

A piece is reused only by a job with the same fingerprint (settings, init, k, model files, task
files, device type and the job's adaptation and seeds); pieces of any other fingerprint are deleted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.data.taskfiles import task_file
from fomaml_math.evaluation.rows import to_output_schema
from fomaml_math.io import write_json, write_parquet


def _file_stamp(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def job_fingerprint(
    settings: Mapping[str, Any],
    *,
    init: str,
    shots: int,
    model: str,
    tasks_dir: str | Path,
    tasks: Sequence[str],
    device: str = "cpu",
    extra: Mapping[str, Any] | None = None,
) -> str:
    """What a finished piece depends on: settings, init, k, model files, task files and the device type."""
    folder = Path(model)
    model_files = sorted(_file_stamp(p) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    task_hashes = {}
    for task in tasks:
        for split in ("dev_pool", "test"):
            task_hashes[f"{task}/{split}"] = hashlib.sha256(task_file(tasks_dir, task, split).read_bytes()).hexdigest()
    blob = json.dumps(
        {"settings": settings, "init": init, "shots": shots, "model": model,
         "model_files": model_files, "tasks": task_hashes, "device": device, "extra": extra or {}},
        sort_keys=True, default=str,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class PieceStore:
    """Finished (task, repeat) results of an unfinished job, in ``.<output name>.parts/<fingerprint>/``."""

    def __init__(self, output: Path, fingerprint: str) -> None:
        self.root = output.parent / f".{output.name}.parts"
        self.dir = self.root / fingerprint
        if self.root.is_dir():
            for stale in self.root.iterdir():  # pieces of other settings/inputs: never reused
                if stale == self.dir:
                    continue
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()

    def _stem(self, task: str, repeat: int) -> Path:
        return self.dir / f"{task}--r{repeat}"

    def load(self, task: str, repeat: int) -> tuple[pd.DataFrame, dict[str, Any]] | None:
        stem = self._stem(task, repeat)
        rows, info = stem.with_suffix(".parquet"), stem.with_suffix(".json")
        if not (rows.is_file() and info.is_file()):
            return None
        return to_output_schema(pd.read_parquet(rows)), json.loads(info.read_text())

    def save(self, task: str, repeat: int, rows: pd.DataFrame, info: dict[str, Any]) -> None:
        stem = self._stem(task, repeat)
        write_parquet(stem.with_suffix(".parquet"), rows)
        write_json(stem.with_suffix(".json"), info)  # written last: its presence marks the piece complete

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
