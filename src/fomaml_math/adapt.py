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
A step over several micro-batches accumulates in ``.grad`` the same way in either mode: ``autograd.grad``
would return a second weight-sized gradient tuple next to the accumulated one (16 GB at 4B parameters),
while backward adds each parameter's gradient in place as it is produced.  The sum is the same
``g1 + g2 + ...`` in the same order, so the result is bitwise that of the tuple path (tests/test_adapt.py).

Memory levers of an adaptation (docs/gpu.md): gradient checkpointing acts in the gradient steps even
when the model is in ``eval()`` mode (:func:`checkpointing_active`: the decoder layers, and only they,
are flagged as training for the forward and backward of a step; dropout modules stay off); the loss
may be computed over chunks of target tokens (:func:`chunked_sft_loss`) so the full
``rows x tokens x vocab`` logits never exist.

Mixed precision: open autocast per forward pass (inside ``loss_fn``; :func:`sft_loss_fn` builds
such a loss for training and evaluation alike), not around the ``with`` block.  Autocast caches
its low-precision copies of the weights until its outermost context exits, so in-place updates
inside one autocast region would be computed against stale copies (every inner step would see the
initial weights: k steps would be one step at k times the learning rate).

The inner optimizer is plain SGD (FOMAML's inner loop, the seed's) or Adam (``optimizer="adam"``,
the seed study plan's evaluation adaptation; its two moment buffers live only inside the block).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.utils.checkpoint

from fomaml_math.batching import IGNORE_INDEX, SFTBatch, sft_loss

LossFn = Callable[[Any, Any], tuple[torch.Tensor, int]]
GradMode = Literal["autograd", "backward"]
InnerOptimizer = Literal["sgd", "adam"]
INNER_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
ADAM_BETAS = (0.9, 0.999)  # torch defaults
ADAM_EPS = 1e-8


def sft_loss_fn(
    device: torch.device | str,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    rows: Callable[[SFTBatch], tuple[SFTBatch, float | None]] | None = None,
    chunk_tokens: int | None = None,
) -> LossFn:
    """``loss_fn(model, batch)`` for :func:`adapted`: the SFT loss with autocast opened per forward pass.

    ``autocast`` makes a fresh mixed-precision context for every call (training: accelerate's,
    evaluation: ``torch.autocast``); ``rows`` optionally picks this process's rows of a batch and
    the normaliser that keeps the reduced gradient exact (training's multi-process split);
    ``chunk_tokens`` computes the loss by :func:`chunked_sft_loss` (not under FSDP: it calls the
    decoder and the output layer separately).
    """

    def loss_fn(model: Any, batch: SFTBatch) -> tuple[torch.Tensor, int]:
        normalizer = None
        if rows is not None:
            batch, normalizer = rows(batch)
        with autocast():
            if chunk_tokens:
                return chunked_sft_loss(model, batch.to(device), chunk_tokens, normalizer=normalizer)
            return sft_loss(model, batch.to(device), normalizer=normalizer)

    return loss_fn


def chunked_sft_loss(
    model: Any, batch: SFTBatch, chunk_tokens: int, *, normalizer: float | None = None
) -> tuple[torch.Tensor, int]:
    """:func:`~fomaml_math.batching.sft_loss` with the logits of at most ``chunk_tokens`` targets alive at a time.

    The decoder's hidden states at the target positions go through the output layer and the
    cross-entropy one chunk at a time, each chunk checkpointed (its logits are recomputed in the
    backward pass), so the ``targets x vocab`` logits, their float32 copy, log-softmax and gradient
    (about 3.4 x targets x vocab x 4 bytes at the peak) shrink to one chunk's.  The loss is the sum of
    the chunks' sums instead of one sum, and the output layer multiplies a gathered matrix: the
    same arithmetic in another order, equal to :func:`sft_loss` within float32 rounding (tests/test_adapt.py).
    """
    if chunk_tokens < 1:
        raise ValueError(f"loss_chunk_tokens: expected a positive number of tokens, got {chunk_tokens}")
    labels = batch.labels[:, 1:]
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    count = int(rows.numel())
    if count == 0:
        return sft_loss(model, batch, normalizer=normalizer)  # its zero loss still depends on the parameters
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    targets = hidden.last_hidden_state[:, :-1][rows, cols]
    head = model.get_output_embeddings()

    def chunk_sum(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

    picked = labels[rows, cols]
    total = sum(
        torch.utils.checkpoint.checkpoint(
            chunk_sum, targets[i : i + chunk_tokens], picked[i : i + chunk_tokens], use_reentrant=False
        )
        for i in range(0, count, chunk_tokens)
    )
    denominator = normalizer if normalizer is not None else max(count, 1)
    return total / denominator, count  # type: ignore[return-value]


@contextmanager
def checkpointing_active(model: torch.nn.Module) -> Iterator[None]:
    """Let gradient checkpointing act in a model kept in ``eval()`` mode, for the duration of the block.

    transformers checkpoints a decoder layer only when ``layer.gradient_checkpointing and
    layer.training``; the evaluation keeps its model in ``eval()`` (no dropout).  This flags the
    checkpointing layers themselves as training, not their submodules (attention dropout reads its
    own module's flag), so the arithmetic is unchanged: the layers' activations are recomputed in the
    backward pass instead of stored.  Not around generation: a checkpointing layer drops the KV cache.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer  # lazy: adapt.py needs no transformers

    layers = [
        m
        for m in model.modules()
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and not m.training
    ]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


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
    def relative_change(self) -> float:
        """‖w − w₀‖ / ‖w₀‖ over all trainable weights: how far the live weights moved from the snapshot."""
        moved = torch.zeros((), dtype=torch.float64)
        base = torch.zeros((), dtype=torch.float64)
        for p, b in zip(self.params, self.buffers, strict=True):
            live = _local(p)
            ref = b.to(live.device, non_blocking=False)
            moved += float(torch.linalg.vector_norm((live - ref).double()) ** 2)
            base += float(torch.linalg.vector_norm(ref.double()) ** 2)
        return float(moved.sqrt() / base.sqrt()) if base > 0 else math.nan

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
    weight_change: float = 0.0  # ‖Δw‖/‖w‖ after the last step (measured only with ``measure_change=True``)
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
    # One part is a plain batch: no rescaling (the loss function may normalise a row split itself).
    total_tokens = max(batch.num_tokens, 1) if isinstance(batch, MicroBatches) and len(parts) > 1 else None
    # Several parts accumulate in place in .grad (moved aside by the caller): see the module docstring.
    in_place = grad_mode == "backward" or len(parts) > 1
    step_loss: torch.Tensor | None = None
    step_count = 0
    grads: list[torch.Tensor | None] | None = None
    with checkpointing_active(model):
        for part in parts:
            loss, count = loss_fn(model, part)
            if total_tokens is not None:
                loss = loss * (count / total_tokens)
            if in_place:
                loss.backward()  # accumulates into .grad across micro-batches: g1, then g1 += g2, ...
            else:
                grads = list(torch.autograd.grad(loss, params, allow_unused=True))
            # Start from the first loss: a CPU zero moved to the GPU would be a blocking copy (a sync) every step.
            step_loss = loss.detach().float() if step_loss is None else step_loss + loss.detach()
            step_count += count
    if in_place:
        grads = [p.grad for p in params]
    assert grads is not None and step_loss is not None
    return step_loss, step_count, grads


def _sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], lr: float) -> None:
    with torch.no_grad():
        pairs = [(_local(p), _local(g)) for p, g in zip(params, grads, strict=True) if g is not None]
        if pairs:
            torch._foreach_add_([p for p, _ in pairs], [g for _, g in pairs], alpha=-lr)


class _Adam:
    """Adam (no weight decay, torch's default betas and eps) on the local weights, state kept only here.

    Written out rather than ``torch.optim.Adam`` because that reads ``.grad``, which the inner loop
    must leave alone.  Matches ``torch.optim.Adam(foreach=False)`` step for step (tests/test_adapt.py).
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float) -> None:
        self.lr = lr
        self.step_count = 0
        with torch.no_grad():
            self.m = [torch.zeros_like(_local(p)) for p in params]
            self.v = [torch.zeros_like(_local(p)) for p in params]

    @torch.no_grad()
    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        self.step_count += 1
        beta1, beta2 = ADAM_BETAS
        correction1 = 1 - beta1**self.step_count
        correction2 = 1 - beta2**self.step_count
        for p, g, m, v in zip(params, grads, self.m, self.v, strict=True):
            if g is None:
                continue
            grad = _local(g)
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(correction2)).add_(ADAM_EPS)
            _local(p).addcdiv_(m, denom, value=-self.lr / correction1)


def _inner_loop(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    support_batches: Sequence[Any],
    inner_lr: float,
    num_steps: int,
    loss_fn: LossFn,
    grad_mode: GradMode,
    result: AdaptationResult,
    optimizer: InnerOptimizer = "sgd",
    on_step: Callable[[int], None] | None = None,
) -> None:
    losses: list[torch.Tensor] = []
    adam = _Adam(params, inner_lr) if optimizer == "adam" else None
    # .grad is moved aside for the whole loop (a micro-batched step accumulates there in either mode) and put back.
    stashed = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        for step in range(num_steps):
            batch = support_batches[step % len(support_batches)]
            loss, count, grads = _step_gradients(model, params, batch, loss_fn, grad_mode)
            if adam is not None:
                adam.step(params, grads)
            else:
                _sgd_step(params, grads, inner_lr)
            for p in params:
                p.grad = None
            losses.append(loss)
            result.support_tokens.append(count)
            del loss, grads
            if on_step is not None:
                on_step(step + 1)  # e.g. a held-out loss after each update (adaptation speed)
    finally:
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
    optimizer: InnerOptimizer = "sgd",
    measure_change: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> Iterator[AdaptationResult]:
    """Adapt ``model`` in place with ``num_steps`` SGD (or Adam) steps, yield, then restore its weights.

    Step ``i`` uses ``support_batches[i % len(support_batches)]`` and ``loss_fn(model, batch) ->
    (loss, num_tokens)`` (default: :func:`fomaml_math.batching.sft_loss`); a :class:`MicroBatches`
    item makes one step over several micro-batches with accumulated gradients.  The update is
    ``w <- w - inner_lr * grad`` (``optimizer="sgd"``) or an Adam step at ``inner_lr`` with fresh
    moments (``"adam"``).  ``measure_change`` records ``‖Δw‖/‖w‖`` in the result before the body runs;
    ``on_step(i)`` is called after the i-th update (1-based).
    ``num_steps=0`` adapts nothing (0-shot).  The weights are
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
    if optimizer not in INNER_OPTIMIZERS:
        raise ValueError(f"adaptation optimizer: expected one of {list(INNER_OPTIMIZERS)}, got {optimizer!r}")
    result = AdaptationResult()
    if num_steps == 0:
        yield result
        return
    params = trainable_parameters(model)
    snap = snapshot if snapshot is not None else WeightSnapshot(model, snapshot_device)
    try:
        _inner_loop(model, params, support_batches, inner_lr, num_steps, loss_fn, grad_mode, result, optimizer, on_step)
        if measure_change:
            result.weight_change = snap.relative_change()
        yield result
    finally:
        snap.restore()
