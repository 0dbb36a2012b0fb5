"""A training stage's settings, read once: what ``config.stage_settings`` gives ``train_fomaml`` / ``train_sft``.

The schema (``workflow/schemas/config.schema.yaml``) fills every default before a stage runs, so
nothing here restates one: a missing key is a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fomaml_math.errors import ConfigError


def require(mapping: Mapping[str, Any], key: str, where: str = "") -> Any:
    """``mapping[key]``, or a ConfigError naming the dotted key (``where`` is the enclosing section)."""
    if not isinstance(mapping, Mapping) or key not in mapping:
        name = f"{where}.{key}" if where else key
        raise ConfigError(
            f"settings: missing key {name} (pass the stage's full settings, e.g. from config.stage_settings)"
        )
    return mapping[key]


@dataclass(frozen=True)
class MethodSection:
    """The keys of ``settings[method]`` that the loop reads; ``values`` is the whole section (the method's own keys)."""

    name: str  # "fomaml" | "sft"
    lr: float
    total_steps: int
    weight_decay: float
    lr_schedule: str
    warmup_steps: int
    max_grad_norm: float
    test_freq: int
    save_freq: int
    keep_checkpoints: int
    candidate_freq: int  # select.criterion tuned: a candidate every candidate_freq steps (null: test_freq)
    values: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return require(self.values, key, self.name)

    @classmethod
    def read(cls, section: Mapping[str, Any], name: str, *, lr_key: str, steps_key: str) -> MethodSection:
        def get(key: str) -> Any:
            return require(section, key, name)

        return cls(
            name=name,
            lr=float(get(lr_key)),
            total_steps=int(get(steps_key)),
            weight_decay=float(get("weight_decay")),
            lr_schedule=str(get("lr_schedule")),
            warmup_steps=int(get("warmup_steps")),
            max_grad_norm=float(get("max_grad_norm")),
            test_freq=int(get("test_freq")),
            save_freq=int(get("save_freq")),
            keep_checkpoints=int(get("keep_checkpoints")),
            candidate_freq=int(section.get("candidate_freq") or get("test_freq")),
            values=section,
        )


COMPUTE_KEYS = ("num_processes", "mixed_precision", "gradient_checkpointing", "snapshot_device")
MODEL_KEYS = ("name_or_path", "revision", "trust_remote_code", "max_seq_len")
SELECT_KEYS = ("criterion", "shots", "draws", "max_monitor_examples")
WANDB_KEYS = ("mode", "project", "entity")


@dataclass(frozen=True)
class TrainSettings:
    """Typed view of one training stage's settings; ``raw`` is the mapping as passed (it keys resumes)."""

    raw: dict[str, Any]
    method: MethodSection
    seed: int  # dev monitoring draws: the same for every training seed and method
    train_seed: int  # what a replicate changes: the order of the training data
    tasks: list[str]
    model: Mapping[str, Any]
    compute: Mapping[str, Any]
    instruction: str
    select: Mapping[str, Any]
    adaptation: Mapping[str, Any]
    wandb: Mapping[str, Any]

    @property
    def stream_seed(self) -> int:
        """The seed of the training data's order: the training seed *and* the training tasks. Two experiments
        that share a seed (leave-one-subject-out folds) then do not share meta-batches, episodes or epoch orders,
        so their estimates are independent, as the pooled-fold analysis assumes; experiments with the same
        training tasks still train alike."""
        return zlib.crc32(json.dumps([self.train_seed, sorted(self.tasks)]).encode())

    @property
    def keep_finished_checkpoints(self) -> bool:
        """compute.keep_finished_checkpoints (absent: false, the resumable checkpoints go once the outputs exist)."""
        return bool(self.compute.get("keep_finished_checkpoints", False))

    @property
    def criterion(self) -> str:
        return str(self.select["criterion"])

    @classmethod
    def read(cls, settings: dict[str, Any], method: str, *, lr_key: str, steps_key: str) -> TrainSettings:
        """Read ``settings`` (``config.stage_settings(config, "train_<method>")``) for ``method``."""

        def section(key: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
            value = require(settings, key)
            for name in keys:
                require(value, name, key)
            return value

        return cls(
            raw=settings,
            method=MethodSection.read(require(settings, method), method, lr_key=lr_key, steps_key=steps_key),
            seed=int(require(settings, "seed")),
            train_seed=int(require(settings, "train_seed")),
            tasks=list(require(settings, "train_tasks")),
            model=section("model", MODEL_KEYS),
            compute=section("compute", COMPUTE_KEYS),
            instruction=str(require(require(settings, "prompt"), "instruction", "prompt")),
            select=section("select", SELECT_KEYS),
            adaptation=require(settings, "adaptation"),
            wandb=section("wandb", WANDB_KEYS),
        )
