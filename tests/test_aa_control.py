"""The A/A split re-analyses (analysis.negative_control, aa_control.tsv): the splits, the test each pair gets
(against Welch's t-test where the estimator reduces to it), the false-positive rate on simulated null data, a
planted difference, and the table on synthetic evaluations (the < 4 seeds message included)."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from test_stats import SETTINGS, synthetic_eval_frame

from fomaml_math.analysis import inference, negative_control
from fomaml_math.analysis.evaldata import load_eval, split_experiments
from fomaml_math.analysis.planted import rejects, seed_scores
from fomaml_math.analysis.tables import AA_COLUMNS, StatsSettings

STRATA = np.repeat(np.array(["algebra", "geometry", "number_theory"]), 30)


def _settings(splits: int = 500, alpha: float = 0.05) -> StatsSettings:
    stats = {**SETTINGS["stats"], "aa": {"splits": splits}, "alpha": alpha}
    return StatsSettings.from_settings({**SETTINGS, "stats": stats})


@pytest.mark.parametrize("n", [4, 5, 6, 8])
def test_every_distinct_split_appears_once(n: int) -> None:
    firsts, exhaustive = negative_control.halves(n, 500, np.random.default_rng(0))
    found = {frozenset((frozenset(f.tolist()), frozenset(range(n)) - frozenset(f.tolist()))) for f in firsts}
    every = {frozenset((frozenset(c), frozenset(range(n)) - frozenset(c))) for c in combinations(range(n), n // 2)}
    assert exhaustive and len(firsts) == len(found) == len(every) == negative_control.distinct_splits(n)
    assert negative_control.distinct_splits(8) == 35 and negative_control.distinct_splits(5) == 10


def test_more_splits_than_the_cap_are_sampled() -> None:
    firsts, exhaustive = negative_control.halves(12, 100, np.random.default_rng(0))  # 462 distinct splits
    assert not exhaustive and len(firsts) == 100
    assert all(len(set(f.tolist())) == 6 and f.max() < 12 for f in firsts)


def test_each_pair_is_welchs_t_test_where_the_estimator_reduces_to_it() -> None:
    """Scores constant over problems within a unit (no problem part, no residual): crossed_estimate of half
    against half is Welch's t-test on the units' means, so the rejections can be counted with scipy."""
    means = np.array([0.30, 0.52, 0.41, 0.12, 0.47, 0.36])
    scores = np.repeat(means[:, None], STRATA.size, axis=1)
    for alpha in (0.05, 0.3):
        found = negative_control.split_rejections(
            scores, STRATA, alpha=alpha, max_splits=500, rng=np.random.default_rng(0)
        )
        expected = 0
        for first in combinations(range(1, 6), 2):
            half = np.isin(np.arange(6), (0, *first))
            expected += scipy_stats.ttest_ind(means[half], means[~half], equal_var=False).pvalue < alpha
        assert found["n_rejected"] == expected and found["n_splits"] == 10
        assert found["false_positive_rate"] == pytest.approx(expected / 10)
        assert found["false_positive_rate_mc_se"] == 0.0  # every split analysed: exact given these units
    assert 0 < expected < 10  # the check is not trivially all or none


def _null_draws(rng: np.random.Generator, draws: int = 8, draw_sd: float = 0.1) -> np.ndarray:
    """One model's binary outcomes Y[draw, problem]: problem difficulty and a random effect per shot draw."""
    difficulty = rng.uniform(0.05, 0.6, STRATA.size)
    p = np.clip(difficulty + rng.normal(0.0, draw_sd, (draws, 1)), 0.0, 1.0)
    return (rng.random((draws, STRATA.size)) < p).astype(np.float64)


def _share(scores: np.ndarray, rng: np.random.Generator, **kwargs: object) -> float:
    found = negative_control.split_rejections(scores, STRATA, alpha=0.05, max_splits=500, rng=rng, **kwargs)
    return float(found["false_positive_rate"])


def test_draw_splits_reject_at_about_alpha_on_simulated_null_draws() -> None:
    """200 simulated models with 8 exchangeable draws each (35 splits each): the mean rejection share is close to
    alpha and to the false-positive rate of the same test on independent 4-vs-4 pairs (which it estimates)."""
    rng = np.random.default_rng(1)
    rates = np.array([_share(_null_draws(rng), rng) for _ in range(200)])
    fresh = (_null_draws(rng) for _ in range(2000))
    independent = [rejects(inference.crossed_estimate(y[:4], y[4:], STRATA), 0.05) for y in fresh]
    mc_se = rates.std(ddof=1) / math.sqrt(rates.size)  # the models are independent: ~0.2 pp
    independent_se = math.sqrt(0.05 * 0.95 / len(independent))  # ~0.5 pp
    assert abs(rates.mean() - np.mean(independent)) < 3 * math.hypot(mc_se, independent_se)
    # The estimator is mildly conservative by design (docs/statistics.md: coverage 92-99%), never liberal.
    assert 0.03 < rates.mean() < 0.05 + 3 * mc_se


def _null_seeds(rng: np.random.Generator, seeds: int, seed_sd: float = 0.08) -> np.ndarray:
    """One method's Y[seed, k, draw, problem]: problem difficulty, a seed effect and a draw effect per (seed, k)."""
    difficulty = rng.uniform(0.05, 0.6, STRATA.size)
    p = difficulty + rng.normal(0.0, seed_sd, (seeds, 1, 1, 1)) + rng.normal(0.0, 0.03, (seeds, 2, 2, 1))
    return (rng.random((seeds, 2, 2, STRATA.size)) < np.clip(p, 0.0, 1.0)).astype(np.float64)


def test_seed_splits_reject_at_about_alpha_on_simulated_null_studies() -> None:
    """300 simulated 6-seed runs of one method (10 splits of 3 vs 3 seeds each), the primary analysis per split."""
    rng = np.random.default_rng(3)
    rates = np.array([_share(seed_scores(_null_seeds(rng, 6)), rng) for _ in range(300)])
    mc_se = rates.std(ddof=1) / math.sqrt(rates.size)  # ~0.3 pp
    assert 0.03 < rates.mean() < 0.05 + 3 * mc_se


def test_a_test_that_ignores_the_draw_variance_is_caught() -> None:
    """What the control is for: intervals that condition on one set of draws (each half's draws averaged into one
    cluster: the paired t-test over problems) are too narrow when draws vary, and the split share shows it."""

    def conditional(a: np.ndarray, b: np.ndarray, strata: np.ndarray) -> inference.Estimate:
        return inference.crossed_estimate(a.mean(axis=0), b.mean(axis=0), strata)

    rng = np.random.default_rng(4)
    models = [_null_draws(rng) for _ in range(20)]
    study = np.mean([_share(y, rng) for y in models])
    naive = np.mean([_share(y, rng, estimator=conditional) for y in models])
    assert study < 0.1 and naive > 0.25  # measured: 4-5% and 36-42%


def _control(tmp_path: Path, draws: int) -> pd.DataFrame:
    """FOMAML seed 0 of in_domain re-evaluated under shot seed 1 with ``draws`` draws (2 per synthetic frame)."""
    parts = [
        synthetic_eval_frame(("fomaml",), seed=99 + j, seeds=(0,), experiments={"in_domain": ()}, shot_seed=1).assign(
            repeat=lambda f, j=j: f["repeat"] + 2 * j
        )
        for j in range(draws // 2)
    ]
    path = tmp_path / "control.parquet"
    pd.concat(parts, ignore_index=True).to_parquet(path, index=False)
    return load_eval([path], "--control-eval")


def test_the_table_has_its_columns_and_says_when_seeds_are_too_few(tmp_path: Path) -> None:
    experiments = split_experiments(synthetic_eval_frame(seeds=(0, 1, 2)))
    table = negative_control.aa_table(experiments, _control(tmp_path, 8), _settings())
    assert list(table.columns) == AA_COLUMNS
    draws = table[table.control == "draws"]
    assert list(draws.shots) == ["5", "10"] and set(draws.n_units) == {8} and set(draws.n_splits) == {35}
    assert draws.exhaustive.all() and (draws.note == "").all()
    np.testing.assert_allclose(draws.false_positive_rate, draws.n_rejected / 35)
    seeds = table[table.control == "seeds"]
    assert len(seeds) == 4  # two experiments x the primary contrast's two arms
    assert seeds.false_positive_rate.isna().all() and (seeds.n_splits == 0).all()
    assert set(seeds.note) == {"needs >= 4 seeds, has 3: each half needs >= 2 for a seed variance"}


def test_four_seeds_give_three_seed_splits_by_the_primary_analysis() -> None:
    """The synthetic runs' accuracy rises with the seed (seeds 0, 1 below 2, 3): at alpha 0.3 the split
    {0, 1} | {2, 3} rejects (p 0.059), the other two do not."""
    frame = synthetic_eval_frame(seeds=(0, 1, 2, 3), experiments={"in_domain": ()})
    table = negative_control.aa_table(split_experiments(frame), None, _settings(alpha=0.3))
    assert list(table.control) == ["seeds", "seeds"] and list(table.init) == ["fomaml", "sft"]
    assert list(table.train_seeds) == ["0,1,2,3"] * 2 and list(table.shots) == ["5,10"] * 2
    assert (table.n_splits == 3).all() and table.exhaustive.all() and (table.alpha == 0.3).all()
    # By hand for FOMAML: the primary analysis of each 2-vs-2 split of its seeds.
    runs = frame[(frame.init == "fomaml") & (frame.shots > 0)]
    per_seed = runs.groupby(["train_seed", "shots", "task", "problem_id"])["correct"].mean()
    scores = per_seed.groupby(["train_seed", "task", "problem_id"]).mean().unstack(["task", "problem_id"])
    strata = scores.columns.get_level_values("task").to_numpy()
    expected = sum(
        rejects(inference.crossed_estimate(scores.loc[[0, b]].to_numpy(), scores.drop([0, b]).to_numpy(), strata), 0.3)
        for b in (1, 2, 3)
    )
    assert table.n_rejected.iloc[0] == expected == 1
    assert table.false_positive_rate.iloc[0] == pytest.approx(1 / 3)


def test_sampled_splits_carry_a_monte_carlo_se() -> None:
    frame = synthetic_eval_frame(seeds=(0, 1, 2, 3, 4, 5), experiments={"in_domain": ()})
    table = negative_control.aa_table(split_experiments(frame), None, _settings(splits=10))  # 10 distinct: all
    assert (table.n_distinct_splits == 10).all() and table.exhaustive.all()
    rng = np.random.default_rng(0)
    found = negative_control.split_rejections(_null_draws(rng, draws=10), STRATA, alpha=0.3, max_splits=40, rng=rng)
    p = found["false_positive_rate"]
    assert not found["exhaustive"] and found["n_distinct_splits"] == 126 and found["n_splits"] == 40
    assert found["false_positive_rate_mc_se"] == pytest.approx(math.sqrt(p * (1 - p) / 40))
