"""The calibration stage's results as the summary and figures read them, and the adaptation speed.

One JSON file per calibrated (init, experiment, train_seed):
``{"init", "experiment": str|null, "train_seed": int, "optimizer": "sgd"|"adam", "chosen": {"lr", "num_steps"},
"grid": [{"lr", "num_steps", "dev_loss", "dev_loss_before"}], "curve": [{"lr", "step", "dev_loss"}]}``.

*Adaptation speed* (``docs/statistics.md``): on the dev-loss curve at the chosen learning rate, the first step at
which the loss has made 90% of its largest reduction below the unadapted loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.choice import AdaptationChoice

SPEED_FRACTION = 0.9
OPTIMIZERS = ("sgd", "adam")
CHOSEN_COLUMNS = [
    "init",
    "experiment",
    "train_seed",
    "optimizer",
    "lr",
    "num_steps",
    "dev_loss_before",
    "dev_loss",
    "steps_to_90",
    "curve_steps",
    "at_grid_edge",  # "lowest"/"highest" when the chosen rate is an end of the grid: the optimum may lie beyond it
]


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--calibration {path}: file not found")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--calibration {path}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    where = f"--calibration {path}"
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    for key in ("init", "train_seed", "optimizer", "chosen", "grid", "curve"):
        if key not in record:
            raise ConfigError(f"{where}: missing key {key!r}")
    if record["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"{where}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {record['optimizer']!r}")
    chosen = record["chosen"]
    if not isinstance(chosen, dict) or {"lr", "num_steps"} - set(chosen):
        raise ConfigError(f"{where}: chosen must hold lr and num_steps")
    for name, keys in (
        ("grid", ("lr", "num_steps", "dev_loss", "dev_loss_before")),
        ("curve", ("lr", "step", "dev_loss")),
    ):
        if not isinstance(record[name], list):
            raise ConfigError(f"{where}: {name} must be a list")
        for k, entry in enumerate(record[name]):
            missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise ConfigError(f"{where}: {name}[{k}] lacks {', '.join(missing)}")
            for key in keys:
                _number(entry[key], f"{where}: {name}[{k}].{key}")
    return record


def steps_to_fraction(steps: Sequence[float], losses: Sequence[float], start: float, fraction: float = SPEED_FRACTION):
    """First step at which ``start − loss`` reaches ``fraction`` of the largest reduction; NaN if none."""
    pairs = sorted(zip(steps, losses, strict=True))
    if not pairs:
        return math.nan
    reduction = start - min(loss for _, loss in pairs)
    if not reduction > 0:
        return math.nan
    goal = start - fraction * reduction
    return float(next(step for step, loss in pairs if loss <= goal))


def grid_edge(chosen: float, rates: Sequence[float]) -> str:
    """``"lowest"``/``"highest"`` when ``chosen`` is an end of a grid of several rates, else ``""``."""
    distinct = sorted(set(rates))
    if len(distinct) < 2:
        return ""
    if math.isclose(chosen, distinct[0]):
        return "lowest"
    return "highest" if math.isclose(chosen, distinct[-1]) else ""


def load_calibration(paths: Sequence[str | Path]) -> dict[str, pd.DataFrame]:
    """``chosen`` (one row per file, with the adaptation speed), ``grid`` and ``curve`` (long tables)."""
    chosen, grid, curve = [], [], []
    for path in map(Path, paths):
        record = _read(path)
        key = {
            "init": str(record["init"]),
            "experiment": record["experiment"] if record.get("experiment") is not None else "",
            "train_seed": int(record["train_seed"]),
            "optimizer": record["optimizer"],
        }
        choice = AdaptationChoice.from_report(record)
        lr, steps = choice.lr, choice.num_steps
        grid += [key | entry for entry in record["grid"]]
        curve += [key | entry for entry in record["curve"]]
        at = [g for g in record["grid"] if math.isclose(g["lr"], lr) and int(g["num_steps"]) == steps]
        before = float(at[0]["dev_loss_before"]) if at else math.nan
        on_curve = [c for c in record["curve"] if math.isclose(c["lr"], lr)]
        start = next((c["dev_loss"] for c in on_curve if c["step"] == 0), before)
        chosen.append(
            key
            | {
                "lr": lr,
                "num_steps": steps,
                "dev_loss_before": before,
                "dev_loss": float(at[0]["dev_loss"]) if at else math.nan,
                "steps_to_90": steps_to_fraction(
                    [c["step"] for c in on_curve], [c["dev_loss"] for c in on_curve], start
                ),
                "curve_steps": max((int(c["step"]) for c in on_curve), default=0),
                "at_grid_edge": grid_edge(lr, [float(g["lr"]) for g in record["grid"]]),
            }
        )
    return {
        "chosen": pd.DataFrame(chosen, columns=CHOSEN_COLUMNS),
        "grid": pd.DataFrame(grid),
        "curve": pd.DataFrame(curve),
    }
