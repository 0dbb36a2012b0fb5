"""The data contract: the normalised table's columns, the five data roles, their files, and how stages read them.

``<tasks_dir>/<task>/<role>.parquet`` per task and role, plus the role index ``<tasks_dir>/roles.parquet``
(docs/data.md).  The split stage writes them; training, calibration, evaluation and pretraining read
them only through this module, so the layout and the leak check are defined once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.errors import ConfigError

# The normalised MATH table (results/data/math.parquet), which the task files extend by a ``split`` column.
COLUMNS: tuple[str, ...] = ("id", "task", "source_split", "level", "problem", "solution", "answer")
# Synthetic tasks only: the task's hidden rule (JSON), kept with every problem so that answers can be recomputed
# (solve_synthetic) and never rendered to a model. Hub and local tables have no such column.
RULE_COLUMN = "rule"

SPLITS: tuple[str, ...] = ("support", "query", "dev_pool", "dev_monitor", "test")
TRAIN_SPLITS: tuple[str, ...] = ("support", "query")
DEV_SPLITS: tuple[str, ...] = ("dev_pool", "dev_monitor")
HELD_OUT_SPLITS: tuple[str, ...] = (*DEV_SPLITS, "test")  # no training batch may hold one of their ids
ROLES_FILE = "roles.parquet"  # the role index: one row (id, task, split) per problem of every task
TRAINING_COLUMNS: tuple[str, ...] = ("id", "task", "problem", "solution")


class SplitValidationError(ConfigError):
    """The splits break an invariant (empty split, bad schema, leakage); the message names the task."""


class LeakageError(SplitValidationError):
    """A held-out (dev or test) problem id is in training data."""


def read_task_split(path: Path, columns: Sequence[str], *, missing_hint: str = "") -> pd.DataFrame:
    """One ``<task>/<split>.parquet`` as written here: checked, ids as strings, sorted by id.

    The order is independent of how the file was written; training batches, shot draws and
    test cuts all depend on it.
    """
    if not path.is_file():
        raise ConfigError(f"--tasks-dir: {path} not found{missing_hint}")
    frame = pd.read_parquet(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {missing}")
    frame = frame.assign(id=frame["id"].astype(str))
    if frame["id"].duplicated().any():
        raise ConfigError(f"{path}: duplicate ids, e.g. {frame['id'][frame['id'].duplicated()].iloc[0]!r}")
    return frame.sort_values("id", kind="stable").reset_index(drop=True)


def assert_disjoint(train_ids: Iterable[Any], held_out: Iterable[Any], what: str) -> None:
    """Raise :class:`LeakageError` naming ``what`` when any id of ``train_ids`` is in ``held_out``.

    The trainers call it for every batch with :func:`held_out_ids`, so no dev or test problem can
    reach a gradient even if a split file was edited by hand.
    """
    held_out_set = held_out if isinstance(held_out, set | frozenset) else {str(i) for i in held_out}
    leaked = sorted({str(i) for i in train_ids} & held_out_set)
    if leaked:
        raise LeakageError(f"{what}: {len(leaked)} dev/test problem id(s) in training data, e.g. {leaked[:3]}")


def held_out_ids(tasks_dir: str | Path) -> frozenset[str]:
    """The ids of every ``dev_pool``, ``dev_monitor`` and ``test`` problem (all tasks), for :func:`assert_disjoint`.

    Read from the role index ``<tasks_dir>/roles.parquet``, so the trainers never open a test file.
    """
    path = Path(tasks_dir) / ROLES_FILE
    if not path.is_file():
        raise ConfigError(f"--tasks-dir: {path} not found (run split-tasks)")
    roles = pd.read_parquet(path, columns=["id", "split"])
    return frozenset(roles.loc[roles["split"].isin(HELD_OUT_SPLITS), "id"].astype(str))


def task_file(tasks_dir: str | Path, task: str, role: str) -> Path:
    """Where one task's role lives: ``<tasks_dir>/<task>/<role>.parquet``."""
    if role not in SPLITS:
        raise ValueError(f"role {role!r}: expected one of {SPLITS}")
    return Path(tasks_dir) / task / f"{role}.parquet"


def read_role(
    tasks_dir: str | Path, task: str, role: str, columns: Sequence[str], *, missing_hint: str = ""
) -> pd.DataFrame:
    """One task's role as :func:`read_task_split` returns it (checked, sorted by id)."""
    return read_task_split(task_file(tasks_dir, task, role), columns, missing_hint=missing_hint)


def load_task_split(tasks_dir: str | Path, task: str, split: str) -> list[dict[str, Any]]:
    """Training rows of one task's role (sorted by id, so input order never matters)."""
    frame = read_role(tasks_dir, task, split, TRAINING_COLUMNS, missing_hint=" (run split-tasks, or check train_tasks)")
    return [{c: frame.at[i, c] for c in TRAINING_COLUMNS} for i in range(len(frame))]


def discover_tasks(tasks_dir: str | Path, only: Sequence[str] | None = None) -> list[str]:
    """Task folders under ``tasks_dir`` that hold a ``test.parquet`` (sorted), or the ``only`` subset."""
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise ConfigError(f"--tasks-dir: {tasks_dir} is not a folder")
    found = sorted(p.parent.name for p in tasks_dir.glob("*/test.parquet"))
    if only:
        unknown = [t for t in only if t not in found]
        if unknown:
            raise ConfigError(f"--tasks: {unknown} not found in {tasks_dir} (found {found})")
        return list(dict.fromkeys(only))
    if not found:
        raise ConfigError(f"--tasks-dir: no <task>/test.parquet under {tasks_dir}")
    return found
