"""The negative control (A/A): one trained model evaluated twice, under two independent shot-draw seeds.

Nothing differs between the two sides but the draw of the k shots, so the null holds; the same machinery
(``inference.crossed_estimate``) compares them, with the shot draws (repeats) as the clusters: the only
variance that separates the sides is the draw-to-draw variance of adaptation, which conditioning on one set of
draws (the main comparisons) cannot see. 0-shot rows are left out (no shots, nothing drawn: identical by
construction).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fomaml_math.analysis import inference
from fomaml_math.analysis.evaldata import build_design, primary_pool, task_roles
from fomaml_math.analysis.tables import CONTROL_COLUMNS, POOLED, StatsSettings
from fomaml_math.errors import ConfigError


def _one(control: pd.DataFrame, column: str) -> object:
    values = sorted(control[column].unique())
    if len(values) != 1:
        raise ConfigError(f"--control-eval: expected one {column}, got {', '.join(map(str, values))}")
    return values[0]


def control_table(
    experiments: dict[str, pd.DataFrame], control: pd.DataFrame | None, settings: StatsSettings
) -> pd.DataFrame:
    """One row per shot count k > 0 of the control, Holm-adjusted over its shot counts (its own family)."""
    if control is None or control.empty:
        return pd.DataFrame(columns=CONTROL_COLUMNS)
    experiment, init, seed = (_one(control, c) for c in ("experiment", "init", "train_seed"))
    if experiment not in experiments:
        raise ConfigError(f"--control-eval: experiment {experiment} has no main evaluation (--eval)")
    frame = experiments[experiment]
    main = frame[(frame["init"] == init) & (frame["train_seed"] == seed)]
    if main.empty:
        raise ConfigError(f"--control-eval: no main evaluation of init {init}, train_seed {seed} in {experiment}")
    clash = sorted(set(main["shot_seed"]) & set(control["shot_seed"]))
    if clash:
        raise ConfigError(f"--control-eval: shot_seed {clash[0]} is also the main evaluation's: not independent draws")
    roles = task_roles(frame)
    pool = primary_pool(roles)
    pool_tasks = {t for t, r in roles.items() if pool == POOLED or r == "meta_test"}
    rows = []
    for shots in sorted(k for k in control["shots"].unique() if k > 0):
        sides = {
            "main": main[(main["shots"] == shots) & main["task"].isin(pool_tasks)],
            "control": control[(control["shots"] == shots) & control["task"].isin(pool_tasks)],
        }
        if sides["main"].empty:
            raise ConfigError(f"--control-eval: the main evaluation has no {shots}-shot rows of {init} in {experiment}")
        cells = pd.concat([s.assign(init=name) for name, s in sides.items()], ignore_index=True)
        cells = cells.groupby(["init", "repeat", "task", "problem_id"], as_index=False)[["correct", "nll"]].mean()
        design = build_design(cells, cluster="repeat")
        est = inference.crossed_estimate(design.correct["main"], design.correct["control"], design.strata)
        low, high = inference.t_interval(est, settings.ci_level, inference.DIFFERENCE_RANGE)
        with np.errstate(invalid="ignore"):
            acc_main = float(np.nanmean(design.correct["main"]))
            acc_control = float(np.nanmean(design.correct["control"]))
        single = min(est.n_clusters_a, est.n_clusters_b) < 2
        rows.append(
            {
                "experiment": experiment,
                "init": init,
                "train_seed": int(seed),
                "pool": pool,
                "shots": int(shots),
                "main_shot_seed": ",".join(map(str, sorted(sides["main"]["shot_seed"].unique()))),
                "control_shot_seed": ",".join(map(str, sorted(sides["control"]["shot_seed"].unique()))),
                "n_problems": est.n_problems,
                "n_draws_main": est.n_clusters_a,
                "n_draws_control": est.n_clusters_b,
                "acc_main": acc_main,
                "acc_control": acc_control,
                "acc_diff": est.estimate,
                "acc_diff_se": est.se,
                "acc_diff_df": est.df,
                "acc_diff_ci_low": low,
                "acc_diff_ci_high": high,
                "acc_p": inference.t_test_p(est) if est.n_problems else math.nan,
                "tost_p": inference.tost(est, settings.margin)[2],
                "note": "one draw per side: draw-to-draw variance not estimable" if single else "",
            }
        )
    table = pd.DataFrame(
        rows, columns=[c for c in CONTROL_COLUMNS if c not in ("acc_p_holm", "significant", "equivalent")]
    )
    table["acc_p_holm"] = inference.holm_adjust(table["acc_p"].to_numpy(dtype=np.float64))
    table["significant"] = table["acc_p_holm"] < settings.alpha
    table["equivalent"] = inference.holm_adjust(table["tost_p"].to_numpy(dtype=np.float64)) < settings.alpha
    return table[CONTROL_COLUMNS]
