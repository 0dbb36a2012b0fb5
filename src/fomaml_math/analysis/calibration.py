"""The tuner's results (stage ``calibrate``) as the summary and figures read them, and the adaptation speed.

One JSON file per tuned initialisation instance (init, experiment, train_seed; -1: the untrained base),
written by :mod:`fomaml_math.evaluation.calibrate`.  The keys read here::

    {"init", "experiment": str|null, "train_seed": int, "optimizer": "sgd"|"adam",
     "criterion": "accuracy"|"answer_nll"|"nll",
     "chosen": [{"shots", "checkpoint", "lr", "num_steps", "nll", "answer_nll", "accuracy",
                 "criterion_value", "edges": [str], "edge_note": str,            # one per tuned k
                 "cap": bool|str (optional: the choice stopped at the tuner's grid-extension cap)}],
     "grid":  [{"checkpoint", "shots", "lr", "num_steps", "nll", "answer_nll", "accuracy",
                "accuracy_half_a", "accuracy_half_b"}],
     "curve": [{"checkpoint", "shots", "lr", "step", "nll", "answer_nll", "accuracy"}],  # step 0..max
     "agreement": {"all" | "<k>": {"accuracy", "answer_nll", "nll", "split_half"}}}

Accuracies (and agreements) may be ``null`` (not graded, or undefined), NLLs ``Infinity`` (diverged).
The choice itself is read with :meth:`fomaml_math.evaluation.choice.AdaptationChoice.from_entry`.

:func:`load_calibration` returns four long tables, one row per file and per tuned k (``chosen``),
grid point, curve point or agreement group: per training seed, never averaged over seeds (a mean of
chosen rates or checkpoints is no adaptation anyone ran).

*Before* is the chosen checkpoint unadapted (step 0 of its curve at the chosen k and rate, else any
step-0 measurement of that checkpoint).  *Adaptation speed* (``docs/statistics.md``): on the dev-NLL
curve of the chosen checkpoint, k and rate, starting at step 0, the first step at which the NLL has
made 90% of its largest reduction below the unadapted NLL; NaN if it never falls (and at 0 shots).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.choice import AdaptationChoice

SPEED_FRACTION = 0.9
OPTIMIZERS = ("sgd", "adam")
CRITERIA = ("accuracy", "answer_nll", "nll")  # as evaluation.criteria.CRITERIA (not imported: it loads the model code)
AGREEMENT_KEYS = ("accuracy", "answer_nll", "nll", "split_half")
KEY_COLUMNS = ["init", "experiment", "train_seed", "optimizer", "criterion"]
CHOSEN_COLUMNS = [
    *KEY_COLUMNS,
    "shots",
    "checkpoint",  # the kept training step (0: the untrained base)
    "lr",
    "num_steps",
    "criterion_value",
    "accuracy_before",  # dev accuracy of the checkpoint unadapted
    "accuracy",  # dev accuracy at the choice
    "nll_before",
    "nll",
    "answer_nll",
    "steps_to_90",
    "curve_steps",
    "edges",  # ";"-joined, e.g. "lr:lowest;num_steps:highest": the choice is an end of that grid
    "edge_note",
    "cap",  # "" or the tuner's flag that the choice stopped at its grid-extension cap (older files: none, "")
    "open_edges",  # ";"-joined edges the tuner resolves (beyond calibration.edge_margin); None: a tuner without them
    "tasks",  # ","-joined: the tasks whose dev data was tuned on (meta_val, else the training tasks)
]
GRID_COLUMNS = [*KEY_COLUMNS, "checkpoint", "shots", "lr", "num_steps", "nll", "answer_nll", "accuracy",
                "accuracy_half_a", "accuracy_half_b"]  # fmt: skip
CURVE_COLUMNS = [*KEY_COLUMNS, "checkpoint", "shots", "lr", "step", "nll", "answer_nll", "accuracy"]
AGREEMENT_COLUMNS = [*KEY_COLUMNS, "group", *AGREEMENT_KEYS]

_INTEGERS = ("shots", "checkpoint", "num_steps", "step")
_NULLABLE = ("accuracy", "accuracy_half_a", "accuracy_half_b", "criterion_value")
_CHOSEN_KEYS = ("shots", "checkpoint", "lr", "num_steps", "nll", "answer_nll", "accuracy", "criterion_value",
                "edges", "edge_note")  # fmt: skip
_GRID_KEYS = ("checkpoint", "shots", "lr", "num_steps", "nll", "answer_nll", "accuracy", "accuracy_half_a",
              "accuracy_half_b")  # fmt: skip
_CURVE_KEYS = ("checkpoint", "shots", "lr", "step", "nll", "answer_nll", "accuracy")


def _number(value: object, where: str, *, nullable: bool = False, integer: bool = False) -> float:
    if value is None and nullable:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "an integer" if integer else "a number" + (" or null" if nullable else "")
        raise ConfigError(f"{where}: expected {kind}, got {value!r}")
    if integer and not (math.isfinite(value) and float(value).is_integer()):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return float(value)


def _entries(record: Mapping[str, Any], name: str, keys: Sequence[str], where: str) -> list[dict[str, Any]]:
    """``record[name]``, a list of objects with ``keys``: numbers (integers where they count, null where allowed)."""
    if not isinstance(record[name], list):
        raise ConfigError(f"{where}: {name} must be a list")
    out = []
    for k, entry in enumerate(record[name]):
        missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise ConfigError(f"{where}: {name}[{k}] lacks {', '.join(missing)}")
        row = dict(entry)
        for key in keys:
            if key in ("edges", "edge_note"):
                continue
            value = _number(entry[key], f"{where}: {name}[{k}].{key}", nullable=key in _NULLABLE,
                            integer=key in _INTEGERS)  # fmt: skip
            row[key] = int(value) if key in _INTEGERS else value
        out.append(row)
    return out


def _read(path: Path) -> dict[str, Any]:
    """The file's record, checked: a one-line ConfigError naming the file and the key otherwise."""
    where = f"--calibration {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: file not found")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    for key in ("init", "experiment", "train_seed", "optimizer", "criterion", "chosen", "grid", "curve", "agreement"):
        if key not in record:
            raise ConfigError(f"{where}: missing key {key!r} (a file of the tuner, stage calibrate, has it)")
    if not isinstance(record["init"], str) or not record["init"]:
        raise ConfigError(f"{where}: init must be a non-empty string, got {record['init']!r}")
    if record["experiment"] is not None and not isinstance(record["experiment"], str):
        raise ConfigError(f"{where}: experiment must be a string or null, got {record['experiment']!r}")
    _number(record["train_seed"], f"{where}: train_seed", integer=True)
    if record["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"{where}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {record['optimizer']!r}")
    if record["criterion"] not in CRITERIA:
        raise ConfigError(f"{where}: criterion must be one of {', '.join(CRITERIA)}, got {record['criterion']!r}")
    if not isinstance(record["chosen"], list) or not record["chosen"]:
        raise ConfigError(f"{where}: chosen must be a non-empty list (one entry per tuned shot count)")
    chosen = _entries(record, "chosen", _CHOSEN_KEYS, where)
    for k, entry in enumerate(chosen):
        edges = entry["edges"]
        if not isinstance(edges, list) or not all(isinstance(e, str) for e in edges):
            raise ConfigError(f"{where}: chosen[{k}].edges must be a list of strings, got {edges!r}")
        if not isinstance(entry["edge_note"], str):
            raise ConfigError(f"{where}: chosen[{k}].edge_note must be a string, got {entry['edge_note']!r}")
    shots = [e["shots"] for e in chosen]
    if len(set(shots)) != len(shots):
        raise ConfigError(f"{where}: chosen lists a shot count twice ({shots})")
    agreement = record["agreement"]
    if not isinstance(agreement, dict):
        raise ConfigError(f"{where}: agreement must be an object (group -> Spearman correlations)")
    for group, values in agreement.items():
        missing = [key for key in AGREEMENT_KEYS if not isinstance(values, dict) or key not in values]
        if missing:
            raise ConfigError(f"{where}: agreement[{group!r}] lacks {', '.join(missing)}")
        for key in AGREEMENT_KEYS:
            _number(values[key], f"{where}: agreement[{group!r}].{key}", nullable=True)
    return record | {
        "chosen": chosen,
        "grid": _entries(record, "grid", _GRID_KEYS, where),
        "curve": _entries(record, "curve", _CURVE_KEYS, where),
    }


def steps_to_fraction(steps: Sequence[float], losses: Sequence[float], start: float, fraction: float = SPEED_FRACTION):
    """First step at which ``start − loss`` reaches ``fraction`` of the largest reduction; NaN if none.

    Steps whose loss is NaN are left out; a non-finite ``start`` (diverged before adapting) gives NaN."""
    pairs = sorted((float(s), float(loss)) for s, loss in zip(steps, losses, strict=True) if not math.isnan(loss))
    if not pairs or not math.isfinite(start):
        return math.nan
    lowest = min(loss for _, loss in pairs)
    reduction = start - lowest
    if not reduction > 0:
        return math.nan
    goal = start - fraction * reduction
    return next(step for step, loss in pairs if loss <= goal or loss == lowest)


def _ordered_groups(groups: Sequence[str]) -> list[str]:
    """``all`` first, then the shot counts in numeric order, then anything else."""
    numeric = sorted((g for g in groups if g.isdigit()), key=int)
    return [g for g in groups if g == "all"] + numeric + sorted(g for g in groups if g != "all" and not g.isdigit())


def _value(entries: Sequence[Mapping[str, Any]], name: str) -> float:
    """The first non-NaN ``name`` among ``entries``; NaN if none has one."""
    return next((float(e[name]) for e in entries if not math.isnan(e[name])), math.nan)


def _chosen_row(record: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    choice = AdaptationChoice.from_entry(record["optimizer"], entry)
    shots = int(entry["shots"])
    mine = [c for c in record["curve"] if c["checkpoint"] == choice.checkpoint]
    on_curve = sorted((c for c in mine if c["shots"] == shots and math.isclose(c["lr"], choice.lr)),
                      key=lambda c: c["step"])  # fmt: skip
    # Unadapted: step 0 of this very curve, else any step-0 measurement of the checkpoint (one and the same).
    unadapted = [c for c in on_curve if c["step"] == 0] + [c for c in mine if c["step"] == 0]
    unadapted += [g for g in record["grid"] if g["checkpoint"] == choice.checkpoint and g["num_steps"] == 0]
    nll_before = _value(unadapted, "nll")
    return {
        "shots": shots,
        "checkpoint": choice.checkpoint,
        "lr": choice.lr,
        "num_steps": choice.num_steps,
        "criterion_value": entry["criterion_value"],
        "accuracy_before": _value(unadapted, "accuracy"),
        "accuracy": entry["accuracy"],
        "nll_before": nll_before,
        "nll": entry["nll"],
        "answer_nll": entry["answer_nll"],
        "steps_to_90": steps_to_fraction([c["step"] for c in on_curve], [c["nll"] for c in on_curve], nll_before),
        "curve_steps": max((c["step"] for c in on_curve), default=0),
        "edges": ";".join(entry["edges"]),
        # the edges the tuner resolves (beyond calibration.edge_margin) and would extend past; None from a tuner
        # that does not extend (every end of its grid then counts)
        "open_edges": None if entry.get("open_edges") is None else ";".join(entry["open_edges"]),
        "edge_note": entry["edge_note"],
        "cap": cap_text(entry),
    }


def cap_text(entry: Mapping[str, Any]) -> str:
    """ "" unless the tuner flagged the choice as stopped at its grid-extension cap: a truthy ``cap`` key (its text
    when it is one, else "cap"), or the word "cap" in an edge or the edge note. Files without the flag read as ""."""
    flag = entry.get("cap")
    if isinstance(flag, str) and flag.strip():
        return flag.strip()
    if flag and not isinstance(flag, str):
        return "cap" if flag is True else str(flag)
    words = [*entry.get("edges", []), entry.get("edge_note", "")]
    return "cap" if any("cap" in re.split(r"[^a-z]+", str(w).lower()) for w in words) else ""


@dataclass(frozen=True)
class EdgeRuns:
    """One (experiment, init): its tuned runs (training seeds), those with a k > 0 choice at a grid edge, those
    with one stopped at the grid-extension cap, and each edge ("axis:end", e.g. "lr:lowest") with its run count."""

    experiment: str
    init: str
    runs: int
    at_edge: int
    capped: int
    edges: dict[str, int]


def edge_runs(chosen: pd.DataFrame, inits: Sequence[str], experiments: Sequence[str] | None = None) -> list[EdgeRuns]:
    """:class:`EdgeRuns` per (experiment, init of ``inits``) in the ``chosen`` table; ``experiments`` (None: all)
    restricts them."""
    rows = chosen[chosen["init"].isin(list(inits)) & (chosen["shots"] > 0)]
    if experiments is not None:
        rows = rows[rows["experiment"].isin(list(experiments))]
    out = []
    for (experiment, init), group in rows.groupby(["experiment", "init"], sort=False):
        # A self-extending tuner's choice counts only on an edge it resolves (it extends past those, so after tuning
        # that means at the cap); an end of its final grid within the dev noise is no edge. Older files: every end.
        column = "open_edges" if "open_edges" in group and group["open_edges"].notna().all() else "edges"
        per_run = [
            ({e for cell in run[column] for e in str(cell).split(";") if e}, any(str(c) for c in run["cap"]))
            for _, run in group.groupby("train_seed")
        ]
        edges: dict[str, int] = {}
        for names, _ in per_run:
            for name in sorted(names):
                edges[name] = edges.get(name, 0) + 1
        at_edge, capped = sum(bool(n) for n, _ in per_run), sum(c for _, c in per_run)
        out.append(EdgeRuns(str(experiment), str(init), len(per_run), at_edge, capped, edges))
    return out


def load_calibration(paths: Sequence[str | Path]) -> dict[str, pd.DataFrame]:
    """``chosen`` (one row per file × tuned k, with before/after and the adaptation speed), ``grid``, ``curve``
    and ``agreement`` (one row per file × group: ``all`` and each tuned k > 0), as long tables."""
    chosen, grid, curve, agreement = [], [], [], []
    for path in map(Path, paths):
        record = _read(path)
        key = {
            "init": record["init"],
            "experiment": record["experiment"] or "",
            "train_seed": int(record["train_seed"]),
            "optimizer": record["optimizer"],
            "criterion": record["criterion"],
        }
        tasks = {"tasks": ",".join(map(str, record.get("tasks") or []))}
        chosen += [
            key | _chosen_row(record, entry) | tasks for entry in sorted(record["chosen"], key=lambda e: e["shots"])
        ]
        grid += [key | {c: entry[c] for c in _GRID_KEYS} for entry in record["grid"]]
        curve += [key | {c: entry[c] for c in _CURVE_KEYS} for entry in record["curve"]]
        for group in _ordered_groups(list(record["agreement"])):
            values = record["agreement"][group]
            agreement.append(key | {"group": group} | {k: _number(values[k], k, nullable=True) for k in AGREEMENT_KEYS})
    return {
        "chosen": pd.DataFrame(chosen, columns=CHOSEN_COLUMNS),
        "grid": pd.DataFrame(grid, columns=GRID_COLUMNS),
        "curve": pd.DataFrame(curve, columns=CURVE_COLUMNS),
        "agreement": pd.DataFrame(agreement, columns=AGREEMENT_COLUMNS),
    }
