"""The planted-effect check: the primary analysis run on whole simulated studies like this one, where the truth is
known.

For each experiment, on the primary contrast's outcomes (``a`` vs ``b`` on the primary pool, every k > 0, every
training seed and shot draw, binary ``correct``), a generator of whole studies is fitted to the study's own
outcomes (``analysis.simulate.fit_generator``: problem difficulties per k, seed, shot-draw and method × problem
variance, the arms' shared draws), and ``replicates`` studies are drawn at the configured design (the study's S
seeds per arm, k, draws and problems):

* **null**: no method difference; the share of studies the primary analysis rejects at the planned level alpha / m
  is its false-positive rate, with the Monte Carlo se at the nominal rate, sqrt(alpha (1 − alpha) / R), and an exact
  (Clopper–Pearson) 95% upper bound;
* **planted**: arm ``a``'s logits shifted so that its expected accuracy rises by the target effect; the rejection
  share is the power at the target.

Every simulated study is an independent draw, so the rate has R independent replicates. The earlier scheme
(permuting the arm labels of the study's own runs) had C(2S, S) relabelings, 20 at S = 3 with only ~10 distinct
|t|: it could not measure a 5% rate (docs/statistics.md). The analysis is exactly the primary one (repeats, then
k averaged per seed and problem; ``inference.crossed_estimate``; two-sided t-test).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from fomaml_math.analysis import inference, simulate
from fomaml_math.analysis.evaldata import primary_pool, task_roles
from fomaml_math.analysis.primary import planned_family_size
from fomaml_math.analysis.tables import META_TEST_POOL, PLANTED_COLUMNS, StatsSettings


def outcome_array(frame: pd.DataFrame, a: str, b: str) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """The primary pool's binary outcomes as ``Y[arm, seed, k, draw, problem]`` (arms ``a``, ``b``), the problems'
    tasks, and the seeds both arms share; None where the design is not complete (a cell missing)."""
    roles = task_roles(frame)
    rows = frame[(frame["shots"] > 0) & frame["init"].isin([a, b])]
    if primary_pool(roles) == META_TEST_POOL:
        rows = rows[rows["task"].map(roles) == "meta_test"]
    if set(rows["init"]) != {a, b}:
        return None
    seeds = sorted(set(rows.loc[rows["init"] == a, "train_seed"]) & set(rows.loc[rows["init"] == b, "train_seed"]))
    rows = rows[rows["train_seed"].isin(seeds)]
    index = pd.MultiIndex.from_product(
        [[a, b], seeds, sorted(rows["shots"].unique()), sorted(rows["repeat"].unique())],
        names=["init", "train_seed", "shots", "repeat"],
    )
    table = rows.pivot_table(
        index=["init", "train_seed", "shots", "repeat"], columns=["task", "problem_id"], values="correct"
    )
    table = table.reindex(index)
    if len(seeds) < 2 or table.isna().to_numpy().any():
        return None
    y = table.to_numpy(dtype=np.float64).reshape(2, len(seeds), index.levshape[2], index.levshape[3], -1)
    return y, table.columns.get_level_values("task").to_numpy(), [int(s) for s in seeds]


def seed_scores(y: np.ndarray) -> np.ndarray:
    """The primary analysis's per-(seed, problem) scores of ``Y[..., seed, k, draw, problem]``: draws, then k
    averaged (``[..., seed, problem]``)."""
    return y.mean(axis=-2).mean(axis=-2)


def analyse(y: np.ndarray, strata: np.ndarray) -> inference.Estimate:
    """The primary analysis of ``Y[arm, seed, k, draw, problem]``: draws then k averaged, seed-aware estimate."""
    scores = seed_scores(y)  # [arm, seed, problem]
    return inference.crossed_estimate(scores[0], scores[1], strata)


def rejects(est: inference.Estimate, alpha: float) -> bool:
    """Whether the two-sided t-test rejects at ``alpha`` (no test, se = 0: not a rejection)."""
    p = inference.t_test_p(est)
    return bool(math.isfinite(p) and p < alpha)


ESTIMATOR = "crossed_estimate: seed-aware t (cluster part floored at its residual share, S - 1 df per arm)"
GENERATOR = "logit model fitted to this study's outcomes (analysis.simulate)"


def planted_check(
    y: np.ndarray, strata: np.ndarray, *, replicates: int, target: float, alpha: float, rng: np.random.Generator
) -> dict[str, float | str]:
    """False-positive rate and power at ``target`` of the primary analysis on ``replicates`` whole studies drawn
    from the generator fitted to ``Y[arm, seed, k, draw, problem]``, at ``alpha``."""
    generator = simulate.fit_generator(y)
    seeds, draws = y.shape[1], y.shape[3]

    def test(study: np.ndarray) -> float:
        return inference.t_test_p(analyse(study, strata))

    design = {"seeds": seeds, "draws": draws, "replicates": replicates, "alpha": alpha, "test": test}
    fpr = simulate.rejection_rate(generator, rng=rng, **design)
    power = simulate.rejection_rate(generator, rng=rng, target=target, **design)
    false_positives = round(fpr * replicates)
    smoothed = (round(power * replicates) + 0.5) / (replicates + 1)  # never a se of 0 at 0% or 100%
    return {
        "estimator": ESTIMATOR,
        "generator": GENERATOR,
        "gen_seed_sd": generator.seed_sd,
        "gen_draw_sd": generator.draw_sd,
        "gen_draw_corr": generator.draw_corr,
        "gen_problem_sd": generator.problem_sd,
        "false_positive_rate": fpr,
        "false_positive_rate_mc_se": math.sqrt(alpha * (1 - alpha) / replicates),
        "false_positive_rate_ci_high": float(
            scipy_stats.beta.ppf(0.975, false_positives + 1, replicates - false_positives)
        )
        if false_positives < replicates
        else 1.0,
        "power": power,
        "power_mc_se": math.sqrt(smoothed * (1 - smoothed) / replicates),
        "note": "; ".join(
            note
            for note, applies in (
                ("one shot draw per run: the draw SD is not estimable and is set to 0", draws < 2),
                ("fewer than 475 studies: the Monte Carlo se of a 5% rate exceeds 1 pp", replicates < 475),
            )
            if applies
        ),
    }


def planted_table(experiments: Mapping[str, pd.DataFrame], settings: StatsSettings) -> pd.DataFrame:
    """One row per experiment with a complete primary design: the planted-effect check of its primary analysis."""
    a, b = settings.primary_contrast.split("-")
    rows = []
    for index, (name, frame) in enumerate(experiments.items()):
        # the level the row is planned at (Holm's first step of its family)
        alpha = settings.alpha / planned_family_size(name, list(experiments), settings.loso_folds)
        built = outcome_array(frame, a, b)
        if built is None:
            continue
        y, strata, seeds = built
        rng = np.random.default_rng([settings.seed, 0x9A57, index])
        check = planted_check(
            y, strata, replicates=settings.planted_replicates, target=settings.target_effect, alpha=alpha, rng=rng
        )
        est = analyse(y, strata)
        rows.append(
            {
                "experiment": name,
                "contrast": settings.primary_contrast,
                "n_seeds": len(seeds),
                "n_shot_counts": y.shape[2],
                "n_draws": y.shape[3],
                "n_problems": y.shape[4],
                "replicates": settings.planted_replicates,
                "alpha": alpha,
                "target_effect": settings.target_effect,
                **check,
                "closed_form_power": inference.power(settings.target_effect, est.se, est.df, alpha),
            }
        )
    return pd.DataFrame(rows, columns=PLANTED_COLUMNS)
