"""Bootstrap confidence intervals and paired significance tests over the few-shot evaluation.

Reads the per-problem parquet files ``results/eval/<init>/shots-<K>.parquet`` and writes, under
``--output-dir`` (``results/stats``), the tables every figure and summary number comes from:

- ``accuracy.tsv``: accuracy and mean gold-solution NLL per (init, task, shots), with bootstrap CIs;
- ``comparisons.tsv``: paired comparisons fomaml−sft, fomaml−base and sft−base per (task, shots);
- ``across_tasks.tsv``: per (shots, comparison), a Wilcoxon signed-rank test across the tasks.

The definitions (resampling unit, repeats, tests, multiple-comparison families) are in
``docs/statistics.md``; the one-line summary: the unit is the test problem, repeats are averaged
per problem first, the pooled row (task ``all``) resamples problems within tasks, and the
p-values are Holm-adjusted within each metric's family.
"""

from __future__ import annotations

import argparse
import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

from fomaml_math.config import MATH_TASKS, ConfigError, add_settings_arguments, settings_from_args
from fomaml_math.io import write_tsv

INIT_ORDER: tuple[str, ...] = ("base", "sft", "fomaml")
# (a, b) reads "a − b": positive accuracy differences favour a, negative NLL differences favour a.
COMPARISONS: tuple[tuple[str, str], ...] = (("fomaml", "sft"), ("fomaml", "base"), ("sft", "base"))
POOLED = "all"
OUTPUT_FILES: tuple[str, ...] = ("accuracy.tsv", "comparisons.tsv", "across_tasks.tsv")
REQUIRED_COLUMNS: tuple[str, ...] = (
    "init",
    "task",
    "shots",
    "repeat",
    "problem_id",
    "correct",
    "grade_status",
    "nll",
)
# Bootstrap replicates are drawn in blocks of about this many resampled indices (bounds memory).
_BLOCK_ELEMENTS = 1 << 22


def comparison_name(a: str, b: str) -> str:
    return f"{a}-{b}"


@dataclass(frozen=True)
class StatsSettings:
    seed: int
    bootstrap_samples: int
    ci_level: float
    alpha: float

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> StatsSettings:
        """From the stage settings ``{"seed": ..., "stats": {...}}`` (config.stage_settings)."""
        try:
            stats = settings["stats"]
            made = cls(
                seed=int(settings["seed"]),
                bootstrap_samples=int(stats["bootstrap_samples"]),
                ci_level=float(stats["ci_level"]),
                alpha=float(stats["alpha"]),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"settings: missing {exc} (expected seed and stats.bootstrap_samples, stats.ci_level, stats.alpha)"
            ) from exc
        if made.bootstrap_samples < 1:
            raise ConfigError(f"stats.bootstrap_samples: expected a positive integer, got {made.bootstrap_samples}")
        for key in ("ci_level", "alpha"):
            value = getattr(made, key)
            if not 0 < value < 1:
                raise ConfigError(f"stats.{key}: expected a number strictly between 0 and 1, got {value}")
        return made


# ---------------------------------------------------------------------------------------------
# Statistical building blocks (each tested against a hand computation or the reference library)


def resample_counts(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """``rows`` bootstrap resamples of ``n`` units, as counts: entry (b, i) = draws of unit i in resample b.

    Drawn as ``rng.integers(0, n, size=(rows, n))`` (row b = the indices of resample b), then
    counted, so a replicate's mean is a matrix product instead of a gather.
    """
    indices = rng.integers(0, n, size=(rows, n))
    flat = (indices + (np.arange(rows) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def stratified_bootstrap(
    strata: Sequence[np.ndarray],
    n_boot: int,
    rngs: Sequence[np.random.Generator],
    *,
    block_rows: int | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Bootstrap replicates of column means, per stratum and pooled over strata.

    ``strata[k]`` is an (n_k × m) matrix, one row per unit (problem) and one column per quantity;
    NaN marks a missing value. Each replicate resamples the rows of every stratum with replacement
    (n_k draws, from ``rngs[k]``); a column's statistic is the mean over the drawn rows where it is
    not missing: per stratum, and pooled (ratio of the sums over all strata, i.e. the mean over all
    units, which weights strata by size while keeping each stratum's size fixed).

    Returns (per-stratum replicates, each n_boot × m; pooled replicates, n_boot × m).
    """
    if not strata:
        raise ValueError("stratified_bootstrap: no strata")
    width = strata[0].shape[1]
    values = [np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0) for x in strata]
    present = [(~np.isnan(np.asarray(x, dtype=np.float64))).astype(np.float64) for x in strata]
    if block_rows is None:
        block_rows = max(1, _BLOCK_ELEMENTS // max(x.shape[0] for x in strata))
    per_stratum = [np.empty((n_boot, width)) for _ in strata]
    pooled = np.empty((n_boot, width))
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 = no unit present in a replicate -> NaN
        for start in range(0, n_boot, block_rows):
            stop = min(n_boot, start + block_rows)
            numerator = np.zeros((stop - start, width))
            denominator = np.zeros((stop - start, width))
            for k, rng in enumerate(rngs):
                counts = resample_counts(rng, values[k].shape[0], stop - start)
                num, den = counts @ values[k], counts @ present[k]
                per_stratum[k][start:stop] = num / den
                numerator += num
                denominator += den
            pooled[start:stop] = numerator / denominator
    return per_stratum, pooled


def percentile_interval(replicates: np.ndarray, ci_level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval per column (NaN where a column has no finite replicate)."""
    tail = (1.0 - ci_level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN, not a warning
        low, high = np.nanquantile(replicates, [tail, 1.0 - tail], axis=0)
    return low, high


def bootstrap_mean_ci(
    values: np.ndarray, *, n_boot: int, ci_level: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (one stratum; paired data: pass differences)."""
    column = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    (replicates,), _ = stratified_bootstrap([column], n_boot, [rng])
    low, high = percentile_interval(replicates, ci_level)
    return float(low[0]), float(high[0])


def mcnemar_exact(b: int, c: int) -> float:
    """Exact (binomial) McNemar p-value, two-sided, from the discordant counts b and c."""
    if b + c == 0:
        return 1.0
    return float(scipy_stats.binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue)


def wilcoxon_test(differences: np.ndarray, alpha: float | None = None) -> tuple[float, float, str]:
    """Two-sided Wilcoxon signed-rank test of paired differences: (statistic, p, note).

    Zero differences are dropped (``zero_method="wilcox"``); with fewer than two values or no
    non-zero difference there is no test: (NaN, NaN, reason). When ``alpha`` is given and the
    exact test could not reach it even in the most extreme case, the note says so.
    """
    diffs = np.asarray(differences, dtype=np.float64)
    diffs = diffs[~np.isnan(diffs)]
    if diffs.size < 2:
        return math.nan, math.nan, f"no test: {diffs.size} paired value(s), need at least 2"
    nonzero = int(np.count_nonzero(diffs))
    if nonzero == 0:
        return math.nan, math.nan, "no test: all differences are zero"
    result = scipy_stats.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided", method="auto")
    note = ""
    smallest_p = 2.0 ** (1 - nonzero)  # all signs equal, exact null distribution (underflows to 0, no error)
    if alpha is not None and smallest_p >= alpha:
        note = f"only {nonzero} non-zero difference(s): p cannot fall below {smallest_p:.3g}"
    return float(result.statistic), float(result.pvalue), note


def holm_adjust(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values over the non-missing entries (NaN stays NaN)."""
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        adjusted[tested] = multipletests(p[tested], method="holm")[1]
    return adjusted


def significance_stars(p_adjusted: float, alpha: float) -> str:
    """'' when not significant at ``alpha``; otherwise *, ** (p < 0.01) or *** (p < 0.001)."""
    if not (p_adjusted < alpha):  # also catches NaN
        return ""
    if p_adjusted < 0.001:
        return "***"
    if p_adjusted < 0.01:
        return "**"
    return "*"


def cohens_h(p_a: float, p_b: float) -> float:
    """Cohen's h for two proportions: 2·asin(√p_a) − 2·asin(√p_b)."""
    return float(2.0 * np.arcsin(np.sqrt(p_a)) - 2.0 * np.arcsin(np.sqrt(p_b)))


def discordant_odds_ratio(b: int, c: int) -> float:
    """McNemar's conditional odds ratio b / c (inf when c = 0 < b, NaN when b = c = 0)."""
    if c == 0:
        return math.inf if b > 0 else math.nan
    return b / c


# ---------------------------------------------------------------------------------------------
# Inputs


def load_eval(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate and check the per-problem evaluation files (one-line errors naming the file)."""
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"--eval {path}: file not found")
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise ConfigError(f"--eval {path}: not a readable parquet file ({type(exc).__name__})") from exc
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ConfigError(f"--eval {path}: missing column(s) {', '.join(missing)}")
        if frame.empty:
            raise ConfigError(f"--eval {path}: no rows")
        if frame["correct"].isna().any():
            raise ConfigError(f"--eval {path}: column 'correct' has missing values")
        optional = [c for c in ("gen_tokens",) if c in frame.columns]
        frames.append(frame[[*REQUIRED_COLUMNS, *optional]])
    evals = pd.concat(frames, ignore_index=True)
    evals = evals.astype(
        {"init": str, "task": str, "problem_id": str, "grade_status": str, "shots": int, "repeat": int}
    )
    evals["correct"] = evals["correct"].astype(bool).astype(np.float64)
    evals["nll"] = pd.to_numeric(evals["nll"], errors="coerce").astype(np.float64)
    key = ["init", "task", "shots", "repeat", "problem_id"]
    duplicated = evals.duplicated(key)
    if duplicated.any():
        row = evals.loc[duplicated].iloc[0]
        where = ", ".join(f"{k}={row[k]}" for k in key)
        raise ConfigError(f"--eval: two results for {where} (was one evaluation file given twice?)")
    return evals


def per_problem(evals: pd.DataFrame) -> pd.DataFrame:
    """One row per (init, task, shots, problem): correctness and NLL averaged over the repeats."""
    grouped = evals.groupby(["init", "task", "shots", "problem_id"], sort=True)
    return grouped.agg(correct=("correct", "mean"), nll=("nll", "mean"), n_repeats=("repeat", "nunique")).reset_index()


def ordered(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """``values`` (deduplicated) in the ``preferred`` order first, then the rest alphabetically."""
    unique = list(dict.fromkeys(values))
    return [v for v in preferred if v in unique] + sorted(v for v in unique if v not in preferred)


def task_order(tasks: Sequence[str]) -> list[str]:
    """Tasks in the MATH subject order, others alphabetically, the pooled ``all`` last."""
    return ordered([t for t in tasks if t != POOLED], MATH_TASKS) + ([POOLED] if POOLED in tasks else [])


def _stratum_rng(seed: int, task: str, shots: int) -> np.random.Generator:
    # Seeded per (task, shots): a task's CIs do not change when other tasks or inits are added.
    return np.random.default_rng([seed, zlib.crc32(task.encode()), int(shots)])


# ---------------------------------------------------------------------------------------------
# Tables


def _descriptive(evals: pd.DataFrame) -> pd.DataFrame:
    """Per (init, task incl. ``all``, shots): repeat spread and grading outcomes over all rows."""
    frame = evals.assign(
        no_answer=(evals["grade_status"] == "no_answer").astype(np.float64),
        grade_failure=evals["grade_status"].isin(["timeout", "error"]).astype(np.float64),
    )
    if "gen_tokens" not in frame.columns:
        frame["gen_tokens"] = np.nan
    frame["gen_tokens"] = pd.to_numeric(frame["gen_tokens"], errors="coerce").astype(np.float64)
    pooled = frame.assign(task=POOLED)
    both = pd.concat([frame, pooled], ignore_index=True)
    keys = ["init", "task", "shots"]
    per_repeat = both.groupby([*keys, "repeat"])["correct"].mean()
    spread = per_repeat.groupby(level=keys).agg(n_repeats="count", accuracy_repeat_sd=lambda s: s.std(ddof=1))
    rates = both.groupby(keys).agg(
        no_answer_rate=("no_answer", "mean"),
        grade_failure_rate=("grade_failure", "mean"),
        mean_gen_tokens=("gen_tokens", "mean"),
    )
    return spread.join(rates).reset_index()


def _comparison_row(
    data: np.ndarray, column: dict[tuple[str, str], int], low: np.ndarray, high: np.ndarray, a: str, b: str
) -> dict[str, Any]:
    name = comparison_name(a, b)
    acc_diff = data[:, column["dacc", name]]
    paired = ~np.isnan(acc_diff)
    acc_diff = acc_diff[paired]
    acc_a = float(np.mean(data[paired, column["acc", a]])) if paired.any() else math.nan
    acc_b = float(np.mean(data[paired, column["acc", b]])) if paired.any() else math.nan
    # Per-problem sign of the repeat-averaged difference; with one repeat this is McNemar's b and c.
    a_better, b_better = int(np.sum(acc_diff > 0)), int(np.sum(acc_diff < 0))
    nll_diff = data[:, column["dnll", name]]
    nll_paired = ~np.isnan(nll_diff)
    nll_diff = nll_diff[nll_paired]
    w_stat, w_p, w_note = wilcoxon_test(nll_diff)
    return {
        "comparison": name,
        "init_a": a,
        "init_b": b,
        "n_problems": int(acc_diff.size),
        "acc_a": acc_a,
        "acc_b": acc_b,
        "acc_diff": float(np.mean(acc_diff)) if acc_diff.size else math.nan,
        "acc_diff_ci_low": float(low[column["dacc", name]]),
        "acc_diff_ci_high": float(high[column["dacc", name]]),
        "cohens_h": cohens_h(acc_a, acc_b) if acc_diff.size else math.nan,
        "n_a_better": a_better,
        "n_b_better": b_better,
        "n_tied": int(acc_diff.size - a_better - b_better),
        "discordant_odds_ratio": discordant_odds_ratio(a_better, b_better),
        "mcnemar_p": mcnemar_exact(a_better, b_better) if acc_diff.size else math.nan,
        "nll_n": int(nll_diff.size),
        "nll_a": float(np.mean(data[nll_paired, column["nll", a]])) if nll_diff.size else math.nan,
        "nll_b": float(np.mean(data[nll_paired, column["nll", b]])) if nll_diff.size else math.nan,
        "nll_diff": float(np.mean(nll_diff)) if nll_diff.size else math.nan,
        "nll_diff_ci_low": float(low[column["dnll", name]]),
        "nll_diff_ci_high": float(high[column["dnll", name]]),
        "wilcoxon_stat": w_stat,
        "wilcoxon_p": w_p,
        "nll_note": w_note,
    }


def _accuracy_row(
    data: np.ndarray, column: dict[tuple[str, str], int], low: np.ndarray, high: np.ndarray, init: str
) -> dict[str, Any]:
    acc = data[:, column["acc", init]]
    acc = acc[~np.isnan(acc)]
    nll = data[:, column["nll", init]]
    nll = nll[~np.isnan(nll)]
    return {
        "init": init,
        "n_problems": int(acc.size),
        "accuracy": float(np.mean(acc)),
        "accuracy_ci_low": float(low[column["acc", init]]),
        "accuracy_ci_high": float(high[column["acc", init]]),
        "nll_n": int(nll.size),
        "nll_mean": float(np.mean(nll)) if nll.size else math.nan,
        "nll_ci_low": float(low[column["nll", init]]),
        "nll_ci_high": float(high[column["nll", init]]),
    }


def _paired_tables(problems: pd.DataFrame, settings: StatsSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    inits = ordered(problems["init"].unique(), INIT_ORDER)
    accuracy_rows: list[dict[str, Any]] = []
    comparison_rows: list[dict[str, Any]] = []
    for shots in sorted(problems["shots"].unique()):
        at_shots = problems[problems["shots"] == shots]
        present = [i for i in inits if i in set(at_shots["init"])]
        pairs = [(a, b) for a, b in COMPARISONS if a in present and b in present]
        keys = (
            [("acc", i) for i in present]
            + [("nll", i) for i in present]
            + [("dacc", comparison_name(a, b)) for a, b in pairs]
            + [("dnll", comparison_name(a, b)) for a, b in pairs]
        )
        column = {key: j for j, key in enumerate(keys)}
        tasks = task_order(at_shots["task"].unique())
        matrices = []
        for task in tasks:
            rows = at_shots[at_shots["task"] == task]
            # Problems as rows, inits as columns; a problem an init lacks is NaN and drops out of its means.
            correct = rows.pivot(index="problem_id", columns="init", values="correct").reindex(columns=present)
            nll = rows.pivot(index="problem_id", columns="init", values="nll").reindex(columns=present)
            parts = (
                [correct[i] for i in present]
                + [nll[i] for i in present]
                + [correct[a] - correct[b] for a, b in pairs]
                + [nll[a] - nll[b] for a, b in pairs]
            )
            matrices.append(np.column_stack([p.to_numpy(dtype=np.float64) for p in parts]))
        rngs = [_stratum_rng(settings.seed, task, shots) for task in tasks]
        per_task, pooled = stratified_bootstrap(matrices, settings.bootstrap_samples, rngs)
        strata = [*zip(tasks, matrices, per_task, strict=True), (POOLED, np.vstack(matrices), pooled)]
        for task, data, replicates in strata:
            low, high = percentile_interval(replicates, settings.ci_level)
            for init in present:
                if np.any(~np.isnan(data[:, column["acc", init]])):
                    accuracy_rows.append(
                        {"task": task, "shots": int(shots)} | _accuracy_row(data, column, low, high, init)
                    )
            for a, b in pairs:
                row = _comparison_row(data, column, low, high, a, b)
                if row["n_problems"]:
                    comparison_rows.append({"task": task, "shots": int(shots)} | row)
    return pd.DataFrame(accuracy_rows), pd.DataFrame(comparison_rows)


def _finish_family(frame: pd.DataFrame, p_column: str, prefix: str, alpha: float) -> pd.DataFrame:
    """Holm-adjust one family of p-values and add the ``<prefix>_significant`` and ``_stars`` columns."""
    adjusted = holm_adjust(frame[p_column].to_numpy(dtype=np.float64))
    frame[f"{p_column}_holm"] = adjusted
    frame[f"{prefix}_significant"] = adjusted < alpha
    frame[f"{prefix}_stars"] = [significance_stars(p, alpha) for p in adjusted]
    return frame


_ACROSS_FIELDS = (
    "mean_diff",
    "median_diff",
    "n_positive",
    "n_negative",
    "wilcoxon_stat",
    "wilcoxon_p",
    "wilcoxon_p_holm",
    "significant",
    "stars",
    "note",
)
_ADDED_BY_FAMILY = ("_p_holm", "_significant", "_stars")  # columns _finish_family adds
ACROSS_TASKS_COLUMNS = ["shots", "comparison", "n_tasks"] + [
    f"{prefix}_{field}" for prefix in ("acc", "nll") for field in _ACROSS_FIELDS
]


def _across_tasks(comparisons: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per (shots, comparison): Wilcoxon signed-rank test over the task-level differences (not ``all``)."""
    rows = []
    per_task = comparisons[comparisons["task"] != POOLED]
    for (shots, name), group in per_task.groupby(["shots", "comparison"], sort=False):
        row: dict[str, Any] = {"shots": int(shots), "comparison": name, "n_tasks": len(group)}
        for prefix in ("acc", "nll"):
            diffs = group[f"{prefix}_diff"].to_numpy(dtype=np.float64)
            finite = diffs[~np.isnan(diffs)]
            stat, p, note = wilcoxon_test(finite, alpha=alpha)
            row |= {
                f"{prefix}_mean_diff": float(np.mean(finite)) if finite.size else math.nan,
                f"{prefix}_median_diff": float(np.median(finite)) if finite.size else math.nan,
                f"{prefix}_n_positive": int(np.sum(finite > 0)),
                f"{prefix}_n_negative": int(np.sum(finite < 0)),
                f"{prefix}_wilcoxon_stat": stat,
                f"{prefix}_wilcoxon_p": p,
                f"{prefix}_note": note,
            }
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[c for c in ACROSS_TASKS_COLUMNS if not c.endswith(_ADDED_BY_FAMILY)])
    # Its own two families (accuracy, NLL): these tests are on task-level summaries, not problems.
    frame = _finish_family(frame, "acc_wilcoxon_p", "acc", alpha)
    frame = _finish_family(frame, "nll_wilcoxon_p", "nll", alpha)
    return frame[ACROSS_TASKS_COLUMNS]


def _sort(frame: pd.DataFrame, by_init: bool) -> pd.DataFrame:
    tasks = task_order(frame["task"].unique())
    keys = {"task": lambda s: s.map({t: k for k, t in enumerate(tasks)})}
    if by_init:
        inits = ordered(frame["init"].unique(), INIT_ORDER)
        keys["init"] = lambda s: s.map({t: k for k, t in enumerate(inits)})
    else:
        names = [comparison_name(a, b) for a, b in COMPARISONS]
        keys["comparison"] = lambda s: s.map({t: k for k, t in enumerate(names)})
    columns = ["task", "shots", "init" if by_init else "comparison"]
    return frame.sort_values(columns, key=lambda s: keys[s.name](s) if s.name in keys else s).reset_index(drop=True)


ACCURACY_COLUMNS = [
    "init",
    "task",
    "shots",
    "n_problems",
    "n_repeats",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "accuracy_repeat_sd",
    "nll_n",
    "nll_mean",
    "nll_ci_low",
    "nll_ci_high",
    "no_answer_rate",
    "grade_failure_rate",
    "mean_gen_tokens",
]
COMPARISON_COLUMNS = [
    "task",
    "shots",
    "comparison",
    "init_a",
    "init_b",
    "n_problems",
    "acc_a",
    "acc_b",
    "acc_diff",
    "acc_diff_ci_low",
    "acc_diff_ci_high",
    "cohens_h",
    "n_a_better",
    "n_b_better",
    "n_tied",
    "discordant_odds_ratio",
    "mcnemar_p",
    "mcnemar_p_holm",
    "acc_significant",
    "acc_stars",
    "nll_n",
    "nll_a",
    "nll_b",
    "nll_diff",
    "nll_diff_ci_low",
    "nll_diff_ci_high",
    "wilcoxon_stat",
    "wilcoxon_p",
    "wilcoxon_p_holm",
    "nll_significant",
    "nll_stars",
    "nll_note",
]


def compute_tables(evals: pd.DataFrame, settings: StatsSettings) -> dict[str, pd.DataFrame]:
    """All three tables, keyed by output file name."""
    accuracy, comparisons = _paired_tables(per_problem(evals), settings)
    accuracy = accuracy.merge(_descriptive(evals), on=["init", "task", "shots"], how="left")
    accuracy = _sort(accuracy, by_init=True)[ACCURACY_COLUMNS]
    if comparisons.empty:
        comparisons = pd.DataFrame(columns=COMPARISON_COLUMNS)
    else:
        # One family per metric: every accuracy test in the table, every NLL test in the table.
        comparisons = _finish_family(comparisons, "mcnemar_p", "acc", settings.alpha)
        comparisons = _finish_family(comparisons, "wilcoxon_p", "nll", settings.alpha)
        comparisons = _sort(comparisons, by_init=False)[COMPARISON_COLUMNS]
    across = _across_tasks(comparisons, settings.alpha)
    return {"accuracy.tsv": accuracy, "comparisons.tsv": comparisons, "across_tasks.tsv": across}


def read_table(stats_dir: str | Path, name: str) -> pd.DataFrame:
    """Read one table written by this stage (empty star/note cells come back as '')."""
    path = Path(stats_dir) / name
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run the stats stage first)")
    with open(path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
    text_columns = {c: str for c in header if c.endswith(("_stars", "_note"))}
    frame = pd.read_csv(path, sep="\t", dtype=text_columns)
    for column in text_columns:
        frame[column] = frame[column].fillna("")
    return frame


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fomaml_math stats",
        description="Bootstrap CIs and paired significance tests over the per-problem evaluation results.",
    )
    add_settings_arguments(parser)
    parser.add_argument(
        "--eval",
        dest="eval_paths",
        nargs="+",
        required=True,
        metavar="PARQUET",
        help="results/eval/<init>/shots-<K>.parquet",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help=f"writes {', '.join(OUTPUT_FILES)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = StatsSettings.from_settings(settings_from_args(args, "stats"))
    evals = load_eval(args.eval_paths)
    tables = compute_tables(evals, settings)
    for name, frame in tables.items():
        write_tsv(args.output_dir / name, frame)
    print(
        f"stats: {len(tables['accuracy.tsv'])} accuracy rows, {len(tables['comparisons.tsv'])} comparisons, "
        f"{settings.bootstrap_samples} bootstrap samples -> {args.output_dir}"
    )
    return 0
