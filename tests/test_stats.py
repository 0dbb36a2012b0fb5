"""Statistics stage: building blocks against hand computations, and the tables on synthetic evaluations.

``write_synthetic_eval`` is imported by the figures and summary tests too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from fomaml_math.analysis import stats
from fomaml_math.config import ConfigError

TASK_SIZES = {"algebra": 30, "geometry": 24, "number_theory": 20}
SHOTS = (0, 5, 10)
REPEATS = 2
INITS = ("base", "sft", "fomaml")
SETTINGS = {"seed": 1234, "stats": {"bootstrap_samples": 200, "ci_level": 0.95, "alpha": 0.05}}


def _correct(init: str, task: str, shots: int, repeat: int, index: int, rng: np.random.Generator) -> bool:
    if task == "algebra" and shots == 0:
        # A known 0-shot pattern: FOMAML alone solves problems 8..14 (b = 7), SFT alone problem 29 (c = 1).
        return {"fomaml": index < 15, "sft": index < 8 or index == 29, "base": index < 5}[init]
    rate = {"base": 0.25, "sft": 0.35, "fomaml": 0.45}[init] + 0.015 * shots
    difficulty = (index % 10) / 10.0 - 0.45  # shared by all inits: makes the comparisons paired
    return bool(rng.random() < min(0.95, max(0.02, rate - 0.5 * difficulty)))


def synthetic_eval_frame(inits: tuple[str, ...] = INITS, seed: int = 0) -> pd.DataFrame:
    """3 inits x 3 tasks x shots 0/5/10 x 2 repeats (0-shot: repeat 0 only), in the eval parquet schema."""
    rng = np.random.default_rng(seed)
    rows = []
    for init in inits:
        for task, size in TASK_SIZES.items():
            for shots in SHOTS:
                for repeat in range(1 if shots == 0 else REPEATS):
                    shot_ids = ",".join(f"{task}-s{repeat}-{j}" for j in range(shots))
                    for index in range(size):
                        correct = _correct(init, task, shots, repeat, index, rng)
                        nll = {"base": 1.6, "sft": 1.3, "fomaml": 1.2}[init] - 0.01 * shots + 0.02 * (index % 7)
                        rows.append(
                            {
                                "init": init,
                                "task": task,
                                "shots": shots,
                                "repeat": repeat,
                                "problem_id": f"{task}-{index:03d}",
                                "level": 1 + index % 5,
                                "gold": "1",
                                "generated": "\\boxed{1}" if correct else "no idea",
                                "extracted": "1" if correct else None,
                                "correct": correct,
                                "grade_status": "ok" if correct or index % 3 else "no_answer",
                                "nll": nll + rng.normal(0.0, 0.05),
                                "nll_tokens": 40,
                                "gen_tokens": 20 + index % 5,
                                "shot_ids": shot_ids,
                            }
                        )
    return pd.DataFrame(rows)


def write_synthetic_eval(directory: Path, inits: tuple[str, ...] = INITS) -> list[Path]:
    """Write ``<directory>/<init>/shots-<K>.parquet`` files; returns their paths."""
    frame = synthetic_eval_frame(inits)
    paths = []
    for (init, shots), group in frame.groupby(["init", "shots"]):
        path = directory / init / f"shots-{shots}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        group.to_parquet(path, index=False)
        paths.append(path)
    return paths


def run_stats(tmp_path: Path, inits: tuple[str, ...] = INITS, settings: dict = SETTINGS) -> Path:
    paths = write_synthetic_eval(tmp_path / "eval", inits)
    out = tmp_path / "stats"
    argv = ["--settings", json.dumps(settings), "--eval", *map(str, paths), "--output-dir", str(out)]
    assert stats.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_stats(tmp_path_factory.mktemp("stats"))


# --- building blocks -----------------------------------------------------------------------------


def test_bootstrap_ci_matches_explicit_loop() -> None:
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0])
    n_boot = 500
    low, high = stats.bootstrap_mean_ci(values, n_boot=n_boot, ci_level=0.9, rng=np.random.default_rng(7))

    rng = np.random.default_rng(7)
    indices = rng.integers(0, values.size, size=(n_boot, values.size))
    means = np.array([values[indices[b]].mean() for b in range(n_boot)])
    assert (low, high) == pytest.approx(tuple(np.quantile(means, [0.05, 0.95])))
    assert low < values.mean() < high


def test_bootstrap_ci_collapses_when_all_differences_are_equal() -> None:
    low, high = stats.bootstrap_mean_ci(np.full(12, 0.25), n_boot=300, ci_level=0.95, rng=np.random.default_rng(0))
    assert low == pytest.approx(0.25)
    assert high == pytest.approx(0.25)


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_stratified_bootstrap_matches_loop_and_ignores_block_size() -> None:
    strata = [
        np.array([[1.0, 0.2], [0.0, np.nan], [1.0, 0.4]]),
        np.array([[0.0, 1.0], [0.0, 2.0], [1.0, 3.0], [1.0, np.nan], [0.5, 5.0]]),
    ]
    n_boot = 64
    per, pooled = stats.stratified_bootstrap(strata, n_boot, [np.random.default_rng(s) for s in (1, 2)])
    per_small, pooled_small = stats.stratified_bootstrap(
        strata, n_boot, [np.random.default_rng(s) for s in (1, 2)], block_rows=5
    )
    np.testing.assert_allclose(pooled, pooled_small)
    for a, b in zip(per, per_small, strict=True):
        np.testing.assert_allclose(a, b)

    indices = [
        np.random.default_rng(s).integers(0, x.shape[0], size=(n_boot, x.shape[0]))
        for s, x in zip((1, 2), strata, strict=True)
    ]
    for b in range(n_boot):
        drawn = [x[idx[b]] for x, idx in zip(strata, indices, strict=True)]
        for k in range(2):
            np.testing.assert_allclose(per[k][b], np.nanmean(drawn[k], axis=0))
        np.testing.assert_allclose(pooled[b], np.nanmean(np.vstack(drawn), axis=0))


def test_mcnemar_exact_against_hand_computed_binomial_sum() -> None:
    b, c = 7, 1
    hand = 2 * sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c)
    assert hand == 0.0703125
    assert stats.mcnemar_exact(b, c) == pytest.approx(hand)
    assert stats.mcnemar_exact(c, b) == pytest.approx(hand)
    assert stats.mcnemar_exact(b, c) == pytest.approx(mcnemar([[10, b], [c, 5]], exact=True).pvalue)
    assert stats.mcnemar_exact(0, 0) == 1.0


def test_holm_against_hand_example_and_statsmodels() -> None:
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06
    expected = [0.03, 0.06, 0.06, 0.02]
    adjusted = stats.holm_adjust(p)
    np.testing.assert_allclose(adjusted[:4], expected)
    np.testing.assert_allclose(adjusted[:4], multipletests(p[:4], method="holm")[1])
    assert np.isnan(adjusted[4])


def test_wilcoxon_against_scipy_and_degenerate_cases() -> None:
    diffs = np.array([0.3, -0.1, 0.25, 0.4, 0.0, 0.15, -0.05, 0.2])
    stat, p, note = stats.wilcoxon_test(diffs)
    reference = scipy_stats.wilcoxon(diffs, zero_method="wilcox")
    assert (stat, p) == pytest.approx((reference.statistic, reference.pvalue))
    assert note == ""
    assert all(math.isnan(x) for x in stats.wilcoxon_test(np.zeros(5))[:2])
    assert "zero" in stats.wilcoxon_test(np.zeros(5))[2]
    assert "need at least 2" in stats.wilcoxon_test(np.array([0.1]))[2]
    _, p3, note3 = stats.wilcoxon_test(np.array([0.1, 0.2, 0.3]), alpha=0.05)
    assert p3 == pytest.approx(0.25)
    assert "cannot fall below 0.25" in note3
    large = np.random.default_rng(0).normal(0.1, 1.0, 5000)  # thousands of problems: no overflow
    assert stats.wilcoxon_test(large, alpha=0.05)[1] == pytest.approx(scipy_stats.wilcoxon(large).pvalue)


def test_stars_and_effect_sizes() -> None:
    assert [stats.significance_stars(p, 0.05) for p in (0.2, 0.04, 0.005, 0.0001, math.nan)] == [
        "",
        "*",
        "**",
        "***",
        "",
    ]
    assert stats.cohens_h(0.5, 0.5) == 0.0
    assert stats.cohens_h(0.6, 0.4) == pytest.approx(2 * math.asin(math.sqrt(0.6)) - 2 * math.asin(math.sqrt(0.4)))
    assert stats.discordant_odds_ratio(7, 1) == 7.0
    assert stats.discordant_odds_ratio(3, 0) == math.inf


@pytest.mark.parametrize(
    ("stats_settings", "message"),
    [
        ({"seed": 1}, "missing"),
        ({"seed": 1, "stats": {"bootstrap_samples": 0, "ci_level": 0.95, "alpha": 0.05}}, "bootstrap_samples"),
        ({"seed": 1, "stats": {"bootstrap_samples": 10, "ci_level": 1.5, "alpha": 0.05}}, "ci_level"),
    ],
)
def test_settings_errors_are_one_line(stats_settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        stats.StatsSettings.from_settings(stats_settings)
    assert "\n" not in str(info.value)


# --- the stage on synthetic evaluations ----------------------------------------------------------


def test_stage_writes_the_three_tables(stats_dir: Path) -> None:
    assert sorted(p.name for p in stats_dir.iterdir()) == sorted(stats.OUTPUT_FILES)


def test_accuracy_table_matches_direct_computation(stats_dir: Path) -> None:
    accuracy = stats.read_table(stats_dir, "accuracy.tsv")
    frame = synthetic_eval_frame()
    per_problem = frame.groupby(["init", "task", "shots", "problem_id"])[["correct", "nll"]].mean().reset_index()
    assert len(accuracy) == len(INITS) * (len(TASK_SIZES) + 1) * len(SHOTS)
    for row in accuracy.itertuples():
        subset = per_problem[(per_problem.init == row.init) & (per_problem.shots == row.shots)]
        if row.task != "all":
            subset = subset[subset.task == row.task]
        assert row.n_problems == len(subset)
        assert row.accuracy == pytest.approx(subset.correct.mean())
        assert row.nll_mean == pytest.approx(subset.nll.mean())
        assert row.accuracy_ci_low <= row.accuracy <= row.accuracy_ci_high
        assert row.nll_ci_low <= row.nll_mean <= row.nll_ci_high
        assert row.n_repeats == (1 if row.shots == 0 else REPEATS)
    # 0-shot has one repeat, so no spread across repeats.
    assert accuracy.loc[accuracy.shots == 0, "accuracy_repeat_sd"].isna().all()


def test_comparisons_known_pattern_and_holm_family(stats_dir: Path) -> None:
    comparisons = stats.read_table(stats_dir, "comparisons.tsv")
    assert len(comparisons) == 3 * (len(TASK_SIZES) + 1) * len(SHOTS)
    row = comparisons[
        (comparisons.task == "algebra") & (comparisons.shots == 0) & (comparisons.comparison == "fomaml-sft")
    ]
    row = row.iloc[0]
    assert (row.n_a_better, row.n_b_better, row.n_tied) == (7, 1, 22)
    assert row.mcnemar_p == pytest.approx(0.0703125)
    assert row.acc_diff == pytest.approx(15 / 30 - 9 / 30)
    assert row.acc_diff_ci_low <= row.acc_diff <= row.acc_diff_ci_high
    assert row.discordant_odds_ratio == 7.0
    # Holm over the whole table, one family per metric.
    np.testing.assert_allclose(comparisons.mcnemar_p_holm, multipletests(comparisons.mcnemar_p, method="holm")[1])
    np.testing.assert_allclose(comparisons.wilcoxon_p_holm, multipletests(comparisons.wilcoxon_p, method="holm")[1])
    assert (comparisons.acc_significant == (comparisons.mcnemar_p_holm < 0.05)).all()
    assert ((comparisons.acc_stars != "") == comparisons.acc_significant).all()


def test_pooled_comparison_pairs_problems_across_all_tasks(stats_dir: Path) -> None:
    comparisons = stats.read_table(stats_dir, "comparisons.tsv")
    frame = synthetic_eval_frame()
    per_problem = frame.groupby(["init", "task", "shots", "problem_id"])[["correct", "nll"]].mean()
    for shots in SHOTS:
        row = comparisons[
            (comparisons.task == "all") & (comparisons.shots == shots) & (comparisons.comparison == "fomaml-base")
        ].iloc[0]
        a = per_problem.xs(("fomaml", shots), level=("init", "shots"))
        b = per_problem.xs(("base", shots), level=("init", "shots"))
        diff = (a.correct - b.correct).to_numpy()
        nll_diff = (a.nll - b.nll).to_numpy()
        assert row.n_problems == sum(TASK_SIZES.values())
        assert row.acc_diff == pytest.approx(diff.mean())
        assert (row.n_a_better, row.n_b_better) == ((diff > 0).sum(), (diff < 0).sum())
        assert row.mcnemar_p == pytest.approx(scipy_stats.binomtest((diff > 0).sum(), (diff != 0).sum()).pvalue)
        assert row.nll_diff == pytest.approx(nll_diff.mean())
        assert row.wilcoxon_p == pytest.approx(scipy_stats.wilcoxon(nll_diff).pvalue)
        assert row.nll_diff_ci_low <= row.nll_diff <= row.nll_diff_ci_high


def test_across_tasks_wilcoxon(stats_dir: Path) -> None:
    comparisons = stats.read_table(stats_dir, "comparisons.tsv")
    across = stats.read_table(stats_dir, "across_tasks.tsv")
    assert len(across) == 3 * len(SHOTS)
    for row in across.itertuples():
        diffs = comparisons[
            (comparisons.task != "all") & (comparisons.shots == row.shots) & (comparisons.comparison == row.comparison)
        ].acc_diff
        assert row.n_tasks == len(TASK_SIZES)
        assert row.acc_mean_diff == pytest.approx(diffs.mean())
        if (diffs != 0).any():
            assert row.acc_wilcoxon_p == pytest.approx(scipy_stats.wilcoxon(diffs).pvalue)
            # three tasks: an exact two-sided p is at least 0.25, and the table says so
            assert "cannot fall below" in row.acc_note
    np.testing.assert_allclose(across.acc_wilcoxon_p_holm, multipletests(across.acc_wilcoxon_p, method="holm")[1])


def test_stage_is_reproducible(tmp_path: Path, stats_dir: Path) -> None:
    again = run_stats(tmp_path)
    for name in stats.OUTPUT_FILES:
        assert (again / name).read_bytes() == (stats_dir / name).read_bytes()


def test_missing_init_skips_its_comparisons(tmp_path: Path) -> None:
    out = run_stats(tmp_path, inits=("base", "fomaml"))
    comparisons = stats.read_table(out, "comparisons.tsv")
    assert set(comparisons.comparison) == {"fomaml-base"}
    assert set(stats.read_table(out, "accuracy.tsv").init) == {"base", "fomaml"}


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    paths = write_synthetic_eval(tmp_path / "eval")
    broken = tmp_path / "broken.parquet"
    pd.read_parquet(paths[0]).drop(columns=["correct"]).to_parquet(broken)
    with pytest.raises(ConfigError, match="missing column"):
        stats.load_eval([broken])
    with pytest.raises(ConfigError, match="two results"):
        stats.load_eval([paths[0], paths[0]])
    with pytest.raises(ConfigError, match="not found"):
        stats.load_eval([tmp_path / "absent.parquet"])
