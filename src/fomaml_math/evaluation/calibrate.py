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
from pathlib import Path
from typing import Any

from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.errors import ConfigError
from fomaml_math.io import write_json

MONITOR_COLUMNS = ("id", "problem", "solution")


def lr_grid(settings: Mapping[str, Any]) -> list[float]:
    """The configured rates plus FOMAML's training inner rate (if the settings carry it), ascending."""
    rates = {float(x) for x in settings["calibration"]["lr_grid"]}
    if settings.get("fomaml_inner_lr") is not None:
        rates.add(float(settings["fomaml_inner_lr"]))
    return sorted(rates)


def steps_grid(settings: Mapping[str, Any]) -> list[int]:
    grid = settings["calibration"].get("steps_grid")
    return sorted({int(s) for s in grid}) if grid else [int(settings["adaptation"]["num_inner_steps"])]


def choose(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The grid point with the lowest finite ``dev_loss`` (ties: smaller lr, then fewer steps)."""
    finite = [p for p in points if math.isfinite(float(p["dev_loss"]))]
    if not finite:
        raise ConfigError(
            "calibration.lr_grid: every learning rate diverged on dev (non-finite loss); add smaller rates"
        )
    best = min(finite, key=lambda p: (float(p["dev_loss"]), float(p["lr"]), int(p["num_steps"])))
    return {"lr": float(best["lr"]), "num_steps": int(best["num_steps"])}


def _monitor_chunks(tokenizer: Any, frame: Any, *, limit: int, batch_size: int, max_len: int, instruction: str) -> list:
    from fomaml_math.batching import collate, encode_example

    rows = frame.iloc[:limit]
    encoded = [
        encode_example(tokenizer, p, s, max_len, instruction=instruction)
        for p, s in zip(rows["problem"].astype(str), rows["solution"].astype(str), strict=True)
    ]
    return [collate(encoded[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(encoded), batch_size)]


def calibrate(
    model: Any,
    tokenizer: Any,
    tasks: Mapping[str, tuple[Any, Any]],
    settings: Mapping[str, Any],
    *,
    device: Any,
    mixed_precision: str = "no",
    snapshot_device: str = "cpu",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Run the grid on ``tasks`` (name -> (dev_pool frame, dev_monitor frame)); returns the report."""
    from tqdm.auto import tqdm

    from fomaml_math.adapt import WeightSnapshot, sft_loss_fn
    from fomaml_math.batching import summed_nll
    from fomaml_math.evaluation.fewshot import precision_context
    from fomaml_math.kshot import STREAM_CALIBRATION, AdaptSpec, adapted_on_shots, draw_shots, shot_batches

    cal = settings["calibration"]
    adaptation = settings["adaptation"]
    instruction = str(settings.get("prompt", {}).get("instruction", ""))
    max_len = int(settings["model"]["max_seq_len"])
    seed = int(settings["seed"])
    rates, step_counts = lr_grid(settings), steps_grid(settings)
    max_steps = max(step_counts)

    def autocast() -> Any:
        return precision_context(device, mixed_precision)

    loss_fn = sft_loss_fn(device, autocast)
    snapshot = WeightSnapshot(model, snapshot_device)
    batch_size = int(adaptation["inner_batch_size"])
    for task, (pool, _) in tasks.items():  # before any work: every shot count must fit every pool
        for k in cal["shots"]:
            if int(k) > len(pool):
                raise ConfigError(
                    f"calibration.shots: {k} shots, but task {task!r} has only {len(pool)} dev_pool examples"
                )
    # per (lr, task): dev loss (summed NLL / tokens over draws and shot counts) after each step 1..max_steps
    after: dict[tuple[float, str], list[float]] = {}
    before: dict[str, float] = {}
    work = len(rates) * len(tasks) * int(cal["draws"]) * len(cal["shots"])
    with tqdm(total=work, desc="calibrate", disable=not show_progress, file=sys.stderr) as bar:
        for task, (pool, monitor) in tasks.items():
            chunks = _monitor_chunks(
                tokenizer,
                monitor,
                limit=int(cal["max_monitor_examples"]),
                batch_size=batch_size,
                max_len=max_len,
                instruction=instruction,
            )
            total, count = summed_nll(model, chunks, autocast)
            before[task] = total / max(count, 1)
            by_id = pool.set_index("id")
            for lr in rates:
                spec = AdaptSpec(str(adaptation["optimizer"]), lr, max_steps, batch_size)
                sums = [[0.0, 0.0] for _ in range(max_steps)]

                def measure(step: int, sums: list[list[float]] = sums, chunks: list = chunks) -> None:
                    nll, tokens = summed_nll(model, chunks, autocast)
                    sums[step - 1][0] += nll
                    sums[step - 1][1] += tokens

                for draw in range(int(cal["draws"])):
                    for k in cal["shots"]:
                        ids = draw_shots(pool["id"].tolist(), int(k), seed=seed, task=task, repeat=draw,
                                         stream=STREAM_CALIBRATION)  # fmt: skip
                        shots = [{"problem": by_id.at[i, "problem"], "solution": by_id.at[i, "solution"]} for i in ids]
                        batches = shot_batches(
                            tokenizer, shots, max_seq_len=max_len, batch_size=batch_size, instruction=instruction
                        )
                        with adapted_on_shots(
                            model, batches, spec, loss_fn=loss_fn, snapshot=snapshot, on_step=measure
                        ):
                            pass
                        bar.update(1)
                after[(lr, task)] = [total / max(tokens, 1.0) for total, tokens in sums]
    if not snapshot.matches():
        raise RuntimeError("calibrate: the initialisation was not restored (a bug in adapt-then-restore)")
    names = list(tasks)
    mean_before = sum(before.values()) / len(names)
    grid, curve = [], []
    for lr in rates:
        for step in range(1, max_steps + 1):
            value = sum(after[(lr, t)][step - 1] for t in names) / len(names)
            value = value if math.isfinite(value) else math.inf
            curve.append({"lr": lr, "step": step, "dev_loss": value})
            if step in step_counts:
                grid.append({"lr": lr, "num_steps": step, "dev_loss": value, "dev_loss_before": mean_before})
    per_task = [
        {"task": t, "lr": lr, "num_steps": s, "dev_loss": after[(lr, t)][s - 1], "dev_loss_before": before[t]}
        for t in names
        for lr in rates
        for s in step_counts
    ]
    return {
        "optimizer": str(adaptation["optimizer"]),
        "chosen": choose(grid),
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
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    settings = settings_from_args(args, "calibrate")
    started = time.perf_counter()

    import torch

    from fomaml_math.data.taskfiles import read_task_split
    from fomaml_math.evaluation.fewshot import _device
    from fomaml_math.modeling import load_model_and_tokenizer

    names = sorted(p.parent.name for p in Path(args.tasks_dir).glob("*/dev_pool.parquet"))  # test is never read
    if not names:
        raise ConfigError(f"--tasks-dir: no <task>/dev_pool.parquet under {args.tasks_dir} (rerun split-tasks)")
    tasks = {
        t: (
            read_task_split(Path(args.tasks_dir) / t / "dev_pool.parquet", MONITOR_COLUMNS),
            read_task_split(Path(args.tasks_dir) / t / "dev_monitor.parquet", MONITOR_COLUMNS),
        )
        for t in names
    }
    model_settings = settings["model"]
    is_base = args.model == model_settings["name_or_path"]
    model, tokenizer = load_model_and_tokenizer(
        args.model,
        revision=model_settings.get("revision") if is_base else None,
        trust_remote_code=bool(model_settings.get("trust_remote_code", False)),
        dtype=torch.float32,
    )
    device = _device(args.device)
    model.to(device)
    model.eval()
    precision = str(settings.get("mixed_precision", "no")) if device.type == "cuda" else "no"
    report = calibrate(
        model, tokenizer, tasks, settings, device=device, mixed_precision=precision, show_progress=not args.no_progress
    )
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
