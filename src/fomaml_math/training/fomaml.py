"""First-order MAML meta-training (stage ``train-fomaml``), as DESIGN.md's "FOMAML, done right".

One live set of parameters.  Per meta-step: snapshot the meta-weights once; for each task of the
meta-batch, inside :func:`fomaml_math.adapt.adapted`, run ``num_inner_steps`` inner steps on
support batches (``fomaml.inner_optimizer``: plain SGD, or Adam with fresh moments for every task
of every meta-step; gradients by ``torch.autograd.grad``, ``.grad`` untouched), compute the query
loss at the adapted weights and ``backward()`` it, so ``.grad`` accumulates the first-order
meta-gradient (no second-order terms, whichever inner optimizer); the context manager restores
the meta-weights before the next task.  Then
``.grad /= meta_batch_size``, clip to ``max_grad_norm``, one AdamW step at the scheduled
``outer_lr``, zero ``.grad``.  How processes share the work: :mod:`fomaml_math.training.runtime`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fomaml_math.adapt import INNER_OPTIMIZERS, InnerOptimizer, WeightSnapshot, adapted
from fomaml_math.batching import EncodedExample, SFTBatch, collate, cycled_slices
from fomaml_math.errors import ConfigError
from fomaml_math.training import loop
from fomaml_math.training.data import TaskData, require_rows, rng_for
from fomaml_math.training.loop import StepContext, StepOutcome
from fomaml_math.training.optim import apply_update
from fomaml_math.training.runtime import Runtime, loss_fn_for
from fomaml_math.training.settings import TrainSettings

TAG_TASKS = 0x7A5C  # rng stream ids: meta-batch task draw, per-task episode draw
TAG_EPISODE = 0xE915


@dataclass
class Episode:
    """One task of a meta-batch: ``num_inner_steps`` support batches and one query batch."""

    task: str
    support: list[SFTBatch]
    query: SFTBatch

    @property
    def num_tokens(self) -> int:
        return sum(b.num_tokens for b in self.support) + self.query.num_tokens

    @property
    def num_truncated(self) -> int:
        return sum(b.num_truncated for b in self.support) + self.query.num_truncated


def sample_tasks(seed: int, step: int, tasks: list[str], meta_batch_size: int) -> list[str]:
    """The meta-batch of step ``step``: ``meta_batch_size`` distinct training tasks (seeded by step)."""
    rng = rng_for(seed, TAG_TASKS, step)
    return [tasks[i] for i in rng.choice(len(tasks), size=meta_batch_size, replace=False)]


def sample_episode(
    seed: int, step: int, slot: int, task: str, data: TaskData, fo: Mapping[str, Any], pad_token_id: int
) -> Episode:
    """Support batches (consecutive slices of a seeded permutation, wrapping around) and a query batch."""
    rng = rng_for(seed, TAG_EPISODE, step, slot)
    bs, steps = int(fo["inner_batch_size"]), int(fo["num_inner_steps"])
    order = rng.permutation(len(data.support))
    support = [
        collate([data.support[order[p]] for p in step], pad_token_id) for step in cycled_slices(len(order), bs, steps)
    ]
    query_idx = rng.choice(len(data.query), size=int(fo["query_batch_size"]), replace=False)
    return Episode(task, support, collate([data.query[i] for i in query_idx], pad_token_id))


@dataclass
class MetaStepResult:
    tasks: list[str]
    support_losses: np.ndarray  # [tasks, num_inner_steps]: loss of each inner step, before its update
    query_losses: np.ndarray  # [tasks]: query loss at the adapted weights
    grad_norm: float  # of the averaged meta-gradient, before clipping

    def metrics(self) -> dict[str, float]:
        """The logged FOMAML metrics (definitions: docs/training.md)."""
        support_final = self.support_losses[:, -1]
        gaps = self.query_losses - support_final
        out = {
            "meta/loss": float(self.query_losses.mean()),
            "meta/grad_norm": self.grad_norm,
            "meta/avg_support_loss": float(support_final.mean()),
            "meta/avg_query_loss": float(self.query_losses.mean()),
            "meta/avg_adaptation_gap": float(gaps.mean()),
            "meta/adaptation_gap_std": float(gaps.std()),
            "meta/task_loss_variance": float(self.query_losses.var()),
            "meta/support_loss_before": float(self.support_losses[:, 0].mean()),
        }
        for task, s, q in zip(self.tasks, support_final, self.query_losses, strict=True):
            out[f"{task}/support_loss"] = float(s)
            out[f"{task}/query_loss"] = float(q)
            out[f"{task}/adaptation_gap"] = float(q - s)
        return out


def accumulate_meta_gradient(
    runtime: Runtime,
    model: Any,
    episodes: list[Episode],
    *,
    inner_lr: float,
    num_inner_steps: int,
    snapshot: WeightSnapshot,
    inner_optimizer: InnerOptimizer = "sgd",
) -> tuple[np.ndarray, np.ndarray]:
    """Add this process's share of ``sum over tasks of d(query loss at adapted weights)/d(weights)`` to ``.grad``.

    ``snapshot`` must hold the current meta-weights.  Each task is one :func:`adapted` call, so an
    Adam inner loop (``inner_optimizer="adam"``) starts from zero moments for every task.  Returns
    the support and query losses of all tasks (gathered from every process).
    """
    split = runtime.mode == "fsdp"
    loss_fn = loss_fn_for(runtime, split_rows=split)
    mine = range(len(episodes)) if split else range(runtime.rank, len(episodes), runtime.world)
    # Losses are gathered on the device: one host sync per meta-step (below), not two per task.
    values = torch.zeros((len(episodes), num_inner_steps + 1), dtype=torch.float64, device=runtime.device)
    for i in mine:
        episode = episodes[i]
        with adapted(
            model,
            episode.support,
            inner_lr=inner_lr,
            num_steps=num_inner_steps,
            snapshot=snapshot,
            loss_fn=loss_fn,
            grad_mode=runtime.grad_mode,
            optimizer=inner_optimizer,
        ) as result:
            query_loss, _ = loss_fn(model, episode.query)
            query_loss.backward()  # first-order: the gradient at the adapted weights is the task's meta-gradient
        if result.losses is not None:
            values[i, :num_inner_steps] = result.losses
        values[i, num_inner_steps] = query_loss.detach()
    reduced = runtime.all_reduce_sum(values).cpu()
    if split:
        reduced /= runtime.world  # each process held the loss of its rows, scaled to the whole batch
    return reduced[:, :num_inner_steps].numpy(), reduced[:, num_inner_steps].numpy()


def meta_step(
    runtime: Runtime,
    model: Any,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    episodes: list[Episode],
    *,
    inner_lr: float,
    num_inner_steps: int,
    max_grad_norm: float,
    snapshot: WeightSnapshot,
    inner_optimizer: InnerOptimizer = "sgd",
    step: int = 0,
    checkpoint_hint: str = "no checkpoint was written",
) -> MetaStepResult:
    """One FOMAML meta-step on ``episodes`` (the whole meta-batch; each process does its share)."""
    snapshot.refresh()
    support, query = accumulate_meta_gradient(
        runtime,
        model,
        episodes,
        inner_lr=inner_lr,
        num_inner_steps=num_inner_steps,
        snapshot=snapshot,
        inner_optimizer=inner_optimizer,
    )

    def checked(grad_norm: float) -> dict[str, float]:
        values = {"meta/grad_norm": grad_norm}
        for episode, s_loss, q_loss in zip(episodes, support.max(axis=1), query, strict=True):
            values[f"{episode.task}/inner_support_loss"] = float(s_loss)  # max over inner steps: NaN if any
            values[f"{episode.task}/query_loss"] = float(q_loss)
        return values

    grad_norm = apply_update(
        runtime,
        model,
        params,
        optimizer,
        scheduler,
        max_grad_norm=max_grad_norm,
        checked=checked,
        step=step,
        checkpoint_hint=checkpoint_hint,
        divide_by=len(episodes),
    )
    return MetaStepResult([e.task for e in episodes], support, query, grad_norm)


# --------------------------------------------------------------------------------------- the method


@dataclass
class MetaBatches:
    """The meta-batch of step ``s``: a task draw and one episode per drawn task (seeded by step)."""

    stream_seed: int  # TrainSettings.stream_seed: the training seed and the training tasks
    tasks: list[str]
    fo: Mapping[str, Any]
    data: dict[str, TaskData]
    pad_token_id: int

    @property
    def examples(self) -> list[EncodedExample]:
        return [e for d in self.data.values() for e in (*d.support, *d.query)]

    def __call__(self, step: int) -> list[Episode]:
        names = sample_tasks(self.stream_seed, step, self.tasks, int(self.fo["meta_batch_size"]))
        return [
            sample_episode(self.stream_seed, step, slot, t, self.data[t], self.fo, self.pad_token_id)
            for slot, t in enumerate(names)
        ]


class FOMAML:
    """The loop's :class:`~fomaml_math.training.loop.Method` for FOMAML meta-training."""

    name, lr_key, steps_key = "fomaml", "outer_lr", "total_steps"

    def check(self, settings: TrainSettings, runtime: Runtime) -> None:
        fo, tasks = settings.method, settings.tasks
        if fo["inner_optimizer"] not in INNER_OPTIMIZERS:
            raise ConfigError(
                f"fomaml.inner_optimizer: expected one of {list(INNER_OPTIMIZERS)}, got {fo['inner_optimizer']!r}"
            )
        if int(fo["meta_batch_size"]) > len(tasks):
            raise ConfigError(
                f"fomaml.meta_batch_size: {fo['meta_batch_size']} exceeds the {len(tasks)} training tasks"
            )
        if runtime.mode == "fsdp":
            for key in ("inner_batch_size", "query_batch_size"):
                if int(fo[key]) % runtime.world:
                    raise ConfigError(
                        f"fomaml.{key}: {fo[key]} must be divisible by compute.num_processes ({runtime.world}) "
                        "under FSDP"
                    )
        elif int(fo["meta_batch_size"]) % runtime.world:
            print(
                f"warning: fomaml.meta_batch_size {fo['meta_batch_size']} is not divisible by {runtime.world} "
                "processes; some processes idle for part of each meta-step",
                file=sys.stderr,
            )

    def check_task(self, settings: TrainSettings, task: str, support: list[dict], query: list[dict]) -> None:
        fo = settings.method
        require_rows(support, int(fo["inner_batch_size"]), setting="fomaml.inner_batch_size", what=f"{task}/support")
        require_rows(query, int(fo["query_batch_size"]), setting="fomaml.query_batch_size", what=f"{task}/query")

    def monitor_chunk_size(self, settings: TrainSettings) -> int:
        return int(settings.method["query_batch_size"])

    def batches(self, settings: TrainSettings, data: dict[str, TaskData], pad_token_id: int) -> MetaBatches:
        return MetaBatches(settings.stream_seed, settings.tasks, settings.method.values, data, pad_token_id)

    def summary_facts(self, settings: TrainSettings) -> dict[str, Any]:
        fo = settings.method  # the inner loop FOMAML was meta-trained with (the evaluation must adapt the same way)
        return {
            "inner_loop": {
                "optimizer": fo["inner_optimizer"],
                "lr": float(fo["inner_lr"]),
                "num_steps": int(fo["num_inner_steps"]),
                "batch_size": int(fo["inner_batch_size"]),
            }
        }

    def step(self, ctx: StepContext, batch: list[Episode], *, step: int, checkpoint_hint: str) -> StepOutcome:
        fo = ctx.settings.method
        result = meta_step(
            ctx.runtime,
            ctx.model,
            ctx.params,
            ctx.optimizer,
            ctx.scheduler,
            batch,
            inner_lr=float(fo["inner_lr"]),
            num_inner_steps=int(fo["num_inner_steps"]),
            max_grad_norm=fo.max_grad_norm,
            snapshot=ctx.snapshot,
            inner_optimizer=fo["inner_optimizer"],
            step=step,
            checkpoint_hint=checkpoint_hint,
        )
        metrics = result.metrics()
        return StepOutcome(
            metrics,
            loss=metrics["meta/loss"],
            grad_norm=result.grad_norm,
            tokens=sum(e.num_tokens for e in batch),
            examples=sum(b.num_examples for e in batch for b in (*e.support, e.query)),
            truncated=sum(e.num_truncated for e in batch),
        )


def train(settings: dict[str, Any], tasks_dir: Path, output_dir: Path, checkpoint_dir: Path) -> dict[str, Any]:
    """Run (or resume) FOMAML meta-training and write the outputs; returns the summary."""
    return loop.train(FOMAML(), settings, tasks_dir, output_dir, checkpoint_dir)


def main(argv: list[str] | None = None) -> int:
    return loop.main(argv, FOMAML(), prog="fomaml_math train-fomaml")
