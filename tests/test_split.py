"""Task splits: five roles, both schemes, deterministic, order-independent, deduplicated, disjoint, exact, validated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fomaml_math.data import ingest
from fomaml_math.data.ingest import build_table
from fomaml_math.data.split import STATS_COLUMNS, main, make_splits, split_sizes, split_tasks, validate_splits
from fomaml_math.data.taskfiles import (
    COLUMNS,
    DEV_SPLITS,
    RULE_COLUMN,
    SPLITS,
    TRAIN_SPLITS,
    LeakageError,
    SplitValidationError,
    assert_disjoint,
    held_out_ids,
)
from fomaml_math.errors import ConfigError
from fomaml_math.subjects import MATH_TASKS

SOURCE_TEST = {"scheme": "source_test", "dev_pool": 8, "dev_monitor": 5, "support": 0.30, "query": 0.40}
POOLED = {
    "scheme": "pooled",
    "dev_pool": 4,
    "dev_monitor": 3,
    "support": 0.30,
    "query": 0.40,
    "dev": 0.15,
    "test": 0.15,
}
POOLED_RATIOS = {name: POOLED[name] for name in ("support", "query", "dev", "test")}


def split_settings(seed: int = 11, *, names: list[str] | None = None, split: dict | None = None, **tasks: Any) -> dict:
    return {"seed": seed, "tasks": {"names": list(names or MATH_TASKS), "meta_test": [], "split": split or SOURCE_TEST}}


def with_tasks(settings: dict, **tasks: Any) -> dict:
    return settings | {"tasks": settings["tasks"] | tasks}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    """Synthetic problems (train and test) plus planted duplicates: within a task, across tasks, across sources."""
    frame, _ = build_table(
        {"seed": 5, "data": {"source": "synthetic", "synthetic": {"problems_per_task": 53}}, "tasks": list(MATH_TASKS)}
    )
    algebra = frame[frame["task"] == "algebra"].iloc[0]
    geometry = frame[frame["task"] == "geometry"].iloc[0]
    tested = frame[(frame["task"] == "number_theory") & (frame["source_split"] == "test")].iloc[0]
    planted = pd.DataFrame(
        [
            algebra.to_dict()
            | {"id": "zz/algebra-copy", "problem": "  " + algebra["problem"].upper().replace(" ", "   ")},
            geometry.to_dict() | {"id": "zz/geometry-in-prealgebra", "task": "prealgebra"},
            # a MATH-train copy of a test problem with a smaller id: the test copy must win
            tested.to_dict() | {"id": "0/train-copy-of-test", "source_split": "train"},
        ]
    )
    return pd.concat([frame, planted], ignore_index=True).astype({"level": "int64"})


@pytest.fixture(scope="module")
def result(table: pd.DataFrame) -> tuple[dict[str, dict[str, pd.DataFrame]], pd.DataFrame]:
    return make_splits(table, split_settings())


@pytest.fixture(scope="module")
def pooled(table: pd.DataFrame) -> tuple[dict[str, dict[str, pd.DataFrame]], pd.DataFrame]:
    return make_splits(table, split_settings(split=POOLED))


def ids_by_split(splits: dict[str, dict[str, pd.DataFrame]]) -> dict[tuple[str, str], list[str]]:
    return {(task, split): frame["id"].tolist() for task, parts in splits.items() for split, frame in parts.items()}


def all_rows(splits: dict[str, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    return pd.concat([frame for parts in splits.values() for frame in parts.values()], ignore_index=True)


def test_role_constants() -> None:
    assert SPLITS == ("support", "query", "dev_pool", "dev_monitor", "test")
    assert (TRAIN_SPLITS, DEV_SPLITS) == (("support", "query"), ("dev_pool", "dev_monitor"))


def test_deterministic_and_seed_dependent(table: pd.DataFrame, result: tuple) -> None:
    splits, stats = result
    again, stats_again = make_splits(table, split_settings())
    assert ids_by_split(again) == ids_by_split(splits)
    pd.testing.assert_frame_equal(stats_again, stats)
    other, _ = make_splits(table, split_settings(seed=12))
    assert ids_by_split(other) != ids_by_split(splits)
    # the seed moves problems between the train roles only: test is MATH test whatever the seed
    assert all(other[task]["test"]["id"].tolist() == splits[task]["test"]["id"].tolist() for task in MATH_TASKS)


@pytest.mark.parametrize("split", [SOURCE_TEST, POOLED], ids=["source_test", "pooled"])
def test_independent_of_input_order(table: pd.DataFrame, split: dict) -> None:
    expected, _ = make_splits(table, split_settings(split=split))
    shuffled = table.sample(frac=1.0, random_state=3).reset_index(drop=True)
    splits, _ = make_splits(shuffled, split_settings(split=split))
    for task, parts in splits.items():
        for name, frame in parts.items():
            pd.testing.assert_frame_equal(frame, expected[task][name])


def test_duplicates_removed_test_copy_kept_and_roles_disjoint(table: pd.DataFrame, result: tuple) -> None:
    splits, stats = result
    rows = all_rows(splits)
    assert rows["id"].is_unique
    assert rows["problem"].str.casefold().str.split().str.join(" ").is_unique
    assert not {"zz/algebra-copy", "zz/geometry-in-prealgebra", "0/train-copy-of-test"} & set(rows["id"])
    removed = stats.set_index("task")["duplicates_removed"]
    assert (removed["algebra"], removed["prealgebra"], removed["number_theory"], removed["all"]) == (1, 1, 1, 3)
    # source_test with the default subset: every remaining problem has exactly one role
    assert len(rows) == len(table) - 3
    assert list(rows.columns) == [*COLUMNS, RULE_COLUMN, "split"]  # synthetic: the hidden rule is carried along


def test_source_test_roles(table: pd.DataFrame, result: tuple) -> None:
    splits, stats = result
    by_task = stats.set_index("task")
    assert list(stats.columns) == list(STATS_COLUMNS)
    assert stats["task"].tolist() == [*MATH_TASKS, "all"]
    for task, parts in splits.items():
        source = table[(table["task"] == task) & ~table["id"].str.startswith(("zz/", "0/"))]
        # test = exactly the task's MATH-test problems; every other role comes from MATH train
        assert sorted(parts["test"]["id"]) == sorted(source.loc[source["source_split"] == "test", "id"])
        for name in ("support", "query", "dev_pool", "dev_monitor"):
            assert parts[name]["source_split"].eq("train").all(), (task, name)
            assert parts[name]["split"].eq(name).all()
        assert (len(parts["dev_pool"]), len(parts["dev_monitor"])) == (8, 5)
        rest = len(parts["support"]) + len(parts["query"])
        assert rest == (source["source_split"] == "train").sum() - 13
        assert abs(len(parts["support"]) - rest * 3 / 7) < 1 and abs(len(parts["query"]) - rest * 4 / 7) < 1
        row = by_task.loc[task]
        assert [row[name] for name in SPLITS] == [len(parts[name]) for name in SPLITS]
        assert row["unused"] == 0 and row["total"] == row["source_train"] + row["source_test"] == sum(
            map(len, parts.values())
        )
    assert by_task.loc["all", "total"] == by_task.loc[list(MATH_TASKS), "total"].sum()


def test_source_test_train_roles_stratified_by_level(result: tuple) -> None:
    for task, parts in result[0].items():
        train = pd.concat([parts[name] for name in (*TRAIN_SPLITS, *DEV_SPLITS)])
        for level, group in train.groupby("level"):
            for name in (*TRAIN_SPLITS, *DEV_SPLITS):
                expected = len(parts[name]) / len(train) * len(group)
                assert abs((group["split"] == name).sum() - expected) < 2, (task, level, name)


def test_pooled_ratios_within_one_problem(pooled: tuple) -> None:
    splits, stats = pooled
    by_task = stats.set_index("task")
    for task, parts in splits.items():
        total = by_task.loc[task, "total"]
        sizes = {name: len(frame) for name, frame in parts.items()}
        assert sum(sizes.values()) + by_task.loc[task, "unused"] == total
        for name in ("support", "query", "test"):
            assert abs(sizes[name] - POOLED[name] * total) < 1, (task, name)
        assert abs(sizes["dev_pool"] + sizes["dev_monitor"] - POOLED["dev"] * total) < 1
        assert sizes["dev_monitor"] == 3 and sizes["dev_pool"] >= 4
        # pooled mixes the sources: some MATH-test problems are trained on, by design of the seed scheme
        assert set(parts["support"]["source_split"]) == {"train", "test"}
    assert all_rows(splits)["id"].is_unique


def test_pooled_stratified_by_level(pooled: tuple) -> None:
    for task, parts in pooled[0].items():
        rows = pd.concat(parts.values())
        for level, group in rows.groupby("level"):
            for name in ("support", "query", "test"):
                assert abs((group["split"] == name).sum() - POOLED[name] * len(group)) < 2, (task, level, name)


def test_split_sizes_are_exact() -> None:
    for total in range(0, 200):
        for ratios in (POOLED_RATIOS, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, {"support": 0.3, "query": 0.7}):
            sizes = split_sizes(total, ratios)
            assert sum(sizes.values()) == total
            assert all(abs(sizes[name] - ratios[name] * total) < 1 for name in ratios)
    assert split_sizes(20, POOLED_RATIOS) == {"support": 6, "query": 8, "dev": 3, "test": 3, "unused": 0}
    assert split_sizes(10, {"support": 0.2, "query": 0.3}) == {"support": 2, "query": 3, "unused": 5}


def test_too_few_train_problems_name_the_keys_and_write_nothing(table: pd.DataFrame, tmp_path: Path) -> None:
    geometry = table[table["task"] == "geometry"]
    tiny = pd.concat([table[table["task"] == "algebra"], geometry[geometry["source_split"] == "test"]])
    tiny = pd.concat([tiny, geometry[geometry["source_split"] == "train"].head(14)])
    input_path, out_dir = tmp_path / "math.parquet", tmp_path / "tasks"
    tiny.to_parquet(input_path)
    out_dir.mkdir()
    (out_dir / "previous.txt").write_text("an earlier, complete run")
    with pytest.raises(
        ConfigError,
        match=r"^task geometry: 14 MATH-train problem\(s\) .* tasks\.split\.dev_pool \(8\) \+ "
        r"tasks\.split\.dev_monitor \(5\) \+ one support and one query need 15",
    ):
        split_tasks(split_settings(names=["algebra", "geometry"]), input_path, out_dir, tmp_path / "stats.tsv")
    assert [p.name for p in out_dir.iterdir()] == ["previous.txt"]
    assert not (tmp_path / "stats.tsv").exists()
    small_dev = POOLED | {"dev_pool": 6}
    with pytest.raises(ConfigError, match=r"^task algebra: tasks\.split\.dev \(0\.15\) of 53 problems gives 8 dev"):
        make_splits(table, split_settings(split=small_dev))


def test_source_test_without_train_problems_names_the_pooling_setting(table: pd.DataFrame) -> None:
    only_test = table[table["source_split"] == "test"]
    with pytest.raises(ConfigError) as info:
        make_splits(only_test, split_settings())
    message = str(info.value)
    assert message.startswith("task algebra: no MATH-train problems") and "set tasks.split.scheme: pooled" in message
    assert "\n" not in message
    small = POOLED | {"dev_pool": 1, "dev_monitor": 1}
    splits, _ = make_splits(only_test, split_settings(split=small))  # the setting it names does work
    assert set(all_rows(splits)["source_split"]) == {"test"}


def test_validation_catches_leakage_sources_and_bad_schema(result: tuple) -> None:
    def copy_of(splits: dict) -> dict:
        return {task: dict(parts) for task, parts in splits.items()}

    splits = copy_of(result[0])
    leaked = splits["number_theory"]["dev_pool"].iloc[[0]].assign(split="support")
    splits["number_theory"]["support"] = pd.concat([splits["number_theory"]["support"], leaked], ignore_index=True)
    with pytest.raises(
        SplitValidationError, match=r"^task number_theory: id .* is in number_theory/support and number_theory/dev_pool"
    ):
        validate_splits(splits)

    splits = copy_of(result[0])
    copied = splits["algebra"]["test"].iloc[[0]].assign(id="other-id", split="query", source_split="train")
    splits["algebra"]["query"] = pd.concat([splits["algebra"]["query"], copied], ignore_index=True)
    with pytest.raises(
        SplitValidationError,
        match=r"^task algebra: the problem of .* \(algebra/test\) is also 'other-id' \(algebra/query\)",
    ):
        validate_splits(splits)

    splits = copy_of(result[0])
    moved = splits["geometry"]["dev_monitor"].iloc[[0]].assign(split="test")
    splits["geometry"]["dev_monitor"] = splits["geometry"]["dev_monitor"].iloc[1:]
    splits["geometry"]["test"] = pd.concat([splits["geometry"]["test"], moved], ignore_index=True)
    with pytest.raises(
        SplitValidationError, match=r"^task geometry: test split holds 1 problem\(s\) that are not from MATH test"
    ):
        validate_splits(splits)
    validate_splits(splits, scheme="pooled")  # pooled test sets mix the sources by design

    splits = copy_of(result[0])
    splits["geometry"]["dev_monitor"] = splits["geometry"]["dev_monitor"].astype({"level": "str"})
    with pytest.raises(SplitValidationError, match=r"^task geometry: dev_monitor split has column level has dtype"):
        validate_splits(splits)


def test_assert_disjoint_and_held_out_ids_from_the_written_files(result: tuple, tmp_path: Path) -> None:
    from fomaml_math.data.split import write_splits

    splits = result[0]
    write_splits(splits, tmp_path / "tasks")
    held_out = held_out_ids(tmp_path / "tasks")
    roles = pd.read_parquet(tmp_path / "tasks" / "roles.parquet")
    assert len(roles) == sum(len(f) for t in splits.values() for f in t.values()) and not roles["id"].duplicated().any()
    expected = {i for task in splits for name in ("dev_pool", "dev_monitor", "test") for i in splits[task][name]["id"]}
    assert held_out == expected and len(held_out) == len(splits) * (8 + 5) + sum(
        len(t["test"]) for t in splits.values()
    )
    assert_disjoint(splits["algebra"]["support"]["id"], held_out, "algebra support batch")  # passes
    dev_id = splits["geometry"]["dev_monitor"]["id"].iloc[0]
    with pytest.raises(
        LeakageError, match=rf"^train-sft batch 7: 1 dev/test problem id\(s\) in training data, e\.g\. \['{dev_id}'\]"
    ):
        assert_disjoint([*splits["algebra"]["query"]["id"][:3], dev_id], held_out, "train-sft batch 7")
    with pytest.raises(ConfigError, match=r"roles\.parquet not found \(run split-tasks\)"):
        held_out_ids(tmp_path / "missing")


def test_input_errors_name_the_file(tmp_path: Path, table: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match=r"--input: .* not found"):
        split_tasks(split_settings(), tmp_path / "missing.parquet", tmp_path / "tasks", tmp_path / "s.tsv")
    path = tmp_path / "math.parquet"
    table.drop(columns="answer").to_parquet(path)
    with pytest.raises(ConfigError, match=r"math\.parquet: missing column\(s\) \['answer'\]"):
        split_tasks(split_settings(), path, tmp_path / "tasks", tmp_path / "s.tsv")
    with pytest.raises(
        ConfigError, match=r"^config error at tasks\.split\.scheme: expected one of \['source_test', 'pooled'\]"
    ):
        make_splits(table, split_settings(split={"scheme": "mixed"}))
    with pytest.raises(
        ConfigError, match=r"^config error at tasks\.split: with scheme pooled, support \+ query \+ dev \+ test"
    ):
        make_splits(table, split_settings(split=POOLED | {"test": 0.5}))


def test_cli_end_to_end(table: pd.DataFrame, tmp_path: Path) -> None:
    input_path = tmp_path / "data" / "math.parquet"
    input_path.parent.mkdir()
    table.to_parquet(input_path)
    settings = with_tasks(split_settings(names=["algebra", "geometry", "precalculus"]), meta_test=["precalculus"])
    out_dir, stats_path = tmp_path / "data" / "tasks", tmp_path / "data" / "split_stats.tsv"
    argv = ["--settings", json.dumps(settings), "--input", str(input_path), "--out-dir", str(out_dir)]
    assert main([*argv, "--stats", str(stats_path)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["algebra", "geometry", "precalculus", "roles.parquet"]
    for task in ("algebra", "geometry", "precalculus"):
        assert sorted(p.name for p in (out_dir / task).iterdir()) == sorted(f"{name}.parquet" for name in SPLITS)
        for name in SPLITS:
            frame = pd.read_parquet(out_dir / task / f"{name}.parquet")
            assert list(frame.columns) == [*COLUMNS, RULE_COLUMN, "split"] and frame["level"].dtype == "int64"
            assert frame["split"].eq(name).all() and len(frame) > 0
    stats = pd.read_csv(stats_path, sep="\t")
    assert list(stats.columns) == list(STATS_COLUMNS)
    assert stats["task"].tolist() == ["algebra", "geometry", "precalculus", "all"]
    assert stats["role"].tolist() == ["train", "train", "meta_test", "all"]
    assert stats.loc[stats["task"] == "algebra", "total"].item() == 53  # its planted duplicate removed
    assert not list(out_dir.parent.glob(".*.tmp"))  # no leftovers of the atomic writes


# --- the real MATH sample ----------------------------------------------------------------------


def archive_with_train_and_test(sample: Path, root: Path, train_share: float = 0.6) -> Path:
    """The real sample (MATH test only) as an archive with both folders: each subject's first files moved to train/."""
    shutil.copytree(sample / "MATH" / "test", root / "MATH" / "test")
    for subject_dir in sorted((root / "MATH" / "test").iterdir()):
        files = sorted(subject_dir.glob("*.json"))
        target = root / "MATH" / "train" / subject_dir.name
        target.mkdir(parents=True)
        for file in files[: round(train_share * len(files))]:
            file.rename(target / file.name)
    return root


def run_ingest_and_split(data_root: Path, out: Path, split: dict) -> tuple[Path, pd.DataFrame]:
    ingest_settings = {
        "seed": 0,
        "data": {"source": "local", "local": {"path": str(data_root)}},
        "tasks": list(MATH_TASKS),
    }
    table_path = out / "math.parquet"
    assert (
        ingest.main(
            ["--settings", json.dumps(ingest_settings), "--output", str(table_path), "--report", str(out / "r.json")]
        )
        == 0
    )
    argv = ["--settings", json.dumps(split_settings(seed=0, split=split)), "--input", str(table_path)]
    assert main([*argv, "--out-dir", str(out / "tasks"), "--stats", str(out / "stats.tsv")]) == 0
    return out / "tasks", pd.read_csv(out / "stats.tsv", sep="\t")


def test_real_archive_with_train_and_test_source_test(math_sample_dir: Path, tmp_path: Path) -> None:
    root = archive_with_train_and_test(math_sample_dir, tmp_path / "archive")
    split = {"scheme": "source_test", "dev_pool": 10, "dev_monitor": 6, "support": 0.3, "query": 0.4}
    tasks_dir, stats = run_ingest_and_split(root, tmp_path / "results", split)
    seen: dict[str, str] = {}
    for task in MATH_TASKS:
        test_files = {f"test/{task}/{p.stem}" for p in (root / "MATH" / "test" / task).glob("*.json")}
        frames = {name: pd.read_parquet(tasks_dir / task / f"{name}.parquet") for name in SPLITS}
        # test rows are exactly the problems still in the archive's test/ folder
        assert set(frames["test"]["id"]) <= test_files and frames["test"]["source_split"].eq("test").all()
        assert len(test_files) - len(frames["test"]) <= stats.set_index("task").loc[task, "duplicates_removed"]
        for name in ("support", "query", "dev_pool", "dev_monitor"):
            assert frames[name]["id"].str.startswith(f"train/{task}/").all(), (task, name)
        assert (len(frames["dev_pool"]), len(frames["dev_monitor"])) == (10, 6)
        for name, frame in frames.items():
            for record_id in frame["id"]:
                assert record_id not in seen, f"{record_id} in {seen.get(record_id)} and {task}/{name}"
                seen[record_id] = f"{task}/{name}"
    assert stats.set_index("task").loc["all", "test"] == sum(1 for v in seen.values() if v.endswith("/test"))


def test_real_sample_alone_stops_naming_the_scheme(math_sample_dir: Path, tmp_path: Path) -> None:
    table, _ = build_table(
        {"seed": 0, "data": {"source": "local", "local": {"path": str(math_sample_dir)}}, "tasks": list(MATH_TASKS)}
    )
    input_path = tmp_path / "math.parquet"
    table.to_parquet(input_path)
    with pytest.raises(ConfigError, match=r"no MATH-train problems.*set tasks\.split\.scheme: pooled"):
        split_tasks(split_settings(seed=0), input_path, tmp_path / "tasks", tmp_path / "stats.tsv")
    assert not (tmp_path / "tasks").exists() and not (tmp_path / "stats.tsv").exists()
    pooled_split = {
        "scheme": "pooled",
        "dev_pool": 10,
        "dev_monitor": 4,
        "support": 0.3,
        "query": 0.4,
        "dev": 0.15,
        "test": 0.15,
    }
    _, stats = make_splits(table, with_tasks(split_settings(seed=0, split=pooled_split), meta_test=["precalculus"]))
    by_task = stats.set_index("task")
    # algebra: 237 problems -> 71.1 / 94.8 / 35.55 / 35.55 by ratio; largest remainders to query, then dev
    assert by_task.loc["algebra", ["support", "query", "test", "total"]].tolist() == [71, 95, 35, 237]
    assert by_task.loc["algebra", "dev_pool"] + by_task.loc["algebra", "dev_monitor"] == 36
    assert by_task.loc["precalculus", "role"] == "meta_test"
    assert by_task.loc["all", "total"] == 1000 - by_task.loc["all", "duplicates_removed"]
