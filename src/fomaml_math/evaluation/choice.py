"""The adaptation an evaluation uses: one typed record, from the calibration file to the inner loop.

The calibration stage writes it (``optimizer`` and ``chosen: {lr, num_steps}`` of ``calibration.json``);
:func:`read_choice` is the one reader, used by the workflow (:func:`fomaml_math.workflow.adaptation_choice`,
whose value names the evaluation's flag file and its ``--adapt-lr``/``--adapt-steps``), by the evaluation
(those flags, or the uncalibrated ``eval`` settings) and by the analysis (:mod:`fomaml_math.analysis.calibration`).
Standard library only: the Snakefile imports it at every start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AdaptationChoice:
    """How an initialisation is adapted to its k shots: optimizer, learning rate and number of steps."""

    optimizer: str  # sgd | adam
    lr: float
    num_steps: int

    def to_json(self) -> dict[str, Any]:
        """The calibration report's ``chosen`` entry (the optimizer is the report's own top-level key)."""
        return {"lr": float(self.lr), "num_steps": int(self.num_steps)}

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> AdaptationChoice:
        """The choice a calibration report (``calibration.json``, parsed) holds."""
        chosen = report["chosen"]
        return cls(str(report["optimizer"]), float(chosen["lr"]), int(chosen["num_steps"]))

    def calibrated(self, lr: float | None, num_steps: int | None) -> AdaptationChoice:
        """This choice with a calibrated ``lr``/``num_steps`` where given (the evaluation's command line)."""
        return AdaptationChoice(
            self.optimizer,
            float(self.lr if lr is None else lr),
            int(self.num_steps if num_steps is None else num_steps),
        )


def read_choice(calibration_json: str | Path) -> AdaptationChoice:
    """The adaptation a calibration file chose."""
    return AdaptationChoice.from_report(json.loads(Path(calibration_json).read_text()))
