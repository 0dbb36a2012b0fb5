"""The bootstrap: resampling problems within tasks, and percentile intervals (numpy only).

Used where a design has one training seed (``docs/statistics.md``, "One training seed"); the seed-aware
intervals are in ``analysis.inference``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

# Bootstrap replicates are drawn in blocks of about this many resampled indices (bounds memory).
BLOCK_ELEMENTS = 1 << 22


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
        block_rows = max(1, BLOCK_ELEMENTS // max(x.shape[0] for x in strata))
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
