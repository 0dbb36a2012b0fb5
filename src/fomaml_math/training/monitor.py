"""Dev monitoring during training, and the dev criterion that selects the kept model.

Both trainers measure the same quantity every ``test_freq`` steps, on data no method trains on:
per training task, the token-weighted NLL of fixed ``dev_monitor`` examples at the current weights
(``dev/<task>/loss_before``) and after the evaluation's k-shot adaptation (``settings.adaptation``:
optimizer, lr, steps) on ``select.shots`` shots drawn from ``dev_pool`` (``dev/<task>/loss_after``;
the draws are seeded by (seed, task, draw) in a stream of their own, so FOMAML and SFT see the same
shots, and the evaluation's draws are different ones).  ``dev/loss_after``, the mean over tasks, is
the selection criterion of ``select.criterion: best_dev``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fomaml_math.adapt import WeightSnapshot
from fomaml_math.batching import EncodedExample, SFTBatch, collate, summed_nll
from fomaml_math.kshot import STREAM_SELECTION, AdaptSpec, adapted_on_shots, draw_shots, shot_batches
from fomaml_math.training.data import rng_for
from fomaml_math.training.runtime import Runtime, loss_fn_for

SELECTION_METRIC = "dev/loss_after"
TAG_MONITOR = 0x4E1D


@dataclass
class MonitorSet:
    """Fixed dev_monitor examples of one task (``chunks``) and fixed k-shot draws to adapt on (``shots``)."""

    task: str
    chunks: list[SFTBatch]
    shots: list[Any]  # one MicroBatches per draw (all k shots per inner step)


def build_monitor_sets(
    tasks: Sequence[str],
    monitor: Mapping[str, list[EncodedExample]],
    pools: Mapping[str, list[dict[str, Any]]],
    *,
    tokenizer: Any,
    seed: int,
    chunk_size: int,
    max_examples: int,
    select: Mapping[str, Any],
    adaptation: Mapping[str, Any],
    max_seq_len: int,
    instruction: str,
    multiple_of: int = 1,
) -> list[MonitorSet]:
    """Draw once (seeded) up to ``max_examples`` dev_monitor examples and the selection's shots per task."""
    sets = []
    k = int(select["shots"])
    # Under FSDP every process runs every forward: one micro-batch of all k shots (its rows split).
    batch_size = k if multiple_of > 1 else int(adaptation["inner_batch_size"])
    for index, task in enumerate(tasks):
        rng = rng_for(seed, TAG_MONITOR, index)
        pool = monitor.get(task, [])
        n = min(len(pool), max_examples)
        n -= n % multiple_of
        if n == 0:
            continue
        rows = [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))]
        chunks = [collate(rows[i : i + chunk_size], tokenizer.pad_token_id) for i in range(0, n, chunk_size)]
        draws = []
        shots_pool = pools.get(task, [])
        if k and k <= len(shots_pool):
            by_id = {str(r["id"]): r for r in shots_pool}
            for draw in range(int(select["draws"])):
                ids = draw_shots(list(by_id), k, seed=seed, task=task, repeat=draw, stream=STREAM_SELECTION)
                shots = [by_id[i] for i in ids]
                draws.append(
                    shot_batches(
                        tokenizer, shots, max_seq_len=max_seq_len, batch_size=batch_size, instruction=instruction
                    )
                )
        sets.append(MonitorSet(task, chunks, draws))
    return sets


def _nll_sum_count(runtime: Runtime, model: Any, chunks: Sequence[SFTBatch], split_rows: bool) -> tuple[float, int]:
    """This process's share (its rows under FSDP) of the chunks' summed NLL and token count."""
    local = [runtime.split_rows(c)[0] for c in chunks] if split_rows and runtime.world > 1 else chunks
    return summed_nll(model, local, runtime.autocast, runtime.device)


def dev_losses(
    runtime: Runtime,
    model: Any,
    sets: Sequence[MonitorSet],
    *,
    adaptation: Mapping[str, Any] | None = None,
    snapshot: Any = None,
) -> dict[str, float]:
    """Token-weighted dev_monitor NLL per task at the current weights and, with ``adaptation``, after the
    evaluation's k-shot adaptation on each draw (restored afterwards).  Every process must call it."""
    split = runtime.mode == "fsdp"
    values = torch.zeros((len(sets), 4), dtype=torch.float64)
    mine = range(len(sets)) if split else range(runtime.rank, len(sets), runtime.world)
    loss_fn = loss_fn_for(runtime, split_rows=split)
    spec = AdaptSpec.from_eval(adaptation) if adaptation else None
    if spec is not None and snapshot is None:
        snapshot = WeightSnapshot(model, "cpu")
    elif spec is not None:
        snapshot.refresh()  # once: every adaptation below restores the weights it started from
    for i in mine:
        item = sets[i]
        values[i, 0], values[i, 1] = _nll_sum_count(runtime, model, item.chunks, split)
        if spec is None:
            continue
        for shots in item.shots:
            with adapted_on_shots(model, shots, spec, loss_fn=loss_fn, snapshot=snapshot, grad_mode=runtime.grad_mode):
                total, count = _nll_sum_count(runtime, model, item.chunks, split)
            values[i, 2] += total
            values[i, 3] += count
    reduced = runtime.all_reduce_sum(values.to(runtime.device)).cpu()
    out: dict[str, float] = {}
    before, after, gains = [], [], []
    for i, item in enumerate(sets):
        b = float(reduced[i, 0] / max(reduced[i, 1], 1.0))
        out[f"dev/{item.task}/loss_before"] = b
        before.append(b)
        if reduced[i, 3] > 0:
            a = float(reduced[i, 2] / reduced[i, 3])
            out[f"dev/{item.task}/loss_after"] = a
            after.append(a)
            gains.append(b - a)
    if before:
        out["dev/loss_before"] = float(np.mean(before))
    if after:
        out[SELECTION_METRIC] = float(np.mean(after))
        out["dev/adaptation_gain"] = float(np.mean(gains))
    return out
