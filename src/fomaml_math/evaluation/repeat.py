"""One (task, repeat) of a k-shot evaluation: draw, adapt (or demonstrate), answer, NLL, grade.

:func:`evaluate_task_repeat` reads top to bottom as the steps of docs/evaluation.md ("What k-shot
means"); everything a job's (task, repeat)s share is its :class:`EvalContext`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from fomaml_math.adapt import WeightSnapshot
from fomaml_math.batching import collate, encode_example, example_nll
from fomaml_math.evaluation.generate import HFBackend, check_context, encode_prompts, engine_follows
from fomaml_math.evaluation.job import JobModel
from fomaml_math.evaluation.prompts import demonstration_messages, problem_messages
from fomaml_math.evaluation.rows import META_INNER_LOOP, to_output_schema
from fomaml_math.evaluation.settings import EvalSettings
from fomaml_math.evaluation.tasks import TaskData, repeats_for
from fomaml_math.kshot import AdaptSpec, adapted_on_shots, inner_loop_batches, mean_loss, shot_batches

NO_EFFECT: dict[str, float] = {"support_loss_before": math.nan, "support_loss_after": math.nan, "weight_change": 0.0}


@dataclass
class EvalContext:
    """What every (task, repeat) of a job shares."""

    job: JobModel  # model, tokenizer, device, precision
    init: str
    shots: int
    settings: EvalSettings
    spec: AdaptSpec  # the adaptation (eval settings, calibrated lr/steps; or FOMAML's meta-training inner loop)
    context_limit: int | None
    snapshot_device: str = "cpu"
    snapshot: Any = None  # one copy of the initialisation for the whole job, taken before the first adaptation
    shot_seed: int | None = None  # None: the global seed
    experiment: str = "default"
    train_seed: int = -1
    backend: Any = None  # the job's generation backend (one per job); None: the HF loop on the model

    @property
    def model(self) -> Any:
        return self.job.model

    @property
    def tokenizer(self) -> Any:
        return self.job.tokenizer

    @property
    def in_context(self) -> bool:
        return self.settings.mode == "in_context" and self.shots > 0

    @property
    def finetune(self) -> bool:
        return self.settings.mode == "finetune" and self.shots > 0

    def generator(self) -> Any:
        """The generation backend: ``backend``, or the reference HF loop on this context's model."""
        if self.backend is None:
            self.backend = HFBackend(self.job.autocast)
        return self.backend

    def draw_seed(self) -> int:
        return int(self.settings.seed if self.shot_seed is None else self.shot_seed)

    def loss_fn(self) -> Any:
        """The adaptation loss: autocast opened per forward pass, exactly as training's (chunked if configured)."""
        return self.job.loss_fn()

    def initialisation_snapshot(self) -> WeightSnapshot:
        """The job's :class:`~fomaml_math.adapt.WeightSnapshot` (every adaptation restores to it)."""
        if self.snapshot is None:
            # One allocation per job, not per task/repeat (16 GB of pinned memory for a 4B model).
            self.snapshot = WeightSnapshot(self.model, self.snapshot_device)
        return self.snapshot

    def prompts(self, problems: Sequence[str], shots: Sequence[dict[str, Any]]) -> list[list[int]]:
        """Token ids of the test prompts (after the k worked demonstrations in ``in_context`` mode)."""
        instruction = self.settings.instruction
        context = demonstration_messages(shots, instruction=instruction) if self.in_context else []
        return encode_prompts(self.tokenizer, [problem_messages(p, context, instruction=instruction) for p in problems])


def evaluate_task_repeat(
    ctx: EvalContext, task: TaskData, repeat: int, grader: Any, progress: Any | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Evaluate one (task, repeat): rows in the output schema and a summary dict."""
    shot_ids, shots = task.draw(ctx.shots, seed=ctx.draw_seed(), repeat=repeat)
    prompt_ids = ctx.prompts(task.test["problem"].astype(str).tolist(), shots)
    gold_examples = _gold_examples(ctx, task, shots)
    info: dict[str, Any] = {"task": task.name, "repeat": repeat, "shot_ids": shot_ids}
    effect = NO_EFFECT
    started = time.perf_counter()
    backend = ctx.generator()
    with contextlib.ExitStack() as stack:
        # Entered first, so it exits after the adaptation's restore: a backend with its own copy of the
        # weights (vllm) gets the initialisation back too.
        job = f"job {ctx.init} k={ctx.shots} ({ctx.experiment}, train seed {ctx.train_seed})"
        where = f"{job}, task {task.name}, repeat {repeat}"
        sync_engine = stack.enter_context(engine_follows(backend, ctx.model, where))
        if ctx.finetune:
            backend.sleep()  # eval.vllm.sleep: the engine frees its GPU memory while the model adapts
            effect = _adapt(ctx, stack, shots, info, f"{task.name} repeat {repeat}")
            sync_engine()  # wakes the engine, pushes the adapted weights, checks that it serves them
        info.update(effect)
        info["adapt_s"] = time.perf_counter() - started
        started = time.perf_counter()
        generations = backend.generate(  # the HF backend opens autocast itself
            ctx.model,
            ctx.tokenizer,
            prompt_ids,
            max_new_tokens=ctx.settings.max_new_tokens,
            batch_size=ctx.settings.gen_batch_size,
            max_context=ctx.context_limit,
            on_batch=progress.update if progress is not None else None,
        )
        info["generate_s"] = time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad(), ctx.job.autocast():
            nll, nll_tokens = _nll(ctx.model, ctx.tokenizer, gold_examples, ctx.settings.inner_batch_size)
        info["nll_s"] = time.perf_counter() - started
    # Leaving the stack restored the initialisation; grading needs no model.
    started = time.perf_counter()
    golds = task.test["answer"].astype(str).tolist()
    grades = grader.grade_many(golds, generations.texts)
    info["grade_s"] = time.perf_counter() - started
    rows = to_output_schema(
        pd.DataFrame(
            {
                "init": ctx.init,
                "task": task.name,
                "shots": ctx.shots,
                "repeat": repeat,
                "problem_id": task.test["id"].astype(str).tolist(),
                "level": task.test["level"].astype("int64").tolist(),
                "gold": golds,
                "generated": generations.texts,
                "extracted": [g.extracted for g in grades],
                "correct": [g.correct for g in grades],
                "grade_status": [g.status for g in grades],
                "nll": nll,
                "nll_tokens": nll_tokens,
                "gen_tokens": generations.num_tokens,
                "shot_ids": ",".join(shot_ids),
                "truncated": generations.truncated,
                "experiment": ctx.experiment,
                "train_seed": ctx.train_seed,
                "shot_seed": ctx.draw_seed(),
                "task_role": task.role,
                **effect,
                **_adaptation_columns(ctx),
            }
        )
    )
    info.update(_row_summary(rows))
    return rows, info


def _gold_examples(ctx: EvalContext, task: TaskData, shots: Sequence[dict[str, Any]]) -> list[Any]:
    """Each test problem's gold solution encoded for its NLL (after the demonstrations in ``in_context``)."""
    instruction = ctx.settings.instruction
    context = demonstration_messages(shots, instruction=instruction) if ctx.in_context else []
    max_seq_len = ctx.settings.model.max_seq_len
    limit = (ctx.context_limit or max_seq_len) if ctx.in_context else max_seq_len
    return [
        encode_example(ctx.tokenizer, p, s, limit, context, instruction=instruction)
        for p, s in zip(task.test["problem"].astype(str), task.test["solution"].astype(str), strict=True)
    ]


def _adapt(
    ctx: EvalContext, stack: contextlib.ExitStack, shots: Sequence[dict[str, Any]], info: dict[str, Any], where: str
) -> dict[str, float]:
    """Adapt the model on the shots until ``stack`` closes; record the adaptation in ``info``; return its effect."""
    full = shot_batches(
        ctx.tokenizer,
        shots,
        max_seq_len=ctx.settings.model.max_seq_len,
        batch_size=ctx.settings.inner_batch_size,
        instruction=ctx.settings.instruction,
    )
    loss_fn = ctx.loss_fn()
    steps: Any = full  # every step on all k shots, or (FOMAML's meta-training inner loop) one mini-batch per step
    before = None  # the loss of all k shots at the initialisation: the first step's own loss when it takes them all
    if ctx.spec.protocol == META_INNER_LOOP:
        steps = inner_loop_batches(ctx.tokenizer, shots, ctx.spec, max_seq_len=ctx.settings.model.max_seq_len,
                                   instruction=ctx.settings.instruction)  # fmt: skip
        before = mean_loss(ctx.model, full, loss_fn)
    # The loss opens autocast per forward pass: an autocast region around the inner loop would
    # keep stale low-precision weights, so every step would see the initialisation.
    adaptation = stack.enter_context(
        adapted_on_shots(ctx.model, steps, ctx.spec, loss_fn=loss_fn, snapshot=ctx.initialisation_snapshot())
    )
    effect = {
        "support_loss_before": adaptation.loss_before if before is None else before,
        "support_loss_after": mean_loss(ctx.model, full, loss_fn),
        "weight_change": adaptation.weight_change,
    }
    info["support_losses"] = adaptation.support_losses
    info["support_tokens"] = full.num_tokens
    info["support_truncated"] = sum(b.num_truncated for b in full.batches)
    if not adaptation.finite:
        print(f"warning: {where}: non-finite support loss", file=sys.stderr)
    return effect


def _adaptation_columns(ctx: EvalContext) -> dict[str, Any]:
    """The adaptation actually used (none without fine-tuning: lr 0, 0 steps)."""
    if ctx.finetune:
        return ctx.spec.describe()
    return {
        "adapt_optimizer": ctx.spec.optimizer,
        "adapt_lr": 0.0,
        "adapt_steps": 0,
        "adapt_protocol": ctx.spec.protocol,
    }


def _nll(model: Any, tokenizer: Any, encoded: Sequence[Any], batch_size: int) -> tuple[list[float], list[int]]:
    nll: list[float] = []
    counts: list[int] = []
    for start in range(0, len(encoded), batch_size):
        sums, numbers = example_nll(model, collate(encoded[start : start + batch_size], tokenizer.pad_token_id))
        for total, number in zip(sums.tolist(), numbers.tolist(), strict=True):
            nll.append(total / number if number > 0 else math.nan)
            counts.append(int(number))
    return nll, counts


def _row_summary(rows: pd.DataFrame) -> dict[str, Any]:
    statuses = rows["grade_status"].value_counts()
    return {
        "n": len(rows),
        "accuracy": float(rows["correct"].mean()) if len(rows) else math.nan,
        "mean_nll": float(rows["nll"].mean()) if len(rows) else math.nan,
        "gen_tokens": int(rows["gen_tokens"].sum()),
        "truncated": int(rows["truncated"].sum()),
        **{status: int(statuses.get(status, 0)) for status in ("timeout", "no_answer", "error")},
    }


def check_in_context_lengths(ctx: EvalContext, tasks: Sequence[TaskData]) -> None:
    """Fail before any work if some (task, repeat)'s k-shot prompt cannot fit in the context.

    Checks the longest test problem (by characters) of each (task, repeat); generation checks
    every prompt exactly again.
    """
    if not ctx.in_context:
        return
    for task in tasks:
        if task.test.empty:
            continue
        longest = max(task.test["problem"].astype(str), key=len)
        for repeat in repeats_for(ctx.shots, ctx.settings.repeats):
            _, shots = task.draw(ctx.shots, seed=ctx.draw_seed(), repeat=repeat)
            check_context(
                ctx.prompts([longest], shots),
                ctx.settings.max_new_tokens,
                ctx.context_limit,
                f"eval.mode in_context, {ctx.shots} shots, task {task.name} repeat {repeat}",
            )
