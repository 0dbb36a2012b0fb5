"""MATH-500: the shipped reference, matching by id and by text hash, and the stop when problems are missing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from fomaml_math.data import math500
from fomaml_math.data.ingest import build_table
from fomaml_math.data.math500 import (
    MATH500_PATH,
    REFERENCE_COLUMNS,
    build_reference,
    load_math500,
    match_math500,
    select_math500,
    write_reference,
)
from fomaml_math.data.split import make_splits
from fomaml_math.data.text import normalise_problem_text, problem_sha256
from fomaml_math.errors import ConfigError
from fomaml_math.subjects import MATH_TASKS

# MATH-500's problems per subject, as published with PRM800K's split
MATH500_PER_TASK = {
    "algebra": 124,
    "counting_and_probability": 38,
    "geometry": 41,
    "intermediate_algebra": 97,
    "number_theory": 62,
    "prealgebra": 82,
    "precalculus": 56,
}


def test_shipped_reference_is_math500() -> None:
    reference = load_math500()
    assert list(reference.columns) == list(REFERENCE_COLUMNS) and len(reference) == 500
    assert reference["unique_id"].is_unique and reference["problem_sha256"].is_unique
    assert reference["task"].value_counts().to_dict() == MATH500_PER_TASK
    assert reference["problem_sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert (reference["unique_id"].str.split("/").str[1] == reference["task"]).all()
    assert reference["level"].between(1, 5).all()
    header = [line for line in MATH500_PATH.read_text().splitlines() if line.startswith("#")]
    assert "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132" in header[0]  # PRM800K's LFS object


def test_hash_is_of_the_normalised_text() -> None:
    assert normalise_problem_text("  What IS\t$1+1$?\n") == "what is $1+1$?"
    assert problem_sha256("What is $1+1$?") == problem_sha256("what  is $1+1$? ")
    assert problem_sha256("What is $1+1$?") != problem_sha256("What is $1+2$?")


def test_shipped_hashes_agree_with_the_real_archive(math_sample_dir: Path) -> None:
    """Every sample file at a MATH-500 path has MATH-500's hash; renamed copies are found by their text alone."""
    reference = load_math500().set_index("unique_id")
    at_math500_path = 0
    for file in sorted((math_sample_dir / "MATH" / "test").glob("*/*.json")):
        unique_id = f"test/{file.parent.name}/{file.name}"
        if unique_id in reference.index:
            at_math500_path += 1
            problem = json.loads(file.read_text(encoding="utf-8"))["problem"]
            assert problem_sha256(problem) == reference.loc[unique_id, "problem_sha256"], unique_id
    assert at_math500_path > 0
    table, _ = build_table(
        {"seed": 0, "data": {"source": "local", "local": {"path": str(math_sample_dir)}}, "tasks": list(MATH_TASKS)}
    )
    matched = match_math500(table, load_math500())
    by_id = matched.notna() & (matched == table["id"] + ".json")
    assert by_id.sum() == at_math500_path
    # some sample files are renumbered (1xxxxx.json, beyond MATH's own numbering): only their text finds them
    by_text = matched.notna() & ~by_id
    assert by_text.any() and table.loc[by_text, "id"].str.fullmatch(r"test/[a-z_]+/1\d{5}").all()


def made_up_reference() -> pd.DataFrame:
    return build_reference(
        [
            {"unique_id": "test/algebra/7.json", "problem": "Solve $x+1=2$.", "level": 1},
            {"unique_id": "test/algebra/9.json", "problem": "Solve $x+2=5$.", "level": 2},
            {"unique_id": "test/geometry/3.json", "problem": "What is the area of a unit square?", "level": 1},
        ]
    )


def rows(*records: tuple[str, str, str]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=["id", "task", "problem"])


def test_matching_by_archive_id_and_by_text_hash() -> None:
    reference = made_up_reference()
    table = rows(
        ("test/algebra/7", "algebra", "Solve $x+1=2$ (edited text)."),  # archive id: matched by id
        ("algebra/0a1b2c", "algebra", "  SOLVE $x+2=5$. "),  # hub-style id: matched by normalised text
        ("geometry/ffff", "algebra", "What is the area of a unit square?"),  # same text, other task: no
        ("test/algebra/8", "algebra", "Solve $x+3=9$."),  # neither
        ("test/geometry/7", "geometry", "Another problem."),  # archive id of another subject: no
    )
    assert match_math500(table, reference).tolist() == ["test/algebra/7.json", "test/algebra/9.json", None, None, None]


def test_fewer_matches_than_math500_stop_naming_the_setting() -> None:
    reference = made_up_reference()
    table = rows(("test/algebra/7", "algebra", "Solve $x+1=2$."), ("test/algebra/9", "algebra", "Solve $x+2=5$."))
    with pytest.raises(ConfigError) as info:
        select_math500(table, ["algebra", "geometry"], reference)
    message = str(info.value)
    assert message.startswith("tasks.split.test_subset: math500: only 2 of the 3 MATH-500 problems")
    assert "test/geometry/3.json" in message and "\n" not in message
    # with a subset of the subjects, the subset's MATH-500 count is what must match
    assert select_math500(table, ["algebra"], reference).tolist() == [True, True]


def test_shipped_reference_stops_on_the_sample(math_sample_dir: Path) -> None:
    """The 1,000-problem sample cannot pass for MATH-500: a few of its problems are in it, not all 500."""
    table, _ = build_table(
        {"seed": 0, "data": {"source": "local", "local": {"path": str(math_sample_dir)}}, "tasks": list(MATH_TASKS)}
    )
    with pytest.raises(ConfigError, match=r"^tasks\.split\.test_subset: math500: only \d+ of the 500 MATH-500"):
        select_math500(table, list(MATH_TASKS))
    with pytest.raises(ConfigError, match=r"only \d+ of the 62 MATH-500 problems of tasks \['number_theory'\]"):
        select_math500(table[table["task"] == "number_theory"], ["number_theory"])


def test_math500_test_subset_in_the_split(math_sample_dir: Path) -> None:
    """source_test + math500: test holds exactly the MATH-500 problems of MATH test; the others stay unused."""
    table, _ = build_table(
        {"seed": 0, "data": {"source": "local", "local": {"path": str(math_sample_dir)}}, "tasks": ["geometry"]}
    )
    table = table.assign(source_split=["train" if i % 2 else "test" for i in range(len(table))])
    test_rows = table[table["source_split"] == "test"]
    picked = test_rows.iloc[::3]
    reference = build_reference(
        {"unique_id": f"{row.id}.json", "problem": row.problem, "level": row.level} for row in picked.itertuples()
    )
    split = {"scheme": "source_test", "test_subset": "math500", "dev_pool": 5, "dev_monitor": 3}
    settings = {"seed": 1, "tasks": {"names": ["geometry"], "meta_test": [], "split": split}}
    splits, stats = make_splits(table, settings, math500_reference=reference)
    assert sorted(splits["geometry"]["test"]["id"]) == sorted(picked["id"])
    row = stats.set_index("task").loc["geometry"]
    assert row["test"] == len(picked) and row["unused"] == len(test_rows) - len(picked)
    with pytest.raises(ConfigError, match=r"only \d+ of the \d+ MATH-500 problems"):
        make_splits(table.drop(index=picked.index[0]), settings, math500_reference=reference)


def test_reference_round_trip_and_regeneration(tmp_path: Path) -> None:
    path = tmp_path / "math500.tsv"
    write_reference(made_up_reference(), path)
    pd.testing.assert_frame_equal(load_math500(path), made_up_reference())
    assert path.read_text().startswith("# MATH-500 = the 500 MATH test problems of OpenAI's PRM800K split")
    source = tmp_path / "test.jsonl"
    source.write_text(
        "\n".join(json.dumps({"unique_id": f"test/algebra/{i}.json", "problem": f"P{i}", "level": 1}) for i in range(3))
    )
    with pytest.raises(ConfigError, match=re.escape(f"--jsonl: {source} holds 3 problems, expected 500")):
        math500.main(["--jsonl", str(source), "--output", str(path)])
    with pytest.raises(
        ConfigError, match=r"MATH-500 unique_id 'train/algebra/1\.json': expected test/<subject>/<n>\.json"
    ):
        build_reference([{"unique_id": "train/algebra/1.json", "problem": "x", "level": 1}])
