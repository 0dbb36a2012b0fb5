"""Sample efficiency: the number of shots at which one initialisation reaches another's accuracy at that
one's largest k, with a bootstrap interval over training seeds and problems (``docs/statistics.md``, "Sample
efficiency").

Only evaluated shot counts are claimed: ``shots_reached`` is the first evaluated k at which the learner's curve
is at the target and ``shots_before`` the evaluated k before it. ``shots_to_match`` interpolates linearly between
the two only where both are > 0 (``interpolated``); a crossing between 0 and the first evaluated k > 0 is reported
as that k, never below it: nothing was evaluated there, and the curve between 0 and k is no straight line.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd

from fomaml_math.analysis.evaldata import per_problem, pool_tasks, primary_pool, task_roles
from fomaml_math.analysis.resampling import BLOCK_ELEMENTS
from fomaml_math.analysis.tables import SAMPLE_EFFICIENCY_COLUMNS, StatsSettings

# (learner, reference): the shots the learner needs to match the reference at the reference's largest k.
PAIRS: tuple[tuple[str, str], ...] = (("fomaml", "sft"), ("sft", "fomaml"), ("fomaml", "base"), ("sft", "base"))


def shots_to_reach(shots: np.ndarray, curves: np.ndarray, target: np.ndarray) -> np.ndarray:
    """First shot count at which each curve reaches its target, linear between measured shot counts > 0.

    ``curves`` is (B × K) accuracy at the sorted ``shots`` (K); ``target`` (B). A curve already at the target at
    the smallest k gives that k; one that crosses it between 0 and the first k > 0 gives that k (no claim below
    the first evaluated k > 0); one that never reaches it gives NaN (more shots than measured).
    """
    curves = np.atleast_2d(curves)
    target = np.broadcast_to(np.asarray(target, dtype=np.float64), curves.shape[:1])
    result = np.full(curves.shape[0], np.nan)
    done = curves[:, 0] >= target
    result[done] = shots[0]
    for j in range(1, len(shots)):
        hit = ~done & (curves[:, j] >= target)
        low, high = curves[hit, j - 1], curves[hit, j]
        step = (target[hit] - low) / (high - low) * (shots[j] - shots[j - 1])
        result[hit] = shots[j - 1] + step if shots[j - 1] > 0 else shots[j]
        done |= hit
    return result


def _cube(cells: pd.DataFrame, init: str, problems: pd.MultiIndex, shots: list[int]) -> np.ndarray:
    """Seeds × problems × shots of the repeat-averaged correctness."""
    rows = cells[cells["init"] == init]
    table = rows.pivot_table(index="train_seed", columns=["shots", "task", "problem_id"], values="correct")
    seeds = sorted(rows["train_seed"].unique())
    cube = np.empty((len(seeds), len(problems), len(shots)))
    for k, shot in enumerate(shots):
        cube[:, :, k] = table[shot].reindex(index=seeds, columns=problems).to_numpy(dtype=np.float64)
    return cube


def _replicates(
    cube: np.ndarray, strata: np.ndarray, n_boot: int, rng: np.random.Generator, problem_rng_seed: list[int]
) -> np.ndarray:
    """(B × K) bootstrap curves: seeds resampled with replacement, then problems within tasks (the problem
    draws come from ``problem_rng_seed`` so learner and reference get the same problems: paired)."""
    s, n, k = cube.shape
    tasks = list(dict.fromkeys(strata))
    problem_rngs = [np.random.default_rng([*problem_rng_seed, zlib.crc32(str(t).encode())]) for t in tasks]
    block = max(1, BLOCK_ELEMENTS // max(1, n))
    curves = np.empty((n_boot, k))
    for start in range(0, n_boot, block):
        stop = min(n_boot, start + block)
        counts = np.zeros((stop - start, n))
        for task, task_rng in zip(tasks, problem_rngs, strict=True):
            index = np.flatnonzero(strata == task)
            drawn = task_rng.integers(0, index.size, size=(stop - start, index.size))
            for row in range(stop - start):
                counts[row] += np.bincount(index[drawn[row]], minlength=n)
        seed_weights = np.stack([np.bincount(rng.integers(0, s, s), minlength=s) / s for _ in range(stop - start)])
        per_seed = np.einsum("bn,snk->bsk", counts, cube) / n
        curves[start:stop] = np.einsum("bs,bsk->bk", seed_weights, per_seed)
    return curves


def sample_efficiency_table(experiments: dict[str, pd.DataFrame], settings: StatsSettings) -> pd.DataFrame:
    rows = []
    for name, frame in experiments.items():
        roles = task_roles(frame)
        pool = primary_pool(roles)
        cells = per_problem(frame[frame["task"].isin(pool_tasks(pool, roles))])
        for learner, reference in PAIRS:
            if not {learner, reference} <= set(cells["init"]):
                continue
            learner_shots = sorted(int(k) for k in cells.loc[cells["init"] == learner, "shots"].unique())
            reference_shots = sorted(int(k) for k in cells.loc[cells["init"] == reference, "shots"].unique())
            if len(learner_shots) < 2:
                continue
            k_ref = reference_shots[-1]
            # Complete cases: problems every seed of both inits answered at every shot count used.
            problems = cells[["task", "problem_id"]].drop_duplicates().sort_values(["task", "problem_id"])
            index = pd.MultiIndex.from_frame(problems)
            cube_l = _cube(cells, learner, index, learner_shots)
            cube_r = _cube(cells, reference, index, [k_ref])
            keep = ~np.isnan(cube_l).any(axis=(0, 2)) & ~np.isnan(cube_r).any(axis=(0, 2))
            cube_l, cube_r = cube_l[:, keep], cube_r[:, keep]
            strata = problems["task"].to_numpy()[keep]
            if not keep.any():
                continue
            shots = np.asarray(learner_shots, dtype=np.float64)
            curve = cube_l.mean(axis=(0, 1))
            target = float(cube_r.mean())
            point = float(shots_to_reach(shots, curve[None, :], np.array([target]))[0])
            at_target = np.flatnonzero(curve >= target)  # the evaluated k at which the curve is at the target
            at = int(at_target[0]) if at_target.size else -1
            shots_reached = float(shots[at]) if at >= 0 else math.nan
            shots_before = float(shots[at - 1]) if at > 0 else math.nan
            base_seed = [settings.seed, zlib.crc32(f"efficiency:{name}".encode())]
            boot_l = _replicates(
                cube_l, strata, settings.bootstrap_samples, np.random.default_rng([*base_seed, 1]), base_seed
            )
            boot_r = _replicates(
                cube_r, strata, settings.bootstrap_samples, np.random.default_rng([*base_seed, 2]), base_seed
            )
            reached = shots_to_reach(shots, boot_l, boot_r[:, 0])
            # Not reached within the measured shots counts as +inf: the upper bound is then "beyond the largest k".
            filled = np.where(np.isnan(reached), np.inf, reached)
            tail = (1.0 - settings.ci_level) / 2.0
            low, high = np.quantile(filled, [tail, 1.0 - tail], method="inverted_cdf")
            rows.append(
                {
                    "experiment": name,
                    "pool": pool,
                    "learner": learner,
                    "reference": reference,
                    "reference_shots": k_ref,
                    "target_accuracy": target,
                    "learner_max_shots": learner_shots[-1],
                    "learner_accuracy_at_max": float(curve[-1]),
                    "shots_to_match": point,
                    "shots_reached": shots_reached,
                    "shots_before": shots_before,
                    "interpolated": bool(math.isfinite(point) and point not in learner_shots),
                    "ci_low": float(low) if math.isfinite(low) else math.inf,
                    "ci_high": float(high) if math.isfinite(high) else math.inf,
                    "share_not_reached": float(np.mean(np.isnan(reached))),
                    "n_problems": int(keep.sum()),
                    "n_seeds_learner": cube_l.shape[0],
                    "n_seeds_reference": cube_r.shape[0],
                    "n_boot": settings.bootstrap_samples,
                }
            )
    return pd.DataFrame(rows, columns=SAMPLE_EFFICIENCY_COLUMNS)
