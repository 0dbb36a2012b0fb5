"""Stage ``calibrate`` (the tuner): choose one initialisation's kept checkpoint and its adaptation per shot count.

One tuner, one criterion, for model selection and adaptation alike (docs/evaluation.md, "Tuning"):
for every candidate checkpoint of a trained run (``--candidate STEP=PATH``, written by training with
``select.criterion: tuned``; the base has one, ``--model``), every tuned shot count k
(``calibration.shots``, or every evaluated k), every learning rate of ``calibration.lr_grid`` (FOMAML's
inner rate included) and ``calibration.draws`` draws of k shots from each task's ``dev_pool`` (a draw
stream of its own), the initialisation is adapted with the evaluation's optimizer for
``max(steps_grid)`` steps.  At the step counts of ``steps_grid`` the two NLL criteria of the task's
``dev_monitor`` examples are measured (one run per rate serves every step count) and, exhaustive
(``calibration.screen`` null), the greedy answers are generated and graded too.  Screened (``screen`` N),
only the N points with the lowest final-answer NLL per tuned k, and the choice's inward neighbours on its
edges, are generated (their rates adapted once more).  The unadapted answers are always generated.

The grid is a starting point (:mod:`fomaml_math.evaluation.grid`): a choice on an edge that beats its inward
neighbour by ``calibration.edge_margin`` dev problems gets one value past that edge (the grid's ratio for a
rate, twice the steps), searched from the chosen checkpoint, and k is re-tuned, until the choice is interior,
within the resolution, or ``calibration.max_extensions`` rounds (the cap) were spent.

The tasks are the experiment's tuning tasks only (``--tasks``): a held-out task's dev data, whose
labelled examples beyond the k shots a true few-shot learner does not have, is never read, nor is any
test file (Perez, Kiela & Cho 2021; tests/test_true_few_shot.py).  The same grid, draws, examples and
criterion serve every initialisation: each gets the same tuning budget.

A point's value is the mean over tasks of each task's value (draws pooled within a task).  Per tuned k
the best generated point by ``calibration.criterion`` wins (accuracy: highest; NLLs: lowest); ties go to the
lower final-answer NLL (accuracy criterion; else to the higher accuracy), then to the smaller rate, fewer
steps and the later checkpoint.  A point whose criterion is not finite (divergence) cannot win.  At
0 shots only the checkpoint is chosen (nothing is adapted).  The report also gives, over the grid,
Spearman's rank correlation of every criterion with dev accuracy, and the split-half agreement of dev
accuracy itself (even- against odd-indexed examples): how far the criterion's optimum is the accuracy's.

Output (``--output``, JSON): ``init``, ``experiment``, ``train_seed``, ``shot_seed``, ``optimizer``, ``criterion``,
``tasks``, ``candidates``, ``lr_grid``, ``steps_grid`` (the starting grid), ``shots`` (tuned; an evaluated k uses
its band, :func:`fomaml_math.evaluation.choice.band_of`), ``screen``, ``max_extensions``, ``edge_margin``,
``chosen`` (per tuned k: ``shots``, ``checkpoint``, ``lr``, ``num_steps``, the criteria there, ``edges``,
``edge_note``, ``extensions``, ``at_cap``, ``open_edges``, its final ``lr_grid``/``steps_grid``,
``graded_points``/``grid_points``), ``grid`` (accuracy null where not generated), ``curve`` (per checkpoint, k
and rate: step 0 and the measured step counts), ``agreement``, ``per_task``, ``work`` and the settings.
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
from fomaml_math.evaluation.grid import Grid, rounds_summary
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


Key = tuple[int, int, float, int]  # (checkpoint, shots, lr, step); step 0 (unadapted) is one key per checkpoint
Requests = dict[tuple[int, int, float], tuple[set[int], set[int]]]  # (checkpoint, k, lr) -> (NLL steps, graded)


def _key(checkpoint: int, shots: int, lr: float, step: int) -> Key:
    """The measurement's key: every (k, rate) shares its checkpoint's unadapted weights at step 0."""
    return (checkpoint, 0, NO_LR, 0) if step == 0 else (checkpoint, shots, lr, step)


class Records:
    """Every measurement, per (checkpoint, shots, lr, step), task and draw: sums, so draws pool exactly.  A point
    measured again (screened: first its NLLs, later its answers) keeps the answers it has."""

    def __init__(self) -> None:
        self.scores: dict[Key, dict[tuple[str, int], Score]] = defaultdict(dict)

    def add(self, key: Key, task: str, draw: int, value: Score) -> None:
        old = self.scores[key].get((task, draw))
        if old is not None and value.correct is None:
            value = replace(value, correct=old.correct)
        self.scores[key][(task, draw)] = value

    def measured(self, key: Key) -> bool:
        return key in self.scores

    def graded(self, key: Key) -> bool:
        return key in self.scores and all(s.correct is not None for s in self.scores[key].values())

    def answers(self, key: Key) -> int:
        """Graded answers behind the point's accuracy (tasks x examples x draws)."""
        return sum(len(s.correct) for s in self.scores.get(key, {}).values() if s.correct is not None)

    def task_values(self, key: Key) -> dict[str, dict[str, float]]:
        by_task: dict[str, list[Score]] = defaultdict(list)
        for (task, _), value in sorted(self.scores[key].items()):
            by_task[task].append(value)
        out = {}
        for task, scores in by_task.items():
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

    def point(self, checkpoint: int, shots: int, lr: float, step: int) -> dict[str, Any]:
        """The mean over tasks of every criterion (non-finite where any task diverged; accuracy null where the
        point was not generated)."""
        values = self.task_values(_key(checkpoint, shots, lr, step))
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


@dataclass
class _Measurer:
    """Runs requested measurements: per candidate (loaded once per call), task, k, draw and rate, one adaptation
    to the largest requested step, scoring the NLLs at the requested steps and generating at the graded ones."""

    candidates: Sequence[Candidate]
    tasks: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]]
    cal: CalibrationSettings
    records: Records
    grader: Grader
    device: str
    snapshot_device: str
    bar: Any
    memory: Mapping[str, Any] | None = None  # the adaptation's memory levers (config.adapt_memory), if set
    adaptations: int = 0  # counts for the report: what the tuner did
    generations: int = 0

    def run(self, requests: Requests) -> None:
        cal = self.cal
        for candidate in self.candidates:
            mine = {(k, lr): req for (c, k, lr), req in requests.items() if c == candidate.step}
            unadapted = _key(candidate.step, 0, NO_LR, 0)
            if not mine and self.records.graded(unadapted):
                continue
            job = load_job_model(candidate.path, cal.model, device=self.device, mixed_precision=cal.mixed_precision,
                                 memory=self.memory)  # fmt: skip
            loss_fn = job.loss_fn()
            snapshot = WeightSnapshot(job.model, self.snapshot_device)
            generation = Generation(cal.max_new_tokens, cal.gen_batch_size,
                                    context_length(job.model) or cal.model.max_seq_len)  # fmt: skip
            need_unadapted = not self.records.graded(unadapted)  # always generated: the accuracy before adapting
            for task, (pool, monitor) in self.tasks.items():
                examples = dev_examples(job.tokenizer, task, monitor, max_examples=cal.max_monitor_examples,
                                        max_seq_len=cal.model.max_seq_len, instruction=cal.instruction,
                                        chunk_size=cal.inner_batch_size)  # fmt: skip
                if need_unadapted:
                    value = score(job, examples, grader=self.grader, generation=generation)
                    self.records.add(unadapted, task, 0, value)
                    self.generations += 1
                for k in sorted({k for k, _ in mine}):
                    for draw in range(cal.draws):
                        ids = draw_shots(pool["id"].tolist(), k, seed=cal.seed, task=task, repeat=draw,
                                         stream=STREAM_CALIBRATION)  # fmt: skip
                        batches = shot_batches(job.tokenizer, shot_examples(pool, ids),
                                               max_seq_len=cal.model.max_seq_len, batch_size=cal.inner_batch_size,
                                               instruction=cal.instruction)  # fmt: skip
                        for lr in sorted(lr for k2, lr in mine if k2 == k):
                            nll_steps, graded_steps = mine[(k, lr)]
                            self._adapt(job, candidate, task, draw, k, lr, nll_steps, graded_steps, examples,
                                        batches, loss_fn, snapshot, generation)  # fmt: skip
                self.bar.update(1)
            if not snapshot.matches():
                raise RuntimeError("calibrate: the initialisation was not restored (a bug in adapt-then-restore)")
            del job

    def _adapt(self, job: JobModel, candidate: Candidate, task: str, draw: int, k: int, lr: float,
               nll_steps: set[int], graded_steps: set[int], examples: DevExamples, batches: Any, loss_fn: Any,
               snapshot: WeightSnapshot, generation: Generation) -> None:  # fmt: skip
        def measure(step: int) -> None:
            if step in graded_steps or step in nll_steps:
                graded = generation if step in graded_steps else None
                self.generations += graded is not None
                self.records.add(_key(candidate.step, k, lr, step), task, draw,
                                 score(job, examples, grader=self.grader, generation=graded))  # fmt: skip

        spec = AdaptSpec(self.cal.optimizer, lr, max(nll_steps | graded_steps), self.cal.inner_batch_size)
        with adapted_on_shots(job.model, batches, spec, loss_fn=loss_fn, snapshot=snapshot, on_step=measure):
            pass
        self.adaptations += 1


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


def screened(points: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
    """The first pass of the screened tuner: the ``count`` adapted points with the lowest final-answer NLL (ties:
    smaller rate, fewer steps, later checkpoint, as :func:`choose`)."""
    adapted = [p for p in points if int(p["num_steps"]) > 0 and math.isfinite(_oriented(p, "answer_nll"))]
    adapted.sort(key=lambda p: (_oriented(p, "answer_nll"), float(p["lr"]), int(p["num_steps"]),
                                -int(p["checkpoint"])))  # fmt: skip
    return adapted[:count]


@dataclass
class _Tuned:
    """One tuned k > 0 while the tuner works on it: its grid (extended in place) and its extensions."""

    shots: int
    grid: Grid
    extensions: list[dict[str, Any]]


def _grid_points(records: Records, candidates: Sequence[Candidate], k: int, grid: Grid) -> list[dict[str, Any]]:
    """The measured points of k's grid (not adapting once per checkpoint, with rate 0, when 0 is in the grid)."""
    points = []
    for candidate in candidates:
        if k == 0:
            points.append(records.point(candidate.step, 0, NO_LR, 0))
            continue
        if 0 in grid.steps:
            points.append(records.point(candidate.step, k, NO_LR, 0))
        points += [records.point(candidate.step, k, lr, s) for lr in grid.lrs for s in grid.steps
                   if s > 0 and records.measured(_key(candidate.step, k, lr, s))]  # fmt: skip
    return points


def _best(points: Sequence[Mapping[str, Any]], criterion: str) -> dict[str, Any] | None:
    try:
        return dict(choose(points, criterion))
    except ConfigError:
        return None


def _margin(records: Records, best: Mapping[str, Any], cal: CalibrationSettings) -> float:
    """The smallest difference of the criterion the tuner resolves: ``edge_margin`` dev problems of the point's
    graded answers (accuracy); any difference for the NLL criteria, which have no such quantum."""
    if cal.criterion != "accuracy":
        return 0.0
    answers = records.answers(_key(int(best["checkpoint"]), int(best["shots"]), float(best["lr"]),
                                   int(best["num_steps"])))  # fmt: skip
    return cal.edge_margin / answers if answers else math.inf


def _verdicts(best: Mapping[str, Any], grid: Grid, points: Sequence[Mapping[str, Any]], margin: float,
              criterion: str) -> list[dict[str, Any]]:  # fmt: skip
    """Per edge of the choice: its inward neighbour and whether the choice beats it by the resolution."""
    out = []
    for edge in grid.edges(float(best["lr"]), int(best["num_steps"])):
        inward = grid.inward(edge, float(best["lr"]), int(best["num_steps"]))
        at = None if inward is None else (NO_LR if inward[1] == 0 else inward[0], inward[1])
        neighbour = next((p for p in points if at is not None and int(p["checkpoint"]) == int(best["checkpoint"])
                          and (float(p["lr"]), int(p["num_steps"])) == at), None)  # fmt: skip
        gain = math.inf if neighbour is None else _oriented(neighbour, criterion) - _oriented(best, criterion)
        out.append({"edge": edge, "neighbour": neighbour, "inward": inward, "gain": gain,
                    "resolved": gain > 0 and gain >= margin})  # fmt: skip
    return out


def _edge_note(best: Mapping[str, Any], verdicts: Sequence[Mapping[str, Any]], criterion: str, margin: float,
               *, at_cap: bool, cap: int) -> str:  # fmt: skip
    """Why an edge won and what the tuner did about it: its neighbour on that axis and both values."""
    notes = []
    for verdict in verdicts:
        axis, end = str(verdict["edge"]).split(":")
        name = "rate" if axis == "lr" else "step count"
        neighbour = verdict["neighbour"]
        if neighbour is None:
            notes.append(f"{end} {name} {best[axis]:g}: its neighbour was not measured")
            continue
        mine, theirs = best.get(criterion), neighbour.get(criterion)
        text = f"{end} {name} {best[axis]:g}: {criterion} {mine:.4g} against {theirs:.4g} at {neighbour[axis]:g}"
        if not verdict["resolved"]:
            resolution = "" if criterion != "accuracy" else f" ({margin * 100:.1f} pp)"
            notes.append(f"{text}, within the tuner's resolution{resolution}: no edge, not extended")
        elif at_cap:
            notes.append(f"{text}: the optimum may lie beyond the grid; the cap of {cap} extension(s) was reached")
        else:
            notes.append(f"{text}: the optimum may lie beyond the grid")
    return "; ".join(notes)


def _agreement(grid: Sequence[Mapping[str, Any]], shots: Sequence[int]) -> dict[str, dict[str, float]]:
    """Spearman's ρ of each criterion (oriented: higher is better) with dev accuracy over the grid points
    (pooled and per tuned k > 0), and dev accuracy's split-half ρ (even- vs odd-indexed examples); screened,
    over the generated points only."""
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


def _requests_for(candidates: Sequence[Candidate], k: int, pairs: Any, *, graded: bool, into: Requests) -> None:
    """Add (lr, step) ``pairs`` of k for every candidate: their NLLs, and their answers when ``graded``."""
    for candidate in candidates:
        for lr, step in pairs:
            if step == 0:
                continue
            nll, gen = into.setdefault((candidate.step, k, float(lr)), (set(), set()))
            (gen if graded else nll).add(int(step))


def _settle(measurer: _Measurer, tuned: Sequence[_Tuned], candidates: Sequence[Candidate]) -> None:
    """Generate what the choice needs until it stands: (screened) the best points by answer NLL and the choice's
    measured neighbours on both axes, again for each new choice (a hill-climb on accuracy from the screen), and the
    choice's inward neighbour on each of its edges, so that an edge is judged on two graded points."""
    cal, records = measurer.cal, measurer.records
    while True:
        requests: Requests = {}
        for entry in tuned:
            points = _grid_points(records, candidates, entry.shots, entry.grid)
            want = [] if cal.screen is None else [(p["checkpoint"], p["lr"], p["num_steps"])
                                                   for p in screened(points, cal.screen)]  # fmt: skip
            best = _best(_graded_points(records, points), cal.criterion)
            if best is not None:
                for edge in entry.grid.edges(float(best["lr"]), int(best["num_steps"])):
                    inward = entry.grid.inward(edge, float(best["lr"]), int(best["num_steps"]))
                    if inward is not None:
                        want.append((best["checkpoint"], *inward))
                if cal.screen is not None:  # hill-climb: the choice stands when it beats its measured neighbours
                    measured = {(float(p["lr"]), int(p["num_steps"])) for p in points
                                if int(p["checkpoint"]) == int(best["checkpoint"])}  # fmt: skip
                    around = entry.grid.neighbours(float(best["lr"]), int(best["num_steps"]))
                    want += [(best["checkpoint"], lr, step) for lr, step in around if (lr, step) in measured]
            for checkpoint, lr, step in want:
                if step > 0 and not records.graded(_key(int(checkpoint), entry.shots, float(lr), int(step))):
                    requests.setdefault((int(checkpoint), entry.shots, float(lr)), (set(), set()))[1].add(int(step))
        if not requests:
            return
        measurer.run(requests)


def _graded_points(records: Records, points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [p for p in points if records.graded(_key(int(p["checkpoint"]), int(p["shots"]), float(p["lr"]),
                                                     int(p["num_steps"])))]  # fmt: skip


def _extend(measurer: _Measurer, tuned: Sequence[_Tuned], candidates: Sequence[Candidate]) -> Requests:
    """One extension round: every tuned k whose choice sits on a resolved edge, below the cap, gets one value past
    that edge, searched from the choice (its checkpoint): a new rate's whole step column, a new step count at the
    choice's rate.  The requests measure the new points' NLLs (exhaustive: their answers too) and generate the
    choice's continuation past its edge(s) in the same adaptation."""
    cal, records = measurer.cal, measurer.records
    requests: Requests = {}
    for entry in tuned:
        points = _grid_points(records, candidates, entry.shots, entry.grid)
        best = choose(_graded_points(records, points), cal.criterion)
        verdicts = _verdicts(best, entry.grid, points, _margin(records, best, cal), cal.criterion)
        resolved = [v["edge"] for v in verdicts if v["resolved"] and entry.grid.beyond(v["edge"]) is not None]
        if not resolved or len({e["round"] for e in entry.extensions}) >= cal.max_extensions:
            continue
        old = entry.grid
        entry.grid = old.extended(resolved)
        round_ = len({e["round"] for e in entry.extensions}) + 1
        origin = {n: best[n] for n in ("checkpoint", "lr", "num_steps", cal.criterion)}
        for edge in resolved:
            entry.extensions.append({"round": round_, "edge": edge, "added": old.beyond(edge), "from": origin})
        new_lrs = {float(old.beyond(e)) for e in resolved if e.startswith("lr:")}  # type: ignore[arg-type]
        new_steps = {int(old.beyond(e)) for e in resolved if e.startswith("num_steps:")}  # type: ignore[arg-type]
        lr, steps = float(best["lr"]), int(best["num_steps"])
        new = [(r, s) for r in new_lrs for s in entry.grid.steps if s > 0] + [(lr, s) for s in new_steps]
        mine = [c for c in candidates if c.step == int(best["checkpoint"])]
        _requests_for(mine, entry.shots, new, graded=cal.screen is None, into=requests)
        continuation = [(r, s) for r in new_lrs | {lr} for s in new_steps | {steps} if (r, s) != (lr, steps)]
        _requests_for(mine, entry.shots, continuation, graded=True, into=requests)
    return requests


def _report(records: Records, candidates: Sequence[Candidate], tasks: Sequence[str], cal: CalibrationSettings,
            tuned: Mapping[int, _Tuned]) -> dict[str, Any]:  # fmt: skip
    curve, grid, per_task, chosen = [], [], [], []
    start = Grid.of(cal.lr_grid, cal.steps_grid)
    for k in cal.shots:
        entry = tuned.get(k)
        k_grid = entry.grid if entry is not None else start
        points = _grid_points(records, candidates, k, k_grid)
        for point in points:
            grid.append(point)
            values = records.task_values(_key(point["checkpoint"], k, point["lr"], point["num_steps"]))
            per_task += [{"task": t, **{n: point[n] for n in ("checkpoint", "shots", "lr", "num_steps")}, **v}
                         for t, v in values.items()]  # fmt: skip
        if k > 0:
            for candidate in candidates:
                for lr in k_grid.lrs:
                    steps = [0] + [s for s in range(1, max(k_grid.steps) + 1)
                                   if records.measured(_key(candidate.step, k, lr, s))]  # fmt: skip
                    curve += [records.point(candidate.step, k, lr, s) for s in steps]
        graded = _graded_points(records, points)
        best = dict(choose(graded, cal.criterion))
        extensions = entry.extensions if entry is not None else []
        margin = _margin(records, best, cal)
        verdicts = _verdicts(best, k_grid, points, margin, cal.criterion) if k > 0 else []
        open_edges = [v["edge"] for v in verdicts if v["resolved"]]
        at_cap = bool(open_edges)  # a resolved edge left: only the cap stops the tuner there
        best |= {
            "edges": [v["edge"] for v in verdicts],
            "edge_note": _edge_note(best, verdicts, cal.criterion, margin, at_cap=at_cap, cap=cal.max_extensions),
            "criterion_value": best[cal.criterion],
            "extensions": extensions,
            "at_cap": at_cap,
            "open_edges": open_edges,
            **k_grid.to_json(),
            "graded_points": len(graded),
            "grid_points": len(points),
        }
        chosen.append(best)
    names = ("checkpoint", "shots", "lr", "nll", "answer_nll", "accuracy")
    curve = [{n: c[n] for n in names} | {"step": c["num_steps"]} for c in curve]
    return {
        "optimizer": cal.optimizer,
        "criterion": cal.criterion,
        "tasks": list(tasks),
        "candidates": [{"step": c.step, "path": c.path} for c in candidates],
        "lr_grid": list(cal.lr_grid),
        "steps_grid": list(cal.steps_grid),
        "shots": list(cal.shots),
        "screen": cal.screen,
        "max_extensions": cal.max_extensions,
        "edge_margin": cal.edge_margin,
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
    """Tune every candidate on ``tasks`` (name -> (dev_pool, dev_monitor)); the report.

    Round 0 measures the starting grid (screened: the NLLs only); then, until every choice stands: generate what
    the choice needs (:func:`_settle`), extend past resolved edges below the cap (:func:`_extend`), measure the new
    points."""
    _check_inputs(tasks, cal)
    records = Records()
    tuned = {k: _Tuned(k, Grid.of(cal.lr_grid, cal.steps_grid), []) for k in cal.shots if k > 0}
    with tqdm(desc="calibrate", disable=not show_progress, file=sys.stderr, unit="task") as bar, \
            Grader(timeout_s=cal.grade_timeout_s) as grader:  # fmt: skip
        measurer = _Measurer(candidates, tasks, cal, records, grader, device, snapshot_device, bar, memory)
        requests: Requests = {}
        for entry in tuned.values():
            pairs = [(lr, s) for lr in entry.grid.lrs for s in entry.grid.steps]
            _requests_for(candidates, entry.shots, pairs, graded=cal.screen is None, into=requests)
        while True:
            measurer.run(requests)
            _settle(measurer, list(tuned.values()), candidates)
            requests = _extend(measurer, list(tuned.values()), candidates)
            if not requests:
                break
    report = _report(records, candidates, list(tasks), cal, tuned)
    report["work"] = {"adaptations": measurer.adaptations, "generation_passes": measurer.generations}
    return report


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
        extended = f", extended {rounds_summary(entry['extensions'])}" if entry["extensions"] else ""
        print(
            f"calibrate {args.init} k={entry['shots']}: checkpoint {entry['checkpoint']}, {report['optimizer']} "
            f"lr {entry['lr']:g}, {entry['num_steps']} step(s), {cal.criterion} {entry['criterion_value']:.4g}"
            f"{extended}{' (at the cap)' if entry['at_cap'] else ''}"
        )
    print(f"-> {args.output}")
    return 0
