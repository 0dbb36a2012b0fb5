"""First-order MAML meta-training (stage ``train-fomaml``), as DESIGN.md's "FOMAML, done right".

One live set of parameters.  Per meta-step: snapshot the meta-weights once; for each task of the
meta-batch, inside :func:`fomaml_math.adapt.adapted`, run ``num_inner_steps`` plain SGD steps on
support batches (gradients by ``torch.autograd.grad``, ``.grad`` untouched), compute the query
loss at the adapted weights and ``backward()`` it, so ``.grad`` accumulates the first-order
meta-gradient; the context manager restores the meta-weights before the next task.  Then
``.grad /= meta_batch_size``, clip to ``max_grad_norm``, one AdamW step at the scheduled
``outer_lr``, zero ``.grad``.  How processes share the work: :mod:`fomaml_math.training.runtime`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fomaml_math.adapt import WeightSnapshot, adapted
from fomaml_math.batching import EncodedExample, SFTBatch, collate
from fomaml_math.data.taskfiles import assert_disjoint, held_out_ids, load_task_split
from fomaml_math.errors import ConfigError
from fomaml_math.training.data import encode_rows, load_dev, require_rows, rng_for
from fomaml_math.training.monitor import build_monitor_sets, dev_losses
from fomaml_math.training.optim import TrainingDivergedError, check_finite, clip_and_norm
from fomaml_math.training.run import run_main, start_run
from fomaml_math.training.runtime import Runtime, loss_fn_for, make_runtime

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


@dataclass
class TaskData:
    support: list[EncodedExample]
    query: list[EncodedExample]


def sample_tasks(seed: int, step: int, tasks: list[str], meta_batch_size: int) -> list[str]:
    """The meta-batch of step ``step``: ``meta_batch_size`` distinct training tasks (seeded by step)."""
    rng = rng_for(seed, TAG_TASKS, step)
    return [tasks[i] for i in rng.choice(len(tasks), size=meta_batch_size, replace=False)]


def sample_episode(
    seed: int, step: int, slot: int, task: str, data: TaskData, fo: dict[str, Any], pad_token_id: int
) -> Episode:
    """Support batches (consecutive slices of a seeded permutation, wrapping around) and a query batch."""
    rng = rng_for(seed, TAG_EPISODE, step, slot)
    bs, steps = int(fo["inner_batch_size"]), int(fo["num_inner_steps"])
    order = rng.permutation(len(data.support))
    support = [
        collate([data.support[order[(i * bs + j) % len(order)]] for j in range(bs)], pad_token_id) for i in range(steps)
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
) -> tuple[np.ndarray, np.ndarray]:
    """Add this process's share of ``sum over tasks of d(query loss at adapted weights)/d(weights)`` to ``.grad``.

    ``snapshot`` must hold the current meta-weights.  Returns the support and query losses of all
    tasks (gathered from every process).
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
    step: int = 0,
    checkpoint_hint: str = "no checkpoint was written",
) -> MetaStepResult:
    """One FOMAML meta-step on ``episodes`` (the whole meta-batch; each process does its share)."""
    snapshot.refresh()
    support, query = accumulate_meta_gradient(
        runtime, model, episodes, inner_lr=inner_lr, num_inner_steps=num_inner_steps, snapshot=snapshot
    )
    runtime.reduce_grads(params)
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.div_(len(episodes))
    grad_norm = clip_and_norm(runtime, model, params, max_grad_norm)
    result = MetaStepResult([e.task for e in episodes], support, query, grad_norm)
    values = {"meta/grad_norm": grad_norm}
    for episode, s_loss, q_loss in zip(episodes, support.max(axis=1), query, strict=True):
        values[f"{episode.task}/inner_support_loss"] = float(s_loss)  # max over inner steps: NaN if any
        values[f"{episode.task}/query_loss"] = float(q_loss)
    try:
        check_finite(values, step=step, checkpoint_hint=checkpoint_hint)
    except TrainingDivergedError:
        optimizer.zero_grad(set_to_none=True)
        raise
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return result


# --------------------------------------------------------------------------------------- the run


def _check_settings(runtime: Runtime, fo: dict[str, Any], tasks: list[str]) -> None:
    if not tasks:
        raise ConfigError("train_tasks: no training tasks (tasks.names minus tasks.meta_test is empty)")
    if int(fo["meta_batch_size"]) > len(tasks):
        raise ConfigError(f"fomaml.meta_batch_size: {fo['meta_batch_size']} exceeds the {len(tasks)} training tasks")
    if runtime.mode == "fsdp":
        for key in ("inner_batch_size", "query_batch_size"):
            if int(fo[key]) % runtime.world:
                raise ConfigError(
                    f"fomaml.{key}: {fo[key]} must be divisible by compute.num_processes ({runtime.world}) under FSDP"
                )
    elif int(fo["meta_batch_size"]) % runtime.world:
        print(
            f"warning: fomaml.meta_batch_size {fo['meta_batch_size']} is not divisible by {runtime.world} processes; "
            "some processes idle for part of each meta-step",
            file=sys.stderr,
        )


def train(settings: dict[str, Any], tasks_dir: Path, output_dir: Path, checkpoint_dir: Path) -> dict[str, Any]:
    """Run (or resume) FOMAML meta-training and write the outputs; returns the summary."""
    from fomaml_math.modeling import load_model_and_tokenizer

    started = time.perf_counter()
    fo = settings["fomaml"]
    model_cfg = settings["model"]
    tasks = list(settings["train_tasks"])
    seed = int(settings["seed"])  # dev monitoring draws: the same for every training seed and method
    train_seed = int(settings.get("train_seed", seed))  # what a replicate changes: the order of the training data
    total = int(fo["total_steps"])
    runtime = make_runtime(settings["compute"])
    _check_settings(runtime, fo, tasks)

    model, tokenizer = load_model_and_tokenizer(
        model_cfg["name_or_path"], revision=model_cfg.get("revision"), trust_remote_code=model_cfg["trust_remote_code"]
    )
    max_len = int(model_cfg["max_seq_len"])
    instruction = str(settings.get("prompt", {}).get("instruction", ""))
    data: dict[str, TaskData] = {}
    held_out = held_out_ids(tasks_dir)  # every dev/test id, from the split's role index (no test file is opened)
    for task in tasks:
        support = load_task_split(tasks_dir, task, "support")
        query = load_task_split(tasks_dir, task, "query")
        assert_disjoint((r["id"] for r in (*support, *query)), held_out, f"task {task}")
        require_rows(support, int(fo["inner_batch_size"]), setting="fomaml.inner_batch_size", what=f"{task}/support")
        require_rows(query, int(fo["query_batch_size"]), setting="fomaml.query_batch_size", what=f"{task}/query")
        data[task] = TaskData(
            encode_rows(tokenizer, support, max_len, instruction=instruction),
            encode_rows(tokenizer, query, max_len, instruction=instruction),
        )
    train_examples = [e for d in data.values() for e in (*d.support, *d.query)]
    pad = int(tokenizer.pad_token_id)
    monitor_sets = build_monitor_sets(
        tasks,
        *load_dev(tasks_dir, tasks, tokenizer, max_len, instruction=instruction),
        tokenizer=tokenizer,
        seed=seed,
        chunk_size=int(fo["query_batch_size"]),
        max_examples=int(settings["select"].get("max_monitor_examples", 32)),
        select=settings["select"],
        adaptation=settings["adaptation"],
        max_seq_len=max_len,
        instruction=instruction,
        multiple_of=runtime.world if runtime.mode == "fsdp" else 1,
    )

    run, params = start_run(
        "fomaml",
        runtime,
        settings,
        model,
        tasks_dir=tasks_dir,
        tasks=tasks,
        checkpoint_dir=checkpoint_dir,
        lr=float(fo["outer_lr"]),
        total_steps=total,
    )
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    snapshot = WeightSnapshot(model, settings["compute"].get("snapshot_device", "cpu"))
    inner_lr, inner_steps = float(fo["inner_lr"]), int(fo["num_inner_steps"])

    def monitor() -> dict[str, float]:
        return dev_losses(runtime, model, monitor_sets, adaptation=settings["adaptation"], snapshot=snapshot)

    try:
        if run.start_step == 0:
            run.log({"step": 0, **monitor()})
        for step in range(run.start_step + 1, total + 1):
            t0 = time.perf_counter()
            names = sample_tasks(train_seed, step, tasks, int(fo["meta_batch_size"]))
            episodes = [sample_episode(train_seed, step, slot, t, data[t], fo, pad) for slot, t in enumerate(names)]
            lr = float(scheduler.get_last_lr()[0])
            try:
                result = meta_step(
                    runtime,
                    model,
                    params,
                    optimizer,
                    scheduler,
                    episodes,
                    inner_lr=inner_lr,
                    num_inner_steps=inner_steps,
                    max_grad_norm=float(fo.get("max_grad_norm", 1.0)),
                    snapshot=snapshot,
                    step=step,
                    checkpoint_hint=run.checkpoint_hint(),
                )
            except TrainingDivergedError:
                run.log({"step": step, "diverged": 1})
                raise
            elapsed = time.perf_counter() - t0
            perf = run.count_step(
                elapsed=elapsed,
                tokens=sum(e.num_tokens for e in episodes),
                examples=sum(b.num_examples for e in episodes for b in (*e.support, e.query)),
                truncated=sum(e.num_truncated for e in episodes),
            )
            record = {"step": step, **result.metrics(), "lr": lr, **perf}
            if run.monitor_due(step):
                record.update(monitor())
            run.log(record, postfix={"loss": f"{record['meta/loss']:.4f}", "gnorm": f"{result.grad_norm:.3f}"})
            run.maybe_save(step)
            run.observe_dev(step, record)
    finally:
        run.close()
    return run.finish(output_dir, tokenizer, train_examples=train_examples, started=started)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, stage="train_fomaml", train_fn=train, prog="fomaml_math train-fomaml")
