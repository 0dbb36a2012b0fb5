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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.data.taskfiles import discover_tasks, read_task_split
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.rows import INITS, OUTPUT_COLUMNS, to_output_schema
from fomaml_math.io import write_json, write_parquet

MODES: tuple[str, ...] = ("finetune", "in_context")
BACKENDS: tuple[str, ...] = ("hf", "vllm")  # eval.backend: who generates (hf: the reference loop)

POOL_COLUMNS = ("id", "problem", "solution")
TEST_COLUMNS = ("id", "level", "problem", "solution", "answer")


# --------------------------------------------------------------------------- tasks and shots


@dataclass(frozen=True)
class TaskData:
    name: str
    pool: pd.DataFrame  # dev_pool: where the shots come from; sorted by id
    test: pd.DataFrame  # sorted by id, cut to eval.max_test_problems
    role: str = "train"  # train | meta_test


def load_task(tasks_dir: str | Path, task: str, max_test_problems: int | None, role: str = "train") -> TaskData:
    folder = Path(tasks_dir) / task
    pool = read_task_split(folder / "dev_pool.parquet", POOL_COLUMNS)
    test = read_task_split(folder / "test.parquet", TEST_COLUMNS)
    if max_test_problems is not None:
        test = test.iloc[: int(max_test_problems)].reset_index(drop=True)
    return TaskData(task, pool, test, role)


def repeats_for(shots: int, repeats: int) -> list[int]:
    return [0] if shots == 0 else list(range(int(repeats)))


# --------------------------------------------------------------------------- one (task, repeat)


def precision_context(device: Any, mixed_precision: str) -> contextlib.AbstractContextManager[Any]:
    """A fresh autocast context for ``bf16``/``fp16`` (weights stay float32, as in training); else a no-op.

    Open it per forward pass (generation, NLL, and inside the adaptation's loss function), never
    around an adaptation: see :mod:`fomaml_math.adapt`.
    """
    import torch

    if mixed_precision == "no":
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
    spec: Any = None  # the AdaptSpec (eval settings, calibrated lr); None: from eval settings
    instruction: str = ""
    shot_seed: int | None = None  # None: the global seed
    experiment: str = "default"
    train_seed: int = -1
    backend: Any = None  # the job's generation backend (one per job); None: the HF loop on ``model``

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """A fresh mixed-precision context (or a no-op): open one per forward pass, never around an adaptation."""
        return precision_context(self.device, self.mixed_precision)

    def generator(self) -> Any:
        """The generation backend: ``backend``, or the reference HF loop on this context's model."""
        from fomaml_math.evaluation.generate import HFBackend

        if self.backend is None:
            self.backend = HFBackend(self.autocast)
        return self.backend

    def adapt_spec(self) -> Any:
        from fomaml_math.kshot import AdaptSpec

        return self.spec if self.spec is not None else AdaptSpec.from_eval(self.eval_settings)

    def draw_seed(self) -> int:
        return int(self.seed if self.shot_seed is None else self.shot_seed)

    def loss_fn(self) -> Any:
        """The adaptation loss: autocast opened per forward pass, exactly as training's."""
        from fomaml_math.adapt import sft_loss_fn

        return sft_loss_fn(self.device, self.autocast)

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

    from fomaml_math.batching import encode_example
    from fomaml_math.evaluation.generate import encode_prompts, engine_follows
    from fomaml_math.evaluation.prompts import demonstration_messages, problem_messages
    from fomaml_math.kshot import adapted_on_shots, draw_shots, mean_loss, shot_batches

    ev = ctx.eval_settings
    spec = ctx.adapt_spec()
    shot_ids = draw_shots(task.pool["id"].tolist(), ctx.shots, seed=ctx.draw_seed(), task=task.name, repeat=repeat)
    by_id = task.pool.set_index("id")
    shots = [{"problem": by_id.at[i, "problem"], "solution": by_id.at[i, "solution"]} for i in shot_ids]
    problems = task.test["problem"].astype(str).tolist()
    solutions = task.test["solution"].astype(str).tolist()
    in_context = ctx.mode == "in_context" and ctx.shots > 0
    context = demonstration_messages(shots, instruction=ctx.instruction) if in_context else []
    prompt_ids = encode_prompts(
        ctx.tokenizer, [problem_messages(p, context, instruction=ctx.instruction) for p in problems]
    )
    nll_limit = (ctx.context_limit or ctx.max_seq_len) if in_context else ctx.max_seq_len
    encoded = [
        encode_example(ctx.tokenizer, p, s, nll_limit, context, instruction=ctx.instruction)
        for p, s in zip(problems, solutions, strict=True)
    ]
    batch_size = int(ev["inner_batch_size"])
    finetune = ctx.mode == "finetune" and ctx.shots > 0
    info: dict[str, Any] = {"task": task.name, "repeat": repeat, "shot_ids": shot_ids}
    effect = {"support_loss_before": math.nan, "support_loss_after": math.nan, "weight_change": 0.0}
    started = time.perf_counter()
    backend = ctx.generator()
    with contextlib.ExitStack() as stack:
        # Entered first, so it exits after the adaptation's restore: a backend with its own copy of the
        # weights (vllm) gets the initialisation back too.
        sync_engine = stack.enter_context(engine_follows(backend, ctx.model))
        if finetune:
            full = shot_batches(
                ctx.tokenizer, shots, max_seq_len=ctx.max_seq_len, batch_size=batch_size, instruction=ctx.instruction
            )
            loss_fn = ctx.loss_fn()
            # The loss opens autocast per forward pass: an autocast region around the inner loop would
            # keep stale low-precision weights, so every step would see the initialisation.
            adaptation = stack.enter_context(
                adapted_on_shots(ctx.model, full, spec, loss_fn=loss_fn, snapshot=ctx.initialisation_snapshot())
            )
            effect = {
                "support_loss_before": adaptation.loss_before,
                "support_loss_after": mean_loss(ctx.model, full, loss_fn),
                "weight_change": adaptation.weight_change,
            }
            info["support_losses"] = adaptation.support_losses
            info["support_tokens"] = full.num_tokens
            info["support_truncated"] = sum(b.num_truncated for b in full.batches)
            if not adaptation.finite:
                print(f"warning: {task.name} repeat {repeat}: non-finite support loss", file=sys.stderr)
            sync_engine()
        info.update(effect)
        info["adapt_s"] = time.perf_counter() - started
        started = time.perf_counter()
        generations = backend.generate(  # the HF backend opens autocast itself
            ctx.model,
            ctx.tokenizer,
            prompt_ids,
            max_new_tokens=int(ev["max_new_tokens"]),
            batch_size=int(ev["gen_batch_size"]),
            max_context=ctx.context_limit,
            on_batch=progress.update if progress is not None else None,
        )
        info["generate_s"] = time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad(), ctx.autocast():
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
            "truncated": generations.truncated,
            "experiment": ctx.experiment,
            "train_seed": ctx.train_seed,
            "shot_seed": ctx.draw_seed(),
            "task_role": task.role,
            **effect,
            **(spec.describe() if finetune else {"adapt_optimizer": spec.optimizer, "adapt_lr": 0.0, "adapt_steps": 0}),
        }
    )
    rows = to_output_schema(rows)
    statuses = rows["grade_status"].value_counts()
    info.update(
        n=len(rows),
        accuracy=float(rows["correct"].mean()) if len(rows) else math.nan,
        mean_nll=float(rows["nll"].mean()) if len(rows) else math.nan,
        gen_tokens=int(rows["gen_tokens"].sum()),
        truncated=int(rows["truncated"].sum()),
        **{status: int(statuses.get(status, 0)) for status in ("timeout", "no_answer", "error")},
    )
    return rows, info


# --------------------------------------------------------------------------- resume pieces


def _file_stamp(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def job_fingerprint(
    settings: Mapping[str, Any],
    args: argparse.Namespace,
    tasks: Sequence[str],
    device: str = "cpu",
    extra: Mapping[str, Any] | None = None,
) -> str:
    """What a finished piece depends on: settings, init, k, model files, task files and the device type."""
    model = Path(args.model)
    model_files = sorted(_file_stamp(p) for p in model.rglob("*") if p.is_file()) if model.is_dir() else []
    task_hashes = {}
    for task in tasks:
        for split in ("dev_pool", "test"):
            path = Path(args.tasks_dir) / task / f"{split}.parquet"
            task_hashes[f"{task}/{split}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    blob = json.dumps(
        {"settings": settings, "init": args.init, "shots": args.shots, "model": args.model,
         "model_files": model_files, "tasks": task_hashes, "device": device, "extra": extra or {}},
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
    from fomaml_math.kshot import draw_shots

    if ctx.mode != "in_context" or ctx.shots == 0:
        return
    for task in tasks:
        if task.test.empty:
            continue
        longest = max(task.test["problem"].astype(str), key=len)
        by_id = task.pool.set_index("id")
        for repeat in repeats_for(ctx.shots, ctx.eval_settings["repeats"]):
            ids = draw_shots(task.pool["id"].tolist(), ctx.shots, seed=ctx.draw_seed(), task=task.name, repeat=repeat)
            demos = [{"problem": by_id.at[i, "problem"], "solution": by_id.at[i, "solution"]} for i in ids]
            context = demonstration_messages(demos, instruction=ctx.instruction)
            prompt = encode_prompts(ctx.tokenizer, [problem_messages(longest, context, instruction=ctx.instruction)])
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
        "mean_gen_tokens": float(frame["gen_tokens"].mean()) if len(frame) else math.nan,
        "no_answer_rate": float((frame["grade_status"] == "no_answer").mean()) if len(frame) else math.nan,
        "truncation_rate": float(frame["truncated"].mean()) if len(frame) else math.nan,
        "per_task_repeat": list(infos),
        **extra,
    }


def make_backend(name: str, ctx: EvalContext, model_path: str, settings: Mapping[str, Any]) -> Any:
    """The job's generation backend: the HF loop (``hf``) or one vLLM engine on ``model_path`` (``vllm``)."""
    from fomaml_math.evaluation.generate import HFBackend

    if name == "hf":
        return HFBackend(ctx.autocast)
    from fomaml_math.evaluation.vllm_backend import VLLMBackend, vllm_settings

    model_settings = settings["model"]
    is_base = model_path == model_settings["name_or_path"]
    return VLLMBackend(
        model_path,
        tokenizer=ctx.tokenizer,
        model=ctx.model,
        revision=model_settings.get("revision") if is_base else None,
        trust_remote_code=bool(model_settings.get("trust_remote_code", False)),
        mixed_precision=ctx.mixed_precision,
        context_limit=ctx.context_limit,
        seed=ctx.seed,
        settings=vllm_settings(settings["eval"]),
    )


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
    parser.add_argument(
        "--adapt-lr", type=float, default=None, help="the calibrated learning rate (default eval.inner_lr)"
    )
    parser.add_argument("--adapt-steps", type=int, default=None, help="calibrated steps (default eval.num_inner_steps)")
    parser.add_argument("--experiment", default="default", help="the experiment these rows belong to")
    parser.add_argument("--train-seed", type=int, default=-1, help="training seed of --model (-1: untrained base)")
    parser.add_argument("--shot-seed", type=int, default=None, help="seed of the shot draws (default: the seed)")
    parser.add_argument("--meta-test", nargs="*", default=[], help="tasks held out of this experiment's training")
    args = parser.parse_args(argv)
    settings = settings_from_args(args, "evaluate")
    started = time.perf_counter()
    ev = settings["eval"]
    if args.shots < 0:
        raise ConfigError(f"--shots: must be >= 0, got {args.shots}")
    if args.grade_workers < 1:
        raise ConfigError(f"--grade-workers: must be >= 1, got {args.grade_workers}")
    if ev.get("mode", "finetune") not in MODES:
        raise ConfigError(f"eval.mode: expected one of {list(MODES)}, got {ev.get('mode')!r}")
    backend_name = str(ev.get("backend", "hf"))
    if backend_name not in BACKENDS:
        raise ConfigError(f"eval.backend: expected one of {list(BACKENDS)}, got {backend_name!r}")
    if backend_name == "vllm":
        from fomaml_math.evaluation.vllm_backend import vllm_settings

        vllm_settings(ev)  # unknown keys fail here, before any model is loaded
    output = Path(args.output)
    if output.suffix != ".parquet":
        raise ConfigError(f"--output: expected a .parquet path, got {output}")

    task_names = discover_tasks(args.tasks_dir, args.tasks)
    held_out = set(args.meta_test)
    tasks = [
        load_task(args.tasks_dir, t, ev.get("max_test_problems"), "meta_test" if t in held_out else "train")
        for t in task_names
    ]
    for task in tasks:  # before loading a model: a too-small shot pool is a settings error
        if args.shots > len(task.pool):
            raise ConfigError(
                f"--shots {args.shots}: task {task.name!r} has only {len(task.pool)} dev_pool examples "
                f"({Path(args.tasks_dir) / task.name / 'dev_pool.parquet'}; raise tasks.split.dev_pool)"
            )
    from fomaml_math.kshot import AdaptSpec

    spec = AdaptSpec.from_eval(ev, lr=args.adapt_lr, num_steps=args.adapt_steps)
    if spec.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"eval.optimizer: expected sgd or adam, got {spec.optimizer!r}")

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
        mixed_precision=str(settings.get("mixed_precision", "no")) if device.type == "cuda" else "no",
        snapshot_device=args.snapshot_device,
        spec=spec,
        instruction=str(settings.get("prompt", {}).get("instruction", "")),
        shot_seed=args.shot_seed,
        experiment=args.experiment,
        train_seed=args.train_seed,
    )
    ctx.backend = make_backend(backend_name, ctx, args.model, settings)  # one engine per job
    job = {"spec": spec.describe(), "experiment": args.experiment, "train_seed": args.train_seed,
           "shot_seed": ctx.draw_seed(), "meta_test": sorted(held_out)}  # fmt: skip
    pieces = PieceStore(output, job_fingerprint(settings, args, task_names, device.type, job))
    try:
        with Grader(timeout_s=float(ev["grade_timeout_s"]), workers=args.grade_workers) as grader:
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
            "device": str(device),
            "precision": ctx.mixed_precision,
            "backend": backend_name,
            **job,
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
