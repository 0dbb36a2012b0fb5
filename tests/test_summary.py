"""Summary stage: the headline Markdown shows exactly the numbers of the stats tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from test_stats import SETTINGS, SHOTS, run_stats

from fomaml_math.analysis import summary
from fomaml_math.analysis.stats import read_table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}"


def _p(p: float, stars: str) -> str:
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return f"{text} {stars}".rstrip()


def _summarise(stats_dir: Path, tmp_path: Path) -> str:
    out = tmp_path / "summary.md"
    argv = ["--settings", json.dumps(SETTINGS), "--stats-dir", str(stats_dir), "--output", str(out)]
    assert summary.main(argv) == 0
    return out.read_text()


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_stats(tmp_path_factory.mktemp("summary"))


def test_headline_rows_carry_the_table_numbers(stats_dir: Path, tmp_path: Path) -> None:
    text = _summarise(stats_dir, tmp_path)
    accuracy = read_table(stats_dir, "accuracy.tsv")
    comparisons = read_table(stats_dir, "comparisons.tsv")
    assert "| Shots | Base | SFT | FOMAML | FOMAML − SFT | p (Holm) | FOMAML − Base | p (Holm) |" in text
    for shots in SHOTS:
        cells = [str(shots)]
        for init in ("base", "sft", "fomaml"):
            row = accuracy[(accuracy.task == "all") & (accuracy.shots == shots) & (accuracy.init == init)].iloc[0]
            cells.append(f"{_pct(row.accuracy)} [{_pct(row.accuracy_ci_low)}, {_pct(row.accuracy_ci_high)}]")
        for name in ("fomaml-sft", "fomaml-base"):
            row = comparisons[
                (comparisons.task == "all") & (comparisons.shots == shots) & (comparisons.comparison == name)
            ].iloc[0]
            cells.append(f"{_pp(row.acc_diff)} [{_pp(row.acc_diff_ci_low)}, {_pp(row.acc_diff_ci_high)}]")
            cells.append(_p(row.mcnemar_p_holm, row.acc_stars))
        assert "| " + " | ".join(cells) + " |" in text
    n_tests = int(comparisons.mcnemar_p.notna().sum())
    assert f"Holm adjustment over all {n_tests} accuracy tests" in text
    assert "200 resamples" in text


def test_nll_and_across_task_lines(stats_dir: Path, tmp_path: Path) -> None:
    text = _summarise(stats_dir, tmp_path)
    comparisons = read_table(stats_dir, "comparisons.tsv")
    across = read_table(stats_dir, "across_tasks.tsv")
    row = comparisons[(comparisons.task == "all") & (comparisons.shots == 5) & (comparisons.comparison == "fomaml-sft")]
    row = row.iloc[0]
    assert f"{row.nll_diff:+.3f} [{row.nll_diff_ci_low:+.3f}, {row.nll_diff_ci_high:+.3f}]" in text
    line = across[(across.shots == 10) & (across.comparison == "fomaml-sft")].iloc[0]
    assert (
        f"FOMAML − SFT, 10 shots: mean task-level difference {_pp(line.acc_mean_diff)} pp, "
        f"positive in {line.acc_n_positive} of {line.n_tasks} tasks"
    ) in text


def test_summary_without_sft(tmp_path: Path) -> None:
    text = _summarise(run_stats(tmp_path, inits=("base", "fomaml")), tmp_path)
    assert "| Shots | Base | FOMAML | FOMAML − Base | p (Holm) |" in text
    assert "| SFT |" not in text
    assert "FOMAML − SFT" not in text


@pytest.mark.parametrize(("p", "expected"), [(0.0004, "<0.001"), (0.0123, "0.012"), (math.nan, "n/a")])
def test_p_value_format(p: float, expected: str) -> None:
    assert summary.fmt_p(p) == expected


def test_empty_star_cells_read_back_as_text(stats_dir: Path) -> None:
    comparisons = read_table(stats_dir, "comparisons.tsv")
    assert pd.api.types.is_string_dtype(comparisons.acc_stars)
    assert not comparisons.acc_stars.isna().any()
