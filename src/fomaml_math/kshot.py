"""k-shot adaptation as the evaluation does it, shared by evaluation, calibration and model selection.

Shots are drawn from a task's ``dev_pool`` split (never trained on by any method): the first k of a
permutation seeded by (shot seed, task, repeat, stream), so draws are nested in k (the 5 shots are
the first 5 of the 10) and identical for every initialisation.  Separate ``stream`` values keep the
evaluation's draws, calibration's and checkpoint selection's apart.  Each inner step takes the
token-weighted loss of all k shots, accumulated over micro-batches of ``batch_size``; the optimizer
(``sgd`` or ``adam``), learning rate and number of steps (an
:class:`~fomaml_math.evaluation.choice.AdaptationChoice`) and that micro-batch size form an :class:`AdaptSpec`.

That is the ``all_shots`` protocol, the primary rows'.  The secondary ``meta_inner_loop`` protocol
(:meth:`AdaptSpec.from_inner_loop`, FOMAML runs only) adapts as FOMAML was meta-trained: its inner optimizer,
rate and steps, and step ``i`` on the ``i``-th mini-batch of ``inner_batch_size`` shots (consecutive slices of
the shots in draw order, wrapping around; all k shots when k is smaller), as an episode slices its permutation
of the support rows (:func:`~fomaml_math.batching.cycled_slices`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fomaml_math.adapt import MicroBatches, adapted
from fomaml_math.batching import cycled_slices, make_sft_batch
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.choice import AdaptationChoice
from fomaml_math.evaluation.rows import ALL_SHOTS, META_INNER_LOOP, PROTOCOLS

STREAM_EVAL = 0
STREAM_CALIBRATION = 1
STREAM_SELECTION = 2


@dataclass(frozen=True)
class AdaptSpec:
    """How an initialisation is adapted to k shots."""

    optimizer: str  # sgd | adam
    lr: float
    num_steps: int
    # all_shots: micro-batch size of one inner step's accumulated gradient; meta_inner_loop: examples per step
    batch_size: int
    protocol: str = ALL_SHOTS

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"adaptation protocol: expected one of {list(PROTOCOLS)}, got {self.protocol!r}")

    @classmethod
    def from_choice(cls, choice: AdaptationChoice, batch_size: int) -> AdaptSpec:
        return cls(choice.optimizer, float(choice.lr), int(choice.num_steps), int(batch_size))

    @classmethod
    def from_eval(cls, ev: Mapping[str, Any]) -> AdaptSpec:
        """The uncalibrated spec of the ``eval`` (or ``adaptation``) settings block."""
        choice = AdaptationChoice(str(ev["optimizer"]), float(ev["inner_lr"]), int(ev["num_inner_steps"]))
        return cls.from_choice(choice, int(ev["inner_batch_size"]))

    @classmethod
    def from_inner_loop(cls, inner_loop: Mapping[str, Any]) -> AdaptSpec:
        """FOMAML's meta-training inner loop (a ``train_summary.json``'s ``inner_loop``: optimizer, lr, num_steps,
        batch_size, i.e. ``fomaml.inner_optimizer``, ``inner_lr``, ``num_inner_steps``, ``inner_batch_size``)."""
        try:
            return cls(str(inner_loop["optimizer"]), float(inner_loop["lr"]), int(inner_loop["num_steps"]),
                       int(inner_loop["batch_size"]), META_INNER_LOOP)  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"inner_loop: expected optimizer, lr, num_steps and batch_size, missing {exc}") from exc

    def describe(self) -> dict[str, Any]:
        return {"adapt_optimizer": self.optimizer, "adapt_lr": self.lr, "adapt_steps": self.num_steps,
                "adapt_protocol": self.protocol}  # fmt: skip


def draw_shots(
    pool_ids: Sequence[str], k: int, *, seed: int, task: str, repeat: int, stream: int = STREAM_EVAL
) -> list[str]:
    """The k shot ids of (task, repeat): the first k of a permutation of the sorted pool ids.

    The permutation does not depend on k (nested draws) nor on the initialisation (same shots for
    base, SFT and FOMAML); crc32, not ``hash()``, because Python's string hash is salted per process.
    """
    ids = sorted(str(i) for i in pool_ids)
    if k > len(ids):
        raise ConfigError(f"--shots {k}: task {task!r} has only {len(ids)} dev_pool examples")
    if k <= 0:
        return []
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode()), int(repeat), int(stream)])
    return [ids[i] for i in rng.permutation(len(ids))[:k]]


def shot_batches(
    tokenizer: Any, shots: Sequence[Mapping[str, Any]], *, max_seq_len: int, batch_size: int, instruction: str
) -> Any:
    """The k shots as one inner step's :class:`~fomaml_math.adapt.MicroBatches` (rendered like training)."""
    micro = [
        make_sft_batch(tokenizer, shots[i : i + batch_size], max_seq_len, instruction=instruction)
        for i in range(0, len(shots), batch_size)
    ]
    return MicroBatches(micro)


def inner_loop_batches(
    tokenizer: Any, shots: Sequence[Mapping[str, Any]], spec: AdaptSpec, *, max_seq_len: int, instruction: str
) -> list[Any]:
    """The ``meta_inner_loop`` protocol's support batch of each inner step, for :func:`adapted_on_shots`:
    ``min(batch_size, k)`` shots, consecutive slices of the draw order wrapping around (FOMAML's episodes)."""
    size = min(spec.batch_size, len(shots))
    return [
        make_sft_batch(tokenizer, [shots[p] for p in step], max_seq_len, instruction=instruction)
        for step in cycled_slices(len(shots), size, spec.num_steps)
    ]


@contextmanager
def adapted_on_shots(
    model: Any,
    batches: Any,
    spec: AdaptSpec,
    *,
    loss_fn: Any,
    snapshot: Any,
    grad_mode: str = "autograd",
    on_step: Callable[[int], None] | None = None,
) -> Iterator[Any]:
    """Adapt ``model`` on ``batches`` by ``spec`` inside :func:`~fomaml_math.adapt.adapted`.

    ``batches``: one batch that every step uses (a :func:`shot_batches`: all k shots), or a list of them, step
    ``i`` using item ``i`` (cycling; :func:`inner_loop_batches`).

    ``loss_fn`` must open autocast per forward pass (:func:`fomaml_math.adapt.sft_loss_fn`).  Yields
    the :class:`~fomaml_math.adapt.AdaptationResult` with ``weight_change`` measured; the
    initialisation is restored bitwise when the block ends.
    """
    with adapted(
        model,
        list(batches) if isinstance(batches, list) else [batches],
        inner_lr=spec.lr,
        num_steps=spec.num_steps,
        snapshot=snapshot,
        loss_fn=loss_fn,
        grad_mode=grad_mode,  # type: ignore[arg-type]
        optimizer=spec.optimizer,  # type: ignore[arg-type]
        measure_change=True,
        on_step=on_step,
    ) as result:
        yield result


def mean_loss(model: Any, batches: Any, loss_fn: Any) -> float:
    """Token-weighted mean loss of ``batches`` (a MicroBatches) at the current weights, without gradients."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for part in batches.batches:
            loss, count = loss_fn(model, part)
            total += float(loss) * count
            tokens += count
    return total / tokens if tokens else float("nan")
