"""The pre-registered primary contrast: one test per experiment, adjusted over the experiments.

``stats.primary.contrast`` (default ``fomaml-sft``) names it. Its estimand is the accuracy difference on the
experiment's primary pool (its held-out tasks, else all its tasks), averaged with equal weight over every
evaluated shot count k > 0. Per training seed and problem, each arm's score is its accuracy averaged over the
repeats (shot draws) and then over k; the seed-aware estimator (``inference.crossed_estimate``) gives the
difference, its standard error (seed part and problem part) and Welch–Satterthwaite df. Problems evaluated at
every k enter (complete cases). The family is the experiments: Holm over them, and the planned MDE and power use
alpha / (number of experiments), Holm's first step. Verdicts: *better*/*worse* (Holm p < alpha), *equivalent*
(Holm-adjusted TOST p < alpha within ±``equivalence_margin_pp``), else *inconclusive*; every row says whether
each verdict is reachable at all from its own se and df.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from fomaml_math.analysis import inference
from fomaml_math.analysis.evaldata import build_design, per_problem, primary_pool, task_roles
from fomaml_math.analysis.tables import PRIMARY_COLUMNS, StatsSettings

POWER = 0.8


def _averaged_over_shots(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (init, seed, task, problem): the mean over k > 0 of the repeat-averaged scores, for problems at every k."""
    adapted = cells[cells["shots"] > 0]
    n_shots = adapted["shots"].nunique()
    grouped = adapted.groupby(["init", "train_seed", "task", "problem_id"], sort=True)
    out = grouped.agg(correct=("correct", "mean"), nll=("nll", "mean"), n_shots=("shots", "nunique")).reset_index()
    return out[out["n_shots"] == n_shots]


def _contrast_row(name: str, frame: pd.DataFrame, a: str, b: str, settings: StatsSettings) -> dict | None:
    roles = task_roles(frame)
    pool = primary_pool(roles)
    cells = per_problem(frame[frame["init"].isin([a, b])])
    shots = sorted(int(k) for k in cells["shots"].unique() if k > 0)
    averaged = _averaged_over_shots(cells)
    if set(averaged["init"]) != {a, b}:
        return None
    design = build_design(averaged)
    mask = design.mask(pool, roles)
    est = inference.crossed_estimate(design.correct[a][:, mask], design.correct[b][:, mask], design.strata[mask])
    if est.n_problems == 0:
        return None
    low, high = inference.t_interval(est, settings.ci_level, inference.DIFFERENCE_RANGE)
    acc_a = float(np.nanmean(design.correct[a][:, mask]))
    acc_b = float(np.nanmean(design.correct[b][:, mask]))
    return {
        "experiment": name,
        "pool": pool,
        "contrast": f"{a}-{b}",
        "shots": ",".join(str(k) for k in shots),
        "n_shot_counts": len(shots),
        "n_problems": est.n_problems,
        "n_seeds_a": est.n_clusters_a,
        "n_seeds_b": est.n_clusters_b,
        "acc_a": acc_a,
        "acc_b": acc_b,
        "diff": est.estimate,
        "se": est.se,
        "df": est.df,
        "seed_var": est.cluster_var,
        "problem_var": est.problem_var,
        "ci_low": low,
        "ci_high": high,
        "p": inference.t_test_p(est),
        "tost_p": inference.tost(est, settings.margin)[2],
        "tost_min_p": inference.tost_smallest_p(est.se, est.df, settings.margin),
    }


def primary_table(experiments: Mapping[str, pd.DataFrame], settings: StatsSettings) -> pd.DataFrame:
    """One row per experiment: the primary contrast, its test, TOST, MDE, power and verdict (Holm over experiments)."""
    a, b = settings.primary_contrast.split("-")
    rows = [row for name, frame in experiments.items() if (row := _contrast_row(name, frame, a, b, settings))]
    if not rows:
        return pd.DataFrame(columns=PRIMARY_COLUMNS)
    table = pd.DataFrame(rows)
    m = len(table)
    alpha = settings.alpha
    table["family_size"] = m
    table["p_holm"] = inference.holm_adjust(table["p"].to_numpy(dtype=np.float64))
    table["tost_p_holm"] = inference.holm_adjust(table["tost_p"].to_numpy(dtype=np.float64))
    table["significant"] = table["p_holm"] < alpha
    table["equivalent"] = table["tost_p_holm"] < alpha
    table["tost_can_reach_alpha"] = [math.isfinite(p) and min(1.0, p * m) < alpha for p in table["tost_min_p"]]
    table["planned_alpha"] = alpha / m
    designs = list(zip(table["se"], table["df"], strict=True))
    table["mde"] = [inference.minimum_detectable_effect(se, df, alpha / m, POWER) for se, df in designs]
    table["power_at_target"] = [inference.power(settings.target_effect, se, df, alpha / m) for se, df in designs]
    table["verdict"] = [
        ("better" if d > 0 else "worse") if sig else ("equivalent" if eq else "inconclusive")
        for d, sig, eq in zip(table["diff"], table["significant"], table["equivalent"], strict=True)
    ]
    return table[PRIMARY_COLUMNS]
