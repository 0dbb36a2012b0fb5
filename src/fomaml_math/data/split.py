"""Split the normalised table into per-task support / query / test sets.

For every task in ``tasks.names`` (``tasks.meta_test`` tasks too: they need support examples for
few-shot adaptation and a test split for evaluation), this writes
``<out-dir>/<task>/{support,query,test}.parquet`` (the table's columns plus ``split``) and a stats
TSV, the seed's printed count table. The split is:

- **deduplicated**: problems with the same normalised text (within a task or across tasks) are
  kept once (the smallest id), so no problem sits in two splits;
- **independent of the input order** and deterministic for a seed: within a task, problems are
  ordered by level, then by a seeded hash of their id;
- **stratified by level** and **exact**: that order is dealt out to the splits systematically, so
  each level is spread over the splits in proportion and each split holds its ratio x the task's
  total within one problem. When the ratios sum to less than 1 the rest is left unused.

Validation (always on) checks non-empty splits, the schema and that no id or problem text is in
two splits; a failure raises :class:`SplitValidationError` naming the task, before anything is
written (the tasks folder is replaced atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.config import MATH_TASKS, ConfigError, add_settings_arguments, settings_from_args
from fomaml_math.data.ingest import COLUMNS
from fomaml_math.io import atomic_dir, write_tsv

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("support", "query", "test")
UNUSED = "unused"  # the share left over when the ratios sum to less than 1
STATS_COLUMNS: tuple[str, ...] = (
    "task",
    "role",
    "support",
    "query",
    "test",
    "unused",
    "total",
    "duplicates_removed",
)
_TEXT_COLUMNS = ("id", "task", "source_split", "problem", "solution", "answer", "split")
_RATIO_DECIMALS = 9  # ratio x total is rounded here first, so 0.3 x 10 counts as exactly 3


class SplitValidationError(ConfigError):
    """The splits break an invariant (empty split, bad schema, leakage); the message names the task."""


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


def normalise_problem_text(text: str) -> str:
    """What counts as "the same problem": Unicode-normalised, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def remove_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep one row (the smallest id) per normalised problem text; also returns the removed count per task."""
    keyed = frame.assign(_key=frame["problem"].map(normalise_problem_text)).sort_values("id", kind="stable")
    duplicated = keyed["_key"].duplicated(keep="first")
    removed = keyed.loc[duplicated, "task"].value_counts().to_dict()
    kept = keyed.loc[~duplicated].drop(columns="_key").sort_values(["task", "id"], ignore_index=True)
    return kept, {str(task): int(count) for task, count in removed.items()}


def split_sizes(total: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """Sizes per split (and ``unused``) summing to ``total``, each within one of its ratio x total.

    Largest remainder: floors first, then the leftover problems go to the largest fractional
    parts (ties in the order support, query, test, unused).
    """
    shares = {split: float(ratios[split]) for split in SPLITS}
    shares[UNUSED] = max(0.0, 1.0 - sum(shares.values()))
    exact = {name: round(share * total, _RATIO_DECIMALS) for name, share in shares.items()}
    sizes = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(shares, key=lambda name: -(exact[name] - sizes[name]))  # sorted() is stable
    for name in by_remainder[: total - sum(sizes.values())]:
        sizes[name] += 1
    return sizes


def _seeded_rank(seed: int, record_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{record_id}".encode()).hexdigest()


def assign_splits(task_frame: pd.DataFrame, ratios: Mapping[str, float], seed: int) -> pd.Series:
    """The split of each row of one task (``support``/``query``/``test``/``unused``), indexed like the frame.

    Rows are ordered by level, then by a seeded hash of the id (so the input order does not
    matter), then dealt out one by one to the split furthest behind its share of the rows dealt
    so far. Each level, a contiguous block of that order, is thereby spread in proportion.
    """
    sizes = split_sizes(len(task_frame), ratios)
    order = sorted(
        task_frame.index, key=lambda i: (task_frame.at[i, "level"], _seeded_rank(seed, task_frame.at[i, "id"]))
    )
    dealt = dict.fromkeys(sizes, 0)
    assignment: dict[Any, str] = {}
    for position, index in enumerate(order, start=1):
        open_splits = [name for name in sizes if dealt[name] < sizes[name]]
        name = max(open_splits, key=lambda n: sizes[n] * position / len(order) - dealt[n])
        dealt[name] += 1
        assignment[index] = name
    return pd.Series(assignment, dtype="str").reindex(task_frame.index)


def _check_input(frame: pd.DataFrame, source: str) -> None:
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise ConfigError(f"{source}: missing column(s) {missing}; expected the ingest table with {list(COLUMNS)}")


def _schema_problems(frame: pd.DataFrame) -> list[str]:
    problems = []
    expected = [*COLUMNS, "split"]
    if list(frame.columns) != expected:
        problems.append(f"columns {list(frame.columns)} instead of {expected}")
        return problems
    for column in _TEXT_COLUMNS:
        if not (pd.api.types.is_string_dtype(frame[column]) or frame[column].map(type).eq(str).all()):
            problems.append(f"column {column} is not text")
        elif frame[column].isna().any():
            problems.append(f"column {column} has missing values")
    if not pd.api.types.is_integer_dtype(frame["level"]):
        problems.append(f"column level has dtype {frame['level'].dtype}, expected integers")
    elif not frame["level"].between(0, 5).all():
        problems.append("column level has values outside 0..5")
    return problems


def validate_splits(splits: Mapping[str, Mapping[str, pd.DataFrame]]) -> None:
    """Non-empty splits with the right schema and no id or problem text in two splits; raises otherwise."""
    first_seen_id: dict[str, str] = {}
    first_seen_text: dict[str, tuple[str, str]] = {}
    for task, task_splits in splits.items():
        total = sum(len(frame) for frame in task_splits.values())
        for split in SPLITS:
            frame = task_splits.get(split)
            if frame is None or frame.empty:
                raise SplitValidationError(
                    f"task {task}: the {split} split is empty ({total} problem(s) after removing duplicates; "
                    "add problems or change tasks.split)"
                )
            problems = _schema_problems(frame)
            if problems:
                raise SplitValidationError(f"task {task}: {split} split has {'; '.join(problems)}")
            if not frame["split"].eq(split).all() or not frame["task"].eq(task).all():
                raise SplitValidationError(f"task {task}: {split} split holds rows of another task or split")
            where = f"{task}/{split}"
            for record_id, problem in zip(frame["id"], frame["problem"], strict=True):
                if record_id in first_seen_id:
                    raise SplitValidationError(
                        f"task {task}: id {record_id!r} is in {first_seen_id[record_id]} and {where}"
                    )
                first_seen_id[record_id] = where
                key = normalise_problem_text(problem)
                if key in first_seen_text:
                    other_where, other_id = first_seen_text[key]
                    raise SplitValidationError(
                        f"task {task}: the problem of {record_id!r} ({where}) is also {other_id!r} ({other_where})"
                    )
                first_seen_text[key] = (where, record_id)


def make_splits(
    table: pd.DataFrame, settings: Mapping[str, Any], *, source: str = "the input table"
) -> tuple[dict[str, dict[str, pd.DataFrame]], pd.DataFrame]:
    """Deduplicate, split and validate; returns ``{task: {split: frame}}`` and the stats table.

    ``source`` names the table in error messages (its file, when read from one).
    """
    _check_input(table, source)
    tasks_settings = settings["tasks"]
    task_names: Sequence[str] = tasks_settings["names"]
    meta_test = set(tasks_settings.get("meta_test", []))
    ratios = tasks_settings.get("split", {"support": 0.30, "query": 0.40, "test": 0.30})
    seed = int(settings["seed"])
    unknown = [task for task in task_names if task not in MATH_TASKS]
    if unknown:
        raise ConfigError(f"tasks.names: unknown task(s) {unknown}; expected names from {list(MATH_TASKS)}")
    if sum(ratios[split] for split in SPLITS) > 1 + 1e-9:
        raise ConfigError(f"tasks.split: support + query + test must be <= 1, got {dict(ratios)}")

    table = table.loc[table["task"].isin(task_names), list(COLUMNS)]
    table, duplicates_removed = remove_duplicates(table)

    splits: dict[str, dict[str, pd.DataFrame]] = {}
    stats_rows = []
    for task in task_names:
        task_frame = table.loc[table["task"] == task]
        assigned = task_frame.assign(split=assign_splits(task_frame, ratios, seed))
        splits[task] = {
            split: assigned.loc[assigned["split"] == split].sort_values("id", ignore_index=True) for split in SPLITS
        }
        counts = assigned["split"].value_counts()
        stats_rows.append(
            {
                "task": task,
                "role": "meta_test" if task in meta_test else "train",
                **{name: int(counts.get(name, 0)) for name in (*SPLITS, UNUSED)},
                "total": len(task_frame),
                "duplicates_removed": duplicates_removed.get(task, 0),
            }
        )
    stats = pd.DataFrame(stats_rows, columns=list(STATS_COLUMNS))
    all_row = {"task": "all", "role": "all", **stats[list(STATS_COLUMNS[2:])].sum().astype(int).to_dict()}
    stats = pd.concat([stats, pd.DataFrame([all_row])], ignore_index=True)
    validate_splits(splits)
    return splits, stats


def write_splits(splits: Mapping[str, Mapping[str, pd.DataFrame]], out_dir: str | Path) -> None:
    """Write every task's splits into a temporary folder that then replaces ``out_dir`` whole."""
    with atomic_dir(out_dir) as staging:
        for task, task_splits in splits.items():
            (staging / task).mkdir()
            for split, frame in task_splits.items():
                frame.to_parquet(staging / task / f"{split}.parquet", index=False)


def split_tasks(
    settings: Mapping[str, Any], input_path: str | Path, out_dir: str | Path, stats_path: str | Path
) -> pd.DataFrame:
    """Read the table, split, validate, write the task folders and the stats TSV; returns the stats."""
    input_path = Path(input_path)
    if not input_path.is_file():
        raise ConfigError(f"--input: {input_path} not found (run the ingest stage first)")
    splits, stats = make_splits(pd.read_parquet(input_path), settings, source=str(input_path))
    write_splits(splits, out_dir)
    write_tsv(stats_path, stats)
    removed = int(stats["duplicates_removed"].iloc[-1])
    logger.info("%d duplicate problem(s) removed; problems per split:\n%s", removed, stats.to_string(index=False))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fomaml_math split-tasks",
        description="Split the normalised MATH table into per-task support/query/test parquet files.",
    )
    add_settings_arguments(parser)
    parser.add_argument("--input", required=True, help="the ingest table, e.g. results/data/math.parquet")
    parser.add_argument("--out-dir", required=True, help="folder of <task>/{support,query,test}.parquet")
    parser.add_argument("--stats", required=True, help="TSV of problems per task and split")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    split_tasks(settings_from_args(args, "split"), args.input, args.out_dir, args.stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
