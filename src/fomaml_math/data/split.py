"""Split the normalised table into five data roles per task (docs/data.md explains why).

For every task in ``tasks.names`` (``tasks.meta_test`` tasks too: they are evaluated, so they
need shots and a test split), this writes ``<out-dir>/<task>/<split>.parquet`` for each split in
:data:`SPLITS` (the table's columns plus ``split``, the file's name) and a stats TSV:

- ``support``, ``query`` (:data:`TRAIN_SPLITS`): meta-training; SFT trains on both;
- ``dev_pool``, ``dev_monitor`` (:data:`DEV_SPLITS`): never trained on; the pool the k shots are
  drawn from, and the slice for monitoring, checkpoint selection and calibration;
- ``test``: read only by the final evaluation.

``tasks.split.scheme`` decides where each problem goes:

- ``source_test`` (default): ``test`` = the task's problems from MATH's own test split
  (``source_split == "test"``; with ``test_subset: math500`` only the MATH-500 ones, the rest
  unused); ``dev_pool`` and ``dev_monitor`` are fixed counts carved from MATH train, and
  ``support``/``query`` share the rest of train in proportion ``support : query``.
- ``pooled`` (the seed's scheme): train and test pooled; ``support``/``query``/``dev``/``test``
  ratios of all problems (sum <= 1, the rest unused); dev is cut into ``dev_monitor`` (its count)
  and ``dev_pool`` (the rest, which must hold at least ``dev_pool``).

In both, the split is **deduplicated** (one row per normalised problem text, within and across
tasks; a MATH-test copy wins over a train copy, so the test set stays whole and its problems are
not trained on), **independent of the input order** and deterministic for a seed (problems are
ordered by level, then by a seeded hash of their id), and **stratified by level** and **exact**
(that order is dealt out so each level spreads over the splits in proportion and each split gets
its size exactly).

Validation (always on, before anything is written; the tasks folder is replaced atomically)
checks non-empty splits, the schema, that no id or problem text is in two roles (which also keeps
every dev and test id out of support/query) and, under ``source_test``, that test rows come from
MATH test and every other role from MATH train. A failure raises :class:`SplitValidationError`
naming the task. :func:`assert_disjoint` and :func:`held_out_ids` let the trainers check the same
by id for every training batch.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.config import add_settings_arguments, settings_from_args, split_settings
from fomaml_math.data.math500 import select_math500
from fomaml_math.data.taskfiles import (
    COLUMNS,
    ROLES_FILE,
    RULE_COLUMN,
    SPLITS,
    SplitValidationError,
)
from fomaml_math.data.text import normalise_problem_text
from fomaml_math.errors import ConfigError
from fomaml_math.io import atomic_dir, write_tsv
from fomaml_math.subjects import MATH_TASKS, is_synthetic_task

logger = logging.getLogger(__name__)

UNUSED = "unused"  # problems no role takes: ratios summing to < 1, MATH test outside MATH-500
STATS_COLUMNS: tuple[str, ...] = (
    "task",
    "role",
    *SPLITS,
    UNUSED,
    "total",
    "source_train",
    "source_test",
    "duplicates_removed",
)
_TEXT_COLUMNS = ("id", "task", "source_split", "problem", "solution", "answer", "split")
_RATIO_DECIMALS = 9  # ratio x total is rounded here first, so 0.3 x 10 counts as exactly 3
_POOLED_TIE_ORDER = ("support", "query", "dev", "test")


def remove_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per normalised problem text (a MATH-test row first, then the smallest id); removed count per task."""
    keyed = frame.assign(
        _key=frame["problem"].map(normalise_problem_text), _train=frame["source_split"].ne("test")
    ).sort_values(["_train", "id"], kind="stable")
    duplicated = keyed["_key"].duplicated(keep="first")
    removed = keyed.loc[duplicated, "task"].value_counts().to_dict()
    kept = keyed.loc[~duplicated].drop(columns=["_key", "_train"]).sort_values(["task", "id"], ignore_index=True)
    return kept, {str(task): int(count) for task, count in removed.items()}


def split_sizes(total: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """Sizes per name of ``ratios`` (and ``unused``) summing to ``total``, each within one of its ratio x total.

    Largest remainder: floors first, then the leftover problems go to the largest fractional
    parts (ties in the order of ``ratios``, then ``unused``).
    """
    shares = {name: float(share) for name, share in ratios.items()}
    shares[UNUSED] = max(0.0, 1.0 - sum(shares.values()))
    exact = {name: round(share * total, _RATIO_DECIMALS) for name, share in shares.items()}
    sizes = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(shares, key=lambda name: -(exact[name] - sizes[name]))  # sorted() is stable
    for name in by_remainder[: total - sum(sizes.values())]:
        sizes[name] += 1
    return sizes


def _seeded_rank(seed: int, record_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{record_id}".encode()).hexdigest()


def assign_splits(task_frame: pd.DataFrame, sizes: Mapping[str, int], seed: int) -> pd.Series:
    """Deal the rows of one task out to ``sizes`` (name -> count, summing to the row count); indexed like the frame.

    Rows are ordered by level, then by a seeded hash of the id (so the input order does not
    matter), then dealt out one by one to the split furthest behind its share of the rows dealt
    so far. Each level, a contiguous block of that order, is thereby spread in proportion.
    """
    if sum(sizes.values()) != len(task_frame):
        raise ValueError(f"sizes {dict(sizes)} do not add up to {len(task_frame)} rows")
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


def _source_test_sizes(task: str, n_train: int, split: Mapping[str, Any]) -> dict[str, int]:
    """Sizes of the four roles carved from one task's MATH-train problems."""
    dev_pool, dev_monitor = int(split["dev_pool"]), int(split["dev_monitor"])
    needed = dev_pool + dev_monitor + 2
    if n_train < needed:
        raise ConfigError(
            f"task {task}: {n_train} MATH-train problem(s) after removing duplicates, but tasks.split.dev_pool "
            f"({dev_pool}) + tasks.split.dev_monitor ({dev_monitor}) + one support and one query need {needed}; "
            "lower those counts or add problems"
        )
    share = split["support"] / (split["support"] + split["query"])
    rest = split_sizes(n_train - dev_pool - dev_monitor, {"support": share, "query": 1.0 - share})
    # a rounding corner (e.g. 3 problems at 0.01 : 0.99) could leave one of them empty
    if rest["support"] == 0 or rest["query"] == 0:
        raise ConfigError(
            f"task {task}: tasks.split.support : tasks.split.query leaves {rest} of the "
            f"{n_train - dev_pool - dev_monitor} MATH-train problems after dev; change the ratios or the dev counts"
        )
    return {"dev_pool": dev_pool, "dev_monitor": dev_monitor, "support": rest["support"], "query": rest["query"]}


def _pooled_sizes(task: str, total: int, split: Mapping[str, Any]) -> dict[str, int]:
    """Sizes of all five roles (and unused) over one task's pooled problems."""
    sizes = split_sizes(total, {name: split[name] for name in _POOLED_TIE_ORDER})
    dev = sizes.pop("dev")
    least_pool, dev_monitor = int(split["dev_pool"]), int(split["dev_monitor"])
    dev_pool = dev - dev_monitor
    if dev_pool < least_pool:
        raise ConfigError(
            f"task {task}: tasks.split.dev ({split['dev']:g}) of {total} problems gives {dev} dev problems, but "
            f"tasks.split.dev_monitor ({dev_monitor}) + tasks.split.dev_pool ({least_pool}, the least pool) "
            f"need {dev_monitor + least_pool}; raise tasks.split.dev or lower the counts"
        )
    return {
        "support": sizes["support"],
        "query": sizes["query"],
        "dev_pool": dev_pool,
        "dev_monitor": dev_monitor,
        "test": sizes["test"],
        UNUSED: sizes[UNUSED],
    }


def _columns(frame: pd.DataFrame) -> list[str]:
    """The ingest columns, and the synthetic tasks' hidden ``rule`` where the table has one (carried, never read)."""
    return [*COLUMNS, RULE_COLUMN] if RULE_COLUMN in frame.columns else list(COLUMNS)


def _check_input(frame: pd.DataFrame, source: str) -> None:
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise ConfigError(f"{source}: missing column(s) {missing}; expected the ingest table with {list(COLUMNS)}")


def _schema_problems(frame: pd.DataFrame) -> list[str]:
    problems = []
    expected = [*_columns(frame), "split"]
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


def validate_splits(splits: Mapping[str, Mapping[str, pd.DataFrame]], *, scheme: str = "source_test") -> None:
    """Non-empty splits with the right schema, no id or problem text in two roles, the scheme's sources; raises.

    Ids and texts are checked across all five roles of all tasks, which covers "no dev or test
    id in support/query". Under ``source_test`` test rows must come from MATH test and the
    other roles from MATH train (no MATH-test problem is trained on or used for selection).
    """
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
            if scheme == "source_test":
                expected_source = "test" if split == "test" else "train"
                wrong = frame.loc[frame["source_split"] != expected_source, "id"]
                if not wrong.empty:
                    raise SplitValidationError(
                        f"task {task}: {split} split holds {len(wrong)} problem(s) that are not from MATH "
                        f"{expected_source} (e.g. {wrong.iloc[0]!r}) under tasks.split.scheme source_test"
                    )
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


def _check_sources(table: pd.DataFrame, task_names: Sequence[str]) -> None:
    """``source_test`` needs both MATH splits for every task; say which setting pools them instead."""
    for task in task_names:
        sources = set(table.loc[table["task"] == task, "source_split"])
        if "train" not in sources:
            raise ConfigError(
                f"task {task}: no MATH-train problems (source_split 'train') in the data, which tasks.split.scheme "
                "source_test carves support, query and dev from; set tasks.split.scheme: pooled to split train and "
                "test together"
            )
        if "test" not in sources:
            raise ConfigError(
                f"task {task}: no MATH-test problems (source_split 'test') in the data for tasks.split.scheme "
                "source_test; ingest MATH's test split too, or set tasks.split.scheme: pooled"
            )


def _assign_source_test(
    task: str, task_frame: pd.DataFrame, split: Mapping[str, Any], seed: int, math500: pd.Series | None
) -> pd.Series:
    is_test = task_frame["source_split"].eq("test")
    train, test = task_frame.loc[~is_test], task_frame.loc[is_test]
    assigned = assign_splits(train, _source_test_sizes(task, len(train), split), seed)
    in_test = pd.Series("test", index=test.index, dtype="str")
    if math500 is not None:
        in_test = in_test.where(math500.reindex(test.index, fill_value=False), UNUSED)
    return pd.concat([assigned, in_test]).reindex(task_frame.index)


def make_splits(
    table: pd.DataFrame,
    settings: Mapping[str, Any],
    *,
    source: str = "the input table",
    math500_reference: pd.DataFrame | None = None,
) -> tuple[dict[str, dict[str, pd.DataFrame]], pd.DataFrame]:
    """Deduplicate, split and validate; returns ``{task: {split: frame}}`` and the stats table.

    ``source`` names the table in error messages (its file, when read from one);
    ``math500_reference`` replaces the shipped MATH-500 table (``test_subset: math500``). Every
    error a configuration or data set can cause is raised here, before anything is written.
    """
    _check_input(table, source)
    tasks_settings = settings["tasks"]
    task_names: Sequence[str] = tasks_settings["names"]
    meta_test = set(tasks_settings.get("meta_test", []))
    split = split_settings(tasks_settings.get("split"))
    seed = int(settings["seed"])
    # Synthetic task names (a family with a variant suffix) exist only in synthetic tables; the config check
    # keeps them away from hub and local data.
    unknown = [task for task in task_names if task not in MATH_TASKS and not is_synthetic_task(task)]
    if unknown:
        raise ConfigError(f"tasks.names: unknown task(s) {unknown}; expected names from {list(MATH_TASKS)}")

    table = table.loc[table["task"].isin(task_names), _columns(table)]
    table, duplicates_removed = remove_duplicates(table)
    if split["scheme"] == "source_test":
        _check_sources(table, task_names)
    math500 = None
    if split["scheme"] == "source_test" and split["test_subset"] == "math500":
        test_rows = table.loc[table["source_split"] == "test"]
        math500 = select_math500(test_rows, task_names, math500_reference)
        logger.info("MATH-500: %d test problem(s) kept, %d unused", int(math500.sum()), int((~math500).sum()))

    splits: dict[str, dict[str, pd.DataFrame]] = {}
    stats_rows = []
    for task in task_names:
        task_frame = table.loc[table["task"] == task]
        if split["scheme"] == "source_test":
            roles = _assign_source_test(task, task_frame, split, seed, math500)
        else:
            roles = assign_splits(task_frame, _pooled_sizes(task, len(task_frame), split), seed)
        assigned = task_frame.assign(split=roles)
        splits[task] = {
            name: assigned.loc[assigned["split"] == name].sort_values("id", ignore_index=True) for name in SPLITS
        }
        counts = assigned["split"].value_counts()
        sources = task_frame["source_split"].value_counts()
        stats_rows.append(
            {
                "task": task,
                "role": "meta_test" if task in meta_test else "train",
                **{name: int(counts.get(name, 0)) for name in (*SPLITS, UNUSED)},
                "total": len(task_frame),
                "source_train": int(sources.get("train", 0)),
                "source_test": int(sources.get("test", 0)),
                "duplicates_removed": duplicates_removed.get(task, 0),
            }
        )
    stats = pd.DataFrame(stats_rows, columns=list(STATS_COLUMNS))
    all_row = {"task": "all", "role": "all", **stats[list(STATS_COLUMNS[2:])].sum().astype(int).to_dict()}
    stats = pd.concat([stats, pd.DataFrame([all_row])], ignore_index=True)
    validate_splits(splits, scheme=split["scheme"])
    return splits, stats


def write_splits(splits: Mapping[str, Mapping[str, pd.DataFrame]], out_dir: str | Path) -> None:
    """Write every task's splits into a temporary folder that then replaces ``out_dir`` whole."""
    roles = []
    with atomic_dir(out_dir) as staging:
        for task, task_splits in splits.items():
            (staging / task).mkdir()
            for split, frame in task_splits.items():
                frame.to_parquet(staging / task / f"{split}.parquet", index=False)
                roles.append(pd.DataFrame({"id": frame["id"].astype(str), "task": task, "split": split}))
        index = pd.concat(roles, ignore_index=True) if roles else pd.DataFrame(columns=["id", "task", "split"])
        index.to_parquet(staging / ROLES_FILE, index=False)


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
        description="Split the normalised MATH table into per-task support/query/dev_pool/dev_monitor/test files.",
    )
    add_settings_arguments(parser)
    parser.add_argument("--input", required=True, help="the ingest table, e.g. results/data/math.parquet")
    parser.add_argument("--out-dir", required=True, help=f"folder of <task>/{{{','.join(SPLITS)}}}.parquet")
    parser.add_argument("--stats", required=True, help="TSV of problems per task and split")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    split_tasks(settings_from_args(args, "split_tasks"), args.input, args.out_dir, args.stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
