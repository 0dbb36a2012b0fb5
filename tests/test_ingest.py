"""Ingestion: the real archive sample, JSONL/parquet files, the hub path (offline), synthetic, bad records."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fomaml_math.__main__ import main as cli_main
from fomaml_math.config import stage_settings
from fomaml_math.data import ingest
from fomaml_math.data.ingest import build_table, parse_level, subject_to_task
from fomaml_math.data.synthetic import solve_synthetic
from fomaml_math.data.taskfiles import COLUMNS, RULE_COLUMN
from fomaml_math.errors import ConfigError
from fomaml_math.subjects import MATH_TASKS

SAMPLE_COUNTS = {
    "algebra": 237,
    "counting_and_probability": 95,
    "geometry": 96,
    "intermediate_algebra": 181,
    "number_theory": 108,
    "prealgebra": 174,
    "precalculus": 109,
}


def settings_for(source: str, *, tasks: list[str] | None = None, **data: Any) -> dict[str, Any]:
    return {"seed": 3, "data": {"source": source, **data}, "tasks": list(tasks or MATH_TASKS)}


def local_settings(path: Path | str, **kwargs: Any) -> dict[str, Any]:
    return settings_for("local", local={"path": str(path)}, **kwargs)


def assert_schema(frame: pd.DataFrame, *, synthetic: bool = False) -> None:
    assert list(frame.columns) == ([*COLUMNS, RULE_COLUMN] if synthetic else list(COLUMNS))
    assert frame["level"].dtype == "int64"
    assert frame["id"].is_unique
    for column in ("id", "task", "source_split", "problem", "solution", "answer"):
        assert frame[column].map(type).eq(str).all(), column


@pytest.fixture(scope="module")
def sample_table(math_sample_dir: Path) -> pd.DataFrame:
    frame, report = build_table(local_settings(math_sample_dir))
    assert report.to_dict()["skipped_total"] == 0
    return frame


def test_real_sample_counts_and_schema(sample_table: pd.DataFrame) -> None:
    assert len(sample_table) == 1000
    assert sample_table["task"].value_counts().to_dict() == SAMPLE_COUNTS
    assert_schema(sample_table)
    assert set(sample_table["source_split"]) == {"test"}
    assert set(sample_table["level"]) == {1, 2, 3, 4, 5}
    row = sample_table.set_index("id").loc["test/counting_and_probability/1038"]
    assert row["answer"] == r"\frac{1}{10}"
    assert row["task"] == "counting_and_probability"


def test_archive_path_may_be_the_math_folder_itself(math_sample_dir: Path, sample_table: pd.DataFrame) -> None:
    frame, _ = build_table(local_settings(math_sample_dir / "MATH", tasks=["geometry"]))
    pd.testing.assert_frame_equal(frame, sample_table[sample_table["task"] == "geometry"].reset_index(drop=True))


def test_only_configured_tasks_are_kept(math_sample_dir: Path) -> None:
    frame, report = build_table(local_settings(math_sample_dir, tasks=["algebra", "precalculus"]))
    assert frame["task"].value_counts().to_dict() == {"algebra": 237, "precalculus": 109}
    assert report.to_dict()["excluded_tasks"] == {
        t: n for t, n in SAMPLE_COUNTS.items() if t not in ("algebra", "precalculus")
    }


@pytest.mark.parametrize(
    ("subject", "task"),
    [
        ("Counting & Probability", "counting_and_probability"),
        ("Intermediate Algebra", "intermediate_algebra"),
        ("Number Theory", "number_theory"),
        ("Precalculus", "precalculus"),
        ("prealgebra", "prealgebra"),
        ("number_theory", "number_theory"),
        ("Calculus", None),
        (None, None),
    ],
)
def test_subject_names(subject: str | None, task: str | None) -> None:
    assert subject_to_task(subject) == task


@pytest.mark.parametrize(
    ("value", "level"),
    [("Level 3", 3), ("Level ?", 0), (5, 5), ("2", 2), (4.0, 4), ("Level 9", None), ("hard", None), (True, None)],
)
def test_levels(value: Any, level: int | None) -> None:
    assert parse_level(value) == level


# --- files --------------------------------------------------------------------------------------


def file_records() -> list[dict[str, Any]]:
    return [
        {"problem": "What is $1+1$?", "level": "Level 1", "type": "Prealgebra", "solution": r"It is $\boxed{2}$."},
        {"problem": "Find $x$.", "level": "Level ?", "type": "Algebra", "solution": r"$x=\boxed{\frac{1}{2}}$"},
        {"problem": "Count.", "level": 4, "subject": "counting_and_probability", "solution": r"\boxed{10,\!080}"},
        {"problem": "Area?", "level": "Level 2", "type": "Geometry", "solution": r"\fbox{6}", "split": "test"},
        {"problem": "Unboxed.", "level": "Level 2", "type": "Geometry", "solution": "just 6"},
        {"problem": "Mystery.", "level": "Level 2", "type": "Calculus", "solution": r"\boxed{1}"},
        {"problem": "No solution.", "level": "Level 2", "type": "Geometry"},
        {"problem": "Too hard.", "level": "Level 7", "type": "Geometry", "solution": r"\boxed{1}"},
    ]


def check_file_ingest(frame: pd.DataFrame, report: dict[str, Any]) -> None:
    assert_schema(frame)
    by_problem = frame.set_index("problem")
    assert by_problem.loc["Find $x$.", "level"] == 0  # "Level ?"
    assert by_problem.loc["Find $x$.", "answer"] == r"\frac{1}{2}"
    assert by_problem.loc["Count.", "task"] == "counting_and_probability"
    assert by_problem.loc["Count.", "answer"] == r"10,\!080"
    assert by_problem.loc["Area?", "source_split"] == "test"
    assert by_problem.loc["What is $1+1$?", "source_split"] == "train"
    assert by_problem.loc["What is $1+1$?", "id"].startswith("prealgebra/")
    assert report["kept"] == 4
    assert report["skipped"]["no_boxed_answer"] == 1
    assert report["skipped"]["unknown_subject"] == 1
    assert report["skipped"]["missing_field"] == 1
    assert report["skipped"]["bad_level"] == 1


def test_jsonl_file(tmp_path: Path) -> None:
    lines = [json.dumps(record) for record in file_records()] + ["{not json", "[1, 2]", ""]
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(lines) + "\n")
    frame, report = build_table(local_settings(path))
    check_file_ingest(frame, report.to_dict())
    assert report.to_dict()["skipped"]["bad_json"] == 2
    assert any("math.jsonl:9" in example for example in report.to_dict()["skipped_examples"]["bad_json"])


def test_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "math.parquet"
    frame = pd.DataFrame(file_records())
    frame["level"] = frame["level"].astype(str)  # one column type, as a real export would have
    frame.to_parquet(path)
    table, report = build_table(local_settings(path))
    check_file_ingest(table, report.to_dict())


def test_ids_do_not_depend_on_input_order(tmp_path: Path) -> None:
    records = [r for r in file_records() if "solution" in r]
    # the same problem twice (e.g. in MATH's train and test) still gets two stable, distinct ids
    records.append({**records[0], "split": "test"})
    tables = []
    for attempt in range(3):
        random.Random(attempt).shuffle(records)
        path = tmp_path / f"order{attempt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        tables.append(build_table(local_settings(path))[0])
    for table in tables[1:]:
        pd.testing.assert_frame_equal(table, tables[0])
    assert tables[0]["id"].is_unique and len(tables[0]) == 5


# --- malformed archive records ------------------------------------------------------------------


def write_archive(root: Path) -> None:
    def put(relative: str, content: Any) -> None:
        path = root / "MATH" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))

    good = {"problem": "What is $2+3$?", "level": "Level 1", "type": "Algebra", "solution": r"$\boxed{5}$"}
    put("train/algebra/1.json", good)
    put("train/algebra/2.json", {**good, "level": "Level ?", "problem": "What is $2+4$?", "solution": r"\boxed{6}"})
    put("test/algebra/3.json", "{ this is not json")
    put("test/algebra/4.json", {k: v for k, v in good.items() if k != "solution"})
    put("test/algebra/5.json", {**good, "solution": "The answer is 5."})
    put("test/algebra/6.json", {**good, "level": "Level six"})
    put("test/calculus/7.json", good)
    put("test/geometry/8.json", {**good, "type": "Geometry"})
    (root / "MATH" / "test" / "algebra" / "README.txt").write_text("not a record")


def test_malformed_records_are_counted_by_reason(tmp_path: Path) -> None:
    write_archive(tmp_path)
    output, report_path = tmp_path / "out" / "math.parquet", tmp_path / "out" / "report.json"
    frame = ingest.ingest(local_settings(tmp_path, tasks=["algebra", "geometry"]), output, report_path)
    report = json.loads(report_path.read_text())
    assert report["skipped"] == {
        "bad_json": 1,
        "missing_field": 1,
        "bad_level": 1,
        "unknown_subject": 1,
        "no_boxed_answer": 1,
    }
    assert report["kept"] == 3
    assert report["kept_per_task"] == {"algebra": 2, "geometry": 1}
    assert report["skipped_examples"]["missing_field"] == ["test/algebra/4.json: missing or empty solution"]
    assert sorted(frame["id"]) == ["test/geometry/8", "train/algebra/1", "train/algebra/2"]
    assert frame.set_index("id").loc["train/algebra/2", "level"] == 0
    pd.testing.assert_frame_equal(pd.read_parquet(output), frame)


def test_missing_local_path_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.local\.path: .*does not exist"):
        build_table(local_settings(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^data\.local\.path: .*archive layout"):
        build_table(local_settings(tmp_path / "empty"))


def test_no_usable_problem_is_an_error_after_the_report(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n")
    with pytest.raises(ConfigError, match="no usable problems"):
        ingest.ingest(local_settings(path), tmp_path / "math.parquet", tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["skipped"]["bad_json"] == 1
    assert not (tmp_path / "math.parquet").exists()


# --- hub (offline) ------------------------------------------------------------------------------


def hub_rows(subject_display: str, count: int, offset: int) -> list[dict[str, Any]]:
    return [
        {
            "problem": f"{subject_display} problem {offset + i}?",
            "level": f"Level {1 + i % 5}",
            "type": subject_display,
            "solution": rf"So it is $\boxed{{{offset + i}}}$.",
        }
        for i in range(count)
    ]


def test_hub_source_through_a_saved_local_copy(tmp_path: Path) -> None:
    """``data.hub.dataset`` pointing at one ``save_to_disk`` folder per subject: same code, no network."""
    from datasets import Dataset, DatasetDict

    copy = tmp_path / "hendrycks_math"
    for task, display in (("geometry", "Geometry"), ("number_theory", "Number Theory")):
        unboxed = {**hub_rows(display, 1, 0)[0], "solution": "no box"}
        train, test = hub_rows(display, 4, 0), [*hub_rows(display, 3, 100), unboxed]
        DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(str(copy / task))
    settings = settings_for("hub", tasks=["geometry", "number_theory"], hub={"dataset": str(copy), "revision": None})
    frame, report = build_table(settings)
    assert_schema(frame)
    assert frame.groupby(["task", "source_split"]).size().to_dict() == {
        ("geometry", "test"): 3,
        ("geometry", "train"): 4,
        ("number_theory", "test"): 3,
        ("number_theory", "train"): 4,
    }
    assert report.to_dict()["skipped"]["no_boxed_answer"] == 2
    assert frame.set_index("problem").loc["Geometry problem 101?", "answer"] == "101"

    with pytest.raises(ConfigError, match=r"^data\.hub\.dataset: .*has no algebra/"):
        build_table(settings | {"tasks": ["algebra"]})


def test_hub_source_calls_load_dataset_per_subject_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub call itself, with ``datasets.load_dataset`` replaced so the test stays offline."""
    import datasets

    calls = []

    def fake_load_dataset(name: str, config: str, *, split: str, revision: str | None) -> list[dict]:
        calls.append((name, config, split, revision))
        return hub_rows("Precalculus", 2, 0 if split == "train" else 10)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    settings = settings_for(
        "hub", tasks=["precalculus"], hub={"dataset": "EleutherAI/hendrycks_math", "revision": "abc123"}
    )
    frame, _ = build_table(settings)
    assert calls == [
        ("EleutherAI/hendrycks_math", "precalculus", "train", "abc123"),
        ("EleutherAI/hendrycks_math", "precalculus", "test", "abc123"),
    ]
    assert len(frame) == 4


# --- synthetic and the command line -------------------------------------------------------------


def test_synthetic_source() -> None:
    settings = settings_for("synthetic", synthetic={"problems_per_task": 20}, tasks=["algebra", "precalculus"])
    frame, report = build_table(settings)
    assert_schema(frame, synthetic=True)
    assert frame["task"].value_counts().to_dict() == {"algebra": 20, "precalculus": 20}
    # the hidden rule travels with every problem, and the stored answer follows from problem + rule
    for row in frame.itertuples():
        assert int(row.answer) == solve_synthetic(row.task, row.problem, row.rule)
    assert report.to_dict()["skipped_total"] == 0
    assert frame["answer"].str.fullmatch(r"-?\d+").all()
    # every source keeps the split of origin; the synthetic one marks round(0.3 x 20) = 6 test problems per task
    assert frame.groupby(["task", "source_split"]).size().to_dict() == {
        ("algebra", "test"): 6,
        ("algebra", "train"): 14,
        ("precalculus", "test"): 6,
        ("precalculus", "train"): 14,
    }
    pd.testing.assert_frame_equal(build_table(settings)[0], frame)


def test_synthetic_variant_names_only_with_the_synthetic_source(math_sample_dir: Path) -> None:
    frame, _ = build_table(settings_for("synthetic", synthetic={"problems_per_task": 10}, tasks=["algebra_v2"]))
    assert set(frame["task"]) == {"algebra_v2"}
    with pytest.raises(ConfigError, match=r"^tasks\.names: unknown task\(s\) \['algebra_v2'\] for data.source local"):
        build_table(local_settings(math_sample_dir, tasks=["algebra_v2"]))


def test_cli_end_to_end_with_settings_json(tmp_path: Path) -> None:
    write_archive(tmp_path)
    output, report = tmp_path / "results" / "math.parquet", tmp_path / "results" / "report.json"
    settings = json.dumps(local_settings(tmp_path, tasks=["algebra"]))
    assert ingest.main(["--settings", settings, "--output", str(output), "--report", str(report)]) == 0
    assert len(pd.read_parquet(output)) == 2
    assert json.loads(report.read_text())["excluded_tasks"] == {"geometry": 1}


def test_cli_with_the_demo_config(tmp_path: Path, demo_config: dict, repo_root: Path) -> None:
    output = tmp_path / "math.parquet"
    argv = ["--configfile", str(repo_root / "config" / "demo.yaml"), "--output", str(output)]
    assert ingest.main([*argv, "--report", str(tmp_path / "report.json")]) == 0
    settings = stage_settings(demo_config, "ingest")
    expected = settings["data"]["synthetic"]["problems_per_task"] * len(settings["tasks"])
    assert len(pd.read_parquet(output)) == expected


def test_cli_user_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = json.dumps(local_settings(tmp_path / "missing"))
    argv = ["ingest", "--settings", settings, "--output", str(tmp_path / "m.parquet"), "--report", str(tmp_path / "r")]
    assert cli_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: data.local.path:") and "\n" not in error
