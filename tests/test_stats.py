"""Statistics stage: the bootstrap (analysis.resampling) against explicit loops, the settings, and the tables on
synthetic evaluations.

``write_synthetic_eval`` and ``run_stats`` are imported by the figures and summary tests too. The synthetic
study: 3 tasks, 3 training seeds, two experiments (``in_domain``; ``heldout_geometry`` with geometry held out),
the base model evaluated once for both (as the shared base evaluation writes it).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

from fomaml_math.analysis import efficiency, inference, resampling, stats
from fomaml_math.analysis.evaldata import load_eval
from fomaml_math.analysis.outputs import STATS_FILES
from fomaml_math.analysis.tables import StatsSettings, read_table
from fomaml_math.errors import ConfigError

TASK_SIZES = {"algebra": 30, "geometry": 24, "number_theory": 20}
SHOTS = (0, 5, 10)
REPEATS = 2
INITS = ("base", "sft", "fomaml")
SEEDS = (0, 1, 2)
EXPERIMENTS = {"in_domain": (), "heldout_geometry": ("geometry",)}
# Full stage settings, as config.stage_settings passes them (the schema's defaults filled in).
SETTINGS = {
    "seed": 1234,
    "stats": {
        "bootstrap_samples": 200,
        "ci_level": 0.95,
        "alpha": 0.05,
        "equivalence_margin_pp": 2.0,
        "primary": {"contrast": "fomaml-sft"},
        "per_shot": {"comparisons": ["fomaml-sft", "fomaml-base"]},
        "target_effect_pp": 3.0,
        "planted": {"replicates": 40},
        "aa": {"splits": 500},
        "assumed": {"seed_sd_pp": 1.0, "draw_sd_pp": 2.0, "problem_var": 0.05},
    },
}


def _correct(init: str, task: str, shots: int, seed: int, index: int, rng: np.random.Generator) -> bool:
    if task == "algebra" and shots == 0 and seed <= 0:
        # A known 0-shot pattern: FOMAML alone solves problems 8..14 (b = 7), SFT alone problem 29 (c = 1).
        return {"fomaml": index < 15, "sft": index < 8 or index == 29, "base": index < 5}[init]
    rate = {"base": 0.25, "sft": 0.35, "fomaml": 0.45}[init] + 0.015 * shots + 0.04 * (seed - 1) * (init != "base")
    difficulty = (index % 10) / 10.0 - 0.45  # shared by all inits: makes the comparisons paired
    return bool(rng.random() < min(0.95, max(0.02, rate - 0.5 * difficulty)))


def synthetic_eval_frame(
    inits: tuple[str, ...] = INITS,
    seed: int = 0,
    seeds: tuple[int, ...] = SEEDS,
    experiments: dict[str, tuple[str, ...]] = EXPERIMENTS,
    shot_seed: int = 0,
    shared_base: bool = True,
) -> pd.DataFrame:
    """inits x seeds x experiments x 3 tasks x shots 0/5/10 x 2 repeats (0-shot: repeat 0 only), in the eval
    parquet schema; base (train_seed -1) once for all experiments (``shared_base``) or once per experiment."""
    rng = np.random.default_rng(seed)
    rows = []
    runs = []
    for experiment, held_out in experiments.items():
        for init in inits:
            if init == "base":
                if not shared_base or not any(r[1] == "base" for r in runs):
                    runs.append((experiment if not shared_base else "shared", "base", -1, held_out))
                continue
            runs += [(experiment, init, s, held_out) for s in seeds]
    for experiment, init, train_seed, held_out in runs:
        for task, size in TASK_SIZES.items():
            for shots in SHOTS:
                for repeat in range(1 if shots == 0 else REPEATS):
                    shot_ids = ",".join(f"{task}-s{shot_seed}-{repeat}-{j}" for j in range(shots))
                    for index in range(size):
                        correct = _correct(init, task, shots, train_seed, index, rng)
                        nll = {"base": 1.6, "sft": 1.3, "fomaml": 1.2}[init] - 0.01 * shots + 0.02 * (index % 7)
                        gen_tokens = 20 + index % 5
                        rows.append(
                            {
                                "experiment": experiment,
                                "train_seed": train_seed,
                                "shot_seed": shot_seed,
                                "init": init,
                                "task": task,
                                "task_role": "meta_test" if task in held_out else "train",
                                "shots": shots,
                                "repeat": repeat,
                                "problem_id": f"{task}-{index:03d}",
                                "level": 1 + index % 5,
                                "gold": "1",
                                "generated": "\\boxed{1}" if correct else "no idea",
                                "extracted": "1" if correct else None,
                                "correct": correct,
                                "grade_status": "ok" if correct or index % 3 else "no_answer",
                                "truncated": gen_tokens == 24,
                                "nll": nll + rng.normal(0.0, 0.05),
                                "nll_tokens": 40,
                                "gen_tokens": gen_tokens,
                                "shot_ids": shot_ids,
                                "support_loss_before": np.nan if shots == 0 else 1.5 + 0.01 * repeat,
                                "support_loss_after": np.nan if shots == 0 else 1.2 - 0.01 * shots,
                                "weight_change": 0.0 if shots == 0 else 1e-4 * shots,
                                "adapt_lr": 1e-4,
                                "adapt_steps": 0 if shots == 0 else 5,
                                "adapt_optimizer": "sgd",
                            }
                        )
    return pd.DataFrame(rows)


def write_synthetic_eval(directory: Path, inits: tuple[str, ...] = INITS, **kwargs) -> list[Path]:
    """Write ``<directory>/<experiment>/<init>/seed-<s>/shots-<K>.parquet`` files; returns their paths."""
    return write_eval_frame(directory, synthetic_eval_frame(inits, **kwargs))


def write_eval_frame(directory: Path, frame: pd.DataFrame) -> list[Path]:
    """Write ``frame`` as ``<directory>/<experiment>/<init>/seed-<s>/shots-<K>.parquet`` files; returns their paths."""
    paths = []
    for (experiment, init, seed, shots), group in frame.groupby(["experiment", "init", "train_seed", "shots"]):
        path = directory / experiment / init / f"seed-{seed}" / f"shots-{shots}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        group.to_parquet(path, index=False)
        paths.append(path)
    return paths


def run_stats(
    tmp_path: Path,
    inits: tuple[str, ...] = INITS,
    settings: dict = SETTINGS,
    control: list[Path] | None = None,
    **kwargs,
) -> Path:
    paths = write_synthetic_eval(tmp_path / "eval", inits, **kwargs)
    out = tmp_path / "stats"
    argv = ["--settings", json.dumps(settings), "--eval", *map(str, paths), "--output-dir", str(out)]
    if control:
        argv += ["--control-eval", *map(str, control)]
    assert stats.main(argv) == 0
    return out


def write_control(directory: Path) -> list[Path]:
    """FOMAML seed 0 of in_domain, re-evaluated under shot_seed 1 (another random stream: other outcomes)."""
    frame = synthetic_eval_frame(("fomaml",), seed=99, seeds=(0,), experiments={"in_domain": ()}, shot_seed=1)
    path = directory / "control.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return [path]


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("stats")
    return run_stats(tmp, control=write_control(tmp / "control"))


def _per_problem(frame: pd.DataFrame) -> pd.DataFrame:
    """Repeat- then seed-averaged correctness per (init, task, shots, problem), computed directly."""
    by_seed = frame.groupby(["init", "train_seed", "task", "shots", "problem_id"])[["correct", "nll"]].mean()
    return by_seed.groupby(["init", "task", "shots", "problem_id"]).mean().reset_index()


# --- building blocks -----------------------------------------------------------------------------


def test_bootstrap_ci_matches_explicit_loop() -> None:
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0])
    n_boot = 500
    low, high = resampling.bootstrap_mean_ci(values, n_boot=n_boot, ci_level=0.9, rng=np.random.default_rng(7))

    rng = np.random.default_rng(7)
    indices = rng.integers(0, values.size, size=(n_boot, values.size))
    means = np.array([values[indices[b]].mean() for b in range(n_boot)])
    assert (low, high) == pytest.approx(tuple(np.quantile(means, [0.05, 0.95])))
    assert low < values.mean() < high


def test_bootstrap_ci_collapses_when_all_differences_are_equal() -> None:
    low, high = resampling.bootstrap_mean_ci(np.full(12, 0.25), n_boot=300, ci_level=0.95, rng=np.random.default_rng(0))
    assert low == pytest.approx(0.25)
    assert high == pytest.approx(0.25)


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_stratified_bootstrap_matches_loop_and_ignores_block_size() -> None:
    strata = [
        np.array([[1.0, 0.2], [0.0, np.nan], [1.0, 0.4]]),
        np.array([[0.0, 1.0], [0.0, 2.0], [1.0, 3.0], [1.0, np.nan], [0.5, 5.0]]),
    ]
    n_boot = 64
    per, pooled = resampling.stratified_bootstrap(strata, n_boot, [np.random.default_rng(s) for s in (1, 2)])
    per_small, pooled_small = resampling.stratified_bootstrap(
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


def _stats(**changes) -> dict:
    return {"seed": 1, "stats": SETTINGS["stats"] | changes}


@pytest.mark.parametrize(
    ("stats_settings", "message"),
    [
        ({"seed": 1}, "missing"),
        ({"seed": 1, "stats": {"bootstrap_samples": 10, "ci_level": 0.9, "alpha": 0.05}}, "missing 'equivalence"),
        (_stats(bootstrap_samples=0), "bootstrap_samples: expected"),
        (_stats(ci_level=1.5), "ci_level: expected"),
        (_stats(equivalence_margin_pp=0), "equivalence_margin_pp: expected"),
        (_stats(per_shot={"comparisons": ["a-b"]}), "stats.per_shot.comparisons: expected"),
        (_stats(primary={"contrast": "fomaml-fomaml"}), "stats.primary.contrast: expected"),
    ],
)
def test_settings_errors_are_one_line(stats_settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        StatsSettings.from_settings(stats_settings)
    assert "\n" not in str(info.value)


# --- the stage on synthetic evaluations ----------------------------------------------------------


def test_stage_writes_every_table(stats_dir: Path) -> None:
    assert sorted(p.name for p in stats_dir.iterdir()) == sorted(STATS_FILES)


def test_accuracy_rows_match_direct_computation(stats_dir: Path) -> None:
    accuracy = read_table(stats_dir, "accuracy.tsv")
    frame = synthetic_eval_frame()
    frame = frame[(frame.experiment == "in_domain") | (frame.init == "base")]
    direct = _per_problem(frame)
    rows = accuracy[(accuracy.experiment == "in_domain") & (accuracy.train_seed == "all")]
    assert len(rows) == len(INITS) * (len(TASK_SIZES) + 1) * len(SHOTS)
    for row in rows.itertuples():
        subset = direct[(direct.init == row.init) & (direct.shots == row.shots)]
        if row.task != "all":
            subset = subset[subset.task == row.task]
        assert row.n_problems == len(subset)
        assert row.accuracy == pytest.approx(subset.correct.mean())
        assert row.nll_mean == pytest.approx(subset.nll.mean())
        assert 0 <= row.accuracy_ci_low <= row.accuracy <= row.accuracy_ci_high <= 1
        assert 0 <= row.nll_ci_low <= row.nll_mean <= row.nll_ci_high  # a mean NLL cannot be negative
        assert row.n_repeats == (1 if row.shots == 0 else REPEATS)
        # Trained models: 3 seeds, seed-aware t-interval; the untrained base: one cluster, problem bootstrap.
        assert row.n_seeds == (1 if row.init == "base" else len(SEEDS))
        assert row.ci_method == ("problem-bootstrap" if row.init == "base" else "seed-t")
    # Per-seed rows, one per training seed, for the thin lines of the figures; their spread is the seed SD.
    seeds = accuracy[(accuracy.experiment == "in_domain") & (accuracy.train_seed != "all") & (accuracy.task == "all")]
    fomaml = frame[frame.init == "fomaml"]
    for shots in SHOTS:
        per_seed = seeds[(seeds.init == "fomaml") & (seeds.shots == shots)].sort_values("train_seed")
        assert list(per_seed.train_seed) == [str(s) for s in SEEDS]
        expected = [
            fomaml[(fomaml.train_seed == s) & (fomaml.shots == shots)].groupby("problem_id").correct.mean().mean()
            for s in SEEDS
        ]
        np.testing.assert_allclose(per_seed.accuracy, expected)
        mean_row = rows[(rows.init == "fomaml") & (rows.task == "all") & (rows.shots == shots)].iloc[0]
        assert mean_row.accuracy_seed_sd == pytest.approx(np.std(expected, ddof=1))
    assert accuracy.loc[accuracy.shots == 0, "accuracy_repeat_sd"].isna().all()


def test_generation_rates_in_accuracy_and_generation_tables(stats_dir: Path) -> None:
    generation = read_table(stats_dir, "generation.tsv")
    frame = synthetic_eval_frame()
    frame = frame[(frame.experiment == "in_domain") | (frame.init == "base")]
    for row in generation[generation.experiment == "in_domain"].itertuples():
        rows = frame[(frame.init == row.init) & (frame.shots == row.shots)]
        assert row.n_rows == len(rows)
        assert row.no_answer_rate == pytest.approx((rows.grade_status == "no_answer").mean())
        assert row.truncation_rate == pytest.approx(rows.truncated.mean())
        assert row.mean_gen_tokens == pytest.approx(rows.gen_tokens.mean())
    accuracy = read_table(stats_dir, "accuracy.tsv")
    pooled = accuracy[(accuracy.task == "all") & (accuracy.train_seed == "all")]
    merged = pooled.merge(generation, on=["experiment", "init", "shots"], suffixes=("", "_g"))
    np.testing.assert_allclose(merged.truncation_rate, merged.truncation_rate_g)


def test_per_shot_family_its_holm_tost_verdict_and_mde(stats_dir: Path) -> None:
    comparisons = read_table(stats_dir, "comparisons.tsv")
    primary = read_table(stats_dir, "per_shot.tsv")
    assert set(primary.family) == {"per_shot"}
    assert len(primary) == len(EXPERIMENTS) * 2 * len(SHOTS)
    assert set(primary.comparison) == {"fomaml-sft", "fomaml-base"}
    # In-domain: all tasks pooled; the held-out experiment: its held-out tasks.
    assert set(primary[primary.experiment == "in_domain"].task) == {"all"}
    assert set(primary[primary.experiment == "heldout_geometry"].task) == {"meta_test"}
    margin = 0.02
    for _, family in primary.groupby("experiment"):
        np.testing.assert_allclose(family.acc_p_holm, multipletests(family.acc_p, method="holm")[1])
        np.testing.assert_allclose(family.tost_p_holm, multipletests(family.tost_p, method="holm")[1])
        assert (family.family_size == 6).all()
        for row in family.itertuples():
            est = inference.Estimate(row.acc_diff, row.acc_diff_se, row.acc_diff_df, row.n_problems, 3, 3, 0, 0)
            assert row.acc_test == "t"
            assert row.acc_p == pytest.approx(
                2 * scipy_stats.t.sf(abs(row.acc_diff) / row.acc_diff_se, row.acc_diff_df)
            )
            assert row.tost_p == pytest.approx(inference.tost(est, margin)[2])
            # The MDE with the test's own t: 80% power (noncentral t, df of the test) at alpha / 6, and more
            # than the normal formula claims; the power column is the same function at the 3 pp target.
            # (inference.power is checked against a simulated t-test in test_power.py.)
            assert inference.power(row.mde, row.acc_diff_se, row.acc_diff_df, 0.05 / 6) == pytest.approx(0.8, abs=1e-6)
            z = scipy_stats.norm.ppf(1 - 0.05 / 6 / 2) + scipy_stats.norm.ppf(0.8)
            assert row.mde > z * row.acc_diff_se
            assert row.power_at_target == pytest.approx(
                inference.power(0.03, row.acc_diff_se, row.acc_diff_df, 0.05 / 6)
            )
            assert row.tost_min_p_holm == pytest.approx(
                min(1.0, 6 * scipy_stats.t.sf(margin / row.acc_diff_se, row.acc_diff_df))
            )
            expected = (
                ("better" if row.acc_diff > 0 else "worse")
                if row.acc_p_holm < 0.05
                else ("equivalent" if row.tost_p_holm < 0.05 else "inconclusive")
            )
            assert row.verdict == expected
    # The secondary family is adjusted separately, per experiment.
    secondary = comparisons[(comparisons.family == "secondary") & (comparisons.experiment == "in_domain")]
    np.testing.assert_allclose(secondary.acc_p_holm, multipletests(secondary.acc_p, method="holm")[1])
    assert len(secondary) == 3 * (len(TASK_SIZES) + 1) * len(SHOTS) - 2 * len(SHOTS)


def test_comparison_estimate_pairs_seed_averaged_problems(stats_dir: Path) -> None:
    comparisons = read_table(stats_dir, "comparisons.tsv")
    frame = synthetic_eval_frame()
    direct = _per_problem(frame[(frame.experiment == "in_domain") | (frame.init == "base")])
    for shots in SHOTS:
        row = comparisons[
            (comparisons.experiment == "in_domain")
            & (comparisons.task == "all")
            & (comparisons.shots == shots)
            & (comparisons.comparison == "fomaml-base")
        ].iloc[0]
        a = direct[(direct.init == "fomaml") & (direct.shots == shots)].set_index(["task", "problem_id"]).correct
        b = direct[(direct.init == "base") & (direct.shots == shots)].set_index(["task", "problem_id"]).correct
        diff = (a - b).to_numpy()
        assert row.acc_diff == pytest.approx(diff.mean())
        assert (row.n_a_better, row.n_b_better) == ((diff > 0).sum(), (diff < 0).sum())
        assert row.n_seeds_a == 3 and row.n_seeds_b == 1
        assert row.acc_diff_ci_low < row.acc_diff < row.acc_diff_ci_high
        assert row.seed_note == ""


def test_one_seed_falls_back_to_the_problem_bootstrap_and_mcnemar(tmp_path: Path) -> None:
    out = run_stats(tmp_path, seeds=(0,), experiments={"in_domain": ()})
    comparisons = read_table(out, "comparisons.tsv")
    row = comparisons[
        (comparisons.task == "algebra") & (comparisons.shots == 0) & (comparisons.comparison == "fomaml-sft")
    ].iloc[0]
    assert (row.n_a_better, row.n_b_better, row.n_tied) == (7, 1, 22)
    assert row.acc_test == "mcnemar"
    assert row.acc_p == pytest.approx(0.0703125)
    assert row.ci_method == "problem-bootstrap"
    assert "1 training seed" in row.seed_note
    assert row.acc_diff == pytest.approx(15 / 30 - 9 / 30)
    # McNemar over 30 problems can reach tiny p; Holm factor = the family size.
    assert row.acc_min_p_holm == pytest.approx(min(1, 2.0**-29 * row.family_size))


def test_across_tasks_macro_average_and_wilcoxon_floor(stats_dir: Path) -> None:
    comparisons = read_table(stats_dir, "comparisons.tsv")
    across = read_table(stats_dir, "across_tasks.tsv")
    rows = across[across.experiment == "in_domain"]
    assert len(rows) == 3 * len(SHOTS)
    for row in rows.itertuples():
        tasks = comparisons[
            (comparisons.experiment == "in_domain")
            & ~comparisons.task.isin(["all", "meta_test"])
            & (comparisons.shots == row.shots)
            & (comparisons.comparison == row.comparison)
        ]
        assert row.n_tasks == len(TASK_SIZES)
        # Every task weighted equally: the mean of the task-level differences.
        assert row.acc_macro_diff == pytest.approx(tasks.acc_diff.mean())
        # Three tasks: exact Wilcoxon cannot go below 0.25, times the Holm factor (9 tests): flagged.
        assert row.acc_wilcoxon_min_p_holm == pytest.approx(1.0)
        assert not row.acc_wilcoxon_can_reach_alpha
    np.testing.assert_allclose(rows.acc_p_holm, multipletests(rows.acc_p, method="holm")[1])


def test_negative_control(stats_dir: Path) -> None:
    control = read_table(stats_dir, "control.tsv")
    assert list(control.shots) == [5, 10]  # 0 shots: nothing drawn, left out
    frame = synthetic_eval_frame()
    main = frame[(frame.experiment == "in_domain") & (frame.init == "fomaml") & (frame.train_seed == 0)]
    other = synthetic_eval_frame(("fomaml",), seed=99, seeds=(0,), experiments={"in_domain": ()}, shot_seed=1)
    for row in control.itertuples():
        a = main[main.shots == row.shots].pivot_table(index="repeat", columns="problem_id", values="correct")
        b = other[other.shots == row.shots].pivot_table(index="repeat", columns="problem_id", values="correct")
        est = inference.crossed_estimate(a.to_numpy(), b.to_numpy(), np.array([c.split("-")[0] for c in a.columns]))
        assert row.acc_diff == pytest.approx(a.to_numpy().mean() - b.to_numpy().mean())
        assert row.acc_diff_se == pytest.approx(est.se)
        assert row.n_draws_main == row.n_draws_control == REPEATS
        assert (str(row.main_shot_seed), str(row.control_shot_seed)) == ("0", "1")
    np.testing.assert_allclose(control.acc_p_holm, multipletests(control.acc_p, method="holm")[1])


def test_control_with_the_main_shot_seed_is_refused(tmp_path: Path) -> None:
    evals = load_eval(write_synthetic_eval(tmp_path / "eval"))
    same = synthetic_eval_frame(("fomaml",), seed=5, seeds=(0,), experiments={"in_domain": ()}, shot_seed=0)
    from fomaml_math.analysis import negative_control
    from fomaml_math.analysis.evaldata import split_experiments

    settings = StatsSettings.from_settings(SETTINGS)
    with pytest.raises(ConfigError, match="not independent"):
        negative_control.control_table(split_experiments(evals), load_eval([_write(tmp_path, same)]), settings)


def _write(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "frame.parquet"
    frame.to_parquet(path, index=False)
    return path


def test_adaptation_effect_against_the_zero_shot_rows(stats_dir: Path) -> None:
    adaptation = read_table(stats_dir, "adaptation.tsv")
    summary = read_table(stats_dir, "adaptation_summary.tsv")
    frame = synthetic_eval_frame()
    run = frame[
        (frame.experiment == "in_domain") & (frame.init == "sft") & (frame.train_seed == 1) & (frame.task == "geometry")
    ]
    zero = run[run.shots == 0].set_index("problem_id")
    after = run[(run.shots == 10) & (run.repeat == 1)].set_index("problem_id")
    row = adaptation[
        (adaptation.experiment == "in_domain")
        & (adaptation.init == "sft")
        & (adaptation.train_seed == 1)
        & (adaptation.task == "geometry")
        & (adaptation.shots == 10)
        & (adaptation.repeat == 1)
    ].iloc[0]
    assert row.nll_change == pytest.approx((after.nll - zero.nll).mean())
    assert row.nll_change_rel == pytest.approx((after.nll - zero.nll).mean() / zero.nll.mean())
    assert row.outputs_changed == pytest.approx((after.generated != zero.generated).mean())
    assert row.support_loss_before == pytest.approx(1.51)
    assert row.support_loss_after == pytest.approx(1.1)
    assert row.weight_change == pytest.approx(1e-3)
    # Per (experiment, init, k): the mean over seeds x tasks x repeats; a flag below 1% of outputs changed.
    per = adaptation[(adaptation.experiment == "in_domain") & (adaptation.init == "sft") & (adaptation.shots == 10)]
    line = summary[(summary.experiment == "in_domain") & (summary.init == "sft") & (summary.shots == 10)].iloc[0]
    assert line.n_runs == len(SEEDS) * len(TASK_SIZES) * REPEATS == len(per)
    assert line.outputs_changed == pytest.approx(per.outputs_changed.mean())
    assert line.low_change == (line.outputs_changed < 0.01)


def test_shots_to_reach_interpolates_the_learning_curve() -> None:
    shots = np.array([0.0, 5.0, 10.0, 25.0])
    curves = np.array([[0.2, 0.3, 0.5, 0.6], [0.7, 0.8, 0.9, 0.9], [0.1, 0.1, 0.2, 0.3]])
    # 0.4 is reached between 5 (0.3) and 10 (0.5): 7.5; the second curve starts above; the third never gets there.
    result = efficiency.shots_to_reach(shots, curves, np.array([0.4, 0.4, 0.4]))
    np.testing.assert_allclose(result[:2], [7.5, 0.0])
    assert np.isnan(result[2])


def test_sample_efficiency_point_estimate(stats_dir: Path) -> None:
    table = read_table(stats_dir, "sample_efficiency.tsv")
    row = table[(table.experiment == "in_domain") & (table.learner == "sft") & (table.reference == "fomaml")].iloc[0]
    frame = synthetic_eval_frame()
    direct = _per_problem(frame[frame.experiment == "in_domain"])
    curve = [direct[(direct.init == "sft") & (direct.shots == k)].correct.mean() for k in SHOTS]
    target = direct[(direct.init == "fomaml") & (direct.shots == 10)].correct.mean()
    assert row.target_accuracy == pytest.approx(target)
    expected = efficiency.shots_to_reach(np.array(SHOTS, dtype=float), np.array([curve]), np.array([target]))[0]
    assert row.shots_to_match == pytest.approx(expected, nan_ok=True)
    assert 0.0 <= row.share_not_reached <= 1.0
    assert row.ci_low <= row.ci_high


def test_shared_and_per_experiment_base_rows_give_the_same_tables(tmp_path: Path) -> None:
    frame = synthetic_eval_frame()
    base = frame[frame.init == "base"]
    per_experiment = pd.concat(
        [frame[frame.init != "base"], *(base.assign(experiment=name) for name in EXPERIMENTS)], ignore_index=True
    )
    settings = StatsSettings.from_settings(SETTINGS)
    shared = stats.compute_tables(load_eval([_write(tmp_path, frame)]), settings)
    copied = stats.compute_tables(load_eval([_write(tmp_path, per_experiment)]), settings)
    for name in ("accuracy.tsv", "comparisons.tsv", "primary.tsv", "per_shot.tsv", "generation.tsv"):
        pd.testing.assert_frame_equal(shared[name], copied[name])
    # Held-out experiment: the base rows take the experiment's roles (geometry held out).
    accuracy = shared["accuracy.tsv"]
    held = accuracy[(accuracy.experiment == "heldout_geometry") & (accuracy.init == "base")]
    assert set(held.loc[held.task == "geometry", "task_role"]) == {"meta_test"}


def test_stage_is_reproducible(tmp_path: Path, stats_dir: Path) -> None:
    again = run_stats(tmp_path, control=write_control(tmp_path / "control"))
    for name in STATS_FILES:
        assert (again / name).read_bytes() == (stats_dir / name).read_bytes()


def test_missing_init_skips_its_comparisons(tmp_path: Path) -> None:
    out = run_stats(tmp_path, inits=("base", "fomaml"))
    comparisons = read_table(out, "comparisons.tsv")
    assert set(comparisons.comparison) == {"fomaml-base"}
    assert set(read_table(out, "accuracy.tsv").init) == {"base", "fomaml"}
    assert set(read_table(out, "per_shot.tsv").comparison) == {"fomaml-base"}
    assert read_table(out, "primary.tsv").empty  # fomaml-sft: SFT is missing


def test_older_files_without_the_new_columns_still_analyse(tmp_path: Path) -> None:
    frame = synthetic_eval_frame(seeds=(0,), experiments={"in_domain": ()})
    legacy = frame.drop(columns=["experiment", "train_seed", "shot_seed", "task_role", "truncated", "weight_change"])
    evals = load_eval([_write(tmp_path, legacy)])
    assert set(evals.experiment) == {"main"}
    assert set(evals.loc[evals.init == "base", "train_seed"]) == {-1}
    tables = stats.compute_tables(evals, StatsSettings.from_settings(SETTINGS))
    assert tables["generation.tsv"].truncation_rate.isna().all()
    assert len(tables["per_shot.tsv"]) == 2 * len(SHOTS)


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    paths = write_synthetic_eval(tmp_path / "eval")
    broken = tmp_path / "broken.parquet"
    pd.read_parquet(paths[0]).drop(columns=["correct"]).to_parquet(broken)
    with pytest.raises(ConfigError, match="missing column"):
        load_eval([broken])
    with pytest.raises(ConfigError, match="two results"):
        load_eval([paths[0], paths[0]])
    with pytest.raises(ConfigError, match="not found"):
        load_eval([tmp_path / "absent.parquet"])
    role = tmp_path / "role.parquet"
    pd.read_parquet(paths[0]).assign(task_role="test").to_parquet(role)
    with pytest.raises(ConfigError, match="task_role"):
        load_eval([role])


def _primary_matrices(evals: pd.DataFrame, name: str, held_out: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """By hand: FOMAML's and SFT's seeds × problems matrices of the primary score (repeats, then k > 0 averaged, so
    every (init, seed, problem) weighs each k equally) on the experiment's primary pool, and each column's task."""
    rows = evals[(evals.experiment == name) & (evals.shots > 0) & evals.init.isin(["fomaml", "sft"])]
    if held_out:
        rows = rows[rows.task.isin(held_out)]
    cell = rows.groupby(["init", "train_seed", "task", "problem_id", "shots"])["correct"].mean()
    cell = cell.groupby(["init", "train_seed", "task", "problem_id"]).mean()
    matrices = {i: cell.loc[i].unstack(["task", "problem_id"]).sort_index(axis=1) for i in ("fomaml", "sft")}
    strata = matrices["fomaml"].columns.get_level_values("task").to_numpy()
    return matrices["fomaml"].to_numpy(), matrices["sft"].to_numpy(), strata


def test_primary_contrast_averages_over_k_and_adjusts_over_experiments(stats_dir: Path, tmp_path: Path) -> None:
    """primary.tsv: one row per experiment, the seed-aware estimate on the mean over k > 0 (by hand from the
    per-problem rows), Holm over the experiments, verdicts and planned power at alpha / m."""
    primary = read_table(stats_dir, "primary.tsv").set_index("experiment")
    assert sorted(primary.index) == sorted(EXPERIMENTS)
    assert (primary["contrast"] == "fomaml-sft").all() and (primary["family_size"] == len(EXPERIMENTS)).all()
    evals = load_eval(write_synthetic_eval(tmp_path / "eval"))
    for name, held_out in EXPERIMENTS.items():
        fomaml, sft, strata = _primary_matrices(evals, name, held_out)
        est = inference.crossed_estimate(fomaml, sft, strata)
        row = primary.loc[name]
        assert row["diff"] == pytest.approx(est.estimate)
        assert row["se"] == pytest.approx(est.se)
        assert row["df"] == pytest.approx(est.df)
        assert row["shots"] == ",".join(str(k) for k in SHOTS if k > 0)
        assert -1.0 <= row["ci_low"] <= row["diff"] <= row["ci_high"] <= 1.0
        assert row["mde"] == pytest.approx(
            inference.minimum_detectable_effect(est.se, est.df, 0.05 / len(EXPERIMENTS)), rel=1e-9
        )
    np.testing.assert_allclose(primary["p_holm"], multipletests(primary["p"], method="holm")[1])
    for row in primary.itertuples():
        expected = (
            ("better" if row.diff > 0 else "worse")
            if row.p_holm < 0.05
            else ("equivalent" if row.tost_p_holm < 0.05 else "inconclusive")
        )
        assert row.verdict == expected


def test_planted_table_is_computed_on_the_studys_outcomes(stats_dir: Path) -> None:
    """planted.tsv: one row per experiment with a complete primary design, rates in [0, 1] with their MC error."""
    planted = read_table(stats_dir, "planted.tsv")
    assert sorted(planted.experiment) == sorted(EXPERIMENTS)
    assert (planted.replicates == SETTINGS["stats"]["planted"]["replicates"]).all()
    np.testing.assert_allclose(planted.alpha, 0.05 / len(EXPERIMENTS))
    for row in planted.itertuples():
        assert 0.0 <= row.false_positive_rate <= 1.0 and 0.0 <= row.power <= 1.0
        n = row.replicates
        assert row.false_positive_rate_mc_se == pytest.approx(math.sqrt(row.alpha * (1 - row.alpha) / n))
        smoothed = (round(row.power * n) + 0.5) / (n + 1)
        assert row.power_mc_se == pytest.approx(math.sqrt(smoothed * (1 - smoothed) / n))
        assert row.n_seeds == len(SEEDS) and row.n_shot_counts == len([k for k in SHOTS if k > 0])
        assert "crossed_estimate" in row.estimator and "fewer than 475" in row.note  # 40 replicates here


def test_primary_permutation_p_and_seed_sd_by_hand(stats_dir: Path, tmp_path: Path) -> None:
    """primary.tsv's perm_p: the share of the C(6, 3) = 20 whole-run relabelings whose |t| reaches the observed
    one (floor 2/20: a relabeling and its mirror); the seed SD pooled within arms with its chi-square interval;
    3 seeds per arm is below the default 5 for a confirmatory verdict."""
    primary = read_table(stats_dir, "primary.tsv").set_index("experiment")
    evals = load_eval(write_synthetic_eval(tmp_path / "eval"))
    for name, held_out in EXPERIMENTS.items():
        fomaml, sft, strata = _primary_matrices(evals, name, held_out)
        runs = np.concatenate([fomaml, sft])

        def t_of(chosen: tuple[int, ...], runs: np.ndarray = runs, strata: np.ndarray = strata) -> float:
            rest = [i for i in range(6) if i not in chosen]
            est = inference.crossed_estimate(runs[list(chosen)], runs[rest], strata)
            return abs(est.estimate) / est.se

        observed = t_of((0, 1, 2))
        hits = [t_of(c) >= observed * (1 - 1e-9) for c in itertools.combinations(range(6), 3)]
        row = primary.loc[name]
        assert row["perm_p"] == pytest.approx(np.mean(hits)) and row["perm_p"] >= 0.1
        assert row["perm_p_floor"] == pytest.approx(0.1) and row["perm_relabelings"] == 20
        means = runs.mean(axis=1)
        squares = ((means[:3] - means[:3].mean()) ** 2).sum() + ((means[3:] - means[3:].mean()) ** 2).sum()
        assert row["seed_sd"] == pytest.approx(math.sqrt(squares / 4))
        assert row["seed_sd_ci_low"] == pytest.approx(math.sqrt(squares / scipy_stats.chi2.ppf(0.975, 4)))
        assert row["seed_sd_ci_low"] < row["seed_sd"] < row["seed_sd_ci_high"]
        assert not row["confirmatory"]


def metaloop_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """FOMAML's k > 0 rows evaluated again with its meta-training inner loop: the same problems and shots (and
    shot seed), other outcomes (the secondary row, as evaluate --meta-inner-loop writes it)."""
    rows = frame[(frame["init"] == "fomaml") & (frame["shots"] > 0)].copy()
    rows["correct"] = np.random.default_rng(7).random(len(rows)) < 0.4
    return rows.assign(adapt_protocol="meta_inner_loop", adapt_optimizer="adam", adapt_lr=3e-3, adapt_steps=2)


def test_the_metaloop_row_is_secondary_and_changes_no_main_number(tmp_path: Path) -> None:
    """With the secondary row: its own init (k > 0), a secondary comparison against FOMAML per k; the primary
    contrast, the per-shot family, the controls and the main inits' accuracy rows are exactly what they were."""
    from fomaml_math.evaluation.rows import METALOOP

    frame = synthetic_eval_frame()
    settings = StatsSettings.from_settings(SETTINGS)
    control = load_eval(write_control(tmp_path / "control"), "--control-eval")
    without = stats.compute_tables(load_eval([_write(tmp_path, frame)]), settings, control)
    extra = metaloop_rows(frame)
    (tmp_path / "with").mkdir()
    evals = load_eval([_write(tmp_path / "with", pd.concat([frame, extra], ignore_index=True))])
    assert set(evals.loc[evals.adapt_protocol == "meta_inner_loop", "init"]) == {METALOOP}
    with_row = stats.compute_tables(evals, settings, control)
    unchanged = ("primary.tsv", "per_shot.tsv", "planted.tsv", "control.tsv", "rule_adoption.tsv",
                 "positive_control.tsv", "across_tasks.tsv", "sample_efficiency.tsv")  # fmt: skip
    for name in unchanged:
        pd.testing.assert_frame_equal(with_row[name], without[name], obj=name)
    accuracy = with_row["accuracy.tsv"]
    main = accuracy[accuracy.init != METALOOP].reset_index(drop=True)
    pd.testing.assert_frame_equal(main, without["accuracy.tsv"])
    assert set(accuracy.loc[accuracy.init == METALOOP, "shots"]) == {k for k in SHOTS if k > 0}
    pooled_seeds = accuracy[(accuracy.init == METALOOP) & (accuracy.train_seed == "all")]
    assert set(pooled_seeds.ci_method) == {"seed-t"} and set(pooled_seeds.n_seeds) == {len(SEEDS)}  # seed-aware
    comparisons = with_row["comparisons.tsv"]
    row = comparisons[comparisons.comparison == f"{METALOOP}-fomaml"]
    assert set(row.family) == {"secondary"} and set(row.shots) == {k for k in SHOTS if k > 0}
    # Paired problem by problem: the pooled difference is the mean of the per-problem seed/repeat-averaged ones.
    pooled = row[(row.experiment == "in_domain") & (row.task == "all") & (row.shots == 5)].iloc[0]
    both = pd.concat([frame, extra.assign(init=METALOOP)])
    cells = _per_problem(both[(both.experiment == "in_domain") & (both.shots == 5)])
    means = cells.set_index(["init", "task", "problem_id"]).correct.unstack("init")
    assert pooled.acc_diff == pytest.approx(float((means[METALOOP] - means["fomaml"]).mean()))
    assert not without["comparisons.tsv"].comparison.str.contains(METALOOP).any()


def test_seed_sd_interval_is_never_a_point_and_follows_the_chi_square_by_hand() -> None:
    """Pooled within-arm SD of the runs' means with its chi-square interval; runs that all scored the same get the
    upper bound of one run one answer off (1 / problems), not the point [0, 0]."""
    from fomaml_math.analysis.primary import Arms, seed_sd

    a = np.array([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # run means 0.75, 0.5, 1.0
    b = np.array([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # 0.25, 0.5, 0.0
    strata = np.zeros(4)
    squares = sum((m - 0.75) ** 2 for m in (0.75, 0.5, 1.0)) + sum((m - 0.25) ** 2 for m in (0.25, 0.5, 0.0))
    sd, low, high = seed_sd([Arms(a, b, strata)], 0.95)
    assert sd == pytest.approx(math.sqrt(squares / 4))
    assert low == pytest.approx(math.sqrt(squares / scipy_stats.chi2.ppf(0.975, 4)))
    assert high == pytest.approx(math.sqrt(squares / scipy_stats.chi2.ppf(0.025, 4)))
    same = np.ones((3, 4))
    sd, low, high = seed_sd([Arms(same, same * 0, strata)], 0.95)
    assert sd == 0 and low == 0
    assert high == pytest.approx(math.sqrt((1 / 4) ** 2 / 2 / scipy_stats.chi2.ppf(0.025, 4)))


def test_a_held_out_only_experiment_has_no_all_pool_beside_its_held_out_pool(tmp_path: Path) -> None:
    """``in_domain_rows: false``: every evaluated task is held out, so ``all`` would be the ``meta_test`` pool again
    (the same numbers twice, one more secondary test each); it is left out there and kept where tasks are mixed."""
    experiments = {"lean": tuple(TASK_SIZES), "heldout_geometry": ("geometry",)}
    out = run_stats(tmp_path, experiments=experiments)
    for name in ("accuracy.tsv", "comparisons.tsv"):
        table = read_table(out, name)
        lean, mixed = (set(table.loc[table["experiment"] == e, "task"]) for e in experiments)
        assert lean == {*TASK_SIZES, "meta_test"}, name
        assert mixed == {*TASK_SIZES, "meta_test", "all"}, name
    positive = read_table(out, "positive_control.tsv")
    assert sorted(positive.loc[positive["experiment"] == "lean", "pool"].unique()) == ["meta_test"]
    assert sorted(positive.loc[positive["experiment"] == "heldout_geometry", "pool"].unique()) == ["all", "meta_test"]
    comparisons = read_table(out, "comparisons.tsv")
    lean = comparisons[comparisons["experiment"] == "lean"]
    # the secondary family holds each task's comparisons and the pool's non-primary ones, nothing twice
    keys = lean[["task", "shots", "comparison"]].astype(str).agg("/".join, axis=1)
    assert keys.is_unique
