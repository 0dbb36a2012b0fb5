"""positive_control_table against a hand computation (fast; the real run is in test_positive_control.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from test_stats import SETTINGS as STATS_SETTINGS

from fomaml_math.analysis.positive_control import positive_control_table
from fomaml_math.analysis.tables import StatsSettings

SETTINGS = StatsSettings.from_settings(STATS_SETTINGS)


def rows(init: str, seed: int, shots: int, correct: list[int], repeat: int = 0) -> list[dict]:
    return [
        {"experiment": "x", "init": init, "train_seed": seed, "task": "t", "task_role": "meta_test", "shots": shots,
         "repeat": repeat, "problem_id": f"p{i}", "correct": bool(c), "nll": 1.0, "shot_seed": 0}
        for i, c in enumerate(correct)
    ]  # fmt: skip


def test_one_cluster_is_the_paired_t_test_over_problems() -> None:
    zero, k_shot = [0, 0, 1, 0, 0], [1, 1, 1, 0, 1]
    # two repeats at k = 4: per problem the mean (problem 4: 1 and 0 -> 0.5)
    evals = pd.DataFrame(
        rows("base", -1, 0, zero) + rows("base", -1, 4, k_shot) + rows("base", -1, 4, [1, 1, 1, 0, 0], 1)
    )
    table = positive_control_table(evals, SETTINGS)
    assert table["pool"].tolist() == ["meta_test"]  # every task held out: "all" would be the same pool again
    row = table.iloc[0]
    differences = np.array([1, 1, 0, 0, 0.5])  # by hand
    reference = stats.ttest_1samp(differences, 0.0)
    assert np.isclose(row["gain"], differences.mean()) and np.isclose(row["p"], reference.pvalue)
    assert (row["acc_0"], row["acc_k"], row["shots"], row["n_seeds"]) == (0.2, 0.7, 4, 1)
    assert np.isclose(row["p_holm"], reference.pvalue)  # one row: nothing to adjust (no duplicate pool doubling it)
    assert not row["detected"]  # t = 2.24 on 4 df, p ≈ 0.09: not significant with five problems


def test_pairing_is_within_each_training_seed() -> None:
    """Two seeds with different 0-shot levels but the same gain: the seed part of the variance is zero."""
    evals = pd.DataFrame(
        rows("sft", 0, 0, [0, 0, 0, 0]) + rows("sft", 0, 8, [1, 1, 0, 0])
        + rows("sft", 1, 0, [1, 1, 0, 0]) + rows("sft", 1, 8, [1, 1, 1, 1])
    )  # fmt: skip
    row = positive_control_table(evals, SETTINGS).iloc[0]
    assert np.isclose(row["gain"], 0.5) and row["n_seeds"] == 2
    assert np.isclose(row["acc_0"], 0.25) and np.isclose(row["acc_k"], 0.75)
