"""Power of the primary contrast before any GPU is spent: its standard error, MDE and power for a design.

The primary contrast (docs/statistics.md) is ``FOMAML − SFT``, the accuracy difference averaged with equal
weight over the evaluated shot counts ``k > 0``. Each method is trained with ``S`` seeds; each run is evaluated
at each of the ``K`` shot counts on ``R`` independent shot draws (drawn per training seed); every run answers the
same ``N`` test problems. With variance components (proportions, not percentage points)

* ``σ_seed``: SD of one training run's mean accuracy around its method's mean (shared by every k and draw);
* ``σ_draw``: SD of one shot draw's mean accuracy around its run's mean, at one k (independent over k, draws);
* ``σ²_problem``: variance over test problems of the per-problem method difference (the problem × method
  interaction; problems are a sample of the problems one could have asked, Miller 2024),

the contrast's variance has three independent parts, as the analysis (``inference.crossed_estimate``) estimates it:

    Var = (σ²_seed + σ²_draw / (R K)) / S     [S − 1 df: the seed-level means of method a]
        + (σ²_seed + σ²_draw / (R K)) / S     [S − 1 df: those of method b]
        + σ²_problem / N                       [N − 1 df]

The problem part is not divided by K: a problem's difference is strongly correlated over k, and counting
it once is the conservative choice. The analysis estimates each part (a scaled chi-square on its df) and tests
with Welch–Satterthwaite df computed from the *estimates*, so its df vary from study to study (at S = 3 between
2 and 4, never the 2(S − 1) = 4 of equal estimates) and its test is not a noncentral t at fixed df. Power is
therefore that of the analysis's own statistic, averaged over the distribution of its variance estimate
(``ESTIMATOR_DRAWS`` fixed draws of the parts, the normal tails Rao–Blackwellised); ``df`` is the median of the
analysis's df over those draws (the df of a typical study). The MDE is the smallest effect with the requested
power, solved from the same function, so the two always agree. A family of ``m`` primary contrasts (one per
experiment) is planned at ``alpha / m``, Holm's first step, which bounds every later step. Not modelled: the
analysis's floor of each seed part at its seed × problem residual share (a component the plan does not have);
where it binds (seed variance near that share) the analysis is more conservative than planned
(tests/test_null_simulation.py).

Leave-one-subject-out folds pooled into one row (the mean of F fold contrasts, each on its held-out subject's N_f
problems, from separate trainings): Var = Σ_f Var_f / F², i.e. the seed part divided by F and the problem part
σ²_problem Σ_f (1/N_f) / F²: the analysis pools the folds' (se_f, df_f) by Welch–Satterthwaite
(``inference.mean_se``), and the plan simulates every fold's parts, scaled by 1 / F², the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize
from scipy import stats as scipy_stats

from fomaml_math.analysis.evaldata import primary_pool, split_experiments, task_roles
from fomaml_math.analysis.tables import META_TEST_POOL
from fomaml_math.errors import ConfigError

# Draws of the analysis's variance estimate per planned contrast (fixed seed: the plan is deterministic); the
# power's Monte Carlo error is then about 0.3 pp.
ESTIMATOR_DRAWS = 20_000


@dataclass(frozen=True)
class VarianceComponents:
    """Variance components of accuracy, as proportions (1 pp = 0.01)."""

    seed_sd: float
    draw_sd: float
    problem_var: float

    @classmethod
    def from_pp(cls, seed_sd_pp: float, draw_sd_pp: float, problem_var: float) -> VarianceComponents:
        """Seed and draw SDs in percentage points (as the config states them), problem variance as a proportion²."""
        return cls(seed_sd_pp / 100.0, draw_sd_pp / 100.0, problem_var)


@dataclass(frozen=True)
class Design:
    seeds: int  # training seeds per method
    draws: int  # shot draws per (run, k)
    shot_counts: int  # evaluated k > 0, averaged with equal weight
    problems: int  # test problems of the experiment's primary pool


@dataclass(frozen=True)
class ContrastPlan:
    se: float  # of the contrast, as a proportion
    df: float
    alpha: float  # per-test level (alpha / family size)
    mde: float  # at the requested power, as a proportion
    power_at_target: float
    target: float  # the target effect, as a proportion


def contrast_parts(components: VarianceComponents, design: Design) -> list[tuple[float, int]]:
    """The contrast's independent variance parts ``(variance, df)`` as the analysis estimates them: each arm's
    seed part (S − 1 df) and the problem part (N − 1 df)."""
    if min(design.seeds, design.draws, design.shot_counts, design.problems) < 1:
        raise ValueError(f"design: every count must be >= 1, got {design}")
    s, r, k, n = design.seeds, design.draws, design.shot_counts, design.problems
    arm = (components.seed_sd**2 + components.draw_sd**2 / (r * k)) / s
    return [(arm, s - 1), (arm, s - 1), (components.problem_var / n, n - 1)]


@dataclass(frozen=True)
class _Sampled:
    """The analysis's variance estimate V̂ and df over ``ESTIMATOR_DRAWS`` draws of its parts."""

    se: float  # the true standard error
    estimated_se: np.ndarray  # sqrt(V̂) per draw
    df: np.ndarray  # Welch–Satterthwaite df of each draw's estimated parts

    @classmethod
    def of(cls, parts: list[tuple[float, int]]) -> _Sampled | None:
        """None where no t-test exists (a part with variance but no df: one seed) or nothing varies."""
        if any(v > 0 and d < 1 for v, d in parts) or not any(v > 0 for v, _ in parts):
            return None
        rng = np.random.default_rng(0x5EED)
        estimated = [v * rng.chisquare(d, ESTIMATOR_DRAWS) / d for v, d in parts if v > 0]
        dfs = [d for v, d in parts if v > 0]
        total = np.sum(estimated, axis=0)
        df = total**2 / np.sum([e * e / d for e, d in zip(estimated, dfs, strict=True)], axis=0)
        return cls(math.sqrt(sum(v for v, _ in parts)), np.sqrt(total), df)

    def threshold(self, alpha: float) -> np.ndarray:
        """Per draw: the critical |effect + se·Z| / se, t_{1 − α/2, df̂} · sqrt(V̂) / se (cached per alpha)."""
        cache = self.__dict__.setdefault("_thresholds", {})
        if alpha not in cache:
            cache[alpha] = scipy_stats.t.ppf(1 - alpha / 2, self.df) * self.estimated_se / self.se
        return cache[alpha]

    def power(self, effect: float, alpha: float) -> float:
        """P(|effect + se·Z| / sqrt(V̂) > t_{1 − α/2, df̂}), Z standard normal independent of V̂."""
        threshold = self.threshold(alpha)
        shift = effect / self.se
        return float(np.mean(scipy_stats.norm.sf(threshold - shift) + scipy_stats.norm.cdf(-threshold - shift)))

    def mde(self, alpha: float, target_power: float) -> float:
        upper = self.se
        while self.power(upper, alpha) < target_power:
            upper *= 2.0
        return float(optimize.brentq(lambda d: self.power(d, alpha) - target_power, 0.0, upper, xtol=1e-9 * self.se))


def _parts(components: VarianceComponents, design: Design | Sequence[Design]) -> list[tuple[float, int]]:
    if isinstance(design, Design):
        return contrast_parts(components, design)
    count = len(design)
    return [(v / count**2, d) for fold in design for v, d in contrast_parts(components, fold)]


def contrast_se(components: VarianceComponents, design: Design | Sequence[Design]) -> tuple[float, float]:
    """(standard error, the analysis's median df) of the primary contrast under ``design`` (a sequence: the pooled
    row of leave-one-subject-out folds); df 0 where no t-test exists (one seed with seed variance)."""
    parts = _parts(components, design)
    sampled = _Sampled.of(parts)
    se = math.sqrt(sum(v for v, _ in parts))
    return se, (float(np.median(sampled.df)) if sampled is not None else 0.0 if se > 0 else math.nan)


def plan_contrast(
    components: VarianceComponents,
    design: Design | Sequence[Design],
    *,
    alpha: float,
    family_size: int,
    target: float,
    target_power: float = 0.8,
) -> ContrastPlan:
    """The primary contrast's se, df, MDE and power at ``target`` (proportions) at ``alpha / family_size``, for the
    analysis's own test (module docstring).

    A sequence of designs is leave-one-subject-out folds pooled as the stats stage pools them: the equal-weight
    mean of the folds' contrasts, independent trainings on disjoint problems.
    """
    se, df = contrast_se(components, design)
    sampled = _Sampled.of(_parts(components, design))
    level = alpha / max(1, family_size)
    return ContrastPlan(
        se=se,
        df=df,
        alpha=level,
        mde=sampled.mde(level, target_power) if sampled is not None else math.nan,
        power_at_target=sampled.power(target, level) if sampled is not None else math.nan,
        target=target,
    )


def estimate_components(evals: pd.DataFrame, a: str = "fomaml", b: str = "sft") -> VarianceComponents:
    """Method-of-moments variance components of the ``a − b`` contrast from a finished study's evaluation rows.

    Per experiment, on its primary pool (held-out tasks if any, else all) at every k > 0, for each arm:
    the draw variance is the pooled within-(seed, k) variance of the per-draw accuracies; the seed variance is the
    variance of the per-seed accuracies (averaged over k and draws) less the draw part it contains
    (σ²_draw / (R K), truncated at 0). The problem variance is the variance over problems of the per-problem
    difference of the arms' mean accuracies. Components are averaged over arms and experiments.
    """
    seed_vars, draw_vars, problem_vars = [], [], []
    for frame in split_experiments(evals).values():
        roles = task_roles(frame)
        pool = primary_pool(roles)
        rows = frame[(frame["shots"] > 0) & frame["init"].isin([a, b])]
        if pool == META_TEST_POOL:
            rows = rows[rows["task"].map(roles) == "meta_test"]
        if set(rows["init"]) != {a, b}:
            continue
        for _, arm in rows.groupby("init"):
            draws = arm.groupby(["train_seed", "shots", "repeat"])["correct"].mean()
            within = draws.groupby(level=["train_seed", "shots"]).var(ddof=1).dropna()
            draw_var = float(within.mean()) if len(within) else 0.0
            per_seed = draws.groupby(level="train_seed").mean()
            if len(per_seed) >= 2:
                cells = draws.groupby(level="train_seed").size().mean()  # R x K per seed
                seed_vars.append(max(0.0, float(per_seed.var(ddof=1)) - draw_var / cells))
            draw_vars.append(draw_var)
        means = rows.groupby(["init", "task", "problem_id"])["correct"].mean().unstack("init").dropna()
        if len(means) >= 2:
            problem_vars.append(float((means[a] - means[b]).var(ddof=1)))
    if not problem_vars:
        raise ConfigError(f"--pilot: no experiment with both {a} and {b} evaluated at k > 0")

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else 0.0

    return VarianceComponents(math.sqrt(mean(seed_vars)), math.sqrt(mean(draw_vars)), mean(problem_vars))
