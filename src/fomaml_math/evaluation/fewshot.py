"""Stage ``evaluate``: k-shot evaluation of one initialisation (base, SFT or FOMAML) on every task.

One job is one (init, k). For each task and repeat it draws k examples from the task's support
split (a seeded permutation per (seed, task, repeat), so the 5 shots are among the 10, the 10
among the 25, and every init sees the same shots), then

* ``finetune`` mode: adapts the initialisation on them inside :func:`fomaml_math.adapt.adapted`
  (``eval.num_inner_steps`` SGD steps at ``eval.inner_lr``, each on the token-weighted loss of all
  k shots, accumulated over micro-batches of ``eval.inner_batch_size``), answers the task's test
  problems greedily, computes the gold solutions' NLL, and leaves the ``with`` block, which
  restores the initialisation bitwise before the next task/repeat;
* ``in_context`` mode: puts the k examples in the prompt as worked user/assistant turns.

0 shots: one repeat, no adaptation. Answers are graded by :mod:`fomaml_math.evaluation.grade`.
Output: one parquet row per (task, repeat, test problem) (schema in docs/architecture.md) and a
``<name>.summary.json`` next to it. Finished (task, repeat) pieces are kept in a hidden folder
beside the output until the job succeeds, so a killed job resumes where it stopped (only when
settings, model files and task files are unchanged).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fomaml_math.config import ConfigError, add_settings_arguments, settings_from_args
from fomaml_math.data.split import read_task_split
from fomaml_math.io import write_json, write_parquet

INITS: tuple[str, ...] = ("base", "sft", "fomaml")
MODES: tuple[str, ...] = ("finetune", "in_context")

# Output schema (docs/architecture.md): column -> pandas dtype used when writing.
OUTPUT_COLUMNS: dict[str, str] = {
    "init": "str",
    "task": "str",
    "shots": "int64",
    "repeat": "int64",
    "problem_id": "str",
    "level": "int64",
    "gold": "str",
    "generated": "str",
    "extracted": "str",  # null where no \boxed{} was found
    "correct": "bool",
    "grade_status": "str",
    "nll": "float64",
    "nll_tokens": "int64",
    "gen_tokens": "int64",
    "shot_ids": "str",
}
SUPPORT_COLUMNS = ("id", "problem", "solution")
TEST_COLUMNS = ("id", "level", "problem", "solution", "answer")


# --------------------------------------------------------------------------- tasks and shots


@dataclass(frozen=True)
class TaskData:
    name: str
    support: pd.DataFrame  # sorted by id
    test: pd.DataFrame  # sorted by id, cut to eval.max_test_problems


def discover_tasks(tasks_dir: str | Path, only: Sequence[str] | None = None) -> list[str]:
    """Task folders under ``tasks_dir`` that hold a ``test.parquet`` (sorted), or the ``only`` subset."""
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise ConfigError(f"--tasks-dir: {tasks_dir} is not a folder")
    found = sorted(p.parent.name for p in tasks_dir.glob("*/test.parquet"))
    if only:
        unknown = [t for t in only if t not in found]
        if unknown:
            raise ConfigError(f"--tasks: {unknown} not found in {tasks_dir} (found {found})")
        return list(dict.fromkeys(only))
    if not found:
        raise ConfigError(f"--tasks-dir: no <task>/test.parquet under {tasks_dir}")
    return found


def load_task(tasks_dir: str | Path, task: str, max_test_problems: int | None) -> TaskData:
    folder = Path(tasks_dir) / task
    support = read_task_split(folder / "support.parquet", SUPPORT_COLUMNS)
    test = read_task_split(folder / "test.parquet", TEST_COLUMNS)
    if max_test_problems is not None:
        test = test.iloc[: int(max_test_problems)].reset_index(drop=True)
    return TaskData(task, support, test)


def draw_shots(support_ids: Sequence[str], k: int, *, seed: int, task: str, repeat: int) -> list[str]:
    """The k shot ids of (task, repeat): the first k of a permutation seeded by (seed, task, repeat).

    The permutation does not depend on k, so draws are nested (the 5 are the first 5 of the 10), and
    it does not depend on the init, so base/SFT/FOMAML are evaluated on the same shots.
    """
    ids = sorted(str(i) for i in support_ids)
    if k > len(ids):
        raise ConfigError(f"--shots {k}: task {task!r} has only {len(ids)} support examples")
    if k <= 0:
        return []
    # crc32, not hash(): Python's string hash is salted per process.
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode()), int(repeat)])
    return [ids[i] for i in rng.permutation(len(ids))[:k]]


def repeats_for(shots: int, repeats: int) -> list[int]:
    return [0] if shots == 0 else list(range(int(repeats)))


# --------------------------------------------------------------------------- one (task, repeat)


def precision_context(device: Any, mixed_precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for ``bf16``/``fp16`` on CUDA (weights stay float32, as in training); else a no-op."""
    import torch

    if mixed_precision == "no" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _nll(model: Any, tokenizer: Any, encoded: Sequence[Any], batch_size: int) -> tuple[list[float], list[int]]:
    from fomaml_math.batching import collate, example_nll

    nll: list[float] = []
    counts: list[int] = []
    for start in range(0, len(encoded), batch_size):
        sums, numbers = example_nll(model, collate(encoded[start : start + batch_size], tokenizer.pad_token_id))
        for total, number in zip(sums.tolist(), numbers.tolist(), strict=True):
            nll.append(total / number if number > 0 else math.nan)
            counts.append(int(number))
    return nll, counts


@dataclass
class EvalContext:
    """What every (task, repeat) of a job shares."""

    model: Any
    tokenizer: Any
    device: Any
    init: str
    shots: int
    mode: str
    seed: int
    eval_settings: Mapping[str, Any]
    max_seq_len: int
    context_limit: int | None
    mixed_precision: str = "no"
    snapshot_device: str = "cpu"
    snapshot: Any = None  # one copy of the initialisation for the whole job, taken before the first adaptation

    def initialisation_snapshot(self) -> Any:
        """The job's :class:`~fomaml_math.adapt.WeightSnapshot` (every adaptation restores to it)."""
        from fomaml_math.adapt import WeightSnapshot

        if self.snapshot is None:
            # One allocation per job, not per task/repeat (16 GB of pinned memory for a 4B model).
            self.snapshot = WeightSnapshot(self.model, self.snapshot_device)
        return self.snapshot


def evaluate_task_repeat(
    ctx: EvalContext, task: TaskData, repeat: int, grader: Any, progress: Any | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Evaluate one (task, repeat): rows in the output schema and a summary dict."""
    import torch

    from fomaml_math.adapt import MicroBatches, adapted
    from fomaml_math.batching import encode_example, make_sft_batch
    from fomaml_math.evaluation.generate import encode_prompts, generate_greedy
    from fomaml_math.evaluation.prompts import demonstration_messages, problem_messages

    ev = ctx.eval_settings
    shot_ids = draw_shots(task.support["id"].tolist(), ctx.shots, seed=ctx.seed, task=task.name, repeat=repeat)
    by_id = task.support.set_index("id")
    shots = [{"problem": by_id.at[i, "problem"], "solution": by_id.at[i, "solution"]} for i in shot_ids]
    problems = task.test["problem"].astype(str).tolist()
    solutions = task.test["solution"].astype(str).tolist()
    in_context = ctx.mode == "in_context" and ctx.shots > 0
    context = demonstration_messages(shots) if in_context else []
    prompt_ids = encode_prompts(ctx.tokenizer, [problem_messages(p, context) for p in problems])
    nll_limit = (ctx.context_limit or ctx.max_seq_len) if in_context else ctx.max_seq_len
    encoded = [
        encode_example(ctx.tokenizer, p, s, nll_limit, context) for p, s in zip(problems, solutions, strict=True)
    ]
    batch_size = int(ev["inner_batch_size"])
    finetune = ctx.mode == "finetune" and ctx.shots > 0
    info: dict[str, Any] = {"task": task.name, "repeat": repeat, "shot_ids": shot_ids}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if finetune:
            micro = [make_sft_batch(ctx.tokenizer, shots[i : i + batch_size], ctx.max_seq_len)
                     for i in range(0, len(shots), batch_size)]  # fmt: skip
            full = MicroBatches(micro)  # each inner step: all k shots, gradients accumulated
            # Autocast only around the inner loop, then exited: its weight-cast cache must not
            # outlive the in-place updates (generation opens a fresh one on the adapted weights).
            with precision_context(ctx.device, ctx.mixed_precision):
                adaptation = stack.enter_context(
                    adapted(
                        ctx.model,
                        [full],
                        inner_lr=float(ev["inner_lr"]),
                        num_steps=int(ev["num_inner_steps"]),
                        snapshot=ctx.initialisation_snapshot(),
                    )
                )
            info["support_losses"] = adaptation.support_losses
            info["support_tokens"] = full.num_tokens
            info["support_truncated"] = sum(b.num_truncated for b in micro)
            if not adaptation.finite:
                print(f"warning: {task.name} repeat {repeat}: non-finite support loss", file=sys.stderr)
        info["adapt_s"] = time.perf_counter() - started
        started = time.perf_counter()
        with precision_context(ctx.device, ctx.mixed_precision):
            generations = generate_greedy(
                ctx.model,
                ctx.tokenizer,
                prompt_ids=prompt_ids,
                max_new_tokens=int(ev["max_new_tokens"]),
                batch_size=int(ev["gen_batch_size"]),
                max_context=ctx.context_limit,
                on_batch=progress.update if progress is not None else None,
            )
        info["generate_s"] = time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad(), precision_context(ctx.device, ctx.mixed_precision):
            nll, nll_tokens = _nll(ctx.model, ctx.tokenizer, encoded, batch_size)
        info["nll_s"] = time.perf_counter() - started
    # Leaving the stack restored the initialisation; grading needs no model.
    started = time.perf_counter()
    golds = task.test["answer"].astype(str).tolist()
    grades = grader.grade_many(golds, generations.texts)
    info["grade_s"] = time.perf_counter() - started
    rows = pd.DataFrame(
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
        }
    )
    rows = to_output_schema(rows)
    statuses = rows["grade_status"].value_counts()
    info.update(
        n=len(rows),
        accuracy=float(rows["correct"].mean()) if len(rows) else math.nan,
        mean_nll=float(rows["nll"].mean()) if len(rows) else math.nan,
        gen_tokens=int(rows["gen_tokens"].sum()),
        **{status: int(statuses.get(status, 0)) for status in ("timeout", "no_answer", "error")},
    )
    return rows, info


def to_output_schema(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns in schema order with schema dtypes (``extracted`` keeps its nulls)."""
    missing = [c for c in OUTPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"evaluation rows: missing column(s) {missing}")
    frame = frame[list(OUTPUT_COLUMNS)].copy()
    for column, dtype in OUTPUT_COLUMNS.items():
        # "string" keeps None as a null (astype(str) would write the text "None" on pandas 2).
        frame[column] = frame[column].astype("string" if dtype == "str" else dtype)
    return frame


# --------------------------------------------------------------------------- resume pieces


def _file_stamp(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def job_fingerprint(
    settings: Mapping[str, Any], args: argparse.Namespace, tasks: Sequence[str], device: str = "cpu"
) -> str:
    """What a finished piece depends on: settings, init, k, model files, task files and the device type."""
    model = Path(args.model)
    model_files = sorted(_file_stamp(p) for p in model.rglob("*") if p.is_file()) if model.is_dir() else []
    task_hashes = {}
    for task in tasks:
        for split in ("support", "test"):
            path = Path(args.tasks_dir) / task / f"{split}.parquet"
            task_hashes[f"{task}/{split}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    blob = json.dumps(
        {"settings": settings, "init": args.init, "shots": args.shots, "model": args.model,
         "model_files": model_files, "tasks": task_hashes, "device": device},
        sort_keys=True, default=str,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class PieceStore:
    """Finished (task, repeat) results of an unfinished job, in ``.<output name>.parts/<fingerprint>/``."""

    def __init__(self, output: Path, fingerprint: str) -> None:
        self.root = output.parent / f".{output.name}.parts"
        self.dir = self.root / fingerprint
        if self.root.is_dir():
            for stale in self.root.iterdir():  # pieces of other settings/inputs: never reused
                if stale == self.dir:
                    continue
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()

    def _stem(self, task: str, repeat: int) -> Path:
        return self.dir / f"{task}--r{repeat}"

    def load(self, task: str, repeat: int) -> tuple[pd.DataFrame, dict[str, Any]] | None:
        stem = self._stem(task, repeat)
        rows, info = stem.with_suffix(".parquet"), stem.with_suffix(".json")
        if not (rows.is_file() and info.is_file()):
            return None
        return to_output_schema(pd.read_parquet(rows)), json.loads(info.read_text())

    def save(self, task: str, repeat: int, rows: pd.DataFrame, info: dict[str, Any]) -> None:
        stem = self._stem(task, repeat)
        write_parquet(stem.with_suffix(".parquet"), rows)
        write_json(stem.with_suffix(".json"), info)  # written last: its presence marks the piece complete

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- the job


def summary_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}.summary.json")


def _device(choice: str) -> Any:
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    return torch.device(choice)


def check_in_context_lengths(ctx: EvalContext, tasks: Sequence[TaskData]) -> None:
    """Fail before any work if some (task, repeat)'s k-shot prompt cannot fit in the context.

    Checks the longest test problem (by characters) of each (task, repeat); generation checks
    every prompt exactly again.
    """
    from fomaml_math.evaluation.generate import check_context, encode_prompts
    from fomaml_math.evaluation.prompts import demonstration_messages, problem_messages

    if ctx.mode != "in_context" or ctx.shots == 0:
        return
    for task in tasks:
        if task.test.empty:
            continue
        longest = max(task.test["problem"].astype(str), key=len)
        by_id = task.support.set_index("id")
        for repeat in repeats_for(ctx.shots, ctx.eval_settings["repeats"]):
            ids = draw_shots(task.support["id"].tolist(), ctx.shots, seed=ctx.seed, task=task.name, repeat=repeat)
            demos = [{"problem": by_id.at[i, "problem"], "solution": by_id.at[i, "solution"]} for i in ids]
            prompt = encode_prompts(ctx.tokenizer, [problem_messages(longest, demonstration_messages(demos))])
            check_context(
                prompt,
                int(ctx.eval_settings["max_new_tokens"]),
                ctx.context_limit,
                f"eval.mode in_context, {ctx.shots} shots, task {task.name} repeat {repeat}",
            )


def run_job(
    ctx: EvalContext,
    tasks: Sequence[TaskData],
    grader: Any,
    *,
    pieces: PieceStore | None = None,
    show_progress: bool = True,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Evaluate every (task, repeat); returns all rows and the per-(task, repeat) summaries."""
    from tqdm.auto import tqdm

    check_in_context_lengths(ctx, tasks)
    plan = [(task, repeat) for task in tasks for repeat in repeats_for(ctx.shots, ctx.eval_settings["repeats"])]
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


def build_summary(
    frame: pd.DataFrame, infos: Sequence[dict[str, Any]], *, ctx: EvalContext, extra: dict[str, Any]
) -> dict[str, Any]:
    per_task = frame.groupby("task")["correct"].mean().to_dict() if len(frame) else {}
    return {
        "init": ctx.init,
        "shots": ctx.shots,
        "mode": ctx.mode,
        "rows": len(frame),
        "accuracy": float(frame["correct"].mean()) if len(frame) else math.nan,
        "accuracy_per_task": {k: float(v) for k, v in per_task.items()},
        "timeouts": int((frame["grade_status"] == "timeout").sum()),
        "no_answer": int((frame["grade_status"] == "no_answer").sum()),
        "errors": int((frame["grade_status"] == "error").sum()),
        "gen_tokens": int(frame["gen_tokens"].sum()),
        "per_task_repeat": list(infos),
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fomaml_math evaluate", description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--init", required=True, choices=INITS, help="which initialisation --model is")
    parser.add_argument("--model", required=True, help="HF model folder or hub id")
    parser.add_argument("--tasks-dir", required=True, help="results/data/tasks")
    parser.add_argument("--shots", required=True, type=int, help="k: support examples per task (0: no adaptation)")
    parser.add_argument("--output", required=True, help="results/eval/<init>/shots-<k>.parquet")
    parser.add_argument("--tasks", nargs="+", default=None, help="evaluate only these tasks")
    parser.add_argument("--grade-workers", type=int, default=1, help="grading processes (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--snapshot-device",
        choices=("cpu", "same"),
        default="cpu",
        help="where the copy of the initialisation lives (restores are bitwise either way)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    settings = settings_from_args(args, "eval")
    started = time.perf_counter()
    ev = settings["eval"]
    if args.shots < 0:
        raise ConfigError(f"--shots: must be >= 0, got {args.shots}")
    if args.grade_workers < 1:
        raise ConfigError(f"--grade-workers: must be >= 1, got {args.grade_workers}")
    if ev.get("mode", "finetune") not in MODES:
        raise ConfigError(f"eval.mode: expected one of {list(MODES)}, got {ev.get('mode')!r}")
    output = Path(args.output)
    if output.suffix != ".parquet":
        raise ConfigError(f"--output: expected a .parquet path, got {output}")

    task_names = discover_tasks(args.tasks_dir, args.tasks)
    tasks = [load_task(args.tasks_dir, t, ev.get("max_test_problems")) for t in task_names]
    for task in tasks:  # before loading a model: a too-small support split is a settings error
        if args.shots > len(task.support):
            raise ConfigError(
                f"--shots {args.shots}: task {task.name!r} has only {len(task.support)} support examples "
                f"({Path(args.tasks_dir) / task.name / 'support.parquet'})"
            )

    import torch

    from fomaml_math.evaluation.generate import context_length
    from fomaml_math.evaluation.grade import Grader
    from fomaml_math.modeling import load_model_and_tokenizer

    model_settings = settings["model"]
    is_base = args.model == model_settings["name_or_path"]
    model, tokenizer = load_model_and_tokenizer(
        args.model,
        revision=model_settings.get("revision") if is_base else None,  # a revision names a hub commit of the base
        trust_remote_code=bool(model_settings.get("trust_remote_code", False)),
        dtype=torch.float32,  # float32 weights; bf16/fp16 via autocast, as in training
    )
    device = _device(args.device)
    model.to(device)
    model.eval()  # no dropout in adaptation either: the same function for every init
    torch.manual_seed(int(settings["seed"]))
    ctx = EvalContext(
        model=model,
        tokenizer=tokenizer,
        device=device,
        init=args.init,
        shots=args.shots,
        mode=ev.get("mode", "finetune"),
        seed=int(settings["seed"]),
        eval_settings=ev,
        max_seq_len=int(model_settings["max_seq_len"]),
        context_limit=context_length(model) or int(model_settings["max_seq_len"]),
        mixed_precision=str(settings.get("mixed_precision", "no")),
        snapshot_device=args.snapshot_device,
    )
    pieces = PieceStore(output, job_fingerprint(settings, args, task_names, device.type))
    with Grader(timeout_s=float(ev["grade_timeout_s"]), workers=args.grade_workers) as grader:
        frame, infos = run_job(ctx, tasks, grader, pieces=pieces, show_progress=not args.no_progress)
    wall = time.perf_counter() - started
    summary = build_summary(
        frame,
        infos,
        ctx=ctx,
        extra={
            "model": args.model,
            "tasks": task_names,
            "device": str(device),
            "precision": ctx.mixed_precision if device.type == "cuda" else "no",
            "wall_time_s": round(wall, 3),
            "resumed_pieces": sum(bool(i.get("resumed")) for i in infos),
            "settings": settings,
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
