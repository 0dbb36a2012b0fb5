"""Power of the primary contrast before any GPU is spent: its standard error, MDE and power for a design.

The primary contrast (docs/statistics.md) is ``FOMAML − SFT``, the accuracy difference averaged with equal
weight over the evaluated shot counts ``k > 0``. Each method is trained with ``S`` seeds; each run is evaluated
at each of the ``K`` shot counts on ``R`` independent shot draws (drawn per training seed); every run answers the
same ``N`` test problems. With variance components (proportions, not percentage points)

* ``σ_seed``: SD of one training run's mean accuracy around its method's mean (shared by every k and draw);
* ``σ_draw``: SD of one shot draw's mean accuracy around its run's mean, at one k (independent over k, draws);
* ``σ²_problem``: variance over test problems of the per-problem method difference (the problem × method
  interaction; problems are a sample of the problems one could have asked, Miller 2024),

the contrast's variance and its Welch–Satterthwaite degrees of freedom are

    Var = 2 (σ²_seed + σ²_draw / (R K)) / S   [2(S − 1) df: the seed-level means of both methods]
        + σ²_problem / N                       [N − 1 df]

The problem part is not divided by K: a problem's difference is strongly correlated over k, and counting
it once is the conservative choice. Power is that of the two-sided level-``alpha`` t-test at those df
(noncentral t); the MDE is the smallest effect with the requested power, solved from the same function, so
the two always agree. A family of ``m`` primary contrasts (one per experiment) is planned at ``alpha / m``,
Holm's first step, which bounds every later step.

Leave-one-subject-out folds pooled into one row (the mean of F fold contrasts, each on its held-out subject's N_f
problems, from separate trainings): Var = Σ_f Var_f / F², i.e. the seed part divided by F and the problem part
σ²_problem Σ_f (1/N_f) / F², df by Welch–Satterthwaite over the folds' (Var_f / F², df_f).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fomaml_math.analysis.evaldata import primary_pool, split_experiments, task_roles
from fomaml_math.analysis.inference import mean_se, minimum_detectable_effect, power, welch_satterthwaite
from fomaml_math.analysis.tables import META_TEST_POOL
from fomaml_math.errors import ConfigError


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


def contrast_se(components: VarianceComponents, design: Design) -> tuple[float, float]:
    """(standard error, Welch–Satterthwaite df) of the primary contrast under ``design``."""
    if min(design.seeds, design.draws, design.shot_counts, design.problems) < 1:
        raise ValueError(f"design: every count must be >= 1, got {design}")
    s, r, k, n = design.seeds, design.draws, design.shot_counts, design.problems
    seed_part = 2.0 * (components.seed_sd**2 + components.draw_sd**2 / (r * k)) / s
    problem_part = components.problem_var / n
    parts = [(seed_part, 2 * (s - 1)), (problem_part, n - 1)]
    variance, df = welch_satterthwaite(parts)
    if any(v > 0 and d <= 0 for v, d in parts):
        return math.sqrt(variance), 0.0  # a part with variance but no df (one seed): no t-test exists
    return math.sqrt(variance), df


def plan_contrast(
    components: VarianceComponents,
    design: Design | Sequence[Design],
    *,
    alpha: float,
    family_size: int,
    target: float,
    target_power: float = 0.8,
) -> ContrastPlan:
    """The primary contrast's se, df, MDE and power at ``target`` (proportions) at ``alpha / family_size``.

    A sequence of designs is leave-one-subject-out folds pooled as the stats stage pools them: the equal-weight
    mean of the folds' contrasts, independent trainings on disjoint problems (``inference.mean_se``).
    """
    if isinstance(design, Design):
        se, df = contrast_se(components, design)
    else:
        se, df = mean_se([contrast_se(components, fold) for fold in design])
    level = alpha / max(1, family_size)
    return ContrastPlan(
        se=se,
        df=df,
        alpha=level,
        mde=minimum_detectable_effect(se, df, level, target_power),
        power_at_target=power(target, se, df, level),
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
