"""The evaluation's rows: one per (task, repeat, test problem), the contract between evaluation and analysis.

``evaluate`` writes them (:func:`to_output_schema`); ``analysis`` reads them (``analysis.evaldata``).
The initialisations and method names live here too, and the workflow imports them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BASE = "base"  # the untrained initialisation
METHODS: tuple[str, ...] = ("sft", "fomaml")  # the trained initialisations, in training order
INITS: tuple[str, ...] = (BASE, "sft", "fomaml")  # every initialisation, in reporting order
# How a row's initialisation was adapted to its k shots (column ``adapt_protocol``): the evaluation's own protocol
# (each step on all k shots, the tuner's or the eval settings' lr and steps), or FOMAML's meta-training inner loop.
ALL_SHOTS = "all_shots"
META_INNER_LOOP = "meta_inner_loop"
PROTOCOLS: tuple[str, ...] = (ALL_SHOTS, META_INNER_LOOP)
# The secondary row: FOMAML's weights adapted with META_INNER_LOOP, an initialisation of its own in the analysis
# (evaldata labels the rows so), reported after INITS and never part of the primary contrast or the controls.
METALOOP = "fomaml_metaloop"
METALOOP_OF: dict[str, str] = {"fomaml": METALOOP}  # evaluated init -> its META_INNER_LOOP arm
SECONDARY_INITS: tuple[str, ...] = (METALOOP,)
REPORTED_INITS: tuple[str, ...] = (*INITS, *SECONDARY_INITS)  # every analysed initialisation, in reporting order
BASE_SEED = -1  # the untrained model is one cluster (its train_seed)
TASK_ROLES: tuple[str, ...] = ("train", "meta_test")  # meta-trained on in this experiment | held out
DEFAULT_EXPERIMENT = "main"  # files written before experiments existed

# Output schema (docs/architecture.md): column -> pandas dtype used when writing.
OUTPUT_COLUMNS: dict[str, str] = {
    "init": "str",
    "task": "str",
    "shots": "int64",
    "repeat": "int64",
    "problem_id": "str",
    "level": "int64",
    "gold": "str",
    "generated": "str",
    "extracted": "str",  # null where no \boxed{} was found
    "correct": "bool",
    "grade_status": "str",
    "nll": "float64",
    "nll_tokens": "int64",
    "gen_tokens": "int64",
    "shot_ids": "str",
    "truncated": "bool",  # generation cut at eval.max_new_tokens (no stop token)
    "experiment": "str",
    "train_seed": "int64",  # -1: the untrained base model
    "shot_seed": "int64",
    "task_role": "str",  # train (meta-trained on in this experiment) | meta_test (held out)
    "support_loss_before": "float64",  # k-shot loss at the initialisation (NaN at 0 shots)
    "support_loss_after": "float64",  # the same loss after adaptation
    "weight_change": "float64",  # ‖Δw‖/‖w‖ of the adaptation (0 at 0 shots)
    "adapt_lr": "float64",
    "adapt_steps": "int64",
    "adapt_optimizer": "str",
    "adapt_protocol": "str",  # all_shots | meta_inner_loop (PROTOCOLS)
}

# What a reader needs of every file; the other columns take these values when an (older) file lacks them.
REQUIRED_COLUMNS: tuple[str, ...] = ("init", "task", "shots", "repeat", "problem_id", "correct", "grade_status", "nll")
OPTIONAL_DEFAULTS: dict[str, object] = {
    "experiment": DEFAULT_EXPERIMENT,
    "shot_seed": 0,
    "task_role": "train",
    "truncated": np.nan,
    "gen_tokens": np.nan,
    "generated": None,
    "support_loss_before": np.nan,
    "support_loss_after": np.nan,
    "weight_change": np.nan,
    "adapt_lr": np.nan,
    "adapt_steps": np.nan,
    "adapt_optimizer": "",
    "adapt_protocol": ALL_SHOTS,  # the only protocol before the meta-training inner loop row
}
# One row per key: the unit every analysis pairs on.
KEY: tuple[str, ...] = ("experiment", "train_seed", "shot_seed", "init", "task", "shots", "repeat", "problem_id")


def to_output_schema(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns in schema order with schema dtypes (``extracted`` keeps its nulls)."""
    missing = [c for c in OUTPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"evaluation rows: missing column(s) {missing}")
    frame = frame[list(OUTPUT_COLUMNS)].copy()
    for column, dtype in OUTPUT_COLUMNS.items():
        # "string" keeps None as a null (astype(str) would write the text "None" on pandas 2).
        frame[column] = frame[column].astype("string" if dtype == "str" else dtype)
    return frame
