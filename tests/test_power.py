"""The primary contrast's power calculation against hand and closed-form values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from fomaml_math.analysis import simulate
from fomaml_math.analysis.inference import crossed_estimate, minimum_detectable_effect, power, t_test_p
from fomaml_math.analysis.planted import analyse, planted_check, rejects
from fomaml_math.analysis.power import (
    Design,
    VarianceComponents,
    contrast_se,
    estimate_components,
    plan_contrast,
)


def test_contrast_se_matches_the_hand_computation() -> None:
    components = VarianceComponents.from_pp(1.0, 2.0, 0.05)
    se, df = contrast_se(components, Design(seeds=3, draws=3, shot_counts=4, problems=500))
    seed_part = 2 * (0.01**2 + 0.02**2 / 12) / 3  # 8.888…e-5: two arms' parts, 2 df each
    problem_part = 0.05 / 500  # 1e-4, 499 df
    variance = seed_part + problem_part
    assert se == pytest.approx(math.sqrt(variance), rel=1e-12)
    # The analysis's df are Welch-Satterthwaite from *estimated* parts: a typical study has fewer than the df of
    # the true parts (which would be its maximum when the estimates happen to be in proportion).
    assert 2.0 < df < variance**2 / ((seed_part / 2) ** 2 / 2 * 2 + problem_part**2 / 499)


def _normal_studies(rng: np.random.Generator, count: int, effect: float, seeds: int, n: int) -> list:
    """Seed-level score matrices of the plan's model: seed SD 3 pp (draws folded in), per-problem difference SD
    5 pp, a small seed x problem residual (SD 2 pp per cell: the analysis's floor never binds)."""
    studies = []
    for _ in range(count):
        x = rng.normal(0.0, 0.05, n)
        a = effect + rng.normal(0.0, 0.03, (seeds, 1)) + x + rng.normal(0.0, 0.02, (seeds, n))
        b = rng.normal(0.0, 0.03, (seeds, 1)) + rng.normal(0.0, 0.02, (seeds, n))
        studies.append((a, b))
    return studies


@pytest.mark.parametrize("seeds", [3, 5])
def test_planned_df_and_power_match_a_simulation_of_the_primary_estimator(seeds: int) -> None:
    """Issue 29: the plan's df and power are the analysis's. 2,000 studies of the plan's model through
    crossed_estimate: their median df is the plan's, and their rejection rate at the plan's MDE is its 80%."""
    n = 200
    components = VarianceComponents(0.03, 0.0, 0.05**2 + 2 * 0.02**2 / seeds)
    design = Design(seeds=seeds, draws=1, shot_counts=1, problems=n)
    planned = plan_contrast(components, design, alpha=0.05, family_size=1, target=0.03)
    rng = np.random.default_rng(seeds)
    estimates = [crossed_estimate(a, b, np.zeros(n)) for a, b in _normal_studies(rng, 2000, planned.mde, seeds, n)]
    assert np.median([e.df for e in estimates]) == pytest.approx(planned.df, rel=0.1)
    assert np.mean([e.se for e in estimates]) == pytest.approx(planned.se, rel=0.1)
    rejected = np.mean([t_test_p(e) < 0.05 for e in estimates])
    assert rejected == pytest.approx(0.8, abs=3 * math.sqrt(0.8 * 0.2 / 2000) + 0.01)
    # the pooled 2(S - 1) df of the old plan promised more: at its own MDE this analysis has less than 80%
    assert power(planned.mde, planned.se, 2 * (seeds - 1), 0.05) > 0.8


def test_one_seed_with_seed_variance_has_no_t_test() -> None:
    se, df = contrast_se(VarianceComponents.from_pp(1.0, 0.0, 0.05), Design(1, 3, 4, 500))
    assert se > 0 and df == 0.0
    assert math.isnan(minimum_detectable_effect(se, df, 0.05))


@pytest.mark.parametrize("df", [2.0, 4.5, 30.0, math.inf])
def test_power_at_zero_is_alpha_and_at_the_mde_is_the_target(df: float) -> None:
    se = 0.01
    assert power(0.0, se, df, 0.05) == pytest.approx(0.05, abs=1e-9)
    mde = minimum_detectable_effect(se, df, 0.05, 0.8)
    assert power(mde, se, df, 0.05) == pytest.approx(0.8, abs=1e-9)


def test_mde_approaches_the_normal_formula_with_many_df_and_grows_with_few() -> None:
    se = 0.01
    normal = (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) * se  # 2.8016 se
    assert minimum_detectable_effect(se, 1e7, 0.05) == pytest.approx(normal, rel=1e-4)
    # With few df the t quantiles are larger: the MDE must be well above the normal one (t(2): ~ 4.3 + 1.1).
    assert minimum_detectable_effect(se, 2.0, 0.05) > 1.8 * normal


def test_power_matches_a_simulated_t_test() -> None:
    """Empirical power of a two-sided t-test with df = 8 against the noncentral-t formula."""
    rng = np.random.default_rng(0)
    df, se, effect, alpha = 8, 1.0, 2.5, 0.05
    # t = (effect + se·Z) / (se·sqrt(χ²_df / df))
    t = (effect + rng.standard_normal(200_000)) / np.sqrt(rng.chisquare(df, 200_000) / df)
    empirical = float(np.mean(np.abs(t) > scipy_stats.t.ppf(1 - alpha / 2, df)))
    assert power(effect, se, df, alpha) == pytest.approx(empirical, abs=0.005)


@pytest.mark.parametrize(("df", "shift"), [(0.6, 3.0), (1.4, 12.0), (1.4, 40.0), (300.0, 10.0)])
def test_power_where_the_noncentral_t_fails_matches_a_simulation(df: float, shift: float) -> None:
    """Few df and large shifts (scipy's nct is NaN or inf at some): the fallback agrees with Monte Carlo."""
    rng = np.random.default_rng(1)
    t = (shift + rng.standard_normal(400_000)) / np.sqrt(rng.chisquare(df, 400_000) / df)
    empirical = float(np.mean(np.abs(t) > scipy_stats.t.ppf(1 - 0.05 / 2, df)))
    assert power(shift, 1.0, df, 0.05) == pytest.approx(empirical, abs=0.004)


def test_plan_contrast_adjusts_alpha_for_the_family() -> None:
    components = VarianceComponents.from_pp(1.0, 2.0, 0.05)
    design = Design(3, 3, 4, 500)
    one = plan_contrast(components, design, alpha=0.05, family_size=1, target=0.03)
    two = plan_contrast(components, design, alpha=0.05, family_size=2, target=0.03)
    assert two.alpha == 0.025
    assert two.mde > one.mde and two.power_at_target < one.power_at_target


def test_pilot_estimates_recover_simulated_components() -> None:
    """estimate_components on a simulated finished study (seed SD 2 pp, draw SD 3 pp, problem variance 0.04)."""
    rng = np.random.default_rng(5)
    seeds, draws, shots, n = 8, 4, (5, 10, 25), 600
    interaction = rng.normal(
        0.0, math.sqrt(0.04 / 2), (2, n)
    )  # each arm's per-problem effect: var of the difference 0.04
    rows = []
    for arm, init in enumerate(("fomaml", "sft")):
        for seed in range(seeds):
            seed_effect = rng.normal(0.0, 0.02)
            for k in shots:
                for repeat in range(draws):
                    y = 0.5 + seed_effect + rng.normal(0.0, 0.03) + interaction[arm] + rng.normal(0.0, 0.05, n)
                    rows += [
                        {"experiment": "in_domain", "train_seed": seed, "init": init, "task": "algebra", "shots": k,
                         "repeat": repeat, "problem_id": str(i), "correct": y[i], "task_role": "train"}
                        for i in range(n)
                    ]  # fmt: skip
    components = estimate_components(pd.DataFrame(rows))
    assert components.draw_sd == pytest.approx(math.sqrt(0.03**2 + 0.05**2 / n), rel=0.15)
    assert components.seed_sd == pytest.approx(0.02, rel=0.5)  # 8 seeds per arm: a rough estimate, as expected
    assert components.problem_var == pytest.approx(0.04, rel=0.15)


def _generator(seed_sd: float = 0.1, n: int = 90, shots: int = 2) -> simulate.Generator:
    rng = np.random.default_rng(29)
    difficulty = rng.normal(-0.8, 1.5, n)
    return simulate.Generator(np.stack([difficulty + 0.2 * k for k in range(shots)]), seed_sd, 0.15, 0.5, 0.5)


def _study(generator: simulate.Generator, seeds: int, draws: int, seed: int, target: float = 0.0) -> np.ndarray:
    return next(generator.studies(1, seeds, draws, np.random.default_rng(seed), target=target))[0]


def test_fit_generator_recovers_known_components() -> None:
    """Moment fit on one large simulated study (8 seeds, 4 draws, 3 k, 1,500 problems): the logit SDs within the
    accuracy of moments through the logistic's mean slope."""
    truth = simulate.Generator(_generator(n=1500, shots=3).difficulty, 0.2, 0.15, 0.5, 0.5)
    fitted = simulate.fit_generator(_study(truth, seeds=8, draws=4, seed=1))
    assert fitted.draw_sd == pytest.approx(0.15, abs=0.05)
    assert fitted.seed_sd == pytest.approx(0.2, abs=0.1)  # 8 seeds per arm: rough, as any seed SD from 16 runs
    assert fitted.problem_sd == pytest.approx(0.5, abs=0.15)
    assert 0.0 <= fitted.draw_corr <= 1.0


def test_planted_shift_raises_expected_accuracy_by_the_target() -> None:
    generator = _generator()
    gains = [analyse(chunk, np.zeros(90)).estimate for chunk in
             next(generator.studies(400, 3, 2, np.random.default_rng(2), target=0.10))]  # fmt: skip
    assert np.mean(gains) == pytest.approx(0.10, abs=0.01)  # the studies' se ~3 pp / sqrt(400)


def test_planted_check_measures_a_five_percent_rate() -> None:
    """The check on one demo-sized study: 500 simulated studies, a Monte Carlo se of at most 1 pp at the nominal 5%,
    a false-positive rate within alpha + 3 se, the power at 10 pp between trivial bounds, and the estimator named."""
    generator = _generator(seed_sd=0.1)
    y = _study(generator, seeds=3, draws=2, seed=3)
    check = planted_check(y, np.zeros(90), replicates=500, target=0.10, alpha=0.05, rng=np.random.default_rng(4))
    assert check["false_positive_rate_mc_se"] == pytest.approx(math.sqrt(0.05 * 0.95 / 500))
    assert check["false_positive_rate_mc_se"] <= 0.01
    assert check["false_positive_rate"] <= 0.05 + 3 * check["false_positive_rate_mc_se"]
    assert check["false_positive_rate_ci_high"] > check["false_positive_rate"]
    assert 0.2 < check["power"] < 0.99
    assert "crossed_estimate" in check["estimator"]


def test_the_null_is_a_null_when_the_study_has_a_real_effect() -> None:
    """A real 15 pp difference must not leak into the null: the generator is fitted with the arms pooled, so its
    null studies have no difference, and the analysis of the study itself rejects."""
    generator = _generator(seed_sd=0.05)
    y = _study(generator, seeds=3, draws=2, seed=5, target=0.15)
    assert rejects(analyse(y, np.zeros(90)), 0.05)
    fitted = simulate.fit_generator(y)
    null = [analyse(chunk, np.zeros(90)).estimate for chunk in
            next(fitted.studies(300, 3, 2, np.random.default_rng(6)))]  # fmt: skip
    assert abs(np.mean(null)) < 0.01
