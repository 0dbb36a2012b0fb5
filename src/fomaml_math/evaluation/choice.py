"""The adaptation an evaluation uses: one typed record, from the tuner's file to the inner loop.

The tuner (stage ``calibrate``, :mod:`fomaml_math.evaluation.calibrate`) writes, per tuned shot count,
the kept checkpoint and the adaptation (optimizer, learning rate, steps) it chose jointly: the
``chosen`` list of ``calibration.json``.  An evaluated shot count ``k`` uses the entry of its *band*
(:func:`band_of`: the tuned shot count nearest to ``k`` on a log scale, ties to the smaller; 0 shots is
its own band).  :func:`read_choice` is the one reader, used by the workflow
(:func:`fomaml_math.workflow.adaptation_choice`: the flag file named after the value, ``--model``,
``--adapt-lr``/``--adapt-steps``), by the evaluation (those flags, or the untuned ``eval`` settings)
and by the analysis (:mod:`fomaml_math.analysis.calibration`).  Standard library only: the Snakefile
imports it at every start.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AdaptationChoice:
    """How an initialisation is adapted to its k shots: optimizer, learning rate and number of steps,
    and (tuned runs) which candidate checkpoint is adapted (its training step; ``None``: the run's model)."""

    optimizer: str  # sgd | adam
    lr: float
    num_steps: int
    checkpoint: int | None = None

    def to_json(self) -> dict[str, Any]:
        """A ``chosen`` entry's adaptation (the optimizer is the report's own top-level key)."""
        return {"checkpoint": self.checkpoint, "lr": float(self.lr), "num_steps": int(self.num_steps)}

    @classmethod
    def from_entry(cls, optimizer: str, entry: Mapping[str, Any]) -> AdaptationChoice:
        checkpoint = entry.get("checkpoint")
        return cls(str(optimizer), float(entry["lr"]), int(entry["num_steps"]),
                   None if checkpoint is None else int(checkpoint))  # fmt: skip

    def calibrated(self, lr: float | None, num_steps: int | None) -> AdaptationChoice:
        """This choice with a tuned ``lr``/``num_steps`` where given (the evaluation's command line)."""
        return AdaptationChoice(
            self.optimizer,
            float(self.lr if lr is None else lr),
            int(self.num_steps if num_steps is None else num_steps),
            self.checkpoint,
        )


def band_of(shots: int, tuned: Sequence[int]) -> int:
    """The tuned shot count whose choice an evaluation at ``shots`` uses: itself if tuned, 0 for 0 shots,
    else the nearest positive tuned count on a log scale (ties to the smaller)."""
    if shots in tuned:
        return int(shots)
    if shots == 0:
        raise ValueError("0 shots: not tuned (add 0 to the evaluated shots)")
    positive = sorted(int(k) for k in tuned if int(k) > 0)
    if not positive:
        raise ValueError(f"{shots} shots: no positive shot count was tuned")
    # rounded: log(10) - log(5) and log(20) - log(10) differ in the last bit, and equidistant must tie
    return min(positive, key=lambda k: (round(abs(math.log(k) - math.log(shots)), 9), k))


def choice_for(report: Mapping[str, Any], shots: int) -> AdaptationChoice:
    """The choice a tuner report (``calibration.json``, parsed) holds for an evaluation at ``shots``."""
    entries = {int(e["shots"]): e for e in report["chosen"]}
    return AdaptationChoice.from_entry(report["optimizer"], entries[band_of(int(shots), sorted(entries))])


def read_choice(calibration_json: str | Path, shots: int) -> AdaptationChoice:
    """The adaptation (and checkpoint) a tuner file chose for an evaluation at ``shots``."""
    return choice_for(json.loads(Path(calibration_json).read_text()), shots)


def read_chosen_model(calibration_json: str | Path, shots: int) -> str:
    """The model folder of the checkpoint a tuner file chose for ``shots`` (its ``candidates`` entry's path,
    as the tuner was given it: relative to the workflow's directory when the rules ran it)."""
    return read_choice_and_model(calibration_json, shots)[1]


def read_choice_and_model(calibration_json: str | Path, shots: int) -> tuple[AdaptationChoice, str]:
    """:func:`read_choice` and :func:`read_chosen_model` from one read of the file (the rules call it per job)."""
    report = json.loads(Path(calibration_json).read_text())
    choice = choice_for(report, shots)
    paths = {int(c["step"]): str(c["path"]) for c in report["candidates"]}
    if choice.checkpoint not in paths:
        raise ValueError(f"{calibration_json}: the chosen checkpoint {choice.checkpoint} is not among its candidates")
    return choice, paths[choice.checkpoint]
