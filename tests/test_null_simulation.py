"""Null studies at the demo's design through the primary estimator (issue 28): the rejection rate overall, in the
regime where the seed means agree by chance, on the per-task rows and on the control table; power at 10 pp.

Design: 3 training seeds per arm, 3 tasks × 30 problems, 2 shot counts × 2 shot draws per seed, binary outcomes
from ``analysis.simulate.Generator`` (difficulty N(logit 0.3, 1.5) plus 0.3 at the second k; method × problem
interaction SD 0.5, draw SD 0.15, arms' draws correlated 0.5, all logits). The seed SD is varied: 0 (the seeds
differ only by their draws), 0.1 (about 2 pp, the demo's order) and 0.3 (about 6 pp). Rates are compared with α
plus three Monte Carlo standard errors at the nominal rate, sqrt(α(1 − α)/R).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.special import logit

from fomaml_math.analysis import inference, simulate

ALPHA = 0.05
STUDIES = 2000
TASKS = np.repeat(np.array(["algebra_v1", "geometry_v1", "number_theory_v1"]), 30)


def _generator(seed_sd: float) -> simulate.Generator:
    rng = np.random.default_rng(28)
    difficulty = rng.normal(logit(0.3), 1.5, TASKS.size)
    return simulate.Generator(np.stack([difficulty, difficulty + 0.3]), seed_sd, 0.15, 0.5, 0.5)


def _mc_bound(rate: float, count: int) -> float:
    return rate + 3.0 * math.sqrt(rate * (1 - rate) / count)


def _simulate(seed_sd: float, target: float = 0.0) -> dict[str, np.ndarray]:
    """Per study: the primary test's rejection, its regime flag, the per-task rows' rejections, and the Welch
    t-test over the seed means (the textbook 3-seed analysis) for comparison."""
    out: dict[str, list] = {"reject": [], "agree": [], "task_reject": [], "task_agree": [], "welch": []}
    rng = np.random.default_rng([28, int(seed_sd * 100), int(target * 100)])
    for chunk in _generator(seed_sd).studies(STUDIES, 3, 2, rng, target=target):
        per_k = chunk.mean(axis=4)  # draws averaged: [study, arm, seed, k, problem]
        scores = per_k.mean(axis=3)  # then k: the primary score [study, arm, seed, problem]
        for study, (a, b) in enumerate(zip(scores[:, 0], scores[:, 1], strict=True)):
            est = inference.crossed_estimate(a, b, TASKS)
            out["reject"].append(inference.t_test_p(est) < ALPHA)
            out["agree"].append(est.seed_means_agree)
            out["welch"].append(scipy_stats.ttest_ind(a.mean(axis=1), b.mean(axis=1), equal_var=False).pvalue < ALPHA)
            for k, start in itertools.product(range(2), range(0, TASKS.size, 30)):  # comparisons.tsv: task x k
                cols = slice(start, start + 30)
                x, y = per_k[study, 0, :, k, cols], per_k[study, 1, :, k, cols]
                row = inference.crossed_estimate(x, y, TASKS[cols])
                out["task_reject"].append(inference.t_test_p(row) < ALPHA)
                out["task_agree"].append(row.seed_means_agree)
    return {key: np.asarray(value, dtype=bool) for key, value in out.items()}


@pytest.fixture(scope="module", params=[0.0, 0.1, 0.3])
def null_studies(request: pytest.FixtureRequest) -> tuple[float, dict[str, np.ndarray]]:
    return request.param, _simulate(request.param)


def test_primary_holds_alpha_overall_and_where_seed_means_agree(null_studies) -> None:
    """Overall at most α + 3 MC se at every seed SD. Where the seed means agree by chance in at least 10% of
    studies (seed SD 0 and 0.1: 17-29%), at most 2α there too (issue 28: the old switch rejected 21-45%). Where the
    regime is rare (seed SD 0.3: ~2%), it is rare *because* the seed means usually differ, so agreeing means are a
    chance small sample variance: every S - 1 df test rejects more there, the textbook Welch t-test over seed means
    more than this estimator (checked), and the overall rate is what the regime can cost."""
    seed_sd, sim = null_studies
    assert sim["reject"].mean() <= _mc_bound(ALPHA, STUDIES)
    regime = sim["agree"]
    if regime.mean() >= 0.10:
        assert sim["reject"][regime].mean() <= 2 * ALPHA
    assert sim["reject"][regime].mean() <= sim["welch"][regime].mean() + 0.02
    if seed_sd > 0:  # the price of 2 df is paid where the seeds barely vary; coverage is not bought elsewhere
        assert sim["reject"].mean() >= 0.01  # 95% intervals cover at most 99%


def test_per_task_rows_hold_alpha(null_studies) -> None:
    """The per-task FOMAML - SFT rows of comparisons.tsv (one task and one k, 30 problems, the same estimator): the
    old switch fired unflagged in 6 of 30 of the demo's rows."""
    _, sim = null_studies
    count = sim["task_reject"].size
    assert sim["task_reject"].mean() <= _mc_bound(ALPHA, count)
    regime = sim["task_agree"]
    if regime.mean() >= 0.10:
        assert sim["task_reject"][regime].mean() <= 2 * ALPHA


def test_control_pair_holds_alpha() -> None:
    """control.tsv's pair: one model, its 2 main draws against 8 control draws as the clusters, 90 problems (the
    demo reported df 112 there under the old switch). Draw SD 0.15 logit, as above: df stay those of the draws."""
    rng = np.random.default_rng(2028)
    difficulty = _generator(0.0).difficulty[:1]
    model = simulate.Generator(difficulty, 0.0, 0.15, 0.0, 0.0)
    rejected, agree, dfs = [], [], []
    for chunk in model.studies(STUDIES, 1, 10, rng):
        for study in chunk:
            draws = study[0, 0, 0]  # [draw, problem]: one run, one k
            est = inference.crossed_estimate(draws[:2], draws[2:], TASKS)
            rejected.append(inference.t_test_p(est) < ALPHA)
            agree.append(est.seed_means_agree)
            dfs.append(est.df)
    rejected, agree = np.array(rejected), np.array(agree)
    assert rejected.mean() <= _mc_bound(ALPHA, STUDIES)
    assert agree.mean() >= 0.10 and rejected[agree].mean() <= 2 * ALPHA
    assert max(dfs) <= 1 + 7 + 89  # never beyond the clusters' and problems' own df


def test_power_at_ten_points_at_the_demo_design() -> None:
    """A planted +10 pp at seed SD 0.1 (the demo's order): the test detects it most of the time (about 70%), and
    its interval covers the truth about 95-99% of the time, not above."""
    sim = _simulate(0.1, target=0.10)
    power = sim["reject"].mean()
    assert 0.5 <= power <= 0.95
