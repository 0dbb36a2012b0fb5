"""The negative controls (A/A): comparisons where nothing differs between the sides, so the null holds.

* ``control.tsv``, the pre-defined pair: one trained model evaluated twice, under two independent shot-draw
  seeds (its main evaluation and the control's), compared by ``inference.crossed_estimate`` with the shot draws
  (repeats) as the clusters: the only variance that separates the sides is the draw-to-draw variance of
  adaptation, which conditioning on one set of draws (the main comparisons) cannot see.
* ``aa_control.tsv``, the split re-analyses, whose rejection shares are empirical false-positive rates:

  - ``draws``: the control's D draws (``replicates.control_draws``) of that model, split into two disjoint halves
    in every distinct way (C(D, D/2)/2), each pair tested as ``control.tsv`` tests its pair. The splits share
    draws, so the share is the rate conditional on these D draws: an unbiased estimate of the test's false-positive
    rate at D/2 draws per side for this model and these problems, with an error from the draws themselves that no
    split can remove (docs/statistics.md, "Negative controls").
  - ``seeds``: each primary arm's S training seeds split into halves, each pair analysed by the primary analysis
    (``planted.analyse``'s estimator: draws then k averaged per seed and problem); a true null from the study's
    own runs (same method, only the seeds differ). A half needs >= 2 seeds for a seed variance, so S >= 4.

0-shot rows are left out (no shots, nothing drawn: identical by construction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from itertools import combinations

import numpy as np
import pandas as pd

from fomaml_math.analysis import inference
from fomaml_math.analysis.bounds import difference_interval
from fomaml_math.analysis.evaldata import build_design, pool_tasks, primary_pool, task_roles
from fomaml_math.analysis.planted import outcome_array, rejects, seed_scores
from fomaml_math.analysis.tables import AA_COLUMNS, CONTROL_COLUMNS, StatsSettings
from fomaml_math.errors import ConfigError

MIN_UNITS = 4  # each half needs >= 2 units (draws or seeds) for a cluster variance
DRAWS, SEEDS = "draws", "seeds"  # aa_control.tsv's ``control`` values


def _one(control: pd.DataFrame, column: str) -> object:
    values = sorted(control[column].unique())
    if len(values) != 1:
        raise ConfigError(f"--control-eval: expected one {column}, got {', '.join(map(str, values))}")
    return values[0]


def _control_setting(
    experiments: Mapping[str, pd.DataFrame], control: pd.DataFrame
) -> tuple[str, str, int, pd.DataFrame, str, set[str]]:
    """(experiment, init, train_seed, its main rows, primary pool, the pool's tasks) of the control, checked."""
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
    return str(experiment), str(init), int(seed), main, pool, pool_tasks(pool, roles)


def _cells(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.groupby(["init", "repeat", "task", "problem_id"], as_index=False)[["correct", "nll"]].mean()


def control_table(
    experiments: dict[str, pd.DataFrame], control: pd.DataFrame | None, settings: StatsSettings
) -> pd.DataFrame:
    """One row per shot count k > 0 of the control, Holm-adjusted over its shot counts (its own family)."""
    if control is None or control.empty:
        return pd.DataFrame(columns=CONTROL_COLUMNS)
    experiment, init, seed, main, pool, tasks_in_pool = _control_setting(experiments, control)
    rows = []
    for shots in sorted(k for k in control["shots"].unique() if k > 0):
        sides = {
            "main": main[(main["shots"] == shots) & main["task"].isin(tasks_in_pool)],
            "control": control[(control["shots"] == shots) & control["task"].isin(tasks_in_pool)],
        }
        if sides["main"].empty:
            raise ConfigError(f"--control-eval: the main evaluation has no {shots}-shot rows of {init} in {experiment}")
        cells = _cells(pd.concat([s.assign(init=name) for name, s in sides.items()], ignore_index=True))
        design = build_design(cells, cluster="repeat")
        est = inference.crossed_estimate(design.correct["main"], design.correct["control"], design.strata)
        low, high = inference.t_interval(est, settings.ci_level, inference.DIFFERENCE_RANGE)
        with np.errstate(invalid="ignore"):
            acc_main = float(np.nanmean(design.correct["main"]))
            acc_control = float(np.nanmean(design.correct["control"]))
        # Nothing varied (e.g. all 0 under both seeds): Newcombe's interval over the problems, never a point.
        low, high, _ = difference_interval(acc_main, acc_control, est.n_problems, low, high, "", settings.ci_level)
        single = min(est.n_clusters_a, est.n_clusters_b) < 2
        rows.append(
            {
                "experiment": experiment,
                "init": init,
                "train_seed": seed,
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


# ---------------------------------------------------------------------------------------------
# The A/A split re-analyses (aa_control.tsv)


def distinct_splits(n: int) -> int:
    """Distinct splits of n units into halves of n // 2 and n - n // 2 (unordered: a split and its mirror are one
    A/A pair, the test is two-sided): C(n, n/2) / 2 for even n, C(n, n // 2) for odd n."""
    return math.comb(n, n // 2) // (2 if n % 2 == 0 else 1)


def halves(n: int, max_splits: int, rng: np.random.Generator) -> tuple[list[np.ndarray], bool]:
    """The first halves (n // 2 unit indices; the second half is the rest) of every distinct split when there are
    at most ``max_splits`` (exhaustive: True), else of ``max_splits`` random splits (drawn with replacement)."""
    size = n // 2
    if distinct_splits(n) <= max_splits:
        if n % 2:
            return [np.array(c) for c in combinations(range(n), size)], True
        # Even n: unit 0 always in the first half, so each unordered split appears once.
        return [np.array((0, *c)) for c in combinations(range(1, n), size - 1)], True
    return [np.sort(rng.permutation(n)[:size]) for _ in range(max_splits)], False


Estimator = Callable[[np.ndarray, np.ndarray, np.ndarray], inference.Estimate]


def split_rejections(
    scores: np.ndarray,
    strata: np.ndarray,
    *,
    alpha: float,
    max_splits: int,
    rng: np.random.Generator,
    estimator: Estimator = inference.crossed_estimate,
) -> dict[str, float | int | bool]:
    """The A/A re-analysis of ``scores`` (units × problems: a unit's per-problem scores, a unit being a shot draw
    or a training seed): for each split into halves, ``estimator`` of half against half (the study's: units as
    the clusters of ``crossed_estimate``) and its two-sided t-test at ``alpha``; the rejection share and its Monte
    Carlo SE over the splits sampled (0 when every distinct split is analysed: exact given these units)."""
    n = scores.shape[0]
    firsts, exhaustive = halves(n, max_splits, rng)
    rejected = 0
    for first in firsts:
        in_first = np.zeros(n, dtype=bool)
        in_first[first] = True
        rejected += rejects(estimator(scores[in_first], scores[~in_first], strata), alpha)
    rate = rejected / len(firsts)
    return {
        "n_units": n,
        "half_size": n // 2,
        "n_distinct_splits": distinct_splits(n),
        "n_splits": len(firsts),
        "exhaustive": exhaustive,
        "n_rejected": rejected,
        "false_positive_rate": rate,
        "false_positive_rate_mc_se": 0.0 if exhaustive else math.sqrt(rate * (1 - rate) / len(firsts)),
    }


def _too_few(n: int, unit: str) -> dict[str, float | int | bool | str]:
    """The row of a control with fewer than MIN_UNITS units: no split has a variance in each half."""
    return {
        "n_units": n,
        "half_size": n // 2,
        "n_distinct_splits": distinct_splits(n) if n >= 2 else 0,
        "n_splits": 0,
        "exhaustive": False,
        "n_rejected": 0,
        "false_positive_rate": math.nan,
        "false_positive_rate_mc_se": math.nan,
        "note": f"needs >= {MIN_UNITS} {unit}, has {n}: each half needs >= 2 for a {unit[:-1]} variance",
    }


def _analysed(
    scores: np.ndarray, strata: np.ndarray, unit: str, settings: StatsSettings, rng: np.random.Generator
) -> dict[str, float | int | bool | str]:
    if scores.shape[0] < MIN_UNITS:
        return _too_few(scores.shape[0], unit)
    found = split_rejections(scores, strata, alpha=settings.alpha, max_splits=settings.aa_splits, rng=rng)
    return found | {"note": ""}


def _draw_rows(
    experiments: Mapping[str, pd.DataFrame], control: pd.DataFrame, settings: StatsSettings
) -> list[dict[str, object]]:
    """Per control k > 0: its draws of the one model split into halves, each pair tested as control.tsv tests."""
    experiment, init, seed, _, pool, tasks_in_pool = _control_setting(experiments, control)
    rows = []
    for shots in sorted(int(k) for k in control["shots"].unique() if k > 0):
        cells = _cells(control[(control["shots"] == shots) & control["task"].isin(tasks_in_pool)])
        design = build_design(cells, cluster="repeat")
        y = design.correct[init]  # [draw, problem]
        rng = np.random.default_rng([settings.seed, 0xAA, shots])
        n_problems = int((~np.isnan(y).any(axis=0)).sum())
        where = {"experiment": experiment, "control": DRAWS, "init": init, "train_seeds": str(seed), "pool": pool}
        where |= {"shots": str(shots), "n_problems": n_problems}
        rows.append(where | _analysed(y, design.strata, DRAWS, settings, rng))
    return rows


def _seed_rows(experiments: Mapping[str, pd.DataFrame], settings: StatsSettings) -> list[dict[str, object]]:
    """Per experiment and primary arm: its training seeds split into halves, each pair by the primary analysis."""
    a, b = settings.primary_contrast.split("-")
    rows = []
    for index, (name, frame) in enumerate(experiments.items()):
        built = outcome_array(frame, a, b)
        if built is None:
            continue
        y, strata, seeds = built
        pool = primary_pool(task_roles(frame))
        adapted = frame[frame["init"].isin([a, b]) & (frame["shots"] > 0)]
        shots = ",".join(str(int(k)) for k in sorted(adapted["shots"].unique()))
        for arm, init in enumerate((a, b)):
            rng = np.random.default_rng([settings.seed, 0xAA5, index, arm])
            where = {"experiment": name, "control": SEEDS, "init": init, "train_seeds": ",".join(map(str, seeds))}
            where |= {"pool": pool, "shots": shots, "n_problems": y.shape[-1]}
            rows.append(where | _analysed(seed_scores(y[arm]), strata, SEEDS, settings, rng))
    return rows


def aa_table(
    experiments: dict[str, pd.DataFrame], control: pd.DataFrame | None, settings: StatsSettings
) -> pd.DataFrame:
    """aa_control.tsv: the draw splits of the negative control (with ``--control-eval``) and the seed splits of each
    primary arm (every experiment with a complete primary design), at the nominal ``stats.alpha``."""
    rows = [] if control is None or control.empty else _draw_rows(experiments, control, settings)
    rows += _seed_rows(experiments, settings)
    return pd.DataFrame(rows, columns=[c for c in AA_COLUMNS if c != "alpha"]).assign(alpha=settings.alpha)[AA_COLUMNS]
