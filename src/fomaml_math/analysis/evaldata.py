"""The evaluation files as the analysis sees them: loading and checking, experiments, and the
clusters × problems matrices every interval is computed from.

One row per (experiment, train_seed, shot_seed, init, task, shots, repeat, test problem). Columns the
evaluation of an older version did not write get documented defaults (one experiment ``main``, training
seed 0 — base: −1 —, every task in the ``train`` role, unknown truncation and adaptation effect; no gold or
extracted answers: no rule-adoption control), so older result folders still analyse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fomaml_math.analysis.tables import META_TEST_POOL, POOLED, experiment_order, init_order, task_order
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.rows import (
    BASE,
    BASE_SEED,
    KEY,
    META_INNER_LOOP,
    METALOOP_OF,
    OPTIONAL_DEFAULTS,
    PROTOCOLS,
    REQUIRED_COLUMNS,
    SECONDARY_INITS,
    TASK_ROLES,
)

# The answers, kept for the rule-adoption control (analysis.rule_adoption); None where a file lacks them.
ANSWER_COLUMNS: tuple[str, ...] = ("gold", "extracted")


def _read_one(path: Path, flag: str) -> pd.DataFrame:
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: file not found")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ConfigError(f"{flag} {path}: not a readable parquet file ({type(exc).__name__})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ConfigError(f"{flag} {path}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise ConfigError(f"{flag} {path}: no rows")
    if frame["correct"].isna().any():
        raise ConfigError(f"{flag} {path}: column 'correct' has missing values")
    frame = frame.copy()
    for column, default in OPTIONAL_DEFAULTS.items():
        if column not in frame.columns:
            frame[column] = default
    for column in ANSWER_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    if "train_seed" not in frame.columns:
        frame["train_seed"] = np.where(frame["init"] == BASE, BASE_SEED, 0)
    bad_roles = sorted(set(frame["task_role"].astype(str)) - set(TASK_ROLES))
    if bad_roles:
        raise ConfigError(
            f"{flag} {path}: task_role must be one of {', '.join(TASK_ROLES)}, got {', '.join(bad_roles)}"
        )
    protocol = frame["adapt_protocol"].fillna(OPTIONAL_DEFAULTS["adapt_protocol"]).astype(str)
    frame["adapt_protocol"] = protocol
    bad_protocols = sorted(set(protocol) - set(PROTOCOLS))
    if bad_protocols:
        raise ConfigError(f"{flag} {path}: adapt_protocol must be one of {', '.join(PROTOCOLS)}, got {bad_protocols}")
    # FOMAML's rows adapted with its meta-training inner loop are an initialisation of their own (the secondary row).
    metaloop = protocol.eq(META_INNER_LOOP).to_numpy()
    arms = frame.loc[metaloop, "init"].astype(str).map(METALOOP_OF)
    if arms.isna().any():
        raise ConfigError(f"{flag} {path}: adapt_protocol {META_INNER_LOOP} is for {', '.join(METALOOP_OF)} rows only")
    frame.loc[metaloop, "init"] = arms
    return frame[[*REQUIRED_COLUMNS, "train_seed", *OPTIONAL_DEFAULTS, *ANSWER_COLUMNS]]


def main_inits(evals: pd.DataFrame) -> pd.DataFrame:
    """``evals`` without the secondary initialisations' rows (the controls' families are the main inits')."""
    return evals[~evals["init"].isin(SECONDARY_INITS)]


def load_eval(paths: Sequence[str | Path], flag: str = "--eval") -> pd.DataFrame:
    """Concatenate and check the per-problem evaluation files (one-line errors naming the file)."""
    if not paths:
        raise ConfigError(f"{flag}: no files given")
    evals = pd.concat([_read_one(Path(p), flag) for p in paths], ignore_index=True)
    evals = evals.astype(
        {
            "experiment": str,
            "init": str,
            "task": str,
            "task_role": str,
            "problem_id": str,
            "grade_status": str,
            "adapt_optimizer": str,
            "adapt_protocol": str,
            "shots": int,
            "repeat": int,
            "train_seed": int,
            "shot_seed": int,
        }
    )
    for column in ANSWER_COLUMNS:  # text, None where missing (a parquet "string" column reads back as object)
        evals[column] = evals[column].astype(object).where(evals[column].notna(), None)
    evals["correct"] = evals["correct"].astype(bool).astype(np.float64)
    for column in ("nll", "gen_tokens", "support_loss_before", "support_loss_after", "weight_change", "adapt_lr"):
        evals[column] = pd.to_numeric(evals[column], errors="coerce").astype(np.float64)
    evals["adapt_steps"] = pd.to_numeric(evals["adapt_steps"], errors="coerce").astype(np.float64)
    evals["truncated"] = evals["truncated"].map(lambda v: np.nan if pd.isna(v) else float(bool(v)))
    duplicated = evals.duplicated(list(KEY))
    if duplicated.any():
        row = evals.loc[duplicated].iloc[0]
        where = ", ".join(f"{k}={row[k]}" for k in KEY)
        raise ConfigError(f"{flag}: two results for {where} (was one evaluation file given twice?)")
    return evals


def split_experiments(evals: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One frame per experiment, base rows included.

    The base model is untrained, so its evaluation may be written once per experiment or once for all:
    an experiment uses its own base rows if it has any, otherwise every base row (one per problem), kept to
    the tasks the experiment's trained models were evaluated on. Task roles come from the trained rows.
    """
    trained = evals[evals["init"] != BASE]
    base = evals[evals["init"] == BASE]
    names = experiment_order(list(trained["experiment"].unique()) or list(base["experiment"].unique()))
    frames: dict[str, pd.DataFrame] = {}
    for name in names:
        rows = trained[trained["experiment"] == name]
        own = base[base["experiment"] == name]
        shared = own if len(own) else base.drop_duplicates(["task", "shots", "repeat", "problem_id"])
        if len(rows):
            shared = shared[shared["task"].isin(set(rows["task"]))]
        roles_source = rows if len(rows) else shared
        roles = roles_source.groupby("task")["task_role"].unique()
        mixed = [task for task, values in roles.items() if len(values) > 1]
        if mixed:
            raise ConfigError(f"--eval: experiment {name}: task {mixed[0]} is both 'train' and 'meta_test'")
        frame = pd.concat([rows, shared.assign(experiment=name)], ignore_index=True)
        frame["task_role"] = frame["task"].map({task: values[0] for task, values in roles.items()})
        frames[name] = frame
    return frames


def per_problem(evals: pd.DataFrame) -> pd.DataFrame:
    """One row per (init, train_seed, task, shots, problem): correctness and NLL averaged over the repeats."""
    grouped = evals.groupby(["init", "train_seed", "task", "shots", "problem_id"], sort=True)
    return grouped.agg(correct=("correct", "mean"), nll=("nll", "mean"), n_repeats=("repeat", "nunique")).reset_index()


@dataclass
class Design:
    """The cluster × problem matrices of one (experiment, shots): per init, rows = training seeds."""

    problems: pd.DataFrame  # task, problem_id, in column order
    seeds: dict[str, list[int]]
    correct: dict[str, np.ndarray]  # init -> S × N (NaN where missing)
    nll: dict[str, np.ndarray]

    @property
    def strata(self) -> np.ndarray:
        return self.problems["task"].to_numpy()

    def mask(self, pool: str, roles: dict[str, str]) -> np.ndarray:
        """Problems of one task, of every task (``all``) or of the held-out tasks (``meta_test``)."""
        return self.problems["task"].isin(pool_tasks(pool, roles)).to_numpy()


def build_design(cells: pd.DataFrame, cluster: str = "train_seed") -> Design:
    """Matrices from per-problem cells (columns init, ``cluster``, task, problem_id, correct, nll)."""
    problems = cells[["task", "problem_id"]].drop_duplicates()
    order = {t: k for k, t in enumerate(task_order(list(problems["task"].unique())))}
    problems = problems.sort_values(["task", "problem_id"], key=lambda s: s.map(order) if s.name == "task" else s)
    problems = problems.reset_index(drop=True)
    columns = pd.MultiIndex.from_frame(problems)
    seeds, correct, nll = {}, {}, {}
    for init in init_order(list(cells["init"].unique())):
        rows = cells[cells["init"] == init]
        for name, target in (("correct", correct), ("nll", nll)):
            table = rows.pivot_table(index=cluster, columns=["task", "problem_id"], values=name, aggfunc="mean")
            target[init] = table.reindex(columns=columns).to_numpy(dtype=np.float64)
        seeds[init] = [int(s) for s in sorted(rows[cluster].unique())]
    return Design(problems, seeds, correct, nll)


def task_roles(frame: pd.DataFrame) -> dict[str, str]:
    return frame.groupby("task")["task_role"].first().to_dict()


def primary_pool(roles: dict[str, str]) -> str:
    """The primary family's pool: the held-out tasks when the experiment has any, else all its tasks."""
    return META_TEST_POOL if "meta_test" in roles.values() else POOLED


def pool_tasks(pool: str, roles: dict[str, str]) -> set[str]:
    """The tasks of ``pool``: every task (``all``), the held-out ones (``meta_test``), or the one task it names."""
    if pool == POOLED:
        return set(roles)
    if pool == META_TEST_POOL:
        return {t for t, r in roles.items() if r == "meta_test"}
    return {pool}


def pooled_groups(roles: dict[str, str]) -> list[str]:
    """The pools over several tasks: the held-out tasks (if any), then all tasks unless those are the held-out ones
    again (an experiment evaluated on its held-out tasks only, ``in_domain_rows: false``): a pool is a set of tasks,
    and the same set twice would be the same numbers twice and one more test in the secondary family."""
    held_out = "meta_test" in roles.values()
    return [*([META_TEST_POOL] if held_out else []), *([POOLED] if set(roles.values()) != {"meta_test"} else [])]


def pools(roles: dict[str, str]) -> list[str]:
    """Every task, then the pools over several tasks (:func:`pooled_groups`)."""
    return task_order([*roles, *pooled_groups(roles)])
