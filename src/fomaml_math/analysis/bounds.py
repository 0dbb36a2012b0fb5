"""Intervals for cells where nothing varied, and simultaneous intervals for a Holm family.

A cell whose outcomes are all 0 (or all 1) has a seed-aware standard error of 0, so its t-interval is a single
point, "0.0 [0.0, 0.0]": not a 95% interval (0 of 90 is compatible with a true accuracy up to 4.0%). Such a cell
gets the exact Clopper–Pearson interval (Clopper & Pearson 1934) with the number of test problems as its n, the
unit the design samples; a cell that is constant but not at a bound (every problem's repeat-averaged score the
same) gets Wilson's score interval (Wilson 1927), which needs no integer count. A difference whose interval
collapsed to a point gets Newcombe's hybrid score interval (Newcombe 1998b, method 10), built from the two Wilson
intervals. Definitions and reasons: ``docs/statistics.md``, "Cells where nothing varied" and "Simultaneous
intervals beside Holm verdicts".

Intervals beside Holm-adjusted verdicts are simultaneous by Bonferroni at the family size ``m``: level
``1 − (1 − ci_level) / m``. With ``ci_level = 1 − alpha`` such an interval excludes 0 only where ``m · p < alpha``,
and then Holm rejects too (Holm 1979: its adjusted p is at most ``m · p``), so none contradicts its verdict.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats as scipy_stats

from fomaml_math.analysis import inference

CLOPPER_PEARSON = "clopper-pearson"  # ``ci_method`` of an all-0 / all-1 accuracy cell
WILSON = "wilson"  # ``ci_method`` of a constant accuracy cell strictly inside (0, 1)
NEWCOMBE = "newcombe"  # ``ci_method`` of a difference whose seed-aware interval collapsed to a point
# Weighted means of 0/1 scores land within rounding of the bounds (1.0000000000000002): compared with this slack.
TOLERANCE = 1e-9


def _z(ci_level: float) -> float:
    return float(scipy_stats.norm.ppf(0.5 + ci_level / 2.0))


def clopper_pearson(successes: float, n: int, ci_level: float) -> tuple[float, float]:
    """Exact two-sided interval of a binomial proportion (equal tails of ``(1 − ci_level) / 2``)."""
    if n <= 0:
        return math.nan, math.nan
    tail = (1.0 - ci_level) / 2.0
    low = 0.0 if successes <= 0 else float(scipy_stats.beta.ppf(tail, successes, n - successes + 1))
    high = 1.0 if successes >= n else float(scipy_stats.beta.ppf(1.0 - tail, successes + 1, n - successes))
    return low, high


def wilson(proportion: float, n: int, ci_level: float) -> tuple[float, float]:
    """Wilson's score interval of a proportion observed on ``n`` units (no continuity correction)."""
    if n <= 0 or not math.isfinite(proportion):
        return math.nan, math.nan
    z = _z(ci_level)
    z2n = z * z / n
    centre = (proportion + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(proportion * (1.0 - proportion) / n + z2n / (4.0 * n)) / (1.0 + z2n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference(p_a: float, n_a: int, p_b: float, n_b: int, ci_level: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``p_a − p_b`` (1998b, method 10) from the two Wilson intervals.

    Written for independent samples. The arms here are paired by problem; Newcombe's version for paired data
    (Newcombe 1998c, method 10) subtracts a term in the phi coefficient of the 2×2 table, which is 0 by convention
    when a margin is empty, i.e. exactly at the bounds where this interval is used: there the two coincide.
    Elsewhere (a constant difference strictly inside) ignoring a positive pairing only widens the interval.
    """
    p_a, p_b = min(1.0, max(0.0, p_a)), min(1.0, max(0.0, p_b))  # rounding past a bound (see TOLERANCE)
    l_a, u_a = wilson(p_a, n_a, ci_level)
    l_b, u_b = wilson(p_b, n_b, ci_level)
    if not all(math.isfinite(v) for v in (l_a, u_a, l_b, u_b)):
        return math.nan, math.nan
    d = p_a - p_b
    low = d - math.sqrt((p_a - l_a) ** 2 + (u_b - p_b) ** 2)
    high = d + math.sqrt((u_a - p_a) ** 2 + (p_b - l_b) ** 2)
    return max(-1.0, low), min(1.0, high)


def is_point(low: float, high: float) -> bool:
    """A finite interval of zero width, up to rounding (what a standard error of 0 gives)."""
    return math.isfinite(low) and math.isfinite(high) and abs(high - low) <= TOLERANCE


def proportion_interval(proportion: float, n: int, ci_level: float) -> tuple[float, float, str]:
    """(low, high, method) of an accuracy cell where nothing varied: Clopper–Pearson at 0 or 1, else Wilson."""
    if proportion <= TOLERANCE or proportion >= 1.0 - TOLERANCE:
        return (*clopper_pearson(0 if proportion < 0.5 else n, n, ci_level), CLOPPER_PEARSON)
    return (*wilson(proportion, n, ci_level), WILSON)


def accuracy_interval(
    proportion: float, n: int, low: float, high: float, method: str, ci_level: float
) -> tuple[float, float, str]:
    """The seed-aware ``(low, high, method)`` unchanged, unless the cell is at 0 or 1 or its interval is a point
    (nothing varied): then :func:`proportion_interval` over the ``n`` problems."""
    at_bound = min(abs(proportion), abs(1.0 - proportion)) <= TOLERANCE
    if n > 0 and math.isfinite(proportion) and (at_bound or is_point(low, high)):
        return proportion_interval(proportion, n, ci_level)
    return low, high, method


def difference_interval(
    p_a: float, p_b: float, n: int, low: float, high: float, method: str, ci_level: float
) -> tuple[float, float, str]:
    """The seed-aware ``(low, high, method)`` of ``p_a − p_b`` unchanged, unless it is a point (nothing varied in
    either arm's differences): then Newcombe's interval with the ``n`` problems as each arm's n."""
    if n > 0 and is_point(low, high) and math.isfinite(p_a) and math.isfinite(p_b):
        return (*newcombe_difference(p_a, n, p_b, n, ci_level), NEWCOMBE)
    return low, high, method


def simultaneous_level(ci_level: float, family_size: int) -> float:
    """Bonferroni's per-interval level for ``family_size`` simultaneous intervals at ``ci_level`` jointly."""
    return 1.0 - (1.0 - ci_level) / max(1, int(family_size))


def simultaneous_difference(
    estimate: float,
    se: float,
    df: float,
    p_a: float,
    p_b: float,
    n: int,
    method: str,
    ci_level: float,
    family_size: int,
) -> tuple[float, float]:
    """The interval of a difference at Bonferroni's level for its family (``simultaneous_level``): the t-interval
    from the row's own se and df (one seed: the paired t over problems), or Newcombe's over the ``n`` problems
    where ``method`` is :data:`NEWCOMBE` (nothing varied). NaN where the family is empty or no se exists."""
    if family_size < 1 or n < 1:
        return math.nan, math.nan
    level = simultaneous_level(ci_level, family_size)
    if method == NEWCOMBE:
        return newcombe_difference(p_a, n, p_b, n, level)
    if not (math.isfinite(se) and se > 0 and df > 0):
        return math.nan, math.nan
    est = inference.Estimate(estimate=estimate, se=se, df=df, n_problems=n, n_clusters_a=0, n_clusters_b=0,
                             cluster_var=math.nan, problem_var=math.nan)  # fmt: skip
    return inference.t_interval(est, level, inference.DIFFERENCE_RANGE)


def widen_point_differences(
    table: pd.DataFrame, ci_level: float, *, low: str = "ci_low", high: str = "ci_high", a: str = "acc_a",
    b: str = "acc_b", n: str = "n_problems",
) -> pd.DataFrame:  # fmt: skip
    """``table`` with each row's difference interval (columns ``low``, ``high``) that is a point replaced by
    :func:`difference_interval` from its accuracies ``a``, ``b`` over its ``n`` problems (a table built elsewhere,
    e.g. ``primary.tsv``); other rows unchanged."""
    if table.empty:
        return table
    table = table.copy()
    replaced = [
        difference_interval(pa, pb, int(count), lo, hi, "", ci_level)[:2]
        for pa, pb, count, lo, hi in zip(table[a], table[b], table[n], table[low], table[high], strict=True)
    ]
    table[low] = [lo for lo, _ in replaced]
    table[high] = [hi for _, hi in replaced]
    return table
