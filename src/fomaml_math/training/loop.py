"""The training loop both stages run (``train-fomaml``, ``train-sft``), top to bottom.

A :class:`Method` (``training.fomaml.FOMAML``, ``training.sft.SFT``) supplies what differs: its
settings checks, its batch of step ``s`` and its update.  The loop owns the rest: settings,
processes, the model, the training data and the leak check, dev monitoring, resume, checkpoints,
the metrics log, best-dev selection or the candidates for the tuner, the divergence stop and the final outputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fomaml_math.adapt import WeightSnapshot
from fomaml_math.batching import EncodedExample
from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.data.taskfiles import assert_disjoint, held_out_ids, load_task_split
from fomaml_math.errors import ConfigError
from fomaml_math.modeling import load_model_and_tokenizer
from fomaml_math.training.data import TaskData, data_fingerprint, encode_rows, load_dev, model_fingerprint, resume_key
from fomaml_math.training.monitor import build_monitor_sets, dev_losses
from fomaml_math.training.optim import TrainingDivergedError, prepare_training
from fomaml_math.training.run import TrainingRun
from fomaml_math.training.runtime import Runtime, make_runtime
from fomaml_math.training.settings import TrainSettings


@dataclass(frozen=True)
class StepContext:
    """What a method's update works on: the prepared model, its optimizer and schedule, the weight snapshot."""

    runtime: Runtime
    settings: TrainSettings
    model: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    snapshot: WeightSnapshot


@dataclass(frozen=True)
class StepOutcome:
    """One step's logged metrics (``loss`` and ``grad_norm`` also go to the progress bar) and data counts."""

    metrics: dict[str, float]
    loss: float
    grad_norm: float
    tokens: int
    examples: int
    truncated: int


class Batches(Protocol):
    """A method's training data: every example it draws from, and the batch of step ``step`` (from 1)."""

    examples: list[EncodedExample]

    def __call__(self, step: int) -> Any: ...


class Method(Protocol):
    """What FOMAML and SFT supply to the loop."""

    name: str  # the settings section ("fomaml" | "sft") and the summary's "method"
    lr_key: str  # the section's base learning rate
    steps_key: str  # the section's number of optimizer steps

    def check(self, settings: TrainSettings, runtime: Runtime) -> None:
        """Refuse settings the method cannot run, before the model is loaded."""
        ...

    def check_task(self, settings: TrainSettings, task: str, support: list[dict], query: list[dict]) -> None:
        """Refuse a training task's split rows (e.g. fewer than a batch), before it is encoded."""
        ...

    def monitor_chunk_size(self, settings: TrainSettings) -> int:
        """Examples per forward pass of the dev monitoring."""
        ...

    def batches(self, settings: TrainSettings, data: dict[str, TaskData], pad_token_id: int) -> Batches: ...

    def step(self, ctx: StepContext, batch: Any, *, step: int, checkpoint_hint: str) -> StepOutcome:
        """One update on ``batch`` (every process passes the whole batch); raises TrainingDivergedError."""
        ...

    def summary_facts(self, settings: TrainSettings) -> dict[str, Any]:
        """Method-specific entries of ``train_summary.json`` (FOMAML: its inner loop)."""
        ...


def train(
    method: Method, raw: dict[str, Any], tasks_dir: Path, output_dir: Path, checkpoint_dir: Path
) -> dict[str, Any]:
    """Run (or resume) ``method`` with the stage settings ``raw`` and write the outputs; returns the summary."""
    started = time.perf_counter()
    settings = TrainSettings.read(raw, method.name, lr_key=method.lr_key, steps_key=method.steps_key)
    runtime = make_runtime(settings.compute)
    if not settings.tasks:
        raise ConfigError("train_tasks: no training tasks (tasks.names minus tasks.meta_test is empty)")
    method.check(settings, runtime)

    # The model and the training data; no dev or test problem may be trained on.
    model_cfg = settings.model
    model, tokenizer = load_model_and_tokenizer(
        model_cfg["name_or_path"], revision=model_cfg["revision"], trust_remote_code=model_cfg["trust_remote_code"]
    )
    max_len, instruction = int(model_cfg["max_seq_len"]), settings.instruction
    data: dict[str, TaskData] = {}
    held_out = held_out_ids(tasks_dir)  # every dev/test id, from the split's role index (no test file is opened)
    for task in settings.tasks:
        support = load_task_split(tasks_dir, task, "support")
        query = load_task_split(tasks_dir, task, "query")
        assert_disjoint((r["id"] for r in (*support, *query)), held_out, f"task {task}")
        method.check_task(settings, task, support, query)
        data[task] = TaskData(
            encode_rows(tokenizer, support, max_len, instruction=instruction),
            encode_rows(tokenizer, query, max_len, instruction=instruction),
        )
    batches = method.batches(settings, data, int(tokenizer.pad_token_id))

    # Dev monitoring, the same for both methods: dev_monitor loss after the evaluation's adaptation.
    monitor_sets = build_monitor_sets(
        settings.tasks,
        *load_dev(tasks_dir, settings.tasks, tokenizer, max_len, instruction=instruction),
        tokenizer=tokenizer,
        seed=settings.seed,
        chunk_size=method.monitor_chunk_size(settings),
        max_examples=int(settings.select["max_monitor_examples"]),
        select=settings.select,
        adaptation=settings.adaptation,
        max_seq_len=max_len,
        instruction=instruction,
        multiple_of=runtime.world if runtime.mode == "fsdp" else 1,
    )

    # Optimizer and schedule, resumed from the latest checkpoint of the same settings, data and model.
    run, ctx = start_run(settings, runtime, model, tasks_dir=tasks_dir, checkpoint_dir=checkpoint_dir)

    def monitor() -> dict[str, float]:
        return dev_losses(runtime, ctx.model, monitor_sets, adaptation=settings.adaptation, snapshot=ctx.snapshot)

    try:
        if run.start_step == 0:
            run.log({"step": 0, **monitor()})
        for step in range(run.start_step + 1, settings.method.total_steps + 1):
            t0 = time.perf_counter()
            batch = batches(step)
            lr = float(ctx.scheduler.get_last_lr()[0])
            try:
                out = method.step(ctx, batch, step=step, checkpoint_hint=run.checkpoint_hint())
            except TrainingDivergedError:
                run.log({"step": step, "diverged": 1})
                raise
            elapsed = time.perf_counter() - t0
            perf = run.count_step(elapsed=elapsed, tokens=out.tokens, examples=out.examples, truncated=out.truncated)
            record = {"step": step, **out.metrics, "lr": lr, **perf}
            if run.monitor_due(step):
                record.update(monitor())
            run.log(record, postfix={"loss": f"{out.loss:.4f}", "gnorm": f"{out.grad_norm:.3f}"})
            run.keep_candidate(step, tokenizer)  # select.criterion tuned; before the checkpoint (resume)
            run.maybe_save(step)
            run.observe_dev(step, record)
    finally:
        run.close()
    return run.finish(
        output_dir, tokenizer, train_examples=batches.examples, started=started, facts=method.summary_facts(settings)
    )


def start_run(
    settings: TrainSettings, runtime: Runtime, model: Any, *, tasks_dir: Path, checkpoint_dir: Path
) -> tuple[TrainingRun, StepContext]:
    """Resume key, optimizer and schedule, the run (resumed from its latest checkpoint, if any).

    The returned context holds the prepared (possibly FSDP-wrapped) model and its trainable parameters.
    """
    section = settings.method
    key = resume_key(
        settings.raw,
        data=data_fingerprint(tasks_dir, settings.tasks, ("support", "query", "dev_pool", "dev_monitor")),
        model=model_fingerprint(settings.model["name_or_path"]),
    )
    model, optimizer, scheduler, params = prepare_training(
        runtime,
        model,
        settings.compute,
        lr=section.lr,
        weight_decay=section.weight_decay,
        schedule=section.lr_schedule,
        warmup=section.warmup_steps,
        total=section.total_steps,
    )
    run = TrainingRun(
        runtime=runtime,
        settings=settings,
        key=key,
        checkpoint_dir=checkpoint_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    snapshot = WeightSnapshot(run.model, settings.compute["snapshot_device"])
    return run, StepContext(runtime, settings, run.model, params, run.optimizer, run.scheduler, snapshot)


def main(argv: Sequence[str] | None, method: Method, *, prog: str) -> int:
    """The command line of both stages: settings, ``--tasks-dir``, ``--output-dir``, ``--checkpoint-dir``."""
    parser = argparse.ArgumentParser(prog=prog)
    add_settings_arguments(parser)
    parser.add_argument("--tasks-dir", required=True, type=Path, help="results/data/tasks")
    parser.add_argument(
        "--output-dir", required=True, type=Path, help="gets model/, metrics.jsonl, metrics.csv, train_summary.json"
    )
    parser.add_argument(
        "--checkpoint-dir", required=True, type=Path, help="resumable checkpoints (kept outside Snakemake outputs)"
    )
    args = parser.parse_args(argv)
    settings = settings_from_args(args, f"train_{method.name}")
    try:
        train(method, settings, args.tasks_dir, args.output_dir, args.checkpoint_dir)
    except TrainingDivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
