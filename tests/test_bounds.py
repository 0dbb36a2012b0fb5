"""Intervals where nothing varied (analysis.bounds) against published values, and the stats tables on a study with
cells at 0: no interval is a single point where n > 0, and the simultaneous intervals agree with Holm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_stats import SETTINGS, synthetic_eval_frame, write_eval_frame

from fomaml_math.analysis import bounds, stats
from fomaml_math.analysis.tables import read_table


def test_clopper_pearson_at_the_bounds_matches_the_closed_form() -> None:
    # At 0 of n the exact upper bound solves (1 − u)^n = α/2; at n of n the lower bound solves l^n = α/2.
    low, high = bounds.clopper_pearson(0, 90, 0.95)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 90), rel=1e-12)
    assert high == pytest.approx(0.0402, abs=5e-5)  # the "exact upper bound is 4.0%"
    low, high = bounds.clopper_pearson(6, 6, 0.95)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 6), rel=1e-12)


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [(81, 263, (0.2553, 0.3662)), (0, 10, (0.0, 0.2775)), (15, 148, (0.0624, 0.1605))],
)
def test_wilson_matches_newcombe_1998a(successes: int, n: int, expected: tuple[float, float]) -> None:
    """Newcombe (1998a), Statist. Med. 17:857-872, worked examples, method 3 (score, no continuity correction)."""
    low, high = bounds.wilson(successes / n, n, 0.95)
    assert (low, high) == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize(
    ("a", "n_a", "b", "n_b", "expected"),
    [
        (56, 70, 48, 80, (0.0524, 0.3339)),
        (9, 10, 3, 10, (0.1705, 0.8090)),
        (5, 56, 0, 29, (-0.0381, 0.1926)),
        (0, 10, 0, 20, (-0.1611, 0.2775)),
        (0, 10, 0, 10, (-0.2775, 0.2775)),
        (10, 10, 0, 20, (0.6791, 1.0)),
    ],
)
def test_newcombe_difference_matches_newcombe_1998b(a: int, n_a: int, b: int, n_b: int, expected) -> None:
    """Newcombe (1998b), Statist. Med. 17:873-890, worked examples, method 10 (hybrid score)."""
    assert bounds.newcombe_difference(a / n_a, n_a, b / n_b, n_b, 0.95) == pytest.approx(expected, abs=5e-5)


def test_a_point_is_replaced_and_a_real_interval_is_kept() -> None:
    assert bounds.accuracy_interval(0.0, 90, 0.0, 0.0, "seed-t", 0.95)[2] == bounds.CLOPPER_PEARSON
    assert bounds.accuracy_interval(1.0, 6, 1.0, 1.0, "problem-bootstrap", 0.95)[2] == bounds.CLOPPER_PEARSON
    low, high, method = bounds.accuracy_interval(0.5, 40, 0.5, 0.5, "seed-t", 0.95)  # constant inside (0, 1)
    assert method == bounds.WILSON and low < 0.5 < high
    assert bounds.accuracy_interval(0.3, 40, 0.2, 0.4, "seed-t", 0.95) == (0.2, 0.4, "seed-t")
    assert bounds.accuracy_interval(0.0, 0, math.nan, math.nan, "seed-t", 0.95)[2] == "seed-t"  # no problems
    low, high, method = bounds.difference_interval(0.0, 0.0, 6, 0.0, 0.0, "seed-t", 0.95)
    assert (
        method == bounds.NEWCOMBE
        and low == pytest.approx(-high)
        and high == pytest.approx(bounds.wilson(0, 6, 0.95)[1])
    )
    assert bounds.difference_interval(0.4, 0.3, 50, 0.0, 0.2, "seed-t", 0.95) == (0.0, 0.2, "seed-t")


def test_simultaneous_interval_excludes_zero_exactly_when_bonferroni_rejects() -> None:
    """At level 1 − (1 − ci)/m the t-interval excludes 0 iff m · p < 1 − ci (its own p; truncation to [−1, 1]
    never moves 0), so with ci = 1 − α it never contradicts Holm, whose first step is Bonferroni's."""
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(3)
    for _ in range(200):
        estimate, se, df, m = (
            rng.normal(0, 0.05),
            rng.uniform(0.005, 0.05),
            rng.uniform(2, 200),
            int(rng.integers(1, 9)),
        )
        low, high = bounds.simultaneous_difference(estimate, se, df, 0.4, 0.4, 90, "seed-t", 0.95, m)
        p = 2 * scipy_stats.t.sf(abs(estimate) / se, df)
        assert (low > 0 or high < 0) == (m * p < 0.05)
        assert bounds.simultaneous_level(0.95, m) == pytest.approx(1 - 0.05 / m)
    assert math.isnan(bounds.simultaneous_difference(0.0, 0.0, 2.0, 0.0, 0.0, 90, "seed-t", 0.95, 3)[0])
    newcombe = bounds.simultaneous_difference(0.0, 0.0, math.nan, 0.0, 0.0, 90, bounds.NEWCOMBE, 0.95, 4)
    assert newcombe == pytest.approx(bounds.newcombe_difference(0.0, 90, 0.0, 90, 1 - 0.05 / 4))


# --- the stats tables on a study with cells at 0 ---------------------------------------------------------


def _study_with_empty_cells(directory: Path) -> list[Path]:
    """The synthetic study with every init wrong on geometry at 0 shots (a cell at 0 and a 0 − 0 difference),
    and FOMAML right on every number_theory problem at 10 shots (a cell at 1)."""
    frame = synthetic_eval_frame(experiments={"in_domain": ()})
    frame.loc[(frame["task"] == "geometry") & (frame["shots"] == 0), "correct"] = False
    frame.loc[(frame["task"] == "number_theory") & (frame["shots"] == 10) & (frame["init"] == "fomaml"), "correct"] = (
        True
    )
    return write_eval_frame(directory, frame)


@pytest.fixture(scope="module")
def boundary_stats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bounds")
    paths = _study_with_empty_cells(tmp / "eval")
    out = tmp / "stats"
    assert stats.main(["--settings", json.dumps(SETTINGS), "--eval", *map(str, paths), "--output-dir", str(out)]) == 0
    return out


INTERVALS = {
    "accuracy.tsv": [("accuracy_ci_low", "accuracy_ci_high", "n_problems")],
    "comparisons.tsv": [
        ("acc_diff_ci_low", "acc_diff_ci_high", "n_problems"),
        ("acc_diff_sci_low", "acc_diff_sci_high", "n_problems"),
    ],
    "across_tasks.tsv": [("acc_macro_ci_low", "acc_macro_ci_high", "n_tasks")],
    "positive_control.tsv": [("gain_ci_low", "gain_ci_high", "n_problems")],
}


def test_no_accuracy_interval_is_a_point(boundary_stats: Path) -> None:
    for name, columns in INTERVALS.items():
        table = read_table(boundary_stats, name)
        for low, high, n in columns:
            rows = table[(table[n] > 0) & table[low].notna()]
            assert len(rows), (name, low)
            points = rows[rows[low] == rows[high]]
            assert points.empty, f"{name}: {low}/{high} is a point in {len(points)} row(s)"


def test_cells_at_zero_and_one_get_clopper_pearson_over_the_problems(boundary_stats: Path) -> None:
    accuracy = read_table(boundary_stats, "accuracy.tsv")
    pooled = accuracy[accuracy["train_seed"] == "all"]
    zero = pooled[(pooled["task"] == "geometry") & (pooled["shots"] == 0)]
    assert len(zero) == 3 and (zero["accuracy"] == 0).all() and (zero["ci_method"] == bounds.CLOPPER_PEARSON).all()
    n = 24  # geometry's problems: the n, not seeds × problems × repeats
    assert (zero["n_problems"] == n).all()
    assert zero["accuracy_ci_high"].to_numpy() == pytest.approx(1 - 0.025 ** (1 / n))
    one = pooled[(pooled["task"] == "number_theory") & (pooled["shots"] == 10) & (pooled["init"] == "fomaml")]
    assert one["accuracy"].iloc[0] == pytest.approx(1.0) and one["ci_method"].iloc[0] == bounds.CLOPPER_PEARSON
    assert one["accuracy_ci_low"].iloc[0] == pytest.approx(0.025 ** (1 / 20))
    varied = pooled[pooled["accuracy"].between(0.01, 0.99)]
    assert set(varied["ci_method"]) == {"seed-t", "problem-bootstrap"}  # every other cell keeps its interval


def test_a_difference_of_empty_cells_gets_newcombe(boundary_stats: Path) -> None:
    comparisons = read_table(boundary_stats, "comparisons.tsv")
    rows = comparisons[(comparisons["task"] == "geometry") & (comparisons["shots"] == 0)]
    assert len(rows) and (rows["ci_method"] == bounds.NEWCOMBE).all()
    wilson_high = bounds.wilson(0.0, 24, 0.95)[1]
    assert rows["acc_diff_ci_low"].to_numpy() == pytest.approx(-wilson_high)
    assert rows["acc_diff_ci_high"].to_numpy() == pytest.approx(wilson_high)
    assert rows["acc_p"].isna().all() and (rows["verdict"] == "inconclusive").all()  # no test where nothing varied


def test_simultaneous_intervals_never_contradict_holm(boundary_stats: Path) -> None:
    comparisons = read_table(boundary_stats, "comparisons.tsv")
    tested = comparisons[comparisons["acc_test"] == "t"].dropna(subset=["acc_p"])
    excludes = (tested["acc_diff_sci_low"] > 0) | (tested["acc_diff_sci_high"] < 0)
    assert excludes.any()  # the check has rows to bite on
    assert (tested.loc[excludes, "acc_p_holm"] < SETTINGS["stats"]["alpha"]).all()
    # Wider than the unadjusted interval wherever the family has more than one test.
    wide = tested[tested["family_size"] > 1]
    assert (
        wide["acc_diff_sci_high"] - wide["acc_diff_sci_low"] > wide["acc_diff_ci_high"] - wide["acc_diff_ci_low"]
    ).all()
    assert tested["acc_diff_sci_level"].to_numpy() == pytest.approx(1 - 0.05 / tested["family_size"].to_numpy())


def test_tables_keep_their_columns(boundary_stats: Path) -> None:
    comparisons = pd.read_csv(boundary_stats / "comparisons.tsv", sep="\t", nrows=1)
    assert {"acc_diff_sci_level", "acc_diff_sci_low", "acc_diff_sci_high"} <= set(comparisons.columns)


# --- sample efficiency claims nothing below the first evaluated k > 0 ---------------------------------------


def test_shots_to_reach_never_interpolates_below_the_first_evaluated_k() -> None:
    from fomaml_math.analysis import efficiency

    shots = np.array([0.0, 5.0, 20.0])
    curves = np.array([[0.2, 0.6, 0.7], [0.2, 0.3, 0.5], [0.45, 0.5, 0.6]])
    # Curve 1 crosses 0.4 between 0 and 5: the claim is "by k = 5", not 2.5. Curve 2 between 5 and 20 (> 0):
    # interpolated, 5 + (0.4 − 0.3)/(0.5 − 0.3) · 15 = 12.5. Curve 3 is there at 0 shots.
    np.testing.assert_allclose(efficiency.shots_to_reach(shots, curves, np.full(3, 0.4)), [5.0, 12.5, 0.0])


def test_the_efficiency_table_names_the_evaluated_k(boundary_stats: Path) -> None:
    table = read_table(boundary_stats, "sample_efficiency.tsv")
    assert len(table)
    evaluated = {0.0, 5.0, 10.0}
    for row in table.itertuples(index=False):
        if math.isnan(row.shots_to_match):
            assert math.isnan(row.shots_reached)
            continue
        assert row.shots_reached in evaluated and (row.shots_to_match == 0 or row.shots_to_match >= 5)
        assert bool(row.interpolated) == (row.shots_to_match not in evaluated)
        if row.interpolated:
            assert 0 < row.shots_before < row.shots_to_match < row.shots_reached
        assert row.ci_low == 0 or row.ci_low >= 5  # nor does its interval


# --- a study where both primary arms answer nothing right: the Answer prints no point and no "n/a%" -----------


def test_a_primary_contrast_of_empty_arms_gets_newcombe_and_the_answer_no_point(tmp_path: Path) -> None:
    from fomaml_math.analysis import summary

    frame = synthetic_eval_frame(experiments={"in_domain": ()})
    frame.loc[frame["init"].isin(["sft", "fomaml"]) & (frame["shots"] > 0), "correct"] = False
    paths = []
    for (init, seed, shots), group in frame.groupby(["init", "train_seed", "shots"]):
        path = tmp_path / "eval" / init / f"seed-{seed}" / f"shots-{shots}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        group.to_parquet(path, index=False)
        paths.append(path)
    out = tmp_path / "stats"
    assert stats.main(["--settings", json.dumps(SETTINGS), "--eval", *map(str, paths), "--output-dir", str(out)]) == 0
    primary = read_table(out, "primary.tsv").iloc[0]
    n = int(primary.n_problems)
    assert n == 74 and primary["diff"] == 0 and math.isnan(primary.p)  # every problem of the 3 tasks, no test
    wilson_high = bounds.wilson(0.0, n, 0.95)[1]
    assert (primary.ci_low, primary.ci_high) == pytest.approx((-wilson_high, wilson_high))
    argv = ["--settings", json.dumps(SETTINGS), "--stats-dir", str(out), "--output", str(tmp_path / "summary.md"),
            "--per-task-output", str(tmp_path / "per_task.md")]  # fmt: skip
    assert summary.main(argv) == 0
    text = (tmp_path / "summary.md").read_text()
    answer = text[text.index("## Answer") : text.index("## Per-shot")]
    assert f"+0.0 [{-100 * wilson_high:+.1f}, {100 * wilson_high:+.1f}]" in answer
    assert "+0.0 [+0.0, +0.0]" not in text and "n/a%" not in text
    assert "not computable (nothing varied: no test)" in answer  # the power of a test that does not exist


def test_widen_point_differences_leaves_real_intervals() -> None:
    table = pd.DataFrame(
        {"acc_a": [0.0, 0.4], "acc_b": [0.0, 0.3], "n_problems": [90, 90], "ci_low": [0.0, 0.02], "ci_high": [0.0, 0.2]}
    )
    out = bounds.widen_point_differences(table, 0.95)
    assert out.loc[1, ["ci_low", "ci_high"]].tolist() == [0.02, 0.2]
    assert out.loc[0, ["ci_low", "ci_high"]].tolist() == pytest.approx(
        list(bounds.newcombe_difference(0, 90, 0, 90, 0.95))
    )
    assert table.loc[0, "ci_high"] == 0.0  # the input is not modified
