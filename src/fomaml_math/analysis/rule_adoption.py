"""The positive control by rule adoption: how often do an initialisation's answers use the evaluated task's own
hidden rule, and does k-shot adaptation raise that share above the base model's 0-shot share?

On the synthetic tasks (docs/demo.md) every reported answer is the plain result with its units digit replaced by
the task's digit ``d``; nothing in a problem reveals ``d``, only the task's worked examples (the shots) do. The
accuracy-based control (``analysis.positive_control``) mixes the rule with everything else an answer can get
wrong, and its 0-shot baselines sit at 0 for reasons unrelated to the rule (SFT writes the digit of the variant-0
task it was trained on; FOMAML's unadapted model mostly writes no answer). This control measures the rule itself.

Definitions (docs/statistics.md, "Positive control: rule adoption"):

- **A task's digit** is read off its gold answers, which the stats stage already loads: a task has a rule when
  its name is a synthetic task name (``subjects.is_synthetic_task``) and every one of its gold answers is an
  integer literal, all with the same units digit (by construction, ``data.synthetic.TaskRule.apply``). Any other
  task (real MATH: fractions, expressions, integers with varying last digits) has no rule and is skipped, so on
  real MATH data the table is empty.
- **An answer follows the rule** when its extracted answer (the last ``\\boxed{}``'s content) is an integer
  literal (optional sign, digits, surrounding whitespace) whose units digit is the task's digit. The sign and the
  other digits are not checked: the rule is about the units digit only. A missing or non-integer answer does not
  follow it: the share is of all answers, so writing no answer cannot raise it.
- Per (experiment, init, k, pool), the **share** is the mean over training seeds and test problems of the
  per-problem share over the repeats, with the seed-aware estimator and t-interval of ``analysis.inference``
  (``crossed_estimate``: seeds × problems crossed, the residual floor; interval truncated to [0, 1]). Pools: each
  held-out task, the held-out tasks pooled (``meta_test``) and the in-domain (train-role) tasks pooled
  (``in_domain``).
- **Against the base's 0-shot share** on the same problems (k > 0 only): ``diff = share − base_share_0`` by
  ``crossed_estimate`` of the two matrices (the trained init's seeds as its clusters, the base one cluster; base
  against itself: the paired t-test over problems), t-interval truncated to [−1, 1], two-sided p. Holm over the
  (init, k > 0) comparisons of one (experiment, pool): its family. ``detected``: Holm p < alpha and diff > 0.

Input: the evaluation rows, split by experiment (``analysis.evaldata.split_experiments``); the stats stage writes
the table as ``rule_adoption.tsv``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from fomaml_math.analysis.bounds import accuracy_interval, difference_interval
from fomaml_math.analysis.evaldata import task_roles
from fomaml_math.analysis.inference import (
    ACCURACY_RANGE,
    DIFFERENCE_RANGE,
    crossed_estimate,
    holm_adjust,
    t_interval,
    t_test_p,
)
from fomaml_math.analysis.tables import (
    IN_DOMAIN_POOL,
    META_TEST_POOL,
    RULE_ADOPTION_COLUMNS,
    StatsSettings,
    experiment_order,
    init_order,
    sort_in_order,
    task_order,
)
from fomaml_math.evaluation.rows import BASE
from fomaml_math.subjects import is_synthetic_task

_INTEGER = re.compile(r"^\s*[+-]?(\d+)\s*$")
_FAMILY_COLUMNS = ("family_size", "p_holm", "detected")  # filled per (experiment, pool) after all rows exist


def units_digit(answer: object) -> int | None:
    """The units digit of an integer literal (``"-37"`` -> 7, ``" 4 "`` -> 4); None for anything else."""
    if answer is None or (not isinstance(answer, str) and pd.isna(answer)):
        return None
    match = _INTEGER.match(str(answer))
    return int(match.group(1)[-1]) if match else None


def task_digits(evals: pd.DataFrame) -> dict[str, int]:
    """Task -> the digit of its rule, for the tasks that have one (see the module docstring); others left out."""
    digits: dict[str, int] = {}
    for task, golds in evals.groupby("task", sort=True)["gold"]:
        if not is_synthetic_task(str(task)):
            continue
        found = {units_digit(gold) for gold in golds.unique()}
        if len(found) == 1 and None not in found:
            digits[str(task)] = int(found.pop())
    return digits


def follows_rule(rows: pd.DataFrame, digits: dict[str, int]) -> np.ndarray:
    """Per row (of tasks in ``digits``): 1.0 when its extracted answer's units digit is its task's digit, else 0.0."""
    answered = [units_digit(answer) for answer in rows["extracted"]]
    wanted = rows["task"].map(digits).to_numpy()
    return np.array([float(got is not None and got == want) for got, want in zip(answered, wanted, strict=True)])


def _cells(frame: pd.DataFrame, digits: dict[str, int]) -> pd.DataFrame:
    """One row per (init, train_seed, task, shots, problem): rule share and no-answer share over the repeats."""
    rows = frame[frame["task"].isin(digits)]
    rows = rows.assign(
        follows=follows_rule(rows, digits),
        no_answer=rows["extracted"].isna().to_numpy(dtype=np.float64),
    )
    grouped = rows.groupby(["init", "train_seed", "task", "shots", "problem_id"], sort=True)
    return grouped.agg(follows=("follows", "mean"), no_answer=("no_answer", "mean")).reset_index()


def _pools(roles: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(pool, its tasks): each held-out task, the held-out pool, the in-domain pool (those that have tasks)."""
    tasks = task_order(list(roles))
    held = [t for t in tasks if roles[t] == "meta_test"]
    in_domain = [t for t in tasks if roles[t] != "meta_test"]
    pools = [(task, [task]) for task in held]
    if held:
        pools.append((META_TEST_POOL, held))
    if in_domain:
        pools.append((IN_DOMAIN_POOL, in_domain))
    return pools


def _matrix(cells: pd.DataFrame, columns: pd.MultiIndex, value: str) -> np.ndarray:
    """Seeds × problems (``columns``) of one (init, shots); NaN where a seed lacks a problem."""
    table = cells.pivot_table(index="train_seed", columns=["task", "problem_id"], values=value, aggfunc="mean")
    return table.reindex(columns=columns).to_numpy(dtype=np.float64)


def _pool_rows(cells: pd.DataFrame, tasks: Iterable[str], settings: StatsSettings) -> list[dict]:
    cells = cells[cells["task"].isin(list(tasks))]
    problems = cells[["task", "problem_id"]].drop_duplicates()
    order = {t: k for k, t in enumerate(task_order(list(problems["task"].unique())))}
    problems = problems.sort_values(["task", "problem_id"], key=lambda s: s.map(order) if s.name == "task" else s)
    columns = pd.MultiIndex.from_frame(problems)
    strata = problems["task"].to_numpy()
    by = {key: group for key, group in cells.groupby(["init", "shots"], sort=False)}
    base_zero = _matrix(by[(BASE, 0)], columns, "follows") if (BASE, 0) in by else None
    base_share_0 = crossed_estimate(base_zero, None, strata).estimate if base_zero is not None else math.nan
    rows = []
    for init in init_order(list(cells["init"].unique())):
        for shots in sorted(int(k) for k in cells.loc[cells["init"] == init, "shots"].unique()):
            own = by[(init, shots)]
            share = _matrix(own, columns, "follows")
            estimate = crossed_estimate(share, None, strata)
            if estimate.n_problems == 0:
                continue
            low, high = t_interval(estimate, settings.ci_level, ACCURACY_RANGE)
            # All 0 or all 1 (the base's 0-shot share often is): an exact interval over the problems, never a point.
            low, high, _ = accuracy_interval(estimate.estimate, estimate.n_problems, low, high, "", settings.ci_level)
            row = {
                "init": init,
                "shots": shots,
                "n_seeds": share.shape[0],
                "n_problems": estimate.n_problems,
                "share": estimate.estimate,
                "share_se": estimate.se,
                "share_df": estimate.df,
                "share_ci_low": low,
                "share_ci_high": high,
                "no_answer_share": crossed_estimate(_matrix(own, columns, "no_answer"), None, strata).estimate,
                "base_share_0": base_share_0,
            }
            if shots > 0 and base_zero is not None:
                diff = crossed_estimate(share, base_zero, strata)
                diff_low, diff_high = t_interval(diff, settings.ci_level, DIFFERENCE_RANGE)
                diff_low, diff_high, _ = difference_interval(
                    estimate.estimate, base_share_0, diff.n_problems, diff_low, diff_high, "", settings.ci_level
                )
                row |= {
                    "diff": diff.estimate,
                    "diff_se": diff.se,
                    "diff_df": diff.df,
                    "diff_ci_low": diff_low,
                    "diff_ci_high": diff_high,
                    "p": t_test_p(diff),
                }
            rows.append(row)
    return rows


def rule_adoption_table(experiments: dict[str, pd.DataFrame], settings: StatsSettings) -> pd.DataFrame:
    """One row per (experiment, pool, init, shots) over the tasks that have a rule; empty (header only) if none."""
    rows: list[dict] = []
    for experiment, frame in experiments.items():
        digits = task_digits(frame)
        if not digits:
            continue
        cells = _cells(frame, digits)
        roles = {t: r for t, r in task_roles(frame).items() if t in digits}
        for pool, tasks in _pools(roles):
            rows += [{"experiment": experiment, "pool": pool} | r for r in _pool_rows(cells, tasks, settings)]
    if not rows:
        return pd.DataFrame(columns=RULE_ADOPTION_COLUMNS)
    table = pd.DataFrame(rows).reindex(columns=[c for c in RULE_ADOPTION_COLUMNS if c not in _FAMILY_COLUMNS])
    adjusted = pd.Series(np.nan, index=table.index)
    sizes = pd.Series(0, index=table.index)
    for _, family in table.groupby(["experiment", "pool"], sort=False):
        p = family["p"].to_numpy(dtype=np.float64)
        adjusted[family.index] = holm_adjust(p)
        sizes[family.index] = int(np.sum(~np.isnan(p)))
    table["family_size"] = sizes.to_numpy()
    table["p_holm"] = adjusted.to_numpy()
    table["detected"] = (table["p_holm"] < settings.alpha) & (table["diff"] > 0)
    orders = {
        "experiment": experiment_order(list(table["experiment"].unique())),
        "pool": task_order(list(table["pool"].unique())),
        "init": init_order(list(table["init"].unique())),
    }
    table = sort_in_order(table, ["experiment", "pool", "init", "shots"], orders).reset_index(drop=True)
    return table[list(RULE_ADOPTION_COLUMNS)]
