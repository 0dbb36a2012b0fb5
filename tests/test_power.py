"""The primary contrast's power calculation against hand and closed-form values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from fomaml_math.analysis.inference import minimum_detectable_effect, power
from fomaml_math.analysis.planted import analyse, equalised, plant, planted_check, rejects
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
    seed_part = 2 * (0.01**2 + 0.02**2 / 12) / 3  # 8.888…e-5, 4 df
    problem_part = 0.05 / 500  # 1e-4, 499 df
    variance = seed_part + problem_part
    assert se == pytest.approx(math.sqrt(variance), rel=1e-12)
    assert df == pytest.approx(variance**2 / (seed_part**2 / 4 + problem_part**2 / 499), rel=1e-12)


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


def _simulated_study(rng: np.random.Generator, effect: float, seeds: int = 4, n: int = 300) -> np.ndarray:
    """Y[arm, seed, k, draw, problem]: binary outcomes with problem difficulty, seed and draw effects."""
    difficulty = rng.uniform(0.1, 0.7, n)
    y = np.empty((2, seeds, 3, 2, n))
    for arm in range(2):
        for s in range(seeds):
            seed_shift = rng.normal(0.0, 0.01)
            for k in range(3):
                for r in range(2):
                    p = np.clip(difficulty + seed_shift + rng.normal(0.0, 0.01) + (effect if arm == 0 else 0.0), 0, 1)
                    y[arm, s, k, r] = rng.random(n) < p
    return y


def test_planted_check_false_positive_rate_is_alpha_and_power_matches_the_closed_form() -> None:
    """On simulated studies without an effect, label permutation rejects at about alpha; planting the target gives
    an empirical power close to the noncentral-t power at the observed se and df."""
    rng = np.random.default_rng(11)
    strata = np.zeros(300)
    fprs, powers, closed = [], [], []
    for _ in range(6):
        y = _simulated_study(rng, effect=0.0)
        check = planted_check(y, strata, replicates=100, target=0.04, alpha=0.05, rng=rng)
        est = analyse(y, strata)
        fprs.append(check["false_positive_rate"])
        powers.append(check["power"])
        closed.append(power(0.04, est.se, est.df, 0.05))
    # 600 null re-analyses: Monte Carlo SE of a 5% rate ~0.9 pp.
    assert abs(np.mean(fprs) - 0.05) < 0.03
    assert abs(np.mean(powers) - np.mean(closed)) < 0.12
    assert 0.1 < np.mean(powers) < 0.99  # the check can fail both ways: neither trivially 0 nor 1


def test_planted_effect_has_the_target_size() -> None:
    """Turning a share target / (1 - accuracy) of one arm's wrong answers right raises its accuracy by the target."""
    rng = np.random.default_rng(3)
    y = _simulated_study(rng, effect=0.0, n=2000)
    before = analyse(y, np.zeros(2000)).estimate
    gains = []
    for _ in range(20):
        planted = y.copy()
        planted[0] = plant(planted[0], 0.05, rng)
        gains.append(analyse(planted, np.zeros(2000)).estimate - before)
    assert np.mean(gains) == pytest.approx(0.05, abs=0.003)


def test_the_null_is_a_null_when_the_study_has_a_real_effect() -> None:
    """A real difference must not leak into the permutation null: the equalised outcomes have no arm difference
    in expectation, and the null rejects at about alpha even where the study itself rejects every time."""
    rng = np.random.default_rng(5)
    strata = np.zeros(300)
    y = _simulated_study(rng, effect=0.15, seeds=3)
    assert rejects(analyse(y, strata), 0.05)
    assert abs(np.mean([analyse(equalised(y, rng), strata).estimate for _ in range(50)])) < 0.01
    fprs = [planted_check(_simulated_study(rng, effect=0.15, seeds=3), strata, replicates=100, target=0.04,
                          alpha=0.05, rng=rng)["false_positive_rate"] for _ in range(4)]  # fmt: skip
    # 400 re-analyses: Monte Carlo SE of a 5% rate ~1.1 pp. Relabeling without equalising gives >= 10% at 3 seeds
    # per arm: 2 of the 20 relabelings are the study itself and its mirror, and both reject.
    assert np.mean(fprs) < 0.085
