"""Adapt-then-restore: the one place where weights are fine-tuned on a task and put back.

FOMAML training and the few-shot evaluation both adapt the live model in place inside
:func:`adapted` and get the meta-weights back when the ``with`` block ends, whatever happens in
it.  There are no "fast weights" next to the live parameters (the seed's first bug) and no way
to forget the restore (its second bug).  The only extra memory is one copy of the trainable
weights (:class:`WeightSnapshot`), which may live on the CPU.

Inner-loop gradients are taken with ``torch.autograd.grad`` so ``.grad``, where FOMAML
accumulates its meta-gradient, is never touched.  Under FSDP that is impossible (the sharded
parameters are not in the autograd graph), so ``grad_mode="backward"`` moves ``.grad`` aside,
lets FSDP reduce-scatter each inner gradient into ``.grad``, applies it, and puts the original
``.grad`` back before the body runs: from the caller's side ``.grad`` is again untouched.

Mixed precision: open autocast per forward pass (inside ``loss_fn``), not around the ``with``
block.  Autocast caches its low-precision copies of the weights until its outermost context exits,
so in-place updates inside one autocast region would be computed against stale copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fomaml_math.batching import SFTBatch, sft_loss

LossFn = Callable[[Any, Any], tuple[torch.Tensor, int]]
GradMode = Literal["autograd", "backward"]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that adaptation changes (tied weights appear once)."""
    return [p for p in model.parameters() if p.requires_grad]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter or gradient), or the tensor itself.

    Must be called under ``torch.no_grad()``: ``to_local`` then returns the shard's own storage.
    """
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


class WeightSnapshot:
    """A copy of the trainable weights (the local shards under FSDP) that can be restored in place.

    ``device="cpu"`` keeps the copy in host memory (pinned when the weights are on a GPU),
    ``"same"`` next to the weights.  :meth:`refresh` re-copies the live weights into the same
    buffers, so one snapshot serves every meta-step without reallocating.
    """

    def __init__(self, model: torch.nn.Module, device: str = "cpu") -> None:
        if device not in ("cpu", "same"):
            raise ValueError(f"compute.snapshot_device: expected cpu or same, got {device!r}")
        self.params = trainable_parameters(model)
        self.device = device
        with torch.no_grad():
            self.buffers = [self._empty_like(_local(p)) for p in self.params]
        self.refresh()

    def _empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device == "same":
            return torch.empty_like(tensor)
        pin = tensor.device.type == "cuda"
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current live weights into the snapshot."""
        # foreach: a few fused copy kernels on a GPU instead of one launch per parameter (per-tensor across devices)
        torch._foreach_copy_(self.buffers, [_local(p) for p in self.params], non_blocking=True)
        self._synchronize()

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the snapshot back into the live weights (bitwise)."""
        torch._foreach_copy_([_local(p) for p in self.params], self.buffers, non_blocking=True)
        self._synchronize()

    @torch.no_grad()
    def matches(self) -> bool:
        """Whether the live weights equal the snapshot bitwise (for tests and debugging)."""
        return all(torch.equal(_local(p).cpu(), b.cpu()) for p, b in zip(self.params, self.buffers, strict=True))

    def _synchronize(self) -> None:
        if any(b.is_pinned() for b in self.buffers[:1]) and torch.cuda.is_available():
            torch.cuda.synchronize()  # non_blocking copies from/to pinned memory must finish before use


@dataclass
class AdaptationResult:
    """What the inner loop saw: the support loss of each SGD step, taken before that step's update.

    ``support_losses[0]`` is therefore the loss at the initial (meta-)weights on the first support
    batch (:attr:`loss_before`), and ``support_losses[-1]`` the loss of the final inner step
    (:attr:`final_loss`).  The losses stay on their device (:attr:`losses`) until
    :attr:`support_losses` is first read, because reading them waits for the GPU: FOMAML copies
    :attr:`losses` into a device tensor instead and syncs once per meta-step, not once per task.
    """

    support_tokens: list[int] = field(default_factory=list)
    num_steps: int = 0
    losses: torch.Tensor | None = None  # [num_steps] float32, on the device the losses were computed on
    _support_losses: list[float] | None = field(default=None, init=False, repr=False)

    @property
    def support_losses(self) -> list[float]:
        if self._support_losses is None:
            self._support_losses = [] if self.losses is None else [float(x) for x in self.losses.cpu()]
        return self._support_losses

    @property
    def loss_before(self) -> float:
        return self.support_losses[0] if self.support_losses else math.nan

    @property
    def final_loss(self) -> float:
        return self.support_losses[-1] if self.support_losses else math.nan

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in self.support_losses)


@dataclass(frozen=True)
class MicroBatches:
    """One inner step over several micro-batches whose gradients are accumulated.

    The step's loss is the token-weighted mean over all of them (each micro-batch's mean loss is
    rescaled by its share of the tokens), but only one micro-batch's activations are alive at a
    time: k-shot adaptation with k = 50 costs the memory of ``inner_batch_size`` examples.
    """

    batches: Sequence[Any]

    @property
    def num_tokens(self) -> int:
        return sum(int(b.num_target_tokens) for b in self.batches)


def _step_gradients(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batch: Any,
    loss_fn: LossFn,
    grad_mode: GradMode,
) -> tuple[torch.Tensor, int, Sequence[torch.Tensor | None]]:
    """Loss, token count and gradient of one inner step (a batch, or accumulated micro-batches)."""
    parts = list(batch.batches) if isinstance(batch, MicroBatches) else [batch]
    total_tokens = max(batch.num_tokens, 1) if isinstance(batch, MicroBatches) else None
    step_loss: torch.Tensor | None = None
    step_count = 0
    grads: list[torch.Tensor | None] | None = None
    for part in parts:
        loss, count = loss_fn(model, part)
        if total_tokens is not None:
            loss = loss * (count / total_tokens)
        if grad_mode == "autograd":
            part_grads = torch.autograd.grad(loss, params, allow_unused=True)
            if grads is None:
                grads = list(part_grads)
            else:
                for i, g in enumerate(part_grads):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i].add_(g)
        else:
            loss.backward()  # accumulates into .grad across micro-batches
        # Start from the first loss: a CPU zero moved to the GPU would be a blocking copy (a sync) every step.
        step_loss = loss.detach().float() if step_loss is None else step_loss + loss.detach()
        step_count += count
    if grad_mode == "backward":
        grads = [p.grad for p in params]
    assert grads is not None and step_loss is not None
    return step_loss, step_count, grads


def _sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], lr: float) -> None:
    with torch.no_grad():
        pairs = [(_local(p), _local(g)) for p, g in zip(params, grads, strict=True) if g is not None]
        if pairs:
            torch._foreach_add_([p for p, _ in pairs], [g for _, g in pairs], alpha=-lr)


def _inner_loop(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    support_batches: Sequence[Any],
    inner_lr: float,
    num_steps: int,
    loss_fn: LossFn,
    grad_mode: GradMode,
    result: AdaptationResult,
) -> None:
    losses: list[torch.Tensor] = []
    stashed = [p.grad for p in params] if grad_mode == "backward" else None
    try:
        if stashed is not None:
            for p in params:
                p.grad = None
        for step in range(num_steps):
            batch = support_batches[step % len(support_batches)]
            loss, count, grads = _step_gradients(model, params, batch, loss_fn, grad_mode)
            _sgd_step(params, grads, inner_lr)
            if stashed is not None:
                for p in params:
                    p.grad = None
            losses.append(loss)
            result.support_tokens.append(count)
            del loss, grads
    finally:
        if stashed is not None:
            for p, g in zip(params, stashed, strict=True):
                p.grad = g
    result.losses = torch.stack(losses).float() if losses else None  # no host sync here (see AdaptationResult)
    result.num_steps = num_steps


@contextmanager
def adapted(
    model: torch.nn.Module,
    support_batches: Sequence[SFTBatch] | Sequence[Any],
    *,
    inner_lr: float,
    num_steps: int,
    snapshot_device: str = "cpu",
    snapshot: WeightSnapshot | None = None,
    loss_fn: LossFn = sft_loss,
    grad_mode: GradMode = "autograd",
) -> Iterator[AdaptationResult]:
    """Adapt ``model`` in place with ``num_steps`` plain SGD steps, yield, then restore its weights.

    Step ``i`` uses ``support_batches[i % len(support_batches)]`` and ``loss_fn(model, batch) ->
    (loss, num_tokens)`` (default: :func:`fomaml_math.batching.sft_loss`); a :class:`MicroBatches`
    item makes one step over several micro-batches with accumulated gradients.  The update is
    ``w <- w - inner_lr * grad``.  ``num_steps=0`` adapts nothing (0-shot).  The weights are
    snapshotted on entry (``snapshot_device``: ``"cpu"`` or ``"same"``) unless ``snapshot`` is given,
    which must then hold the current weights (FOMAML takes one per meta-step for all its tasks).
    The weights are restored bitwise on exit, also when the inner loop or the body raises.
    Non-finite losses are recorded, not raised (:attr:`AdaptationResult.finite`): in a
    multi-process run every process has to reach the same decision point first.
    """
    if num_steps < 0:
        raise ValueError(f"num_inner_steps: expected >= 0, got {num_steps}")
    if num_steps > 0 and not support_batches:
        raise ValueError("adapted: num_steps > 0 needs at least one support batch")
    result = AdaptationResult()
    if num_steps == 0:
        yield result
        return
    params = trainable_parameters(model)
    snap = snapshot if snapshot is not None else WeightSnapshot(model, snapshot_device)
    try:
        _inner_loop(model, params, support_batches, inner_lr, num_steps, loss_fn, grad_mode, result)
        yield result
    finally:
        snap.restore()
