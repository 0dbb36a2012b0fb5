"""Seed-aware inference: a mean (difference) over a clusters × problems design, its standard error, t-interval,
two-sided test, TOST equivalence test and minimum detectable effect; Holm's adjustment; and the paired tests and
effect sizes of one training seed (exact McNemar, Wilcoxon signed-rank, Cohen's h, the discordant odds ratio).
The bootstrap is in ``analysis.resampling``.

The design (``docs/statistics.md``, "Seed-aware uncertainty"): each initialisation contributes a matrix
``Y[s, i]`` of per-problem scores (repeats already averaged), one row per *cluster* (a training seed; for the
negative control, a shot draw) and one column per test problem. Clusters and problems are crossed: every cluster
is scored on the same problems. The estimate is the weighted mean over problems of the cluster-averaged scores
(the difference of two such means for a comparison). Its variance has a cluster part per initialisation and a
problem part:

    Var = Σ_init σ²_cluster,init / S_init  +  Σ_strata (Σ_{i∈t} w_i²) · s²_t

where ``σ²_cluster / S`` is estimated by the variance of the per-cluster weighted means over ``S``, bounded
below by the cluster × problem residual share that every cluster mean holds (``max(raw, share)``, always with
the ``S − 1`` df of the cluster means: no switch, docs/statistics.md "Seed-aware uncertainty"), and ``s²_t`` is
the sample variance, within task ``t``, of the per-problem (differences of) cluster means, less that residual
share (truncated at 0). Degrees of freedom by Welch–Satterthwaite: about ``S − 1`` when the cluster part
dominates (the t-interval over seed means), about ``N − T`` when the problem part dominates (the paired t-test
over problems). With one cluster per initialisation the cluster part is zero and this is the paired t-test over
problems.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

SEEDS_AND_PROBLEMS = "seeds+problems"
# Parameter ranges intervals are truncated to (t_interval): an accuracy, a difference of two, a mean NLL (>= 0);
# a difference of NLLs is unbounded.
ACCURACY_RANGE = (0.0, 1.0)
DIFFERENCE_RANGE = (-1.0, 1.0)
NLL_RANGE = (0.0, math.inf)
UNBOUNDED = (-math.inf, math.inf)
PROBLEMS_ONLY = "problems"


@dataclass(frozen=True)
class Estimate:
    """A mean or a difference of means with its seed-aware standard error."""

    estimate: float
    se: float
    df: float
    n_problems: int
    n_clusters_a: int
    n_clusters_b: int  # 0 for a single initialisation
    cluster_var: float  # the cluster part of se² (both initialisations)
    problem_var: float  # the problem part of se²
    # The raw cluster variances plus the problem part fell below the cluster × problem residual share: the cluster
    # means agree by chance (the regime the residual floor acts in; tests/test_null_simulation.py).
    seed_means_agree: bool = False

    @property
    def method(self) -> str:
        return SEEDS_AND_PROBLEMS if max(self.n_clusters_a, self.n_clusters_b) >= 2 else PROBLEMS_ONLY


def _weights(strata: np.ndarray, weighting: str) -> np.ndarray:
    """Problem weights summing to 1: ``problem`` = 1/N (micro-average), ``task`` = 1/(T·n_t) (macro-average)."""
    n = strata.size
    if weighting == "problem":
        return np.full(n, 1.0 / n)
    if weighting == "task":
        labels, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
        return 1.0 / (labels.size * counts[inverse])
    raise ValueError(f"weighting: expected 'problem' or 'task', got {weighting!r}")


def _cluster_part(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(var of the per-cluster weighted means / S, the cluster × problem residual share Σw²·σ²_e/S) of one
    initialisation's S × N matrix; (0, 0) with one cluster."""
    s, n = x.shape
    if s < 2:
        return 0.0, 0.0
    raw = float(np.var(x @ w, ddof=1)) / s
    if n < 2:
        return raw, 0.0
    # Two-way additive fit (problem + cluster effects): its residual mean square estimates σ²_e.
    residual = x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + x.mean()
    ms_residual = float(np.sum(residual**2)) / ((s - 1) * (n - 1))
    return raw, float(np.sum(w**2)) * ms_residual / s


def welch_satterthwaite(parts: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(variance, df) of a sum of independent variance parts ``(v, df)``: df by Welch–Satterthwaite over the
    non-zero parts (infinite when none has both)."""
    variance = sum(v for v, _ in parts)
    denominator = sum(v * v / d for v, d in parts if v > 0 and d > 0)
    return variance, (variance * variance / denominator if denominator > 0 else math.inf)


def mean_se(parts: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(se, df) of the equal-weight mean of F independent estimates given as ``(se_f, df_f)``: se² = Σ se_f² / F²,
    df by Welch–Satterthwaite; df 0 (no t-test) when a part has variance but no df, NaN when a se is unknown."""
    count = len(parts)
    scaled = [(se * se / count**2, df) for se, df in parts]
    if not scaled or not all(math.isfinite(v) for v, _ in scaled):
        return math.nan, math.nan
    variance, df = welch_satterthwaite(scaled)
    return math.sqrt(variance), (0.0 if any(v > 0 and not d > 0 for v, d in scaled) else df)


def mean_of_independent(estimates: Sequence[Estimate]) -> Estimate:
    """The equal-weight mean of independent estimates (leave-one-subject-out folds: separate trainings scored on
    disjoint problems, so seeds are nested in folds): its se and df by :func:`mean_se`; counts are sums, the
    variance parts Σ part_f / F²."""
    count = len(estimates)
    se, df = mean_se([(e.se, e.df) for e in estimates])
    return Estimate(
        estimate=float(np.mean([e.estimate for e in estimates])),
        se=se,
        df=df,
        n_problems=sum(e.n_problems for e in estimates),
        n_clusters_a=sum(e.n_clusters_a for e in estimates),
        n_clusters_b=sum(e.n_clusters_b for e in estimates),
        cluster_var=sum(e.cluster_var for e in estimates) / count**2,
        problem_var=sum(e.problem_var for e in estimates) / count**2,
    )


def crossed_estimate(
    a: np.ndarray, b: np.ndarray | None, strata: Sequence[str] | np.ndarray, *, weighting: str = "problem"
) -> Estimate:
    """Mean of ``a`` (or the difference ``a − b``) over problems, with the seed-aware standard error.

    ``a`` (S_a × N) and ``b`` (S_b × N) hold per-problem scores, one row per cluster; ``strata`` (N) names each
    problem's task. Problems with a missing value in any row of ``a`` or ``b`` are left out (complete cases).
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b_matrix = None if b is None else np.atleast_2d(np.asarray(b, dtype=np.float64))
    strata = np.asarray(strata)
    keep = ~np.isnan(a).any(axis=0)
    if b_matrix is not None:
        keep &= ~np.isnan(b_matrix).any(axis=0)
    a, strata = a[:, keep], strata[keep]
    b_matrix = None if b_matrix is None else b_matrix[:, keep]
    n = int(keep.sum())
    n_b = 0 if b_matrix is None else b_matrix.shape[0]
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, a.shape[0], n_b, math.nan, math.nan)
    w = _weights(strata, weighting)
    per_problem = a.mean(axis=0) - (0.0 if b_matrix is None else b_matrix.mean(axis=0))
    estimate = float(per_problem @ w)
    clusters = [(a, _cluster_part(a, w))]
    if b_matrix is not None:
        clusters.append((b_matrix, _cluster_part(b_matrix, w)))
    # The cluster × problem residual is in both the spread of the cluster means and the spread over problems;
    # it is counted once, with the cluster part (S − 1 df): the conservative split (coverage in docs). A cluster
    # mean's variance is at least the residual share it holds, so the cluster part is bounded below by it; its df
    # stay the S − 1 of the cluster means whatever the data (when the means agree by chance, they say no more
    # about the seed variance than S − 1 values can: simulated null studies in tests/test_null_simulation.py).
    parts = [(max(raw, share), x.shape[0] - 1) for x, (raw, share) in clusters]
    problem_var, problem_df = 0.0, 0
    for label in np.unique(strata):
        in_stratum = strata == label
        if in_stratum.sum() >= 2:
            problem_var += float(np.sum(w[in_stratum] ** 2)) * float(np.var(per_problem[in_stratum], ddof=1))
            problem_df += int(in_stratum.sum()) - 1
    residual_share = sum(share for _, (_, share) in clusters)
    problem_var = max(0.0, problem_var - residual_share)
    agree = sum(raw for _, (raw, _) in clusters) + problem_var < residual_share
    parts.append((problem_var, problem_df))
    variance, df = welch_satterthwaite(parts)
    cluster_var = sum(v for v, _ in parts[:-1])
    return Estimate(estimate, math.sqrt(variance), df, n, a.shape[0], n_b, cluster_var, problem_var, agree)


def task_random_estimate(a: np.ndarray, b: np.ndarray, strata: Sequence[str] | np.ndarray) -> Estimate:
    """Mean over tasks of the per-task difference ``a − b``, tasks a random sample of subjects.

    The summary-statistic approach of random-effects analysis: each task's difference of seed-averaged
    accuracies ``d_t`` is one observation, so the spread of the ``d_t`` holds the task × method interaction
    (and each task's problem and seed × task noise); ``s²_d / T`` with ``T − 1`` df. The seed main effects are
    shared by every task (one trained model is scored on all of them), so the spread of each init's per-seed
    macro-averages adds ``var / S`` with ``S − 1`` df. Their seed × task share is then counted twice: a
    conservative sum (docs/statistics.md, "Cross-task analysis"); df by Welch–Satterthwaite. With one seed
    per init it is the one-sample t-test over the ``T`` task differences. In the returned Estimate,
    ``cluster_var`` is the seed parts and ``problem_var`` the task part.
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    strata = np.asarray(strata)
    keep = ~(np.isnan(a).any(axis=0) | np.isnan(b).any(axis=0))
    a, b, strata = a[:, keep], b[:, keep], strata[keep]
    labels = np.unique(strata)
    if labels.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, a.shape[0], b.shape[0], math.nan, math.nan)
    w = _weights(strata, "task")
    per_task = np.array([a[:, strata == t].mean() - b[:, strata == t].mean() for t in labels])
    task_part = [(float(np.var(per_task, ddof=1)) / labels.size, labels.size - 1)] if labels.size >= 2 else []
    seed_parts = [(float(np.var(x @ w, ddof=1)) / x.shape[0], x.shape[0] - 1) for x in (a, b) if x.shape[0] >= 2]
    if not task_part + seed_parts:
        return Estimate(float(per_task.mean()), math.nan, math.nan, int(keep.sum()), a.shape[0], b.shape[0],
                        math.nan, math.nan)  # fmt: skip
    variance, df = welch_satterthwaite(task_part + seed_parts)
    return Estimate(float(per_task.mean()), math.sqrt(variance), df, int(keep.sum()), a.shape[0], b.shape[0],
                    sum(v for v, _ in seed_parts), sum(v for v, _ in task_part))  # fmt: skip


def t_interval(
    est: Estimate, ci_level: float, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> tuple[float, float]:
    """``estimate ± t_{(1+ci)/2, df} · se``, truncated to the parameter's range ``bounds`` (a point when se = 0).

    Truncation never changes coverage: the true value always lies within its range (an accuracy in [0, 1], a
    difference of two in [−1, 1]), so it is inside the truncated interval exactly when it is inside the raw
    one (simulated in tests/test_inference.py at 2, 3 and 5 seeds).
    """
    if not math.isfinite(est.se):
        return math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.5 + ci_level / 2.0, est.df)) * est.se if est.se > 0 else 0.0
    low, high = bounds
    return max(low, est.estimate - half), min(high, est.estimate + half)


def t_test_p(est: Estimate, null: float = 0.0) -> float:
    """Two-sided p-value of H0: mean (difference) = ``null``."""
    # se == 0: every pair agrees exactly (e.g. both inits fail every problem). That is no evidence of a
    # zero (or any) difference: the plug-in standard error is 0 only because nothing varied, so no test.
    if not math.isfinite(est.se) or est.se == 0:
        return math.nan
    return float(2.0 * scipy_stats.t.sf(abs(est.estimate - null) / est.se, est.df))


def tost(est: Estimate, margin: float) -> tuple[float, float, float]:
    """Two one-sided tests of equivalence within ±margin: (p_lower, p_upper, p_tost = max of the two).

    p_lower tests H0: Δ ≤ −margin (t = (d + margin)/se, upper tail); p_upper tests H0: Δ ≥ +margin
    (t = (d − margin)/se, lower tail). Equivalence is concluded when p_tost < alpha.
    """
    if not math.isfinite(est.se) or est.se == 0:  # no variation: equivalence cannot be concluded (see t_test_p)
        return math.nan, math.nan, math.nan
    lower = float(scipy_stats.t.sf((est.estimate + margin) / est.se, est.df))
    upper = float(scipy_stats.t.cdf((est.estimate - margin) / est.se, est.df))
    return lower, upper, max(lower, upper)


def power(effect: float, se: float, df: float, alpha: float) -> float:
    """Power of the two-sided level-``alpha`` t-test with ``df`` degrees of freedom against a true ``effect``
    (noncentral t; normal for infinite df). NaN where no test exists (se = 0 or not finite, df <= 0)."""
    if not (math.isfinite(se) and se > 0 and df > 0):
        return math.nan
    shift = effect / se
    if math.isinf(df):
        crit = float(scipy_stats.norm.ppf(1 - alpha / 2))
        return float(scipy_stats.norm.sf(crit - shift) + scipy_stats.norm.cdf(-crit - shift))
    crit = float(scipy_stats.t.ppf(1 - alpha / 2, df))
    value = float(scipy_stats.nct.sf(crit, df, shift) + scipy_stats.nct.cdf(-crit, df, shift))
    if math.isfinite(value):
        return value

    return _power_by_mixture(shift, crit, df)


# Gauss-Legendre nodes on the quantile scale of V ~ chi2_df (mapped from [-1, 1] to (0, 1)): the power's
# integrand there is smooth and bounded, and 256 nodes agree with scipy's noncentral t to ~3e-8 wherever
# that is finite (checked at df 0.6-300, shifts 0-40); scipy's adaptive quad was 200x slower and returned 0
# at df < 1.
_QUANTILE_NODES, _QUANTILE_WEIGHTS = np.polynomial.legendre.leggauss(256)
_QUANTILE_NODES, _QUANTILE_WEIGHTS = (_QUANTILE_NODES + 1) / 2, _QUANTILE_WEIGHTS / 2


def _power_by_mixture(shift: float, crit: float, df: float) -> float:
    """P(|T| > crit) for T = (Z + shift) / sqrt(V / df), V ~ chi2_df: the normal tails averaged over V."""
    scale = crit * np.sqrt(scipy_stats.chi2.ppf(_QUANTILE_NODES, df) / df)
    tails = scipy_stats.norm.sf(scale - shift) + scipy_stats.norm.cdf(-scale - shift)
    return float(np.dot(_QUANTILE_WEIGHTS, tails))


def minimum_detectable_effect(se: float, df: float, alpha: float, target_power: float = 0.8) -> float:
    """Smallest true difference the two-sided level-``alpha`` t-test (``df``) detects with ``target_power``.

    Solves :func:`power` = ``target_power`` (so the two always agree); about (t_{1−α/2} + t_{power}) · se, and
    2.8016 · se with many df at alpha 0.05 and 80% power. NaN ("n/a") where no test exists (se = 0).
    """
    if not (math.isfinite(se) and se > 0 and df > 0):
        return math.nan
    upper = se
    while power(upper, se, df, alpha) < target_power:
        upper *= 2.0
    return float(optimize.brentq(lambda d: power(d, se, df, alpha) - target_power, 0.0, upper, xtol=1e-12 * se))


def tost_smallest_p(se: float, df: float, margin: float) -> float:
    """The smallest TOST p this design can reach: at an estimate of exactly 0, ``P(T > margin / se)``.

    A test whose ``tost_smallest_p`` (times its family size under Holm) is >= alpha cannot conclude
    equivalence whatever the data: its standard error is too large for the margin.
    """
    if not (math.isfinite(se) and se > 0 and df > 0):
        return math.nan
    return float(scipy_stats.t.sf(margin / se, df))


def t_test_smallest_p(se: float, df: float, largest_effect: float) -> float:
    """The smallest two-sided t-test p this design can reach: at the largest possible |estimate|
    (``largest_effect``: 1 for a difference of accuracies)."""
    if not (math.isfinite(se) and se > 0 and df > 0):
        return math.nan
    return float(2.0 * scipy_stats.t.sf(largest_effect / se, df))


def holm_adjust(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values over the non-missing entries (NaN stays NaN)."""
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        adjusted[tested] = multipletests(p[tested], method="holm")[1]
    return adjusted


def smallest_adjusted_p(smallest_raw_p: float, family_size: int) -> float:
    """The smallest Holm-adjusted p a test can reach: its own smallest raw p times the family size (Holm's
    first step), capped at 1. A test with ``smallest_adjusted_p(...) >= alpha`` cannot be significant."""
    return min(1.0, smallest_raw_p * max(1, family_size))


def mcnemar_smallest_p(n_pairs: int) -> float:
    """Exact two-sided McNemar (sign) test: all n pairs discordant in one direction gives 2 · 2^-n."""
    return min(1.0, 2.0 ** (1 - n_pairs)) if n_pairs > 0 else 1.0


def wilcoxon_smallest_p(n_nonzero: int) -> float:
    """Exact two-sided Wilcoxon signed-rank test with n non-zero differences: 2 / 2^n."""
    return min(1.0, 2.0 ** (1 - n_nonzero)) if n_nonzero > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# Paired tests and effect sizes over problems (each tested against a hand computation or the reference library)


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
