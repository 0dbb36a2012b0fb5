"""Display names of the initialisations and tasks, shared by the figures and the summary (no matplotlib)."""

from __future__ import annotations

from fomaml_math.evaluation.rows import METALOOP

INIT_LABELS: dict[str, str] = {
    "base": "Base",
    "sft": "SFT",
    "fomaml": "FOMAML",
    METALOOP: "FOMAML (meta-training inner loop)",  # the secondary row
}
TASK_LABELS: dict[str, str] = {
    "algebra": "Algebra",
    "counting_and_probability": "Counting & Prob.",
    "geometry": "Geometry",
    "intermediate_algebra": "Interm. Algebra",
    "number_theory": "Number Theory",
    "prealgebra": "Prealgebra",
    "precalculus": "Precalculus",
    "all": "All tasks",
}


def init_label(init: str) -> str:
    return INIT_LABELS.get(init, init)


def task_label(task: str) -> str:
    return TASK_LABELS.get(task, task.replace("_", " ").capitalize())
