"""Stage ``evaluate``: k-shot evaluation of one initialisation (base, SFT or FOMAML) on every task.

One job is one (init, k). For each task and repeat it draws k examples from the task's ``dev_pool``
split, which no method trains on (:func:`fomaml_math.kshot.draw_shots`: nested in k, the same for
every init), then

* ``finetune`` mode: adapts the initialisation on them (:func:`fomaml_math.kshot.adapted_on_shots`:
  ``eval.optimizer`` sgd or adam, the learning rate chosen by the calibration stage or
  ``eval.inner_lr``, ``eval.num_inner_steps`` steps on all k shots; autocast per forward pass),
  records the adaptation's effect (support loss before/after, ``‖Δw‖/‖w‖``), answers the task's
  test problems greedily, computes the gold solutions' NLL, and leaves the ``with`` block, which
  restores the initialisation bitwise before the next task/repeat;
* ``in_context`` mode: puts the k examples in the prompt as worked user/assistant turns.

``--meta-inner-loop TRAIN_SUMMARY`` (the secondary row of a FOMAML run, docs/evaluation.md) adapts instead with
the inner loop the run was meta-trained with: its optimizer, rate and steps, one mini-batch of its
``inner_batch_size`` shots per step (:func:`fomaml_math.kshot.inner_loop_batches`); the rows say so
(``adapt_protocol``).

0 shots: one repeat, no adaptation. Answers are graded by :mod:`fomaml_math.evaluation.grade`.
Output: one parquet row per (task, repeat, test problem) (:mod:`~fomaml_math.evaluation.rows`) and a
``<name>.summary.json`` next to it. Finished (task, repeat) pieces are kept in a hidden folder
beside the output until the job succeeds, so a killed job resumes where it stopped (only when
settings, model files and task files are unchanged: :mod:`~fomaml_math.evaluation.pieces`).

This module is the job: command line, settings, set-up, the loop over (task, repeat)s and the
outputs. One (task, repeat) is :mod:`~fomaml_math.evaluation.repeat`; the task files are read by
:mod:`~fomaml_math.evaluation.tasks`, the model set up by :mod:`~fomaml_math.evaluation.job`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from fomaml_math import measured
from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.data.taskfiles import discover_tasks
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.backends import check_backend, make_backend
from fomaml_math.evaluation.generate import context_length
from fomaml_math.evaluation.grade import Grader
from fomaml_math.evaluation.job import DEVICES, load_job_model
from fomaml_math.evaluation.pieces import PieceStore, job_fingerprint
from fomaml_math.evaluation.repeat import EvalContext, check_in_context_lengths, evaluate_task_repeat
from fomaml_math.evaluation.rows import INITS, METALOOP_OF, OUTPUT_COLUMNS, to_output_schema
from fomaml_math.evaluation.settings import OPTIMIZERS, EvalSettings
from fomaml_math.evaluation.tasks import TaskData, load_tasks, repeats_for
from fomaml_math.io import write_json, write_parquet
from fomaml_math.kshot import AdaptSpec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fomaml_math evaluate", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--init", required=True, choices=INITS, help="which initialisation --model is")
    parser.add_argument("--model", required=True, help="HF model folder or hub id")
    parser.add_argument("--tasks-dir", required=True, help="results/data/tasks")
    parser.add_argument("--shots", required=True, type=int, help="k: support examples per task (0: no adaptation)")
    parser.add_argument("--output", required=True, help="results/eval/<init>/shots-<k>.parquet")
    parser.add_argument("--tasks", nargs="+", default=None, help="evaluate only these tasks")
    parser.add_argument("--grade-workers", type=int, default=1, help="grading processes (default 1)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument(
        "--snapshot-device",
        choices=("cpu", "same"),
        default="cpu",
        help="where the copy of the initialisation lives (restores are bitwise either way)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--adapt-lr", type=float, default=None, help="the calibrated learning rate (default eval.inner_lr)"
    )
    parser.add_argument("--adapt-steps", type=int, default=None, help="calibrated steps (default eval.num_inner_steps)")
    parser.add_argument(
        "--meta-inner-loop",
        metavar="TRAIN_SUMMARY",
        default=None,
        help="adapt as this FOMAML run was meta-trained (its train_summary.json's inner_loop: optimizer, lr, steps, "
        "one mini-batch of batch_size shots per step); the secondary row, instead of --adapt-lr/--adapt-steps",
    )
    parser.add_argument("--experiment", default="default", help="the experiment these rows belong to")
    parser.add_argument("--train-seed", type=int, default=-1, help="training seed of --model (-1: untrained base)")
    parser.add_argument("--shot-seed", type=int, default=None, help="seed of the shot draws (default: the seed)")
    parser.add_argument("--meta-test", nargs="*", default=[], help="tasks held out of this experiment's training")
    return parser.parse_args(argv)


def run_job(
    ctx: EvalContext,
    tasks: Sequence[TaskData],
    grader: Any,
    *,
    pieces: PieceStore | None = None,
    show_progress: bool = True,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Evaluate every (task, repeat); returns all rows and the per-(task, repeat) summaries."""
    check_in_context_lengths(ctx, tasks)
    plan = [(task, repeat) for task in tasks for repeat in repeats_for(ctx.shots, ctx.settings.repeats)]
    frames: list[pd.DataFrame] = []
    infos: list[dict[str, Any]] = []
    total = sum(len(task.test) for task, _ in plan)
    with tqdm(total=total, unit="problem", desc=f"eval {ctx.init} k={ctx.shots}", disable=not show_progress,
              mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:  # fmt: skip
        for task, repeat in plan:
            done = pieces.load(task.name, repeat) if pieces is not None else None
            if done is not None:
                rows, info = done
                info["resumed"] = True
                bar.update(len(rows))
            else:
                bar.set_postfix_str(f"{task.name} r{repeat}")
                rows, info = evaluate_task_repeat(ctx, task, repeat, grader, bar)
                if pieces is not None:
                    pieces.save(task.name, repeat, rows, info)
            frames.append(rows)
            infos.append(info)
    if not frames:
        return to_output_schema(pd.DataFrame({c: [] for c in OUTPUT_COLUMNS})), infos
    return to_output_schema(pd.concat(frames, ignore_index=True)), infos


def summary_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}.summary.json")


def build_summary(
    frame: pd.DataFrame, infos: Sequence[dict[str, Any]], *, ctx: EvalContext, extra: dict[str, Any]
) -> dict[str, Any]:
    per_task = frame.groupby("task")["correct"].mean().to_dict() if len(frame) else {}
    return {
        "init": ctx.init,
        "shots": ctx.shots,
        "mode": ctx.settings.mode,
        "rows": len(frame),
        "accuracy": float(frame["correct"].mean()) if len(frame) else math.nan,
        "accuracy_per_task": {k: float(v) for k, v in per_task.items()},
        "timeouts": int((frame["grade_status"] == "timeout").sum()),
        "no_answer": int((frame["grade_status"] == "no_answer").sum()),
        "errors": int((frame["grade_status"] == "error").sum()),
        "gen_tokens": int(frame["gen_tokens"].sum()),
        "mean_gen_tokens": float(frame["gen_tokens"].mean()) if len(frame) else math.nan,
        "no_answer_rate": float((frame["grade_status"] == "no_answer").mean()) if len(frame) else math.nan,
        "truncation_rate": float(frame["truncated"].mean()) if len(frame) else math.nan,
        "per_task_repeat": list(infos),
        **extra,
    }


def adapt_spec(args: argparse.Namespace, settings: EvalSettings) -> AdaptSpec:
    """The job's adaptation: calibration's choice (the rule passes it) or the eval settings, each step on all k
    shots; with ``--meta-inner-loop``, the inner loop the FOMAML run was meta-trained with."""
    if args.meta_inner_loop is None:
        choice = settings.adaptation.calibrated(args.adapt_lr, args.adapt_steps)
        return AdaptSpec.from_choice(choice, settings.inner_batch_size)
    if args.adapt_lr is not None or args.adapt_steps is not None:
        raise ConfigError("--meta-inner-loop: adapts with the run's own inner loop; drop --adapt-lr/--adapt-steps")
    if args.init not in METALOOP_OF or settings.mode != "finetune" or args.shots == 0:
        raise ConfigError(
            f"--meta-inner-loop: needs --init {' or '.join(METALOOP_OF)}, eval.mode finetune and --shots > 0 "
            f"(got --init {args.init}, {settings.mode}, --shots {args.shots})"
        )
    path = Path(args.meta_inner_loop)
    if not path.is_file():
        raise ConfigError(f"--meta-inner-loop {path}: file not found")
    inner_loop = json.loads(path.read_text()).get("inner_loop")
    if not isinstance(inner_loop, dict):
        raise ConfigError(f"--meta-inner-loop {path}: no inner_loop entry (not a FOMAML run's train_summary.json?)")
    return AdaptSpec.from_inner_loop(inner_loop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw = settings_from_args(args, "evaluate")
    started = time.perf_counter()
    if args.shots < 0:
        raise ConfigError(f"--shots: must be >= 0, got {args.shots}")
    if args.grade_workers < 1:
        raise ConfigError(f"--grade-workers: must be >= 1, got {args.grade_workers}")
    settings = EvalSettings.from_stage(raw)
    check_backend(settings)  # unknown eval.vllm keys fail here, before any model is loaded
    output = Path(args.output)
    if output.suffix != ".parquet":
        raise ConfigError(f"--output: expected a .parquet path, got {output}")
    task_names = discover_tasks(args.tasks_dir, args.tasks)
    tasks = load_tasks(args.tasks_dir, task_names, max_test_problems=settings.max_test_problems,
                       meta_test=args.meta_test, shots=args.shots)  # fmt: skip
    spec = adapt_spec(args, settings)
    if spec.optimizer not in OPTIMIZERS:
        raise ConfigError(f"eval.optimizer: expected sgd or adam, got {spec.optimizer!r}")

    job = load_job_model(args.model, settings.model, device=args.device, mixed_precision=settings.mixed_precision,
                         memory=raw.get("adapt_memory"))  # fmt: skip
    torch.manual_seed(settings.seed)
    ctx = EvalContext(
        job=job,
        init=args.init,
        shots=args.shots,
        settings=settings,
        spec=spec,
        context_limit=context_length(job.model) or settings.model.max_seq_len,
        snapshot_device=args.snapshot_device,
        shot_seed=args.shot_seed,
        experiment=args.experiment,
        train_seed=args.train_seed,
    )
    ctx.backend = make_backend(settings, job, args.model, context_limit=ctx.context_limit)  # one engine per job
    described = {"spec": spec.describe(), "experiment": args.experiment, "train_seed": args.train_seed,
                 "shot_seed": ctx.draw_seed(), "meta_test": sorted(set(args.meta_test))}  # fmt: skip
    fingerprint = job_fingerprint(raw, init=args.init, shots=args.shots, model=args.model, tasks_dir=args.tasks_dir,
                                  tasks=task_names, device=job.device.type, extra=described)  # fmt: skip
    pieces = PieceStore(output, fingerprint)
    try:
        with Grader(timeout_s=settings.grade_timeout_s, workers=args.grade_workers) as grader:
            frame, infos = run_job(ctx, tasks, grader, pieces=pieces, show_progress=not args.no_progress)
    finally:
        ctx.backend.close()
    wall = time.perf_counter() - started
    summary = build_summary(
        frame,
        infos,
        ctx=ctx,
        extra={
            "model": args.model,
            "tasks": task_names,
            "device": str(job.device),
            "precision": job.mixed_precision,
            "backend": settings.backend,
            **described,
            "wall_time_s": round(wall, 3),
            "resumed_pieces": sum(bool(i.get("resumed")) for i in infos),
            "measured": measured.evaluation(
                infos,
                model=settings.model.name_or_path,
                backend=settings.backend,
                max_new_tokens=settings.max_new_tokens,
                device=job.device,
            ),
            "settings": raw,
        },
    )
    write_parquet(output, frame)
    write_json(summary_path(output), summary)
    pieces.clear()
    print(
        f"evaluate {args.init} k={args.shots}: accuracy {summary['accuracy']:.3f} over {len(frame)} answers "
        f"({summary['timeouts']} grading timeouts) in {wall:.1f}s -> {output}"
    )
    return 0
