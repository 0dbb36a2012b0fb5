"""What generation and adaptation did: no-answer and truncation rates, generated length, and the effect of each
k-shot adaptation (support loss, gold-solution NLL, weight change, outputs changed versus the same init's 0-shot
outputs). Descriptive tables; definitions in ``docs/statistics.md`` ("Generation and adaptation").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fomaml_math.analysis.tables import (
    ADAPTATION_COLUMNS,
    ADAPTATION_SUMMARY_COLUMNS,
    GENERATION_COLUMNS,
    experiment_order,
    init_order,
    sort_in_order,
)
from fomaml_math.evaluation.rows import METALOOP_OF

# An adaptation that changes fewer greedy outputs than this is flagged as a near no-op.
LOW_CHANGE = 0.01


def generation_table(experiments: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (experiment, init, shots), over every seed, task, repeat and problem."""
    rows = []
    for name, frame in experiments.items():
        marked = frame.assign(
            no_answer=(frame["grade_status"] == "no_answer").astype(np.float64),
            grade_failure=frame["grade_status"].isin(["timeout", "error"]).astype(np.float64),
        )
        table = marked.groupby(["init", "shots"]).agg(
            n_seeds=("train_seed", "nunique"),
            n_rows=("correct", "size"),
            no_answer_rate=("no_answer", "mean"),
            truncation_rate=("truncated", "mean"),
            mean_gen_tokens=("gen_tokens", "mean"),
            grade_failure_rate=("grade_failure", "mean"),
        )
        rows.append(table.reset_index().assign(experiment=name))
    return _order(pd.concat(rows, ignore_index=True), GENERATION_COLUMNS, ["init", "shots"])


def _order(frame: pd.DataFrame, columns: list[str], keys: list[str]) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(columns=columns)
    orders = {
        "experiment": experiment_order(list(frame["experiment"].unique())),
        "init": init_order(list(frame["init"].unique())),
    }
    return sort_in_order(frame, ["experiment", *keys], orders).reset_index(drop=True)[columns]


def adaptation_table(experiments: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per k-shot adaptation (experiment, train_seed, init, task, shots > 0, repeat).

    ``nll_change`` = mean over the test problems of (NLL after adaptation − the same init's 0-shot NLL), joined
    per problem on (experiment, train_seed, init, task, problem_id); ``nll_change_rel`` divides it by the mean
    0-shot NLL; ``outputs_changed`` = share of problems whose greedy output differs from the 0-shot output.
    """
    keys = ["train_seed", "init", "task", "problem_id"]
    parts = []
    for name, frame in experiments.items():
        adapted = frame[frame["shots"] > 0]
        if adapted.empty:
            continue
        zero = frame[(frame["shots"] == 0) & (frame["repeat"] == 0)]
        zero = zero[[*keys, "nll", "generated"]].rename(columns={"nll": "nll_0", "generated": "generated_0"})
        # A meta-training inner loop row's 0 shots are its init's own (the same weights, nothing adapted).
        zero = pd.concat([zero, *(zero[zero["init"] == i].assign(init=arm) for i, arm in METALOOP_OF.items())])
        joined = adapted.merge(zero, on=keys, how="left")
        both = joined["generated"].notna() & joined["generated_0"].notna()
        joined["changed"] = np.where(both, (joined["generated"] != joined["generated_0"]).astype(float), np.nan)
        joined["nll_delta"] = joined["nll"] - joined["nll_0"]
        grouped = joined.groupby(["train_seed", "init", "task", "shots", "repeat"], sort=True)
        table = grouped.agg(
            n_problems=("problem_id", "size"),
            adapt_optimizer=("adapt_optimizer", "first"),
            adapt_lr=("adapt_lr", "first"),
            adapt_steps=("adapt_steps", "first"),
            support_loss_before=("support_loss_before", "first"),
            support_loss_after=("support_loss_after", "first"),
            weight_change=("weight_change", "first"),
            nll_zero_shot=("nll_0", "mean"),
            nll_after=("nll", "mean"),
            nll_change=("nll_delta", "mean"),
            outputs_changed=("changed", "mean"),
        ).reset_index()
        table["support_loss_change"] = table["support_loss_after"] - table["support_loss_before"]
        table["nll_change_rel"] = table["nll_change"] / table["nll_zero_shot"]
        parts.append(table.assign(experiment=name))
    if not parts:
        return pd.DataFrame(columns=ADAPTATION_COLUMNS)
    return _order(pd.concat(parts, ignore_index=True), ADAPTATION_COLUMNS, ["init", "train_seed", "task", "shots"])


def _choice_text(row: pd.Series) -> str:
    if not (isinstance(row["adapt_optimizer"], str) and row["adapt_optimizer"]) or pd.isna(row["adapt_lr"]):
        return "n/a"
    return f"{row['adapt_optimizer']} lr {row['adapt_lr']:.3g} x {int(row['adapt_steps'])}"


def _choices(group: pd.DataFrame) -> str:
    """Each training seed's adaptation as it was used: one text when all seeds agree, else one per seed."""
    per_seed = group.groupby("train_seed", sort=True).first().apply(_choice_text, axis=1)
    if per_seed.nunique() == 1:
        return str(per_seed.iloc[0])
    return "; ".join(f"seed {seed}: {text}" for seed, text in per_seed.items())


def adaptation_summary(adaptation: pd.DataFrame) -> pd.DataFrame:
    """Per (experiment, init, shots): means over the adaptations (seeds × tasks × repeats, each weighted equally)."""
    if adaptation.empty:
        return pd.DataFrame(columns=ADAPTATION_SUMMARY_COLUMNS)
    grouped = adaptation.groupby(["experiment", "init", "shots"], sort=False)
    table = grouped.agg(
        n_runs=("repeat", "size"),
        support_loss_before=("support_loss_before", "mean"),
        support_loss_after=("support_loss_after", "mean"),
        support_loss_change=("support_loss_change", "mean"),
        weight_change=("weight_change", "mean"),
        nll_change=("nll_change", "mean"),
        nll_change_rel=("nll_change_rel", "mean"),
        outputs_changed=("outputs_changed", "mean"),
    ).reset_index()
    choices = grouped.apply(_choices, include_groups=False).rename("adapt_choices").reset_index()
    table = table.merge(choices, on=["experiment", "init", "shots"], how="left")
    table["low_change"] = table["outputs_changed"] < LOW_CHANGE  # NaN (nothing to compare) is not flagged
    return _order(table, ADAPTATION_SUMMARY_COLUMNS, ["init", "shots"])
