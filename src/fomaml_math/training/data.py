"""Training data: task split rows, their encoding, and the fingerprints that key checkpoint resumes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fomaml_math.batching import EncodedExample, encode_example
from fomaml_math.config import settings_hash
from fomaml_math.data.taskfiles import load_task_split
from fomaml_math.errors import ConfigError


@dataclass
class TaskData:
    """One training task's encoded support and query splits."""

    support: list[EncodedExample]
    query: list[EncodedExample]


def encode_rows(
    tokenizer: Any, rows: Sequence[dict[str, Any]], max_seq_len: int, *, instruction: str = ""
) -> list[EncodedExample]:
    """Chat-encode split rows with the configured user-turn instruction (the evaluation renders alike)."""
    return [encode_example(tokenizer, r["problem"], r["solution"], max_seq_len, instruction=instruction) for r in rows]


def require_rows(rows: Sequence[Any], needed: int, *, setting: str, what: str) -> None:
    """A batch size larger than a split is a configuration error, reported before training starts."""
    if len(rows) < needed:
        raise ConfigError(f"{setting}: {needed} examples per batch, but {what} has only {len(rows)}")


def data_fingerprint(tasks_dir: str | Path, tasks: Sequence[str], splits: Sequence[str]) -> str:
    """Content hash of the task files training reads (a re-split data set must not resume old checkpoints)."""
    digest = hashlib.sha256()
    for task in tasks:
        for split in splits:
            path = Path(tasks_dir) / task / f"{split}.parquet"
            digest.update(f"{task}/{split}:".encode())
            digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()[:16]


def model_fingerprint(name_or_path: str) -> str:
    """Identity of the base model: for a local folder its json files and weight file sizes/mtimes."""
    path = Path(name_or_path)
    if not path.is_dir():
        return f"hub:{name_or_path}"
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if not file.is_file():
            continue
        digest.update(file.name.encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
        else:
            stat = file.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def resume_key(settings: dict[str, Any], *, data: str, model: str) -> str:
    """Checkpoints resume only under the same key: settings (minus wandb and what happens to the checkpoints once
    the run is done, compute.keep_finished_checkpoints), data and base model."""
    relevant = {k: v for k, v in settings.items() if k != "wandb"}
    if isinstance(relevant.get("compute"), dict):
        relevant["compute"] = {k: v for k, v in relevant["compute"].items() if k != "keep_finished_checkpoints"}
    return settings_hash({"settings": relevant, "data": data, "model": model})


def rng_for(*key: int) -> np.random.Generator:
    """A generator derived from integers only: the draws of step ``s`` do not depend on earlier steps,
    on the number of processes, or on where a run was resumed."""
    return np.random.default_rng([int(k) for k in key])


def load_dev(
    tasks_dir: str | Path, tasks: Sequence[str], tokenizer: Any, max_seq_len: int, *, instruction: str
) -> tuple[dict[str, list[EncodedExample]], dict[str, list[dict[str, Any]]]]:
    """Per task: the encoded ``dev_monitor`` examples and the ``dev_pool`` rows (monitoring and selection)."""
    monitor = {
        t: encode_rows(tokenizer, load_task_split(tasks_dir, t, "dev_monitor"), max_seq_len, instruction=instruction)
        for t in tasks
    }
    pools = {t: load_task_split(tasks_dir, t, "dev_pool") for t in tasks}
    return monitor, pools
