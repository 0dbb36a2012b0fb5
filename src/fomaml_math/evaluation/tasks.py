"""The task data an evaluation job reads: each task's ``dev_pool`` (where shots come from) and ``test``.

Files are read through :mod:`fomaml_math.data.taskfiles` (checked, sorted by id), so every draw and
every cut of the test problems is independent of how the files were written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.data.taskfiles import read_role, task_file
from fomaml_math.errors import ConfigError
from fomaml_math.kshot import draw_shots

POOL_COLUMNS = ("id", "problem", "solution")
TEST_COLUMNS = ("id", "level", "problem", "solution", "answer")


@dataclass(frozen=True)
class TaskData:
    name: str
    pool: pd.DataFrame  # dev_pool: where the shots come from; sorted by id
    test: pd.DataFrame  # sorted by id, cut to eval.max_test_problems
    role: str = "train"  # train | meta_test

    def draw(self, shots: int, *, seed: int, repeat: int) -> tuple[list[str], list[dict[str, Any]]]:
        """The evaluation's shots of ``repeat``: their ids and their (problem, solution) records."""
        ids = draw_shots(self.pool["id"].tolist(), shots, seed=seed, task=self.name, repeat=repeat)
        return ids, shot_examples(self.pool, ids)


def shot_examples(pool: pd.DataFrame, ids: Sequence[str]) -> list[dict[str, Any]]:
    """The (problem, solution) records of the drawn ``ids``, in draw order."""
    by_id = pool.set_index("id")
    return [{"problem": by_id.at[i, "problem"], "solution": by_id.at[i, "solution"]} for i in ids]


def load_task(tasks_dir: str | Path, task: str, max_test_problems: int | None, role: str = "train") -> TaskData:
    pool = read_role(tasks_dir, task, "dev_pool", POOL_COLUMNS)
    test = read_role(tasks_dir, task, "test", TEST_COLUMNS)
    if max_test_problems is not None:
        test = test.iloc[: int(max_test_problems)].reset_index(drop=True)
    return TaskData(task, pool, test, role)


def load_tasks(
    tasks_dir: str | Path, names: Sequence[str], *, max_test_problems: int | None, meta_test: Sequence[str], shots: int
) -> list[TaskData]:
    """Every task of a job (``meta_test`` ones marked so); a pool smaller than ``shots`` is a settings error."""
    held_out = set(meta_test)
    tasks = [load_task(tasks_dir, t, max_test_problems, "meta_test" if t in held_out else "train") for t in names]
    for task in tasks:  # before loading a model: a too-small shot pool is a settings error
        if shots > len(task.pool):
            raise ConfigError(
                f"--shots {shots}: task {task.name!r} has only {len(task.pool)} dev_pool examples "
                f"({task_file(tasks_dir, task.name, 'dev_pool')}; raise tasks.split.dev_pool)"
            )
    return tasks


def repeats_for(shots: int, repeats: int) -> list[int]:
    """The repeats of a k-shot job: 0 shots has nothing to redraw, so one repeat."""
    return [0] if shots == 0 else list(range(int(repeats)))


def load_dev_tasks(tasks_dir: str | Path, names: Sequence[str]) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """The tuner's data: each named task's (``dev_pool``, ``dev_monitor``), and nothing else: no test file, and
    no other task's file (a held-out task's dev data is not the tuner's to read)."""
    if not names:
        raise ConfigError("--tasks: name at least one training task to tune on")
    return {
        t: (read_role(tasks_dir, t, "dev_pool", POOL_COLUMNS), read_role(tasks_dir, t, "dev_monitor", POOL_COLUMNS))
        for t in sorted(set(names))
    }
