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

Beside every row (docs/statistics.md, "Exploratory below the confirmatory seed count"): ``confirmatory`` (both arms
have at least ``stats.primary.min_seeds_confirmatory`` training runs; the Answer is exploratory otherwise); a
permutation p over whole training runs, the estimator's exchangeable unit (``perm_p``: the share of relabelings of
the 2S runs into two arms whose |t| from the same estimator reaches the observed one; exhaustive up to
``PERMUTATION_LIMIT`` relabelings, else that many at random), with the smallest value the scheme can give
(``perm_p_floor``: 2 / C(2S, S) with equal arms, a relabeling and its mirror giving the same |t|; 0.1 at S = 3);
and the seed SD, the SD of one run's primary score around its arm's mean pooled over both arms (it holds the shot
draws and the seed × problem noise of one run), with its chi-square interval on S_a + S_b − 2 df.

Generated leave-one-subject-out folds (``experiments: [{generate: leave_one_subject_out}]``) are pooled into one row,
``<name_prefix>-pooled``: the mean over the folds of each fold's estimate (equal weight per subject), seeds nested in
folds (``inference.mean_of_independent``). That row is the family's test of the held-out claim; the folds' own rows
are secondary (family ``secondary``, Holm over the folds).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from fomaml_math.analysis import inference
from fomaml_math.analysis.evaldata import build_design, per_problem, primary_pool, task_roles
from fomaml_math.analysis.tables import FOLD_FAMILY, META_TEST_POOL, PRIMARY_COLUMNS, PRIMARY_FAMILY, StatsSettings

POWER = 0.8
# Whole-run relabelings enumerated at most (C(10, 5) = 252 at 5 seeds per arm); beyond, this many drawn at random.
PERMUTATION_LIMIT = 2000


@dataclass(frozen=True)
class Arms:
    """One experiment's primary matrices (seeds × problems, complete cases) for the permutation and the seed SD."""

    a: np.ndarray
    b: np.ndarray
    strata: np.ndarray


def _relabelled(arms: Arms, chosen: Sequence[int]) -> Arms:
    runs = np.concatenate([arms.a, arms.b])
    rest = [i for i in range(runs.shape[0]) if i not in set(chosen)]
    return Arms(runs[list(chosen)], runs[rest], arms.strata)


def permutation_p(folds: Sequence[Arms], rng: np.random.Generator) -> tuple[float, float, int]:
    """(p, smallest attainable p, relabelings) of the permutation test over whole training runs.

    Each fold's 2S runs are dealt into two arms of its sizes (independently per fold: folds are separate trainings);
    the statistic is |t| of the primary estimator (one fold: ``crossed_estimate``; several: the mean over folds,
    ``inference.mean_of_independent``). Every relabeling is enumerated when there are at most
    ``PERMUTATION_LIMIT``; then p counts the identity, and its floor is 2 / count with equal arms (the mirror
    relabeling gives the same |t|), else 1 / count. Otherwise ``PERMUTATION_LIMIT`` random relabelings:
    p = (1 + hits) / (1 + draws), floor 1 / (1 + draws).
    """

    def statistic(relabelled: Sequence[Arms]) -> float:
        estimates = [inference.crossed_estimate(f.a, f.b, f.strata) for f in relabelled]
        est = estimates[0] if len(estimates) == 1 else inference.mean_of_independent(estimates)
        return abs(est.estimate) / est.se if est.se > 0 else math.nan

    observed = statistic(folds)
    if not math.isfinite(observed):
        return math.nan, math.nan, 0
    sizes = [(f.a.shape[0], f.a.shape[0] + f.b.shape[0]) for f in folds]
    count = math.prod(math.comb(total, s) for s, total in sizes)
    tolerance = 1e-9 * observed  # ties: the mirror relabeling reproduces |t| up to rounding
    if count <= PERMUTATION_LIMIT:
        choices = itertools.product(*(itertools.combinations(range(total), s) for s, total in sizes))
        values = np.array([statistic([_relabelled(f, c) for f, c in zip(folds, chosen, strict=True)])
                           for chosen in choices])  # fmt: skip
        hits = np.nan_to_num(values, nan=-1.0) >= observed - tolerance
        mirrored = all(2 * s == total for s, total in sizes)
        return float(hits.mean()), (2.0 if mirrored else 1.0) / count, count
    hits = 0
    for _ in range(PERMUTATION_LIMIT):
        chosen = [sorted(rng.choice(total, size=s, replace=False).tolist()) for s, total in sizes]
        value = statistic([_relabelled(f, c) for f, c in zip(folds, chosen, strict=True)])
        hits += bool(math.isfinite(value) and value >= observed - tolerance)
    return (1 + hits) / (1 + PERMUTATION_LIMIT), 1 / (1 + PERMUTATION_LIMIT), PERMUTATION_LIMIT


def seed_sd(folds: Sequence[Arms], ci_level: float) -> tuple[float, float, float]:
    """(SD, low, high): the SD of one training run's primary score (its mean over the primary pool's problems)
    around its arm's mean, pooled over both arms (and folds), with the chi-square interval on its df
    (S_a + S_b − 2 per fold); where every run scored the same, the upper bound is that of one run one answer off."""
    squares, df = 0.0, 0
    for fold in folds:
        for arm in (fold.a, fold.b):
            means = arm.mean(axis=1)
            squares += float(np.sum((means - means.mean()) ** 2))
            df += means.size - 1
    if df < 1:
        return math.nan, math.nan, math.nan
    tail = (1 - ci_level) / 2
    low = math.sqrt(squares / scipy_stats.chi2.ppf(1 - tail, df))
    # Every run scored the same: the interval would be the point [0, 0]. A run's mean moves by at least one
    # answer over its problems, so the bound uses the squares of one run one answer off (the coarsest step,
    # 1 / problems; conservative): an SD below that cannot be told from 0 by these runs.
    problems = max(int(arm.shape[1]) for fold in folds for arm in (fold.a, fold.b))
    resolved = squares if squares > 0 else (1.0 / problems) ** 2 / 2
    high = math.sqrt(resolved / scipy_stats.chi2.ppf(tail, df))
    return math.sqrt(squares / df), low, high


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
    matrix_a, matrix_b = design.correct[a][:, mask], design.correct[b][:, mask]
    complete = ~(np.isnan(matrix_a).any(axis=0) | np.isnan(matrix_b).any(axis=0))
    arms = Arms(matrix_a[:, complete], matrix_b[:, complete], design.strata[mask][complete])
    return est, {"pool": pool, "shots": shots, "acc_a": acc_a, "acc_b": acc_b, "arms": [arms]}


def _pooled_estimate(folds: list[tuple[inference.Estimate, dict]]) -> tuple[inference.Estimate, dict]:
    """The folds' pooled row: every cell the equal-weight mean over the folds (one held-out subject each)."""
    estimates = [est for est, _ in folds]
    cells = [cell for _, cell in folds]
    return inference.mean_of_independent(estimates), {
        "pool": META_TEST_POOL,
        "shots": sorted({k for cell in cells for k in cell["shots"]}),
        "acc_a": float(np.mean([cell["acc_a"] for cell in cells])),
        "acc_b": float(np.mean([cell["acc_b"] for cell in cells])),
        "arms": [arms for cell in cells for arms in cell["arms"]],
    }


def _contrast_row(name: str, est: inference.Estimate, cells: dict, contrast: str, settings: StatsSettings) -> dict:
    low, high = inference.t_interval(est, settings.ci_level, inference.DIFFERENCE_RANGE)
    rng = np.random.default_rng([settings.seed, 0x9E4, *name.encode()])
    perm_p, perm_floor, relabelings = permutation_p(cells["arms"], rng)
    sd, sd_low, sd_high = seed_sd(cells["arms"], settings.ci_level)
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
        "confirmatory": min(est.n_clusters_a, est.n_clusters_b) >= settings.min_seeds_confirmatory,
        "perm_p": perm_p,
        "perm_p_floor": perm_floor,
        "perm_relabelings": relabelings,
        "seed_sd": sd,
        "seed_sd_ci_low": sd_low,
        "seed_sd_ci_high": sd_high,
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
