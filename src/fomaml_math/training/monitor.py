"""Held-out monitoring during training: NLL on fixed dev examples, before and after adaptation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fomaml_math.batching import EncodedExample, SFTBatch
from fomaml_math.training.data import rng_for
from fomaml_math.training.runtime import Runtime, loss_fn_for


@dataclass
class HeldoutSet:
    """Fixed held-out examples of one task (``chunks``) and fixed support batches to adapt on (``support``)."""

    task: str
    chunks: list[SFTBatch]
    support: list[SFTBatch]


def build_heldout_sets(
    tasks: Sequence[str],
    heldout: dict[str, list[EncodedExample]],
    support: dict[str, list[EncodedExample]],
    *,
    seed: int,
    pad_token_id: int,
    chunk_size: int,
    max_examples: int,
    support_batch_size: int = 0,
    support_steps: int = 0,
    multiple_of: int = 1,
) -> list[HeldoutSet]:
    """Draw once (seeded) up to ``max_examples`` held-out examples and ``support_steps`` support batches per task."""
    from fomaml_math.batching import collate

    sets = []
    for index, task in enumerate(tasks):
        rng = rng_for(seed, 0x4E1D, index)
        pool = heldout.get(task, [])
        n = min(len(pool), max_examples)
        n -= n % multiple_of
        if n == 0:
            continue
        rows = [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))]
        chunks = [collate(rows[i : i + chunk_size], pad_token_id) for i in range(0, n, chunk_size)]
        batches = []
        if support_steps and support_batch_size <= len(support.get(task, [])):
            order = rng.permutation(len(support[task]))
            for step in range(support_steps):
                idx = [order[(step * support_batch_size + j) % len(order)] for j in range(support_batch_size)]
                batches.append(collate([support[task][i] for i in idx], pad_token_id))
        sets.append(HeldoutSet(task, chunks, batches))
    return sets


def _nll_sum_count(runtime: Runtime, model: Any, chunks: Sequence[SFTBatch], split_rows: bool) -> tuple[float, float]:
    from fomaml_math.batching import example_nll

    total, count = 0.0, 0.0
    for chunk in chunks:
        local = runtime.split_rows(chunk)[0] if split_rows and runtime.world > 1 else chunk
        with runtime.autocast():
            sums, counts = example_nll(model, local.to(runtime.device))
        total += float(sums.sum())
        count += float(counts.sum())
    return total, count


def heldout_losses(
    runtime: Runtime,
    model: Any,
    sets: Sequence[HeldoutSet],
    *,
    inner_lr: float | None = None,
    num_inner_steps: int = 0,
    snapshot: Any = None,
) -> dict[str, float]:
    """Token-weighted held-out NLL per task at the current weights and, with ``num_inner_steps``, after
    adapting on the task's fixed support batches (restored afterwards).  Every process must call it."""
    from fomaml_math.adapt import adapted

    split = runtime.mode == "fsdp"
    values = torch.zeros((len(sets), 4), dtype=torch.float64)
    mine = range(len(sets)) if split else range(runtime.rank, len(sets), runtime.world)
    loss_fn = loss_fn_for(runtime, split_rows=split)
    if snapshot is not None and num_inner_steps:
        snapshot.refresh()  # once: every adaptation below restores the weights it started from
    for i in mine:
        item = sets[i]
        values[i, 0], values[i, 1] = _nll_sum_count(runtime, model, item.chunks, split)
        if num_inner_steps and item.support:
            with adapted(
                model,
                item.support,
                inner_lr=float(inner_lr or 0.0),
                num_steps=num_inner_steps,
                snapshot=snapshot,
                loss_fn=loss_fn,
                grad_mode=runtime.grad_mode,
            ):
                values[i, 2], values[i, 3] = _nll_sum_count(runtime, model, item.chunks, split)
    reduced = runtime.all_reduce_sum(values.to(runtime.device)).cpu()
    out: dict[str, float] = {}
    before, after, gains = [], [], []
    for i, item in enumerate(sets):
        b = float(reduced[i, 0] / max(reduced[i, 1], 1.0))
        out[f"heldout/{item.task}/loss_before"] = b
        before.append(b)
        if reduced[i, 3] > 0:
            a = float(reduced[i, 2] / reduced[i, 3])
            out[f"heldout/{item.task}/loss_after"] = a
            after.append(a)
            gains.append(b - a)
    if before:
        out["heldout/loss_before"] = float(np.mean(before))
    if after:
        out["heldout/loss_after"] = float(np.mean(after))
        out["heldout/adaptation_gain"] = float(np.mean(gains))
    return out
