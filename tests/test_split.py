"""Task splits: deterministic, order-independent, deduplicated, disjoint, exact, stratified, validated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fomaml_math.config import MATH_TASKS, ConfigError
from fomaml_math.data.ingest import COLUMNS, build_table
from fomaml_math.data.split import (
    SPLITS,
    STATS_COLUMNS,
    SplitValidationError,
    main,
    make_splits,
    split_sizes,
    split_tasks,
    validate_splits,
)

RATIOS = {"support": 0.30, "query": 0.40, "test": 0.30}


def split_settings(seed: int = 11, *, names: list[str] | None = None, **tasks: Any) -> dict[str, Any]:
    return {"seed": seed, "tasks": {"names": list(names or MATH_TASKS), "meta_test": [], "split": RATIOS} | tasks}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    """Synthetic problems plus planted duplicates: within a task (spacing and case) and across tasks."""
    frame, _ = build_table(
        {"seed": 5, "data": {"source": "synthetic", "synthetic": {"problems_per_task": 53}}, "tasks": list(MATH_TASKS)}
    )
    algebra = frame[frame["task"] == "algebra"].iloc[0]
    geometry = frame[frame["task"] == "geometry"].iloc[0]
    planted = pd.DataFrame(
        [
            algebra.to_dict()
            | {"id": "zz/algebra-copy", "problem": "  " + algebra["problem"].upper().replace(" ", "   ")},
            geometry.to_dict() | {"id": "zz/geometry-in-prealgebra", "task": "prealgebra"},
        ]
    )
    return pd.concat([frame, planted], ignore_index=True).astype({"level": "int64"})


@pytest.fixture(scope="module")
def result(table: pd.DataFrame) -> tuple[dict[str, dict[str, pd.DataFrame]], pd.DataFrame]:
    return make_splits(table, split_settings())


def ids_by_split(splits: dict[str, dict[str, pd.DataFrame]]) -> dict[tuple[str, str], list[str]]:
    return {(task, split): frame["id"].tolist() for task, parts in splits.items() for split, frame in parts.items()}


def test_deterministic_and_seed_dependent(table: pd.DataFrame, result: tuple) -> None:
    splits, stats = result
    again, stats_again = make_splits(table, split_settings())
    assert ids_by_split(again) == ids_by_split(splits)
    pd.testing.assert_frame_equal(stats_again, stats)
    other, _ = make_splits(table, split_settings(seed=12))
    assert ids_by_split(other) != ids_by_split(splits)


def test_independent_of_input_order(table: pd.DataFrame, result: tuple) -> None:
    shuffled = table.sample(frac=1.0, random_state=3).reset_index(drop=True)
    splits, _ = make_splits(shuffled, split_settings())
    assert ids_by_split(splits) == ids_by_split(result[0])
    for task, parts in splits.items():
        for split, frame in parts.items():
            pd.testing.assert_frame_equal(frame, result[0][task][split])


def test_duplicates_removed_and_splits_disjoint(table: pd.DataFrame, result: tuple) -> None:
    splits, stats = result
    all_rows = pd.concat([frame for parts in splits.values() for frame in parts.values()])
    assert all_rows["id"].is_unique
    assert all_rows["problem"].str.casefold().str.split().str.join(" ").is_unique
    assert "zz/algebra-copy" not in set(all_rows["id"]) and "zz/geometry-in-prealgebra" not in set(all_rows["id"])
    removed = stats.set_index("task")["duplicates_removed"]
    assert removed["algebra"] == 1 and removed["prealgebra"] == 1 and removed["all"] == 2
    # nothing else is lost: every remaining problem is in exactly one split (ratios sum to 1)
    assert len(all_rows) == len(table) - 2
    assert list(all_rows.columns) == [*COLUMNS, "split"]


def test_each_split_within_one_of_its_ratio(result: tuple) -> None:
    splits, stats = result
    for task, parts in splits.items():
        total = sum(len(frame) for frame in parts.values())
        for split in SPLITS:
            assert abs(len(parts[split]) - RATIOS[split] * total) < 1, (task, split)
            assert (parts[split]["split"] == split).all()
    by_task = stats.set_index("task")
    assert list(stats.columns) == list(STATS_COLUMNS)
    assert stats["task"].tolist() == [*MATH_TASKS, "all"]
    assert (by_task["support"] + by_task["query"] + by_task["test"] == by_task["total"]).all()
    assert by_task.loc["all", "total"] == by_task.loc[list(MATH_TASKS), "total"].sum()


def test_stratified_by_level(result: tuple) -> None:
    for task, parts in result[0].items():
        rows = pd.concat(parts.values())
        for level, group in rows.groupby("level"):
            for split in SPLITS:
                expected = RATIOS[split] * len(group)
                assert abs((group["split"] == split).sum() - expected) < 2, (task, level, split)


def test_real_sample_splits(math_sample_dir: Path) -> None:
    table, _ = build_table(
        {"seed": 0, "data": {"source": "local", "local": {"path": str(math_sample_dir)}}, "tasks": list(MATH_TASKS)}
    )
    splits, stats = make_splits(table, split_settings(meta_test=["precalculus"]))
    by_task = stats.set_index("task")
    assert by_task.loc["algebra", ["support", "query", "test", "total"]].tolist() == [71, 95, 71, 237]
    assert by_task.loc["precalculus", "role"] == "meta_test"
    assert by_task.loc["algebra", "role"] == "train"
    assert by_task.loc["all", "total"] == 1000 - by_task.loc["all", "duplicates_removed"]
    assert all(len(frame) > 0 for frame in splits["precalculus"].values())


def test_ratios_below_one_leave_the_rest_unused(table: pd.DataFrame) -> None:
    ratios = {"support": 0.2, "query": 0.2, "test": 0.1}
    splits, stats = make_splits(table, split_settings(split=ratios))
    for task, parts in splits.items():
        row = stats.set_index("task").loc[task]
        for split in SPLITS:
            assert abs(len(parts[split]) - ratios[split] * row["total"]) < 1
        assert row["unused"] == row["total"] - sum(len(frame) for frame in parts.values()) > 0


def test_split_sizes_are_exact() -> None:
    for total in range(0, 200):
        for ratios in ({"support": 0.3, "query": 0.4, "test": 0.3}, {"support": 1 / 3, "query": 1 / 3, "test": 1 / 3}):
            sizes = split_sizes(total, ratios)
            assert sum(sizes.values()) == total
            assert all(abs(sizes[split] - ratios[split] * total) < 1 for split in SPLITS)
    assert split_sizes(10, RATIOS) == {"support": 3, "query": 4, "test": 3, "unused": 0}


def test_too_few_problems_fail_validation_and_write_nothing(table: pd.DataFrame, tmp_path: Path) -> None:
    tiny = pd.concat([table[table["task"] == "algebra"], table[table["task"] == "geometry"].head(2)])
    input_path, out_dir = tmp_path / "math.parquet", tmp_path / "tasks"
    tiny.to_parquet(input_path)
    out_dir.mkdir()
    (out_dir / "previous.txt").write_text("an earlier, complete run")
    with pytest.raises(
        SplitValidationError, match=r"^task geometry: the (support|query|test) split is empty \(2 problem"
    ):
        split_tasks(split_settings(names=["algebra", "geometry"]), input_path, out_dir, tmp_path / "stats.tsv")
    assert [p.name for p in out_dir.iterdir()] == ["previous.txt"]
    assert not (tmp_path / "stats.tsv").exists()


def test_validation_catches_leakage_and_bad_schema(result: tuple) -> None:
    splits = {task: dict(parts) for task, parts in result[0].items()}
    leaked = splits["number_theory"]["support"].iloc[[0]].assign(split="test")
    splits["number_theory"]["test"] = pd.concat([splits["number_theory"]["test"], leaked], ignore_index=True)
    with pytest.raises(
        SplitValidationError, match=r"^task number_theory: id .* is in number_theory/support and number_theory/test"
    ):
        validate_splits(splits)

    splits = {task: dict(parts) for task, parts in result[0].items()}
    copied = splits["algebra"]["support"].iloc[[0]].assign(id="other-id", split="query")
    splits["algebra"]["query"] = pd.concat([splits["algebra"]["query"], copied], ignore_index=True)
    with pytest.raises(
        SplitValidationError, match=r"^task algebra: the problem of 'other-id' \(algebra/query\) is also"
    ):
        validate_splits(splits)

    splits = {task: dict(parts) for task, parts in result[0].items()}
    splits["geometry"]["test"] = splits["geometry"]["test"].astype({"level": "str"})
    with pytest.raises(SplitValidationError, match=r"^task geometry: test split has column level has dtype"):
        validate_splits(splits)


def test_input_errors_name_the_file(tmp_path: Path, table: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match=r"--input: .* not found"):
        split_tasks(split_settings(), tmp_path / "missing.parquet", tmp_path / "tasks", tmp_path / "s.tsv")
    path = tmp_path / "math.parquet"
    table.drop(columns="answer").to_parquet(path)
    with pytest.raises(ConfigError, match=r"math\.parquet: missing column\(s\) \['answer'\]"):
        split_tasks(split_settings(), path, tmp_path / "tasks", tmp_path / "s.tsv")


def test_cli_end_to_end(table: pd.DataFrame, tmp_path: Path) -> None:
    input_path = tmp_path / "data" / "math.parquet"
    input_path.parent.mkdir()
    table.to_parquet(input_path)
    settings = split_settings(names=["algebra", "geometry", "precalculus"], meta_test=["precalculus"])
    out_dir, stats_path = tmp_path / "data" / "tasks", tmp_path / "data" / "split_stats.tsv"
    argv = ["--settings", json.dumps(settings), "--input", str(input_path), "--out-dir", str(out_dir)]
    assert main([*argv, "--stats", str(stats_path)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["algebra", "geometry", "precalculus"]
    for task in ("algebra", "geometry", "precalculus"):
        assert sorted(p.name for p in (out_dir / task).iterdir()) == [
            "query.parquet",
            "support.parquet",
            "test.parquet",
        ]
        support = pd.read_parquet(out_dir / task / "support.parquet")
        assert list(support.columns) == [*COLUMNS, "split"] and support["level"].dtype == "int64"
    stats = pd.read_csv(stats_path, sep="\t")
    assert stats["task"].tolist() == ["algebra", "geometry", "precalculus", "all"]
    assert stats["role"].tolist() == ["train", "train", "meta_test", "all"]
    assert stats.loc[stats["task"] == "algebra", "total"].item() == 53  # its planted duplicate removed
    assert not list(out_dir.parent.glob(".*.tmp"))  # no leftovers of the atomic writes
