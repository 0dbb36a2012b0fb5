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

Generated leave-one-subject-out folds (``experiments: [{generate: leave_one_subject_out}]``) are pooled into one row,
``<name_prefix>-pooled``: the mean over the folds of each fold's estimate (equal weight per subject), seeds nested in
folds (``inference.mean_of_independent``). That row is the family's test of the held-out claim; the folds' own rows
are secondary (family ``secondary``, Holm over the folds).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from fomaml_math.analysis import inference
from fomaml_math.analysis.evaldata import build_design, per_problem, primary_pool, task_roles
from fomaml_math.analysis.tables import FOLD_FAMILY, META_TEST_POOL, PRIMARY_COLUMNS, PRIMARY_FAMILY, StatsSettings

POWER = 0.8


def _averaged_over_shots(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (init, seed, task, problem): the mean over k > 0 of the repeat-averaged scores, for problems at every k."""
    adapted = cells[cells["shots"] > 0]
    n_shots = adapted["shots"].nunique()
    grouped = adapted.groupby(["init", "train_seed", "task", "problem_id"], sort=True)
    out = grouped.agg(correct=("correct", "mean"), nll=("nll", "mean"), n_shots=("shots", "nunique")).reset_index()
    return out[out["n_shots"] == n_shots]


def _contrast_estimate(frame: pd.DataFrame, a: str, b: str) -> tuple[inference.Estimate, dict] | None:
    """The primary contrast of one experiment: its seed-aware estimate and the row's descriptive cells."""
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
    acc_a = float(np.nanmean(design.correct[a][:, mask]))
    acc_b = float(np.nanmean(design.correct[b][:, mask]))
    return est, {"pool": pool, "shots": shots, "acc_a": acc_a, "acc_b": acc_b}


def _pooled_estimate(folds: list[tuple[inference.Estimate, dict]]) -> tuple[inference.Estimate, dict]:
    """The folds' pooled row: every cell the equal-weight mean over the folds (one held-out subject each)."""
    estimates = [est for est, _ in folds]
    cells = [cell for _, cell in folds]
    return inference.mean_of_independent(estimates), {
        "pool": META_TEST_POOL,
        "shots": sorted({k for cell in cells for k in cell["shots"]}),
        "acc_a": float(np.mean([cell["acc_a"] for cell in cells])),
        "acc_b": float(np.mean([cell["acc_b"] for cell in cells])),
    }


def _contrast_row(name: str, est: inference.Estimate, cells: dict, contrast: str, settings: StatsSettings) -> dict:
    low, high = inference.t_interval(est, settings.ci_level, inference.DIFFERENCE_RANGE)
    return {
        "experiment": name,
        "pool": cells["pool"],
        "contrast": contrast,
        "shots": ",".join(str(k) for k in cells["shots"]),
        "n_shot_counts": len(cells["shots"]),
        "n_problems": est.n_problems,
        "n_seeds_a": est.n_clusters_a,
        "n_seeds_b": est.n_clusters_b,
        "acc_a": cells["acc_a"],
        "acc_b": cells["acc_b"],
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


def _family(rows: list[dict], family: str, settings: StatsSettings) -> pd.DataFrame:
    """One family's rows with their Holm adjustment, planned MDE and power at alpha / m, and verdicts."""
    table = pd.DataFrame(rows)
    m = len(table)
    alpha = settings.alpha
    table["family"] = family
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


def planned_family_size(name: str, names: Sequence[str], folds: Sequence[str]) -> int:
    """The family size the primary row of ``name`` is planned with, among the experiments ``names`` of which
    ``folds`` are generated folds: a fold's, the number of folds; any other experiment's, and the folds' pooled
    row's, the confirmatory family's (the other experiments and the pooled row)."""
    present = [n for n in names if n in folds]
    if name in folds:
        return len(present)
    return len(names) - len(present) + (1 if present else 0)


def primary_table(experiments: Mapping[str, pd.DataFrame], settings: StatsSettings) -> pd.DataFrame:
    """One row per experiment: the primary contrast, its test, TOST, MDE, power and verdict (Holm over experiments).

    With generated leave-one-subject-out folds (``settings.loso_folds``) their pooled row (the mean over the folds)
    is the family's test of the held-out claim, in place of the folds; each fold's row stays, secondary, Holm over
    the folds (docs/statistics.md, "Leave-one-subject-out"). The pooled row needs every fold.
    """
    a, b = settings.primary_contrast.split("-")
    contrast = f"{a}-{b}"
    estimates = {name: found for name, frame in experiments.items() if (found := _contrast_estimate(frame, a, b))}
    rows = {name: _contrast_row(name, *found, contrast, settings) for name, found in estimates.items()}
    folds = [name for name in settings.loso_folds if name in estimates]
    primary = [row for name, row in rows.items() if name not in settings.loso_folds]
    if folds and len(folds) == len(settings.loso_folds):
        pooled = _pooled_estimate([estimates[name] for name in folds])
        primary.append(_contrast_row(str(settings.loso_pooled), *pooled, contrast, settings))
    elif folds:  # a partial study (by hand): a mean over some subjects is not the held-out claim over all
        missing = sorted(set(settings.loso_folds) - set(folds))
        warnings.warn(f"primary: no row {settings.loso_pooled}: folds {missing} have no primary contrast", stacklevel=2)
    families = [(primary, PRIMARY_FAMILY), ([rows[name] for name in folds], FOLD_FAMILY)]
    tables = [_family(family_rows, family, settings) for family_rows, family in families if family_rows]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=PRIMARY_COLUMNS)
