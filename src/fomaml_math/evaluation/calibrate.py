"""Stage ``calibrate``: choose the evaluation's adaptation learning rate of one initialisation on dev.

For every learning rate of ``calibration.lr_grid`` (FOMAML's training ``inner_lr`` is always among
them, so the rate FOMAML was meta-trained for is a candidate), every task and ``calibration.draws``
draws of each ``calibration.shots`` count from the task's ``dev_pool`` (a draw stream of their own,
so the evaluation's shots are other ones), the initialisation is adapted with the evaluation's
optimizer for up to ``max(steps_grid)`` steps.  After every step the token-weighted NLL of the
task's ``dev_monitor`` examples is measured (the adaptation-speed curve); the value after ``s``
steps is exactly what adapting for ``s`` steps gives, so one run per rate serves every step count.

The criterion of a (lr, steps) point is the mean over tasks of the dev loss after adaptation
(averaged over draws and shot counts within a task); the lowest wins, ties going to the smaller
rate and then to fewer steps.  A rate whose loss is not finite (divergence) cannot win.  No test
data is read.  The grid, the draws and the criterion are the same for every initialisation: each
gets the same tuning budget.

The grids and every other setting are read through :class:`~.settings.CalibrationSettings`, the
model set up by :mod:`~.job` (as the evaluation's); the choice is an :class:`~.choice.AdaptationChoice`.

Output (``--output``, JSON): ``init``, ``experiment``, ``train_seed``, ``optimizer``, ``chosen``
(``lr``, ``num_steps``), ``grid`` (per point: ``lr``, ``num_steps``, ``dev_loss``,
``dev_loss_before``), ``curve`` (per rate and step: ``dev_loss``), ``per_task`` and the settings.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from fomaml_math.adapt import WeightSnapshot, sft_loss_fn
from fomaml_math.batching import collate, encode_example, summed_nll
from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.choice import AdaptationChoice
from fomaml_math.evaluation.job import DEVICES, JobModel, load_job_model
from fomaml_math.evaluation.settings import CalibrationSettings
from fomaml_math.evaluation.tasks import load_dev_tasks, shot_examples
from fomaml_math.io import write_json
from fomaml_math.kshot import STREAM_CALIBRATION, AdaptSpec, adapted_on_shots, draw_shots, shot_batches


def choose(points: Sequence[Mapping[str, Any]], optimizer: str) -> AdaptationChoice:
    """The grid point with the lowest finite ``dev_loss`` (ties: smaller lr, then fewer steps)."""
    finite = [p for p in points if math.isfinite(float(p["dev_loss"]))]
    if not finite:
        raise ConfigError(
            "calibration.lr_grid: every learning rate diverged on dev (non-finite loss); add smaller rates"
        )
    best = min(finite, key=lambda p: (float(p["dev_loss"]), float(p["lr"]), int(p["num_steps"])))
    return AdaptationChoice(optimizer, float(best["lr"]), int(best["num_steps"]))


def _monitor_chunks(job: JobModel, frame: pd.DataFrame, cal: CalibrationSettings) -> list:
    """The first ``max_monitor_examples`` dev_monitor examples, collated in micro-batches."""
    rows = frame.iloc[: cal.max_monitor_examples]
    encoded = [
        encode_example(job.tokenizer, p, s, cal.model.max_seq_len, instruction=cal.instruction)
        for p, s in zip(rows["problem"].astype(str), rows["solution"].astype(str), strict=True)
    ]
    size = cal.inner_batch_size
    return [collate(encoded[i : i + size], job.tokenizer.pad_token_id) for i in range(0, len(encoded), size)]


def _check_pools(tasks: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]], cal: CalibrationSettings) -> None:
    for task, (pool, _) in tasks.items():  # before any work: every shot count must fit every pool
        for k in cal.shots:
            if k > len(pool):
                raise ConfigError(
                    f"calibration.shots: {k} shots, but task {task!r} has only {len(pool)} dev_pool examples"
                )


def _curve(
    job: JobModel, task: str, pool: pd.DataFrame, chunks: list, lr: float, cal: CalibrationSettings, *,
    loss_fn: Any, snapshot: WeightSnapshot, bar: Any,
) -> list[float]:  # fmt: skip
    """One rate on one task: the dev loss after each step 1..max steps, over every draw and shot count."""
    max_steps = max(cal.steps_grid)
    spec = AdaptSpec(cal.optimizer, lr, max_steps, cal.inner_batch_size)
    sums = [[0.0, 0.0] for _ in range(max_steps)]

    def measure(step: int) -> None:
        nll, tokens = summed_nll(job.model, chunks, job.autocast)
        sums[step - 1][0] += nll
        sums[step - 1][1] += tokens

    for draw in range(cal.draws):
        for k in cal.shots:
            ids = draw_shots(pool["id"].tolist(), k, seed=cal.seed, task=task, repeat=draw, stream=STREAM_CALIBRATION)
            batches = shot_batches(job.tokenizer, shot_examples(pool, ids), max_seq_len=cal.model.max_seq_len,
                                   batch_size=cal.inner_batch_size, instruction=cal.instruction)  # fmt: skip
            with adapted_on_shots(job.model, batches, spec, loss_fn=loss_fn, snapshot=snapshot, on_step=measure):
                pass
            bar.update(1)
    return [total / max(tokens, 1.0) for total, tokens in sums]


def calibrate(
    job: JobModel,
    tasks: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
    cal: CalibrationSettings,
    *,
    snapshot_device: str = "cpu",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Run the grid on ``tasks`` (name -> (dev_pool frame, dev_monitor frame)); returns the report."""
    loss_fn = sft_loss_fn(job.device, job.autocast)
    snapshot = WeightSnapshot(job.model, snapshot_device)
    _check_pools(tasks, cal)
    # per (lr, task): dev loss (summed NLL / tokens over draws and shot counts) after each step 1..max_steps
    after: dict[tuple[float, str], list[float]] = {}
    before: dict[str, float] = {}
    work = len(cal.lr_grid) * len(tasks) * cal.draws * len(cal.shots)
    with tqdm(total=work, desc="calibrate", disable=not show_progress, file=sys.stderr) as bar:
        for task, (pool, monitor) in tasks.items():
            chunks = _monitor_chunks(job, monitor, cal)
            total, count = summed_nll(job.model, chunks, job.autocast)
            before[task] = total / max(count, 1)
            for lr in cal.lr_grid:
                after[(lr, task)] = _curve(job, task, pool, chunks, lr, cal, loss_fn=loss_fn, snapshot=snapshot,
                                           bar=bar)  # fmt: skip
    if not snapshot.matches():
        raise RuntimeError("calibrate: the initialisation was not restored (a bug in adapt-then-restore)")
    return _report(after, before, list(tasks), cal)


def _report(
    after: Mapping[tuple[float, str], list[float]], before: Mapping[str, float], names: list[str],
    cal: CalibrationSettings,
) -> dict[str, Any]:  # fmt: skip
    """The grid (mean over tasks per point), the curve, the per-task values and the choice."""
    mean_before = sum(before.values()) / len(names)
    grid, curve = [], []
    for lr in cal.lr_grid:
        for step in range(1, max(cal.steps_grid) + 1):
            value = sum(after[(lr, t)][step - 1] for t in names) / len(names)
            value = value if math.isfinite(value) else math.inf
            curve.append({"lr": lr, "step": step, "dev_loss": value})
            if step in cal.steps_grid:
                grid.append({"lr": lr, "num_steps": step, "dev_loss": value, "dev_loss_before": mean_before})
    per_task = [
        {"task": t, "lr": lr, "num_steps": s, "dev_loss": after[(lr, t)][s - 1], "dev_loss_before": before[t]}
        for t in names
        for lr in cal.lr_grid
        for s in cal.steps_grid
    ]
    return {
        "optimizer": cal.optimizer,
        "chosen": choose(grid, cal.optimizer).to_json(),
        "grid": grid,
        "curve": curve,
        "per_task": per_task,
        "tasks": names,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fomaml_math calibrate", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--init", required=True, help="base, sft or fomaml")
    parser.add_argument("--model", required=True, help="HF model folder or hub id")
    parser.add_argument("--tasks-dir", required=True, help="results/data/tasks (dev_pool and dev_monitor are read)")
    parser.add_argument("--output", required=True, help="calibration JSON")
    parser.add_argument("--experiment", default=None, help="experiment of --model (null: shared, e.g. the base)")
    parser.add_argument("--train-seed", type=int, default=-1, help="training seed of --model (-1: untrained base)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    settings = settings_from_args(args, "calibrate")
    started = time.perf_counter()
    cal = CalibrationSettings.from_stage(settings)
    tasks = load_dev_tasks(args.tasks_dir)
    job = load_job_model(args.model, cal.model, device=args.device, mixed_precision=cal.mixed_precision)
    report = calibrate(job, tasks, cal, show_progress=not args.no_progress)
    report = {
        "init": args.init,
        "experiment": args.experiment,
        "train_seed": args.train_seed,
        **report,
        "model": args.model,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "settings": settings,
    }
    write_json(args.output, report)
    chosen = report["chosen"]
    print(
        f"calibrate {args.init}: {report['optimizer']} lr {chosen['lr']:g}, {chosen['num_steps']} step(s) "
        f"(dev loss {min(p['dev_loss'] for p in report['grid']):.4f}) -> {args.output}"
    )
    return 0
