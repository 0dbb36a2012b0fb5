"""The headline results as Markdown (``results/summary.md``), read off the stats tables.

Every number in the summary is a cell of ``accuracy.tsv``, ``comparisons.tsv`` or
``across_tasks.tsv``, only rounded for display.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fomaml_math.analysis import style
from fomaml_math.analysis.stats import INIT_ORDER, POOLED, StatsSettings, ordered, read_table
from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.io import write_text

# Comparisons in the headline table, in column order.
HEADLINE_COMPARISONS: tuple[str, ...] = ("fomaml-sft", "fomaml-base")
Formatter = Callable[[float], str]


def fmt_percent(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.1f}"


def fmt_points(value: float) -> str:
    """A difference of proportions in percentage points, signed."""
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.1f}"


def fmt_nll(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def fmt_nll_diff(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.3f}"


def fmt_p(p: float, stars: str = "") -> str:
    if not math.isfinite(p):
        return "n/a"
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return f"{text} {stars}".rstrip()


def _interval(fmt: Formatter, value: float, low: float, high: float) -> str:
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def _comparison_label(name: str) -> str:
    a, _, b = name.partition("-")
    return f"{style.init_label(a)} − {style.init_label(b)}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _metric_table(
    accuracy: pd.DataFrame,
    comparisons: pd.DataFrame,
    *,
    value: str,
    low: str,
    high: str,
    diff: str,
    p: str,
    stars: str,
    fmt_value: Formatter,
    fmt_diff: Formatter,
) -> list[str]:
    pooled = accuracy[accuracy["task"] == POOLED]
    pooled_cmp = comparisons[comparisons["task"] == POOLED]
    inits = ordered(list(pooled["init"].unique()), INIT_ORDER)
    names = [n for n in HEADLINE_COMPARISONS if n in set(pooled_cmp["comparison"])]
    header = ["Shots", *(style.init_label(i) for i in inits)]
    for name in names:
        header += [_comparison_label(name), "p (Holm)"]
    rows = []
    for shots in sorted(pooled["shots"].unique()):
        row = [str(int(shots))]
        for init in inits:
            cell = pooled[(pooled["shots"] == shots) & (pooled["init"] == init)]
            row.append(_interval(fmt_value, *cell[[value, low, high]].iloc[0]) if len(cell) else "–")
        for name in names:
            cell = pooled_cmp[(pooled_cmp["shots"] == shots) & (pooled_cmp["comparison"] == name)]
            if cell.empty:
                row += ["–", "–"]
                continue
            c = cell.iloc[0]
            row += [_interval(fmt_diff, c[diff], c[f"{diff}_ci_low"], c[f"{diff}_ci_high"]), fmt_p(c[p], c[stars])]
        rows.append(row)
    return _table(header, rows)


def _across_tasks_lines(across: pd.DataFrame) -> list[str]:
    lines = []
    for name in HEADLINE_COMPARISONS:
        rows = across[across["comparison"] == name].sort_values("shots")
        for row in rows.itertuples(index=False):
            text = (
                f"- {_comparison_label(name)}, {row.shots} shots: mean task-level difference "
                f"{fmt_points(row.acc_mean_diff)} pp, positive in {row.acc_n_positive} of {row.n_tasks} tasks, "
                f"Wilcoxon p (Holm) = {fmt_p(row.acc_wilcoxon_p_holm, row.acc_stars)}"
            )
            lines.append(text + (f" ({row.acc_note})" if row.acc_note else ""))
    return lines


def render_summary(
    accuracy: pd.DataFrame, comparisons: pd.DataFrame, across: pd.DataFrame, settings: StatsSettings
) -> str:
    """The Markdown text of ``summary.md``."""
    ci = f"{settings.ci_level:.0%}"
    pooled = accuracy[accuracy["task"] == POOLED]
    n_tasks = accuracy.loc[accuracy["task"] != POOLED, "task"].nunique()
    n_problems = int(pooled["n_problems"].max()) if len(pooled) else 0
    lines = [
        "# FOMAML vs SFT on MATH: headline results",
        "",
        f"Accuracy (%) on the test problems of all {n_tasks} task(s) pooled ({n_problems} problems), "
        f"with {ci} bootstrap confidence intervals; differences in percentage points (pp). "
        f"Stars: Holm-adjusted p < {settings.alpha:g} (*), < 0.01 (**), < 0.001 (***).",
        "",
        *_metric_table(
            accuracy,
            comparisons,
            value="accuracy",
            low="accuracy_ci_low",
            high="accuracy_ci_high",
            diff="acc_diff",
            p="mcnemar_p_holm",
            stars="acc_stars",
            fmt_value=fmt_percent,
            fmt_diff=fmt_points,
        ),
        "",
        "## Gold-solution NLL",
        "",
        f"Mean negative log-likelihood per gold-solution token (nats; lower is better), {ci} bootstrap CIs; "
        "p-values from the Wilcoxon signed-rank test on per-problem differences, Holm-adjusted.",
        "",
        *_metric_table(
            accuracy,
            comparisons,
            value="nll_mean",
            low="nll_ci_low",
            high="nll_ci_high",
            diff="nll_diff",
            p="wilcoxon_p_holm",
            stars="nll_stars",
            fmt_value=fmt_nll,
            fmt_diff=fmt_nll_diff,
        ),
        "",
    ]
    across_lines = _across_tasks_lines(across)
    if across_lines:
        lines += ["## Consistency across tasks", "", *across_lines, ""]
    n_acc = int(comparisons["mcnemar_p"].notna().sum()) if len(comparisons) else 0
    n_nll = int(comparisons["wilcoxon_p"].notna().sum()) if len(comparisons) else 0
    lines += [
        "## Method",
        "",
        "- Unit of analysis: the test problem. A problem's correctness (and NLL) is first averaged over the "
        "repeats (independent draws of the k support examples); 0-shot has a single repeat.",
        f"- Confidence intervals: percentile bootstrap, {settings.bootstrap_samples} resamples of problems "
        f"(seed {settings.seed}); pooled rows resample problems within each task, keeping task sizes fixed. "
        "Intervals are not adjusted for multiplicity: one that excludes 0 can still have a Holm p above alpha.",
        "- Paired accuracy test: exact McNemar test (two-sided binomial test on the problems where one "
        "initialisation scores higher than the other); with repeats, this is the sign test on the "
        "repeat-averaged per-problem differences.",
        "- Paired NLL test: Wilcoxon signed-rank test on per-problem NLL differences.",
        f"- Multiple comparisons: Holm adjustment over all {n_acc} accuracy tests (every task, the pooled rows, "
        f"every shot count and comparison) and, separately, over all {n_nll} NLL tests.",
        "- Full tables: `results/stats/accuracy.tsv`, `comparisons.tsv`, `across_tasks.tsv`; definitions in "
        "`docs/statistics.md`.",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fomaml_math summary", description="Write the headline results table (Markdown)."
    )
    add_settings_arguments(parser)
    parser.add_argument("--stats-dir", required=True, type=Path, help="folder with the stats stage's tables")
    parser.add_argument("--output", required=True, type=Path, help="results/summary.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = StatsSettings.from_settings(settings_from_args(args, "report"))
    tables = [read_table(args.stats_dir, name) for name in ("accuracy.tsv", "comparisons.tsv", "across_tasks.tsv")]
    write_text(args.output, render_summary(*tables, settings))
    print(f"summary: {args.output}")
    return 0
