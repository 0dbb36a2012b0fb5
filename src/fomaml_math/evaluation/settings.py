"""The typed settings of the evaluation-like stages (``evaluate``, ``calibrate``).

Built from the stage's settings dict (:func:`fomaml_math.config.stage_settings`, whose schema has
filled every default): keys are read, never defaulted here. The dicts themselves still go into the
resume fingerprint and the reports unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.choice import AdaptationChoice

MODES: tuple[str, ...] = ("finetune", "in_context")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclass(frozen=True)
class ModelSettings:
    name_or_path: str
    revision: str | None
    trust_remote_code: bool
    max_seq_len: int

    @classmethod
    def from_dict(cls, model: Mapping[str, Any]) -> ModelSettings:
        return cls(str(model["name_or_path"]), model["revision"], bool(model["trust_remote_code"]),
                   int(model["max_seq_len"]))  # fmt: skip

    def revision_for(self, model_path: str) -> str | None:
        """The configured revision names a hub commit of the base model: only the base is loaded at it."""
        return self.revision if model_path == self.name_or_path else None


@dataclass(frozen=True)
class EvalSettings:
    """``config.stage_settings(config, "evaluate")`` as the evaluation reads it."""

    seed: int
    mode: str  # finetune | in_context
    repeats: int
    adaptation: AdaptationChoice  # before calibration: eval.optimizer, eval.inner_lr, eval.num_inner_steps
    inner_batch_size: int
    max_test_problems: int | None
    gen_batch_size: int
    max_new_tokens: int
    grade_timeout_s: float
    backend: str  # hf | vllm
    eval: Mapping[str, Any]  # the raw block (eval.vllm is read by the vllm backend)
    model: ModelSettings
    mixed_precision: str
    instruction: str

    @classmethod
    def from_stage(cls, settings: Mapping[str, Any]) -> EvalSettings:
        ev = settings["eval"]
        if ev["mode"] not in MODES:
            raise ConfigError(f"eval.mode: expected one of {list(MODES)}, got {ev['mode']!r}")
        return cls(
            seed=int(settings["seed"]),
            mode=str(ev["mode"]),
            repeats=int(ev["repeats"]),
            adaptation=AdaptationChoice(str(ev["optimizer"]), float(ev["inner_lr"]), int(ev["num_inner_steps"])),
            inner_batch_size=int(ev["inner_batch_size"]),
            max_test_problems=None if ev["max_test_problems"] is None else int(ev["max_test_problems"]),
            gen_batch_size=int(ev["gen_batch_size"]),
            max_new_tokens=int(ev["max_new_tokens"]),
            grade_timeout_s=float(ev["grade_timeout_s"]),
            # stage_settings leaves eval.backend (and eval.vllm) out when it is hf, so the hf
            # evaluation's settings stay what they were before backends existed: absent means hf.
            backend=str(ev.get("backend", "hf")),
            eval=ev,
            model=ModelSettings.from_dict(settings["model"]),
            mixed_precision=str(settings["mixed_precision"]),
            instruction=str(settings["prompt"]["instruction"]),
        )


@dataclass(frozen=True)
class CalibrationSettings:
    """``config.stage_settings(config, "calibrate")`` as the tuner reads it."""

    seed: int
    criterion: str  # accuracy | answer_nll | nll (evaluation.criteria)
    lr_grid: tuple[float, ...]  # ascending, FOMAML's training inner rate included
    steps_grid: tuple[int, ...]  # ascending; 0 (no adaptation) may be a candidate
    shots: tuple[int, ...]  # the tuned shot counts (0 included when 0 shots are evaluated)
    draws: int
    max_monitor_examples: int
    screen: int | None  # None: every grid point generated; N: the N best by answer NLL per tuned k (and neighbours)
    max_extensions: int  # the cap: extension rounds per tuned k past a resolved edge
    edge_margin: float  # dev problems a choice must beat its inward neighbour by for its edge to count
    optimizer: str
    inner_batch_size: int
    max_new_tokens: int
    gen_batch_size: int
    grade_timeout_s: float
    model: ModelSettings
    mixed_precision: str
    instruction: str

    @classmethod
    def from_stage(cls, settings: Mapping[str, Any]) -> CalibrationSettings:
        cal, adaptation, generation = settings["calibration"], settings["adaptation"], settings["generation"]
        return cls(
            seed=int(settings["seed"]),
            criterion=str(cal["criterion"]),
            lr_grid=tuple(lr_grid(settings)),
            steps_grid=tuple(steps_grid(settings)),
            shots=tuple(tuned_shots(settings)),
            draws=int(cal["draws"]),
            max_monitor_examples=int(cal["max_monitor_examples"]),
            screen=None if cal["screen"] is None else int(cal["screen"]),
            max_extensions=int(cal["max_extensions"]),
            edge_margin=float(cal["edge_margin"]),
            optimizer=str(adaptation["optimizer"]),
            inner_batch_size=int(adaptation["inner_batch_size"]),
            max_new_tokens=int(generation["max_new_tokens"]),
            gen_batch_size=int(generation["gen_batch_size"]),
            grade_timeout_s=float(generation["grade_timeout_s"]),
            model=ModelSettings.from_dict(settings["model"]),
            mixed_precision=str(settings["mixed_precision"]),
            instruction=str(settings["prompt"]["instruction"]),
        )


def lr_grid(settings: Mapping[str, Any]) -> list[float]:
    """The configured rates plus FOMAML's training inner rate (when set), ascending."""
    rates = {float(x) for x in settings["calibration"]["lr_grid"]}
    if settings["fomaml_inner_lr"] is not None:
        rates.add(float(settings["fomaml_inner_lr"]))
    return sorted(rates)


def steps_grid(settings: Mapping[str, Any]) -> list[int]:
    """``calibration.steps_grid`` ascending; unset: the evaluation's ``num_inner_steps`` alone."""
    grid = settings["calibration"]["steps_grid"]
    return sorted({int(s) for s in grid}) if grid else [int(settings["adaptation"]["num_inner_steps"])]


def tuned_shots(settings: Mapping[str, Any]) -> list[int]:
    """The tuned shot counts (``config.tuned_shot_counts``, resolved into the stage settings)."""
    return sorted(int(k) for k in settings["tuned_shots"])
