"""Optimisation shared by both trainers: AdamW with warm-up and decay, clipping, divergence checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fomaml_math.adapt import trainable_parameters
from fomaml_math.errors import ConfigError
from fomaml_math.training.runtime import Runtime


class TrainingDivergedError(RuntimeError):
    """A loss or gradient norm became NaN/inf; training stops and the last good checkpoint is kept."""


class LRSchedule:
    """Multiplier of the base learning rate for optimizer step ``s`` (0-based), picklable for checkpoints.

    Warm-up: ``(s + 1) / (warmup + 1)`` for ``s < warmup``; then with ``p = (s - warmup) / (total - warmup)``
    cosine ``0.5 * (1 + cos(pi * p))``, linear ``1 - p``, constant ``1``.
    """

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int) -> None:
        if schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_schedule: expected cosine, linear or constant, got {schedule!r}")
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    params: Sequence[torch.nn.Parameter], *, lr: float, weight_decay: float, schedule: str, warmup: int, total: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (torch defaults: betas 0.9/0.999, eps 1e-8) and its warm-up + decay schedule."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(schedule, warmup, total))
    return optimizer, scheduler


def clip_and_norm(runtime: Runtime, model: Any, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradient to ``max_norm``; return its total L2 norm before clipping.

    ``clip_grad_norm_`` handles FSDP2's DTensor gradients (one device mesh) itself; the norm is then a
    DTensor that every process turns into the same full value.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    value = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(value)


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing; transformers renamed the method (``activation_...`` in 5.18+)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers <= 5.17 (e.g. a lent GPU machine's preinstalled stack)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_training(
    runtime: Runtime,
    model: Any,
    compute: Mapping[str, Any],
    *,
    lr: float,
    weight_decay: float,
    schedule: str,
    warmup: int,
    total: int,
) -> tuple[Any, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, list[torch.nn.Parameter]]:
    """Gradient checkpointing, device placement (task mode) or FSDP2 sharding (fsdp mode), AdamW + schedule.

    Returns the (possibly wrapped) model, optimizer, scheduler and the trainable parameters to update.
    """
    model.config.use_cache = False
    if compute["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    model.train()
    if runtime.mode == "fsdp":
        # accelerate's FSDP2 path shards the model and swaps the optimizer's parameters in one prepare call
        optimizer, scheduler = make_optimizer(
            trainable_parameters(model), lr=lr, weight_decay=weight_decay, schedule=schedule, warmup=warmup, total=total
        )
        model, optimizer = runtime.accelerator.prepare(model, optimizer)
        return model, optimizer, scheduler, trainable_parameters(model)
    model = model.to(runtime.device)
    params = trainable_parameters(model)
    optimizer, scheduler = make_optimizer(
        params, lr=lr, weight_decay=weight_decay, schedule=schedule, warmup=warmup, total=total
    )
    return model, optimizer, scheduler, params


def check_finite(values: dict[str, float], *, step: int, checkpoint_hint: str) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        first = ", ".join(f"{k}={v}" for k, v in list(bad.items())[:3])
        raise TrainingDivergedError(
            f"non-finite value at step {step} ({first}); no update was applied, {checkpoint_hint}; "
            "lower the learning rates or check the data"
        )


def apply_update(
    runtime: Runtime,
    model: Any,
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float,
    checked: Callable[[float], dict[str, float]],
    step: int,
    checkpoint_hint: str,
    *,
    divide_by: int | None = None,
) -> float:
    """The end of every training step, after the backward passes: one update from ``.grad``.

    Sum ``.grad`` over processes, divide it by ``divide_by`` (if given), clip it to ``max_grad_norm``;
    if a value of ``checked(grad_norm)`` is NaN/inf, zero ``.grad`` and raise :class:`TrainingDivergedError`
    (no update); else one optimizer and schedule step, and zero ``.grad``.  Returns the pre-clip norm.
    """
    runtime.reduce_grads(params)
    if divide_by is not None:
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.div_(divide_by)
    grad_norm = clip_and_norm(runtime, model, params, max_grad_norm)
    try:
        check_finite(checked(grad_norm), step=step, checkpoint_hint=checkpoint_hint)
    except TrainingDivergedError:
        optimizer.zero_grad(set_to_none=True)
        raise
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
