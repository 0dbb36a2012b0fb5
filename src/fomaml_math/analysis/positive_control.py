"""The positive control: does k-shot adaptation raise an initialisation's accuracy above its own 0-shot accuracy?

On the offline demo (docs/demo.md) the shots carry information that no initialisation has on the held-out tasks
(each task's hidden units digit), so the pipeline must find a gain there; a study pipeline that cannot recover a
known effect cannot be trusted to report a missing one. Per (experiment, init, pool) the gain is the accuracy at
the largest k minus the 0-shot accuracy, on the same test problems. It is paired within each training seed (the
same trained model, adapted or not): per seed and problem ``d[s, i] = ȳ_k[s, i] − ȳ_0[s, i]`` (repeats averaged),
and :func:`fomaml_math.analysis.inference.crossed_estimate` of ``d`` gives its seed-aware standard error (with one
cluster, e.g. the base model, the paired t-test over problems). Holm over the table's rows (one family).

Input: the evaluation rows (:func:`fomaml_math.analysis.evaldata.load_eval`); the stats stage writes the table as
``positive_control.tsv`` and the summary reports it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fomaml_math.analysis.bounds import difference_interval
from fomaml_math.analysis.evaldata import per_problem, pool_tasks, pooled_groups, split_experiments, task_roles
from fomaml_math.analysis.inference import DIFFERENCE_RANGE, crossed_estimate, holm_adjust, t_interval, t_test_p
from fomaml_math.analysis.tables import POSITIVE_CONTROL_COLUMNS, StatsSettings


def _paired_differences(cells: pd.DataFrame, shots: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Seeds × problems matrix of (k-shot − 0-shot) accuracy, the problems' tasks, and the two mean accuracies."""
    wide = cells.pivot_table(index=["task", "problem_id"], columns=["train_seed", "shots"], values="correct")
    seeds = sorted({seed for seed, _ in wide.columns})
    complete = [s for s in seeds if (s, 0) in wide.columns and (s, shots) in wide.columns]
    k_shot = np.vstack([wide[(s, shots)].to_numpy() for s in complete])
    zero = np.vstack([wide[(s, 0)].to_numpy() for s in complete])
    strata = wide.index.get_level_values("task").to_numpy()
    return k_shot - zero, strata, float(np.nanmean(zero)), float(np.nanmean(k_shot))


def positive_control_table(evals: pd.DataFrame, settings: StatsSettings) -> pd.DataFrame:
    """One row per (experiment, init, pool ∈ {meta_test if any, all}) at the experiment's largest shot count."""
    rows = []
    for experiment, experiment_rows in split_experiments(evals).items():
        roles = task_roles(experiment_rows)
        frame = per_problem(experiment_rows)
        largest = int(frame["shots"].max())
        if largest == 0 or 0 not in set(frame["shots"]):
            continue
        for init, by_init in frame.groupby("init", sort=False):
            for pool in pooled_groups(roles):
                chosen = by_init[by_init["task"].isin(pool_tasks(pool, roles))]
                chosen = chosen[chosen["shots"].isin([0, largest])]
                if chosen.empty:
                    continue
                diffs, strata, acc_0, acc_k = _paired_differences(chosen, largest)
                estimate = crossed_estimate(diffs, None, strata)
                low, high = t_interval(estimate, settings.ci_level, DIFFERENCE_RANGE)
                # Nothing varied (e.g. all 0 at 0 and at k shots): Newcombe's interval, never a point.
                low, high, _ = difference_interval(acc_k, acc_0, estimate.n_problems, low, high, "", settings.ci_level)
                rows.append(
                    {
                        "experiment": experiment,
                        "init": init,
                        "pool": pool,
                        "shots": largest,
                        "n_seeds": diffs.shape[0],
                        "n_problems": estimate.n_problems,
                        "acc_0": acc_0,
                        "acc_k": acc_k,
                        "gain": estimate.estimate,
                        "gain_se": estimate.se,
                        "gain_df": estimate.df,
                        "gain_ci_low": low,
                        "gain_ci_high": high,
                        "p": t_test_p(estimate),
                    }
                )
    table = pd.DataFrame(rows, columns=[c for c in POSITIVE_CONTROL_COLUMNS if c not in ("p_holm", "detected")])
    table["p_holm"] = holm_adjust(table["p"].to_numpy()) if len(table) else []
    table["detected"] = (table["gain"] > 0) & (table["p_holm"] < settings.alpha)
    return table[list(POSITIVE_CONTROL_COLUMNS)]
