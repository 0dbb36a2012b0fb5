"""Seed-aware intervals, the study's test families, equivalence and power, over the few-shot evaluation.

Reads the per-problem evaluation files (``--eval``: every experiment, training seed, init and shot count; and
optionally ``--control-eval``, the negative control) and writes, under ``--output-dir`` (``results/stats``),
the tables every figure and summary number comes from:

- ``accuracy.tsv``: accuracy and gold-solution NLL per (experiment, init, task or pool, shots), over all training
  seeds (``train_seed`` = ``all``) and per seed;
- ``comparisons.tsv``: paired comparisons per (experiment, task or pool, shots), each in the ``primary`` or the
  ``secondary`` (exploratory) family, with TOST equivalence, the minimum detectable effect and a verdict;
- ``primary.tsv``: the primary family's rows of ``comparisons.tsv``;
- ``across_tasks.tsv``: the cross-task analysis (tasks a random sample of subjects) per (experiment, shots, comparison);
- ``control.tsv``: the negative control (A/A); ``aa_control.tsv``: the A/A split re-analyses (the control's draws,
  each primary arm's seeds) and their rejection shares; ``generation.tsv``, ``adaptation.tsv``,
  ``adaptation_summary.tsv``: what generation and adaptation did; ``sample_efficiency.tsv``: the shots one init
  needs to match another; ``rule_adoption.tsv``: the positive control, the share of answers that follow the
  evaluated task's own hidden rule (synthetic tasks only), per init, k and pool, against the base's 0-shot share;
  ``positive_control.tsv`` (secondary): each init's accuracy gain at the largest k over its own 0-shot accuracy.

The stage only: the tables' columns and reading are in ``analysis.tables``, the statistics in ``analysis.inference``
and ``analysis.resampling``. Definitions in ``docs/statistics.md``.
"""

from __future__ import annotations

import argparse
import math
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fomaml_math.analysis import bounds, effects, efficiency, inference, negative_control
from fomaml_math.analysis.evaldata import (
    Design,
    build_design,
    load_eval,
    main_inits,
    per_problem,
    pool_tasks,
    pooled_groups,
    pools,
    primary_pool,
    split_experiments,
    task_roles,
)
from fomaml_math.analysis.inference import (
    cohens_h,
    discordant_odds_ratio,
    holm_adjust,
    mcnemar_exact,
    significance_stars,
    wilcoxon_test,
)
from fomaml_math.analysis.outputs import STATS_FILES
from fomaml_math.analysis.planted import planted_table
from fomaml_math.analysis.positive_control import positive_control_table
from fomaml_math.analysis.primary import primary_table
from fomaml_math.analysis.resampling import percentile_interval, stratified_bootstrap
from fomaml_math.analysis.rule_adoption import rule_adoption_table
from fomaml_math.analysis.tables import (
    ACCURACY_COLUMNS,
    ACROSS_TASKS_COLUMNS,
    ALL_SEEDS,
    COMPARISON_COLUMNS,
    COMPARISONS,
    META_TEST_POOL,
    POOLED,
    PROBLEM_BOOTSTRAP,
    SECONDARY_COMPARISONS,
    SEED_T,
    StatsSettings,
    comparison_name,
    experiment_order,
    init_order,
    sort_in_order,
    task_order,
)
from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.evaluation.rows import BASE
from fomaml_math.io import write_tsv

POWER = 0.8  # of the minimum detectable effect


def _stratum_rng(seed: int, task: str, shots: int) -> np.random.Generator:
    # Seeded per (task, shots): a task's CIs do not change when other tasks or inits are added.
    return np.random.default_rng([seed, zlib.crc32(task.encode()), int(shots)])


def _seed_mean(matrix: np.ndarray) -> np.ndarray:
    """Per-problem mean over the clusters (NaN where a cluster lacks the problem: complete cases)."""
    return matrix.mean(axis=0)


def _pool_role(pool: str, roles: dict[str, str]) -> str:
    if pool == META_TEST_POOL:
        return "meta_test"
    if pool == POOLED:
        values = set(roles.values())
        return values.pop() if len(values) == 1 else "mixed"
    return roles[pool]


def _bootstrap(
    design: Design, quantities: list[np.ndarray], roles: dict[str, str], settings: StatsSettings, shots: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Percentile intervals (one per quantity) per task and pool, problems resampled within tasks."""
    data = np.column_stack(quantities)
    strata = design.strata
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    groups = [(POOLED, task_order(list(dict.fromkeys(strata))))]
    held_out = [t for t in groups[0][1] if roles.get(t) == "meta_test"]
    if held_out:
        groups.append((META_TEST_POOL, held_out))
    for pool, tasks in groups:
        matrices = [data[strata == task] for task in tasks]
        rngs = [_stratum_rng(settings.seed, task, shots) for task in tasks]
        per_task, pooled = stratified_bootstrap(matrices, settings.bootstrap_samples, rngs)
        intervals[pool] = percentile_interval(pooled, settings.ci_level)
        if pool == POOLED:
            for task, replicates in zip(tasks, per_task, strict=True):
                intervals[task] = percentile_interval(replicates, settings.ci_level)
    return intervals


def _interval(
    est: inference.Estimate,
    boot: tuple[np.ndarray, np.ndarray],
    column: int,
    ci_level: float,
    bounds: tuple[float, float] = inference.UNBOUNDED,
):
    """The seed-aware t-interval (truncated to ``bounds``) with two or more seeds; the problem bootstrap with one
    (within range by construction); and the method's name."""
    if est.method == inference.SEEDS_AND_PROBLEMS:
        return (*inference.t_interval(est, ci_level, bounds), SEED_T)
    return float(boot[0][column]), float(boot[1][column]), PROBLEM_BOOTSTRAP


def _seed_note(design: Design, inits: Sequence[str]) -> str:
    single = [i for i in inits if i != BASE and len(design.seeds[i]) == 1]
    return f"{', '.join(single)}: 1 training seed, seed variance not included" if single else ""


def _accuracy_rows(
    design: Design, pool: str, mask: np.ndarray, boot: dict, column: dict, settings: StatsSettings
) -> list[dict[str, Any]]:
    rows = []
    strata = design.strata[mask]
    for init, seeds in design.seeds.items():
        correct, nll = design.correct[init][:, mask], design.nll[init][:, mask]
        if np.all(np.isnan(correct)):
            continue
        acc = inference.crossed_estimate(correct, None, strata)
        low, high, method = _interval(acc, boot[pool], column["acc", init], settings.ci_level, inference.ACCURACY_RANGE)
        # All 0, all 1, or nothing varied: an exact (or score) interval over the problems, never a point.
        low, high, method = bounds.accuracy_interval(acc.estimate, acc.n_problems, low, high, method, settings.ci_level)
        nll_est = inference.crossed_estimate(nll, None, strata)
        nll_low, nll_high, _ = _interval(
            nll_est, boot[pool], column["nll", init], settings.ci_level, inference.NLL_RANGE
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a seed without NLL values -> NaN
            seed_acc = np.nanmean(correct, axis=1)
            seed_nll = np.nanmean(nll, axis=1)
        rows.append(
            {
                "init": init,
                "train_seed": ALL_SEEDS,
                "n_seeds": len(seeds),
                "n_problems": acc.n_problems,
                "accuracy": acc.estimate,
                "accuracy_se": acc.se,
                "accuracy_df": acc.df,
                "accuracy_ci_low": low,
                "accuracy_ci_high": high,
                "ci_method": method,
                "accuracy_seed_sd": float(np.std(seed_acc, ddof=1)) if len(seeds) > 1 else math.nan,
                "nll_n": nll_est.n_problems,
                "nll_mean": nll_est.estimate,
                "nll_ci_low": nll_low,
                "nll_ci_high": nll_high,
            }
        )
        for seed, value, nll_value in zip(seeds, seed_acc, seed_nll, strict=True):
            count = int(np.sum(~np.isnan(correct[seeds.index(seed)])))
            rows.append(
                {
                    "init": init,
                    "train_seed": str(seed),
                    "n_seeds": 1,
                    "n_problems": count,
                    "accuracy": float(value),
                    "nll_mean": float(nll_value),
                }
            )
    return rows


def _comparison_row(
    design: Design, pool: str, mask: np.ndarray, boot: dict, column: dict, a: str, b: str, settings: StatsSettings
) -> dict[str, Any] | None:
    name = comparison_name(a, b)
    strata = design.strata[mask]
    ca, cb = design.correct[a][:, mask], design.correct[b][:, mask]
    acc = inference.crossed_estimate(ca, cb, strata)
    if acc.n_problems == 0:
        return None
    low, high, method = _interval(acc, boot[pool], column["dacc", name], settings.ci_level, inference.DIFFERENCE_RANGE)
    mean_a, mean_b = _seed_mean(ca), _seed_mean(cb)
    paired = ~np.isnan(mean_a) & ~np.isnan(mean_b)
    diff = mean_a[paired] - mean_b[paired]
    # Per-problem sign of the seed- and repeat-averaged difference: McNemar's b and c with one seed and repeat.
    a_better, b_better = int(np.sum(diff > 0)), int(np.sum(diff < 0))
    mcnemar_p = mcnemar_exact(a_better, b_better)
    acc_a, acc_b = float(np.mean(mean_a[paired])), float(np.mean(mean_b[paired]))
    # Nothing varied (e.g. both arms all 0): Newcombe's interval over the problems, never a point.
    low, high, method = bounds.difference_interval(acc_a, acc_b, acc.n_problems, low, high, method, settings.ci_level)
    tost_lower, tost_upper, tost_p = inference.tost(acc, settings.margin)

    na, nb = design.nll[a][:, mask], design.nll[b][:, mask]
    nll = inference.crossed_estimate(na, nb, strata)
    nll_low, nll_high, _ = _interval(nll, boot[pool], column["dnll", name], settings.ci_level)
    nll_mean_a, nll_mean_b = _seed_mean(na), _seed_mean(nb)
    nll_paired = ~np.isnan(nll_mean_a) & ~np.isnan(nll_mean_b)
    nll_diff = nll_mean_a[nll_paired] - nll_mean_b[nll_paired]
    w_stat, w_p, w_note = wilcoxon_test(nll_diff)
    seed_t = acc.method == inference.SEEDS_AND_PROBLEMS
    return {
        "comparison": name,
        "init_a": a,
        "init_b": b,
        "n_problems": acc.n_problems,
        "n_seeds_a": acc.n_clusters_a,
        "n_seeds_b": acc.n_clusters_b,
        "acc_a": acc_a,
        "acc_b": acc_b,
        "acc_diff": acc.estimate,
        "acc_diff_se": acc.se,
        "acc_diff_df": acc.df,
        "acc_diff_ci_low": low,
        "acc_diff_ci_high": high,
        "ci_method": method,
        "seed_note": _seed_note(design, (a, b)),
        "acc_test": "t" if seed_t else "mcnemar",
        "acc_p": inference.t_test_p(acc) if seed_t else mcnemar_p,
        # The smallest p the test can reach: the t-test's at a difference of 100 pp, McNemar's with every pair
        # discordant one way.
        "acc_min_p": (
            inference.t_test_smallest_p(acc.se, acc.df, 1.0) if seed_t else inference.mcnemar_smallest_p(acc.n_problems)
        ),
        "tost_min_p": inference.tost_smallest_p(acc.se, acc.df, settings.margin),
        "tost_p_lower": tost_lower,
        "tost_p_upper": tost_upper,
        "tost_p": tost_p,
        "cohens_h": cohens_h(acc_a, acc_b),
        "n_a_better": a_better,
        "n_b_better": b_better,
        "n_tied": int(diff.size - a_better - b_better),
        "discordant_odds_ratio": discordant_odds_ratio(a_better, b_better),
        "mcnemar_p": mcnemar_p,
        "nll_n": nll.n_problems,
        "nll_a": float(np.mean(nll_mean_a[nll_paired])) if nll_diff.size else math.nan,
        "nll_b": float(np.mean(nll_mean_b[nll_paired])) if nll_diff.size else math.nan,
        "nll_diff": nll.estimate,
        "nll_diff_se": nll.se,
        "nll_diff_ci_low": nll_low,
        "nll_diff_ci_high": nll_high,
        "nll_test": "t" if seed_t else "wilcoxon",
        "nll_p": (inference.t_test_p(nll) if nll.n_problems else math.nan) if seed_t else w_p,
        "wilcoxon_stat": w_stat,
        "wilcoxon_p": w_p,
        "nll_note": w_note,
    }


def _across_row(
    design: Design, pool: str, mask: np.ndarray, task_rows: pd.DataFrame, a: str, b: str, settings: StatsSettings
) -> dict[str, Any]:
    """The cross-task analysis of one (shots, comparison): the mean over tasks of the per-task differences, tasks
    a random sample of subjects (``inference.task_random_estimate``: its t-test generalises to a new subject), and
    the Wilcoxon signed-rank test over the task-level differences (descriptive)."""
    row: dict[str, Any] = {"pool": pool, "comparison": comparison_name(a, b), "n_tasks": len(task_rows)}
    strata = design.strata[mask]
    for prefix, matrices in (("acc", design.correct), ("nll", design.nll)):
        est = inference.task_random_estimate(matrices[a][:, mask], matrices[b][:, mask], strata)
        limits = inference.DIFFERENCE_RANGE if prefix == "acc" else inference.UNBOUNDED
        low, high = inference.t_interval(est, settings.ci_level, limits) if est.n_problems else (math.nan, math.nan)
        if prefix == "acc" and bounds.is_point(low, high):  # nothing varied: Newcombe's, never a point
            macro = [np.nanmean([np.nanmean(matrices[i][:, mask][:, strata == t]) for t in np.unique(strata)])
                     for i in (a, b)]  # fmt: skip
            low, high, _ = bounds.difference_interval(*macro, est.n_problems, low, high, "", settings.ci_level)
        diffs = task_rows[f"{prefix}_diff"].to_numpy(dtype=np.float64)
        finite = diffs[~np.isnan(diffs)]
        stat, p, note = wilcoxon_test(finite, alpha=settings.alpha)
        row |= {
            f"{prefix}_macro_diff": est.estimate,
            f"{prefix}_macro_se": est.se,
            f"{prefix}_macro_df": est.df,
            f"{prefix}_macro_ci_low": low,
            f"{prefix}_macro_ci_high": high,
            f"{prefix}_p": inference.t_test_p(est) if est.n_problems else math.nan,
            f"{prefix}_n_positive": int(np.sum(finite > 0)),
            f"{prefix}_n_negative": int(np.sum(finite < 0)),
            f"{prefix}_wilcoxon_stat": stat,
            f"{prefix}_wilcoxon_p": p,
            f"{prefix}_wilcoxon_min_p": inference.wilcoxon_smallest_p(int(np.count_nonzero(finite))),
            f"{prefix}_note": note,
        }
    return row


def _experiment_tables(
    name: str, frame: pd.DataFrame, settings: StatsSettings
) -> tuple[list[dict], list[dict], list[dict]]:
    roles = task_roles(frame)
    cells = per_problem(frame)
    accuracy_rows: list[dict[str, Any]] = []
    comparison_rows: list[dict[str, Any]] = []
    across_rows: list[dict[str, Any]] = []
    main_pool = primary_pool(roles)
    for shots in sorted(cells["shots"].unique()):
        design = build_design(cells[cells["shots"] == shots])
        inits = list(design.seeds)
        pairs = [(a, b) for a, b in (*COMPARISONS, *SECONDARY_COMPARISONS) if a in inits and b in inits]
        keys = (
            [("acc", i) for i in inits]
            + [("nll", i) for i in inits]
            + [("dacc", comparison_name(a, b)) for a, b in pairs]
            + [("dnll", comparison_name(a, b)) for a, b in pairs]
        )
        column = {key: j for j, key in enumerate(keys)}
        quantities = (
            [_seed_mean(design.correct[i]) for i in inits]
            + [_seed_mean(design.nll[i]) for i in inits]
            + [_seed_mean(design.correct[a]) - _seed_mean(design.correct[b]) for a, b in pairs]
            + [_seed_mean(design.nll[a]) - _seed_mean(design.nll[b]) for a, b in pairs]
        )
        boot = _bootstrap(design, quantities, roles, settings, int(shots))
        present_tasks = set(design.strata)
        at_shots: list[dict[str, Any]] = []
        for pool in pools({t: r for t, r in roles.items() if t in present_tasks}):
            mask = design.mask(pool, roles)
            where = {"experiment": name, "task": pool, "task_role": _pool_role(pool, roles), "shots": int(shots)}
            accuracy_rows += [where | row for row in _accuracy_rows(design, pool, mask, boot, column, settings)]
            for a, b in pairs:
                row = _comparison_row(design, pool, mask, boot, column, a, b, settings)
                if row is not None:
                    per_shot = pool == main_pool and row["comparison"] in settings.per_shot_comparisons
                    at_shots.append(where | {"family": "per_shot" if per_shot else "secondary"} | row)
        comparison_rows += at_shots
        task_level = pd.DataFrame([r for r in at_shots if r["task"] not in (POOLED, META_TEST_POOL)])
        mask = design.mask(main_pool, roles)
        pool_tasks = set(design.strata[mask])
        for a, b in pairs:
            if task_level.empty or (a, b) not in COMPARISONS:  # the cross-task analysis: the main comparisons
                continue
            rows = task_level[(task_level["comparison"] == comparison_name(a, b)) & task_level["task"].isin(pool_tasks)]
            across = _across_row(design, main_pool, mask, rows, a, b, settings)
            across_rows.append({"experiment": name, "shots": int(shots)} | across)
    return accuracy_rows, comparison_rows, across_rows


def _descriptive(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Per (init, task or pool, shots), all seeds and repeats: repeat spread and generation outcomes."""
    roles = task_roles(frame)
    rows = frame.assign(
        no_answer=(frame["grade_status"] == "no_answer").astype(np.float64),
        grade_failure=frame["grade_status"].isin(["timeout", "error"]).astype(np.float64),
    )
    parts = [rows, *(rows[rows["task"].isin(pool_tasks(p, roles))].assign(task=p) for p in pooled_groups(roles))]
    both = pd.concat(parts, ignore_index=True)
    keys = ["init", "task", "shots"]
    per_repeat = both.groupby([*keys, "train_seed", "repeat"])["correct"].mean()
    # Spread over the shot draws within a training seed, averaged over seeds.
    within = per_repeat.groupby(level=[*keys, "train_seed"]).agg(["count", lambda s: s.std(ddof=1)])
    within.columns = ["n_repeats", "sd"]
    spread = within.groupby(level=keys).agg(n_repeats=("n_repeats", "max"), accuracy_repeat_sd=("sd", "mean"))
    rates = both.groupby(keys).agg(
        no_answer_rate=("no_answer", "mean"),
        grade_failure_rate=("grade_failure", "mean"),
        truncation_rate=("truncated", "mean"),
        mean_gen_tokens=("gen_tokens", "mean"),
    )
    return spread.join(rates).reset_index().assign(experiment=name, train_seed=ALL_SEEDS)


def _finish_family(frame: pd.DataFrame, p_column: str, prefix: str, alpha: float, groups: list[str]) -> pd.DataFrame:
    """Holm-adjust ``p_column`` within each group (a family) and add ``<prefix>_significant`` and ``_stars``."""
    adjusted = pd.Series(np.nan, index=frame.index)
    for _, group in frame.groupby(groups, sort=False):
        adjusted[group.index] = holm_adjust(group[p_column].to_numpy(dtype=np.float64))
    frame[f"{p_column}_holm"] = adjusted.to_numpy()
    if prefix:
        frame[f"{prefix}_significant"] = frame[f"{p_column}_holm"] < alpha
        frame[f"{prefix}_stars"] = [significance_stars(p, alpha) for p in frame[f"{p_column}_holm"]]
    return frame


def _family_sizes(frame: pd.DataFrame, p_column: str, groups: list[str]) -> pd.Series:
    return frame.groupby(groups)[p_column].transform(lambda s: int(s.notna().sum()))


def _verdict(row: pd.Series) -> str:
    if row["acc_significant"]:
        return "better" if row["acc_diff"] > 0 else "worse"
    return "equivalent" if row["equivalent"] else "inconclusive"


def _finish_comparisons(comparisons: pd.DataFrame, settings: StatsSettings) -> pd.DataFrame:
    families = ["experiment", "family"]
    alpha = settings.alpha
    comparisons = _finish_family(comparisons, "acc_p", "acc", alpha, families)
    comparisons = _finish_family(comparisons, "nll_p", "nll", alpha, families)
    comparisons = _finish_family(comparisons, "tost_p", "", alpha, families)
    comparisons["family_size"] = _family_sizes(comparisons, "acc_p", families)
    # The smallest Holm-adjusted p this test can reach, from its own design (Holm's first-step factor).
    comparisons["acc_min_p_holm"] = [
        inference.smallest_adjusted_p(p, m)
        for p, m in zip(comparisons["acc_min_p"], comparisons["family_size"], strict=True)
    ]
    comparisons["acc_can_reach_alpha"] = comparisons["acc_min_p_holm"] < alpha
    # TOST's reachability the same way: its best case (an estimate of exactly 0) times the family size.
    comparisons["tost_min_p_holm"] = [
        inference.smallest_adjusted_p(p, m) if math.isfinite(p) else math.nan
        for p, m in zip(comparisons["tost_min_p"], comparisons["family_size"], strict=True)
    ]
    comparisons["tost_can_reach_alpha"] = comparisons["tost_min_p_holm"] < alpha
    comparisons["equivalent"] = comparisons["tost_p_holm"] < alpha
    # Simultaneous (Bonferroni at the family size) beside the Holm verdicts: one excludes 0 only where Holm rejects.
    sizes = comparisons["family_size"]
    comparisons["acc_diff_sci_level"] = [bounds.simultaneous_level(settings.ci_level, m) for m in sizes]
    simultaneous = [
        bounds.simultaneous_difference(*cells, settings.ci_level, int(m))
        for *cells, m in zip(
            comparisons["acc_diff"], comparisons["acc_diff_se"], comparisons["acc_diff_df"], comparisons["acc_a"],
            comparisons["acc_b"], comparisons["n_problems"], comparisons["ci_method"], comparisons["family_size"],
            strict=True,
        )
    ]  # fmt: skip
    comparisons["acc_diff_sci_low"] = [low for low, _ in simultaneous]
    comparisons["acc_diff_sci_high"] = [high for _, high in simultaneous]
    comparisons["verdict"] = comparisons.apply(_verdict, axis=1)
    # Power at the threshold the test must pass as the family's smallest p (alpha / m, Holm's first step), with
    # the t quantiles of the test's own df; n/a (NaN) where se = 0 (nothing varied, no test).
    comparisons["mde_alpha"] = alpha / comparisons["family_size"].clip(lower=1)
    designs = list(zip(comparisons["acc_diff_se"], comparisons["acc_diff_df"], comparisons["mde_alpha"], strict=True))
    comparisons["mde"] = [inference.minimum_detectable_effect(se, df, a, POWER) for se, df, a in designs]
    comparisons["power_at_target"] = [inference.power(settings.target_effect, se, df, a) for se, df, a in designs]
    return comparisons


def _sort(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    orders = {"experiment": experiment_order(list(frame["experiment"].unique()))}
    orders["task"] = task_order(list(frame["task"].unique()))
    if by == "init":
        orders["init"] = init_order(list(frame["init"].unique()))
        orders["train_seed"] = [
            ALL_SEEDS,
            *sorted((s for s in frame["train_seed"].unique() if s != ALL_SEEDS), key=int),
        ]
    else:
        orders["comparison"] = [comparison_name(a, b) for a, b in (*COMPARISONS, *SECONDARY_COMPARISONS)]
    columns = ["experiment", "task", "shots", by, *(["train_seed"] if by == "init" else [])]
    return sort_in_order(frame, columns, orders).reset_index(drop=True)


def _finish_across(across: pd.DataFrame, alpha: float) -> pd.DataFrame:
    if across.empty:
        return pd.DataFrame(columns=ACROSS_TASKS_COLUMNS)
    for prefix in ("acc", "nll"):
        across = _finish_family(across, f"{prefix}_p", prefix, alpha, ["experiment"])
        across = _finish_family(across, f"{prefix}_wilcoxon_p", "", alpha, ["experiment"])
        sizes = _family_sizes(across, f"{prefix}_wilcoxon_p", ["experiment"])
        across[f"{prefix}_wilcoxon_min_p_holm"] = [
            inference.smallest_adjusted_p(p, m) for p, m in zip(across[f"{prefix}_wilcoxon_min_p"], sizes, strict=True)
        ]
        across[f"{prefix}_wilcoxon_can_reach_alpha"] = across[f"{prefix}_wilcoxon_min_p_holm"] < alpha
    return across[ACROSS_TASKS_COLUMNS]


def compute_tables(
    evals: pd.DataFrame, settings: StatsSettings, control: pd.DataFrame | None = None
) -> dict[str, pd.DataFrame]:
    """Every table of the stage, keyed by output file name."""
    experiments = split_experiments(evals)
    # The controls (and their Holm families) are the main initialisations': the secondary row is not in them.
    main = {name: main_inits(frame) for name, frame in experiments.items()}
    accuracy_rows, comparison_rows, across_rows, descriptive = [], [], [], []
    for name, frame in experiments.items():
        acc, cmp, across = _experiment_tables(name, frame, settings)
        accuracy_rows += acc
        comparison_rows += cmp
        across_rows += across
        descriptive.append(_descriptive(frame, name))
    accuracy = pd.DataFrame(accuracy_rows).merge(
        pd.concat(descriptive, ignore_index=True), on=["experiment", "init", "task", "shots", "train_seed"], how="left"
    )
    accuracy = _sort(accuracy, "init").reindex(columns=ACCURACY_COLUMNS)
    if comparison_rows:
        comparisons = _finish_comparisons(pd.DataFrame(comparison_rows), settings)
        comparisons = _sort(comparisons, "comparison")[COMPARISON_COLUMNS]
    else:
        comparisons = pd.DataFrame(columns=COMPARISON_COLUMNS)
    across = _finish_across(pd.DataFrame(across_rows), settings.alpha)
    adaptation = effects.adaptation_table(experiments)
    return {
        "accuracy.tsv": accuracy,
        "comparisons.tsv": comparisons,
        # Nothing varied (both arms all 0, e.g.): Newcombe's interval, never a point (analysis.bounds).
        "primary.tsv": bounds.widen_point_differences(primary_table(experiments, settings), settings.ci_level),
        "per_shot.tsv": comparisons[comparisons["family"] == "per_shot"].reset_index(drop=True),
        "planted.tsv": planted_table(experiments, settings),
        "across_tasks.tsv": across,
        "control.tsv": negative_control.control_table(experiments, control, settings),
        "aa_control.tsv": negative_control.aa_table(main, control, settings),
        "generation.tsv": effects.generation_table(experiments),
        "adaptation.tsv": adaptation,
        "adaptation_summary.tsv": effects.adaptation_summary(adaptation),
        "sample_efficiency.tsv": efficiency.sample_efficiency_table(experiments, settings),
        "rule_adoption.tsv": rule_adoption_table(main, settings),
        "positive_control.tsv": positive_control_table(main_inits(evals), settings),
    }


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fomaml_math stats",
        description="Seed-aware intervals, test families, equivalence and the negative control over the evaluation.",
    )
    add_settings_arguments(parser)
    parser.add_argument(
        "--eval",
        dest="eval_paths",
        nargs="+",
        required=True,
        metavar="PARQUET",
        help="every main evaluation file (all experiments, training seeds, inits and shot counts)",
    )
    parser.add_argument(
        "--control-eval",
        dest="control_paths",
        nargs="*",
        default=[],
        metavar="PARQUET",
        help="the negative control: one trained model re-evaluated under an independent shot_seed (optional)",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help=f"writes {', '.join(STATS_FILES)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = StatsSettings.from_settings(settings_from_args(args, "stats"))
    evals = load_eval(args.eval_paths)
    control = load_eval(args.control_paths, "--control-eval") if args.control_paths else None
    tables = compute_tables(evals, settings, control)
    for name, frame in tables.items():
        write_tsv(args.output_dir / name, frame)
    print(
        f"stats: {len(tables['accuracy.tsv'])} accuracy rows, {len(tables['comparisons.tsv'])} comparisons "
        f"({len(tables['per_shot.tsv'])} per-shot, {len(tables['primary.tsv'])} primary contrast(s)), "
        f"{settings.bootstrap_samples} bootstrap samples -> {args.output_dir}"
    )
    return 0
