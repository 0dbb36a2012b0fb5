"""Experiments table: every run's final metrics and only the settings that differ between runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fomaml_math.analysis import experiments
from fomaml_math.errors import ConfigError

COMMON = {"seed": 1234, "model": {"name_or_path": "tiny", "max_seq_len": 256}, "train_tasks": ["algebra", "geometry"]}


def write_run(root: Path, name: str, summary: dict) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "train_summary.json").write_text(json.dumps(summary))
    return directory


@pytest.fixture()
def runs(tmp_path: Path) -> list[str]:
    fomaml = write_run(
        tmp_path,
        "fomaml",
        {
            "method": "fomaml",
            "steps": 100,
            "wall_time_s": 12.5,
            "final_metrics": {"meta/loss": 0.81, "meta/avg_adaptation_gap": -0.05, "history": [1.0, 0.9]},
            "versions": {"torch": "2.8.0"},
            "settings_hash": "abc",
            "settings": COMMON | {"fomaml": {"inner_lr": 0.01, "num_inner_steps": 2}},
        },
    )
    fomaml_lr = write_run(
        tmp_path,
        "fomaml-lr",
        {
            "method": "fomaml",
            "steps": 100,
            "wall_time_s": 13.0,
            "final_metrics": {"meta/loss": 0.79, "meta/avg_adaptation_gap": -0.07},
            "settings": COMMON | {"fomaml": {"inner_lr": 0.03, "num_inner_steps": 2}},
        },
    )
    sft = write_run(
        tmp_path,
        "sft",
        {
            "steps": 300,
            "wall_time_s": 10.0,
            "method": "sft",
            "final_metrics": {"sft/loss": 0.7},
            "settings": COMMON | {"sft": {"lr": 3e-5}},
        },
    )
    return [f"fomaml={fomaml}", f"fomaml-lr={fomaml_lr}", f"sft={sft}"]


def test_table_shows_only_differing_settings(tmp_path: Path, runs: list[str]) -> None:
    csv, md = tmp_path / "experiments.csv", tmp_path / "experiments.md"
    argv = [arg for spec in runs for arg in ("--run", spec)] + ["--output-csv", str(csv), "--output-md", str(md)]
    assert experiments.main(argv) == 0
    table = pd.read_csv(csv)
    assert list(table.run) == ["fomaml", "fomaml-lr", "sft"]
    settings = [c for c in table.columns if c.startswith("setting:")]
    # inner_lr differs; num_inner_steps and sft.lr are absent from some runs, so they differ too.
    assert settings == ["setting:fomaml.inner_lr", "setting:fomaml.num_inner_steps", "setting:sft.lr"]
    assert list(table.columns[:7]) == [
        "run",
        "method",
        "steps",
        "wall_time_s",
        "meta/loss",
        "meta/avg_adaptation_gap",
        "sft/loss",
    ]
    assert not {"history", "versions.torch", "settings_hash"} & set(table.columns)  # lists and bookkeeping
    assert table.loc[table.run == "fomaml-lr", "setting:fomaml.inner_lr"].item() == 0.03
    assert pd.isna(table.loc[table.run == "sft", "meta/loss"].item())
    text = md.read_text()
    assert "| run | method | steps | wall_time_s |" in text
    assert "seed" not in text and "max_seq_len" not in text and "train_tasks" not in text
    # headline metrics only (meta/avg_adaptation_gap stays in the CSV), settings transposed
    assert "| fomaml-lr | fomaml | 100 | 13 | 0.79 |" in text
    assert "avg_adaptation_gap" not in text
    assert "| `fomaml.inner_lr` | 0.01 | 0.03 |  |" in text
    assert "| `sft.lr` |  |  | 3e-05 |" in text


def test_identical_settings_leave_no_setting_column(tmp_path: Path) -> None:
    one = write_run(tmp_path, "a", {"steps": 1, "settings": COMMON})
    two = write_run(tmp_path, "b", {"steps": 2, "settings": COMMON})
    table = experiments.experiment_table({n: experiments.load_run(n, d) for n, d in (("a", one), ("b", two))})
    assert list(table.columns) == ["run", "steps"]
    assert "No setting differs" in experiments.to_markdown(table)


def test_flatten_uses_dotted_keys() -> None:
    flat = experiments.flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None})
    assert flat == {"a.b.c": 1, "a.d": "[1, 2]", "e": None}


@pytest.mark.parametrize(
    ("spec", "message"), [("no-equals", "expected NAME=DIR"), ("x=/nonexistent/dir", "train_summary.json not found")]
)
def test_bad_run_specs_are_one_line_errors(tmp_path: Path, spec: str, message: str) -> None:
    argv = ["--run", spec, "--output-csv", str(tmp_path / "e.csv"), "--output-md", str(tmp_path / "e.md")]
    with pytest.raises(ConfigError, match=message):
        experiments.main(argv)


def test_duplicate_run_names_are_refused(tmp_path: Path, runs: list[str]) -> None:
    argv = [
        "--run",
        runs[0],
        "--run",
        runs[0],
        "--output-csv",
        str(tmp_path / "e.csv"),
        "--output-md",
        str(tmp_path / "e.md"),
    ]
    with pytest.raises(ConfigError, match="unique"):
        experiments.main(argv)


def test_the_selected_step_is_a_headline_column(tmp_path: Path) -> None:
    one = write_run(tmp_path, "a", {"steps": 10, "selected_step": 6, "settings": COMMON})
    table = experiments.experiment_table({"a": experiments.load_run("a", one)})
    assert table.loc[0, "selected_step"] == 6
    header = next(line for line in experiments.to_markdown(table).splitlines() if line.startswith("| run"))
    assert header == "| run | steps | selected_step |"
