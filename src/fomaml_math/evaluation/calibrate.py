"""Stage ``calibrate`` (the tuner): choose one initialisation's kept checkpoint and its adaptation per shot count.

One tuner, one criterion, for model selection and adaptation alike (docs/evaluation.md, "Tuning"):
for every candidate checkpoint of a trained run (``--candidate STEP=PATH``, written by training with
``select.criterion: tuned``; the base has one, ``--model``), every tuned shot count k
(``calibration.shots``, or every evaluated k), every learning rate of ``calibration.lr_grid`` (FOMAML's
inner rate included) and ``calibration.draws`` draws of k shots from each task's ``dev_pool`` (a draw
stream of its own), the initialisation is adapted with the evaluation's optimizer for
``max(steps_grid)`` steps.  Before adapting and after every step the two NLL criteria of the task's
``dev_monitor`` examples are measured; at the step counts of ``steps_grid`` (and before adapting) the
greedy answers are generated and graded too.  One run per rate serves every step count.

The tasks are the experiment's *training* tasks only (``--tasks``): a held-out task's dev data, whose
labelled examples beyond the k shots a true few-shot learner does not have, is never read, nor is any
test file (Perez, Kiela & Cho 2021; tests/test_true_few_shot.py).  The same grid, draws, examples and
criterion serve every initialisation: each gets the same tuning budget.

A point's value is the mean over tasks of each task's value (draws pooled within a task).  Per tuned k
the best point by ``calibration.criterion`` wins (accuracy: highest; NLLs: lowest); ties go to the lower
final-answer NLL (accuracy criterion; else to the higher accuracy), then to the smaller rate, fewer
steps and the later checkpoint.  A point whose criterion is not finite (divergence) cannot win.  At
0 shots only the checkpoint is chosen (nothing is adapted).  The report also gives, over the grid,
Spearman's rank correlation of every criterion with dev accuracy, and the split-half agreement of dev
accuracy itself (even- against odd-indexed examples): how far the criterion's optimum is the accuracy's.

Output (``--output``, JSON): ``init``, ``experiment``, ``train_seed``, ``shot_seed``, ``optimizer``, ``criterion``,
``tasks``, ``candidates``, ``lr_grid``, ``steps_grid``, ``shots`` (tuned; an evaluated k uses its band,
:func:`fomaml_math.evaluation.choice.band_of`),
``chosen`` (per tuned k: ``shots``, ``checkpoint``, ``lr``, ``num_steps``, the criteria there, ``edges``,
``edge_note``), ``grid``, ``curve`` (per checkpoint, k, rate and step 0..max), ``agreement``,
``per_task`` and the settings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fomaml_math.adapt import WeightSnapshot
from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.criteria import (
    CRITERIA,
    HIGHER_IS_BETTER,
    DevExamples,
    Generation,
    Score,
    dev_examples,
    score,
    spearman,
)
from fomaml_math.evaluation.generate import context_length
from fomaml_math.evaluation.grade import Grader
from fomaml_math.evaluation.job import DEVICES, JobModel, load_job_model
from fomaml_math.evaluation.settings import CalibrationSettings
from fomaml_math.evaluation.tasks import load_dev_tasks, shot_examples
from fomaml_math.io import write_json
from fomaml_math.kshot import STREAM_CALIBRATION, AdaptSpec, adapted_on_shots, draw_shots, shot_batches

NO_LR = 0.0  # the "rate" of a 0-shot or 0-step point: nothing is adapted


@dataclass(frozen=True)
class Candidate:
    """Weights the tuner may keep: a training step (0: the untrained base) and its HF model folder."""

    step: int
    path: str


def parse_candidate(text: str) -> Candidate:
    step, sep, path = text.partition("=")
    if not sep or not step.strip().isdigit() or not path:
        raise ConfigError(f"--candidate: expected STEP=PATH (e.g. 80=results/.../candidates/step-80), got {text!r}")
    return Candidate(int(step), path)


def summary_candidates(train_summary: Path) -> list[Candidate]:
    """The candidates a training run kept (``candidates`` of its ``train_summary.json``), by step."""
    try:
        entries = json.loads(Path(train_summary).read_text())["candidates"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--train-summary {train_summary}: no readable 'candidates' list ({exc})") from exc
    if not entries:
        raise ConfigError(f"--train-summary {train_summary}: the run kept no candidate checkpoint")
    root = Path(train_summary).parent
    return sorted((Candidate(int(e["step"]), str(root / e["path"])) for e in entries), key=lambda c: c.step)


# ------------------------------------------------------------------------------------------ measuring


Key = tuple[int, int, float, int]  # (checkpoint, shots, lr, step)


class Records:
    """Every measurement, per (checkpoint, shots, lr, step) and task: sums, so draws pool exactly."""

    def __init__(self) -> None:
        self.scores: dict[Key, dict[str, list[Score]]] = defaultdict(lambda: defaultdict(list))

    def add(self, key: Key, task: str, value: Score) -> None:
        self.scores[key][task].append(value)

    def task_values(self, key: Key) -> dict[str, dict[str, float]]:
        out = {}
        for task, scores in self.scores[key].items():
            nll_tokens = sum(s.nll_tokens for s in scores)
            answer_tokens = sum(s.answer_tokens for s in scores)
            measured = [s.correct for s in scores if s.correct is not None]
            flat = [c for correct in measured for c in correct]
            half_a = [c for correct in measured for c in correct[0::2]]
            half_b = [c for correct in measured for c in correct[1::2]]
            out[task] = {
                "nll": sum(s.nll_sum for s in scores) / nll_tokens if nll_tokens else math.nan,
                "answer_nll": sum(s.answer_sum for s in scores) / answer_tokens if answer_tokens else math.nan,
                "accuracy": float(np.mean(flat)) if flat else math.nan,
                "accuracy_half_a": float(np.mean(half_a)) if half_a else math.nan,
                "accuracy_half_b": float(np.mean(half_b)) if half_b else math.nan,
            }
        return out

    def point(self, key: Key) -> dict[str, Any]:
        """The mean over tasks of every criterion at ``key`` (non-finite where any task diverged)."""
        values = self.task_values(key)
        checkpoint, shots, lr, step = key
        out: dict[str, Any] = {"checkpoint": checkpoint, "shots": shots, "lr": lr, "num_steps": step}
        for name in ("nll", "answer_nll", "accuracy", "accuracy_half_a", "accuracy_half_b"):
            column = [v[name] for v in values.values()]
            mean = float(np.mean(column)) if column else math.nan
            out[name] = mean if math.isfinite(mean) else (None if name.startswith("accuracy") else math.inf)
        return out


def _check_inputs(tasks: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]], cal: CalibrationSettings) -> None:
    if cal.criterion not in CRITERIA:
        raise ConfigError(f"calibration.criterion: expected one of {list(CRITERIA)}, got {cal.criterion!r}")
    for task, (pool, monitor) in tasks.items():  # before any work: every shot count must fit every pool
        for k in cal.shots:
            if k > len(pool):
                raise ConfigError(
                    f"calibration.shots: {k} shots, but task {task!r} has only {len(pool)} dev_pool examples"
                )
        if len(monitor) == 0:
            raise ConfigError(f"calibration: task {task!r} has no dev_monitor examples")


def _measure_candidate(
    job: JobModel, candidate: Candidate, tasks: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
    cal: CalibrationSettings, records: Records, grader: Grader, *, snapshot_device: str, bar: Any,
) -> None:  # fmt: skip
    loss_fn = job.loss_fn()
    snapshot = WeightSnapshot(job.model, snapshot_device)
    generation = Generation(cal.max_new_tokens, cal.gen_batch_size,
                            context_length(job.model) or cal.model.max_seq_len)  # fmt: skip
    max_steps = max(cal.steps_grid)
    graded_steps = set(cal.steps_grid)
    for task, (pool, monitor) in tasks.items():
        examples: DevExamples = dev_examples(job.tokenizer, task, monitor, max_examples=cal.max_monitor_examples,
                                             max_seq_len=cal.model.max_seq_len, instruction=cal.instruction,
                                             chunk_size=cal.inner_batch_size)  # fmt: skip
        unadapted = score(job, examples, grader=grader, generation=generation)
        for k in cal.shots:
            for lr in cal.lr_grid if k > 0 else [NO_LR]:
                records.add((candidate.step, k, lr, 0), task, unadapted)
        bar.update(1)
        for k in (k for k in cal.shots if k > 0 and max_steps > 0):
            for draw in range(cal.draws):
                ids = draw_shots(pool["id"].tolist(), k, seed=cal.seed, task=task, repeat=draw,
                                 stream=STREAM_CALIBRATION)  # fmt: skip
                batches = shot_batches(job.tokenizer, shot_examples(pool, ids), max_seq_len=cal.model.max_seq_len,
                                       batch_size=cal.inner_batch_size, instruction=cal.instruction)  # fmt: skip
                for lr in cal.lr_grid:

                    def measure(step: int, lr: float = lr, k: int = k, task: str = task,
                                examples: DevExamples = examples) -> None:  # fmt: skip
                        graded = generation if step in graded_steps else None
                        records.add((candidate.step, k, lr, step), task,
                                    score(job, examples, grader=grader, generation=graded))  # fmt: skip

                    spec = AdaptSpec(cal.optimizer, lr, max_steps, cal.inner_batch_size)
                    with adapted_on_shots(job.model, batches, spec, loss_fn=loss_fn, snapshot=snapshot,
                                          on_step=measure):  # fmt: skip
                        pass
                    bar.update(1)
    if not snapshot.matches():
        raise RuntimeError("calibrate: the initialisation was not restored (a bug in adapt-then-restore)")


# ------------------------------------------------------------------------------------------ choosing


def _oriented(point: Mapping[str, Any], name: str) -> float:
    """``name`` as a loss (lower is better), +inf where missing or not finite."""
    value = point.get(name)
    if value is None or not math.isfinite(float(value)):
        return math.inf
    return -float(value) if HIGHER_IS_BETTER[name] else float(value)


def choose(points: Sequence[Mapping[str, Any]], criterion: str) -> Mapping[str, Any]:
    """The best point by ``criterion``; ties: the tie-break criterion, smaller rate, fewer steps, later checkpoint."""
    finite = [p for p in points if math.isfinite(_oriented(p, criterion))]
    if not finite:
        raise ConfigError(
            f"calibration: no grid point has a finite {criterion} (every rate diverged?); add smaller rates "
            "to calibration.lr_grid"
        )
    second = "answer_nll" if criterion == "accuracy" else "accuracy"
    return min(
        finite,
        key=lambda p: (_oriented(p, criterion), _oriented(p, second), float(p["lr"]), int(p["num_steps"]),
                       -int(p["checkpoint"])),
    )  # fmt: skip


def _edges(best: Mapping[str, Any], points: Sequence[Mapping[str, Any]], cal: CalibrationSettings) -> list[str]:
    """Where the choice sits at an end of a grid of several values (the optimum may lie beyond it).

    Not adapting (0 steps, when the grid holds 0) is no edge: fewer steps than none do not exist, and the rate
    means nothing there."""
    if int(best["shots"]) == 0 or int(best["num_steps"]) == 0:
        return []
    edges = []
    for axis, grid, value in (("lr", cal.lr_grid, float(best["lr"])), ("num_steps", cal.steps_grid,
                                                                        int(best["num_steps"]))):  # fmt: skip
        if len(grid) > 1 and value in (min(grid), max(grid)):
            edges.append(f"{axis}:{'lowest' if value == min(grid) else 'highest'}")
    return edges


def _edge_note(best: Mapping[str, Any], points: Sequence[Mapping[str, Any]], edges: Sequence[str],
               criterion: str) -> str:  # fmt: skip
    """Why an edge won: its neighbour on that axis (all else equal) and both values of the criterion."""
    notes = []
    for edge in edges:
        axis, end = edge.split(":")
        others = [p for p in points if all(p[a] == best[a] for a in ("checkpoint", "lr", "num_steps") if a != axis)]
        values = sorted({float(p[axis]) for p in others})
        here = values.index(float(best[axis]))
        neighbour_value = values[here + 1] if end == "lowest" else values[here - 1]
        neighbour = next(p for p in others if float(p[axis]) == neighbour_value)
        mine, theirs = best.get(criterion), neighbour.get(criterion)
        name = "rate" if axis == "lr" else "step count"
        if mine == theirs:
            notes.append(f"{end} {name} {best[axis]:g} tied with {neighbour_value:g} on {criterion} ({mine:.4g}); "
                         "the tie-break chose it")  # fmt: skip
        else:
            notes.append(f"{end} {name} {best[axis]:g}: {criterion} {mine:.4g} against {theirs:.4g} at "
                         f"{neighbour_value:g}, so the optimum may lie beyond the grid")  # fmt: skip
    return "; ".join(notes)


def _agreement(grid: Sequence[Mapping[str, Any]], shots: Sequence[int]) -> dict[str, dict[str, float]]:
    """Spearman's ρ of each criterion (oriented: higher is better) with dev accuracy over the grid points
    (pooled and per tuned k > 0), and dev accuracy's split-half ρ (even- vs odd-indexed examples)."""
    out: dict[str, dict[str, float]] = {}
    groups = {"all": [p for p in grid if int(p["shots"]) > 0]}
    groups |= {str(k): [p for p in grid if int(p["shots"]) == k] for k in shots if k > 0}
    for label, points in groups.items():
        accuracy = [math.nan if p["accuracy"] is None else float(p["accuracy"]) for p in points]
        row = {name: spearman([-_oriented(p, name) for p in points], accuracy) for name in CRITERIA}

        def half(p: Mapping[str, Any], name: str) -> float:
            return math.nan if p[name] is None else float(p[name])

        row["split_half"] = spearman([half(p, "accuracy_half_a") for p in points],
                                     [half(p, "accuracy_half_b") for p in points])  # fmt: skip
        out[label] = {k: (None if not math.isfinite(v) else round(v, 6)) for k, v in row.items()}
    return out


def _report(
    records: Records, candidates: Sequence[Candidate], tasks: Sequence[str], cal: CalibrationSettings
) -> dict[str, Any]:
    max_steps = max(cal.steps_grid)
    curve, grid, per_task = [], [], []
    for candidate in candidates:
        for k in cal.shots:
            for lr in cal.lr_grid if k > 0 else [NO_LR]:
                for step in range(0, (max_steps if k > 0 else 0) + 1):
                    key = (candidate.step, k, lr, step)
                    if key not in records.scores:
                        continue
                    point = records.point(key)
                    curve.append({n: point[n] for n in ("checkpoint", "shots", "lr", "num_steps", "nll",
                                                        "answer_nll", "accuracy")})  # fmt: skip
                    if k == 0 or step in cal.steps_grid:
                        grid.append(point)
                        per_task += [{"task": t, **{n: point[n] for n in ("checkpoint", "shots", "lr", "num_steps")},
                                      **v} for t, v in records.task_values(key).items()]  # fmt: skip
    chosen = []
    for k in cal.shots:
        points = [p for p in grid if int(p["shots"]) == k]
        best = dict(choose(points, cal.criterion))
        if int(best["num_steps"]) == 0:
            best["lr"] = NO_LR  # not adapting: every rate's step-0 point is the same model
        edges = _edges(best, points, cal)
        best |= {"edges": edges, "edge_note": _edge_note(best, points, edges, cal.criterion),
                 "criterion_value": best[cal.criterion]}  # fmt: skip
        chosen.append(best)
    for entry in curve:  # "step" is the curve's name for the step count
        entry["step"] = entry.pop("num_steps")
    return {
        "optimizer": cal.optimizer,
        "criterion": cal.criterion,
        "tasks": list(tasks),
        "candidates": [{"step": c.step, "path": c.path} for c in candidates],
        "lr_grid": list(cal.lr_grid),
        "steps_grid": list(cal.steps_grid),
        "shots": list(cal.shots),
        "chosen": chosen,
        "grid": grid,
        "curve": curve,
        "agreement": _agreement(grid, cal.shots),
        "per_task": per_task,
    }


def tune(
    candidates: Sequence[Candidate],
    tasks: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
    cal: CalibrationSettings,
    *,
    device: str = "auto",
    snapshot_device: str = "cpu",
    show_progress: bool = False,
    memory: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure the grid for every candidate on ``tasks`` (name -> (dev_pool, dev_monitor)); the report."""
    _check_inputs(tasks, cal)
    records = Records()
    positive = [k for k in cal.shots if k > 0]
    work = len(candidates) * len(tasks) * (1 + len(positive) * cal.draws * len(cal.lr_grid))
    with tqdm(total=work, desc="calibrate", disable=not show_progress, file=sys.stderr) as bar, \
            Grader(timeout_s=cal.grade_timeout_s) as grader:  # fmt: skip
        for candidate in candidates:
            job = load_job_model(candidate.path, cal.model, device=device, mixed_precision=cal.mixed_precision,
                                 memory=memory)  # fmt: skip
            _measure_candidate(job, candidate, tasks, cal, records, grader, snapshot_device=snapshot_device, bar=bar)
            del job
    return _report(records, candidates, list(tasks), cal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fomaml_math calibrate", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--init", required=True, help="base, sft or fomaml")
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", help="HF model folder or hub id: the one candidate (the base)")
    models.add_argument("--candidate", action="append", metavar="STEP=PATH",
                        help="a trained run's candidate checkpoint (repeat for each)")  # fmt: skip
    models.add_argument(
        "--train-summary",
        type=Path,
        metavar="JSON",
        help="a trained run's train_summary.json: its candidates (paths relative to its folder)",
    )
    parser.add_argument("--tasks-dir", required=True, help="results/data/tasks (dev_pool and dev_monitor are read)")
    parser.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        help="the experiment's training tasks: the only tasks tuned on (never a held-out one)",
    )
    parser.add_argument("--output", required=True, help="calibration JSON")
    parser.add_argument("--experiment", default=None, help="experiment tuned for")
    parser.add_argument("--train-seed", type=int, default=-1, help="training seed of the candidates (-1: base)")
    parser.add_argument(
        "--shot-seed", type=int, default=None, help="seed of the tuning's shot draws (default: the settings' seed)"
    )
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    settings = settings_from_args(args, "calibrate")
    started = time.perf_counter()
    cal = CalibrationSettings.from_stage(settings)
    if args.shot_seed is not None:
        cal = replace(cal, seed=int(args.shot_seed))
    if args.model:
        candidates = [Candidate(0, args.model)]
    elif args.train_summary:
        candidates = summary_candidates(args.train_summary)
    else:
        candidates = sorted(map(parse_candidate, args.candidate), key=lambda c: c.step)
    if len({c.step for c in candidates}) != len(candidates):
        raise ConfigError("--candidate: two candidates share a step")
    tasks = load_dev_tasks(args.tasks_dir, args.tasks)
    report = tune(candidates, tasks, cal, device=args.device,
                  show_progress=not args.no_progress, memory=settings.get("adapt_memory"))  # fmt: skip
    report = {
        "init": args.init,
        "experiment": args.experiment,
        "train_seed": args.train_seed,
        "shot_seed": cal.seed,
        **report,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "settings": settings,
    }
    write_json(args.output, report)
    for entry in report["chosen"]:
        print(
            f"calibrate {args.init} k={entry['shots']}: checkpoint {entry['checkpoint']}, {report['optimizer']} "
            f"lr {entry['lr']:g}, {entry['num_steps']} step(s), {cal.criterion} {entry['criterion_value']:.4g}"
        )
    print(f"-> {args.output}")
    return 0
