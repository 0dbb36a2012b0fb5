"""Helpers the Snakefile imports: where the package lives, and path params derived from files."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from fomaml_math.evaluation.choice import AdaptationChoice, read_choice_and_model

SRC_DIR = str(Path(__file__).resolve().parents[1])


def export_package_path() -> None:
    """Put ``src/`` on the jobs' PYTHONPATH so ``python -m fomaml_math`` works without an install
    (e.g. inside conda environments that Snakemake builds from envs/)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if SRC_DIR not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([SRC_DIR, *parts])


def tasks_dir(wildcards: object, input: object) -> str:
    """``results/data/tasks`` from its first task file (``<dir>/<task>/<split>.parquet``)."""
    return str(Path(input.tasks[0]).parent.parent)  # type: ignore[attr-defined]


def output_dir(wildcards: object, output: object) -> str:
    """The folder of a rule's first output."""
    return str(Path(output[0]).parent)  # type: ignore[index]


def job_interpreter_warning() -> str | None:
    """A warning when jobs would run another Python than the one running Snakemake.

    Rules call ``python -m fomaml_math`` and ``accelerate`` from the PATH; run Snakemake from an
    environment that is not activated and the jobs fail with ``No module named ...``.
    """
    found = shutil.which("python")
    ours = Path(sys.executable).parent
    if found is not None and Path(found).parent.resolve() == ours.resolve():
        return None
    return (
        f"`python` on the PATH is {found or 'missing'}, not {sys.executable} (the interpreter running "
        f"Snakemake): jobs may not find the packages; activate the environment first "
        f"(source {ours.parent}/bin/activate), unless you use --software-deployment-method conda"
    )


def adaptation_choice(calibration_json: str | Path, shots: int) -> tuple[AdaptationChoice, str]:
    """The adaptation a tuner file chose for an evaluation at ``shots``, and the model folder it adapts
    (:mod:`fomaml_math.evaluation.choice`)."""
    return read_choice_and_model(calibration_json, shots)


def choice_flag_name(choice: AdaptationChoice) -> str:
    """The flag file an evaluation depends on: named by the chosen value, so a retuning that chooses the
    same value reruns no evaluation."""
    checkpoint = "model" if choice.checkpoint is None else f"ckpt{choice.checkpoint}"
    return f"results/calibration-choices/{choice.optimizer}-{checkpoint}-lr{choice.lr!r}-steps{choice.num_steps}.flag"
