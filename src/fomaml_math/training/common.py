"""What FOMAML and SFT training share: processes and devices, data, schedule, metrics, outputs.

How work is split across processes (``Runtime.mode``):

* ``"task"`` (one process, or several CPU/DDP-style processes, each holding the whole model):
  FOMAML gives each process its own tasks of the meta-batch (positions ``rank, rank+P, ...``);
  every process adapts and backpropagates its tasks alone, and the ``.grad`` sums are all-reduced
  once per meta-step.  The model is *not* wrapped in DDP: its per-backward all-reduce would fire
  in the inner loop, where each process works on a different task.  SFT splits the rows of each
  batch across processes and all-reduces the same way.
* ``"fsdp"`` (accelerate FSDP2): the weights are sharded, so every process must run every forward
  and backward together.  All processes work on the same task; each takes the rows
  ``rank, rank+P, ...`` of every support/query batch, and the loss is normalised by the whole
  batch's token count so FSDP's gradient average equals the gradient of the whole batch.

In both modes the meta-gradient is exactly the one of a single process (up to float summation
order); ``tests/test_accelerate_launch.py`` checks this for 2 CPU processes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fomaml_math.batching import EncodedExample, SFTBatch, encode_example
from fomaml_math.config import ConfigError, settings_hash
from fomaml_math.data.split import read_task_split
from fomaml_math.io import atomic_path, write_json

TASK_COLUMNS: tuple[str, ...] = ("id", "task", "problem", "solution")
GRAD_BUCKET_ELEMENTS = 1 << 25  # 32M elements (128 MB in fp32) per all-reduce


class TrainingDivergedError(RuntimeError):
    """A loss or gradient norm became NaN/inf; training stops and the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------- processes


@dataclass
class Runtime:
    """The accelerate state a trainer needs, and the collectives it uses."""

    accelerator: Any  # None in single-process unit tests
    mode: Literal["task", "fsdp"]
    world: int
    rank: int
    local_world: int
    device: torch.device

    @classmethod
    def local(cls, device: str | torch.device = "cpu") -> Runtime:
        """One process without accelerate (unit tests, notebooks)."""
        return cls(None, "task", 1, 0, 1, torch.device(device))

    def autocast(self) -> Any:
        """Mixed-precision autocast of the forward passes (accelerate's), or nothing."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_mode(self) -> Literal["autograd", "backward"]:
        return "backward" if self.mode == "fsdp" else "autograd"

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place (no-op with one process)."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def split_rows(self, batch: SFTBatch) -> tuple[SFTBatch, float]:
        """This process's rows of ``batch`` and the loss normaliser that makes the reduced gradient exact.

        Task mode sums gradients over processes (normaliser: the batch's token count); FSDP averages
        them (normaliser: token count / processes).
        """
        total = max(batch.num_target_tokens, 1)
        if self.world == 1:
            return batch, float(total)
        local = batch.select(slice(self.rank, None, self.world))
        return local, float(total) / (self.world if self.mode == "fsdp" else 1)

    def reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum ``.grad`` over processes (task mode); FSDP has already reduced them."""
        if self.world == 1 or self.mode == "fsdp":
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        for bucket in _buckets(grads, GRAD_BUCKET_ELEMENTS):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() > limit or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def threads_per_process(local_world: int, omp_num_threads: str | None, cpu_count: int | None) -> int:
    """CPU threads for each of ``local_world`` processes on this machine.

    Snakemake exports ``OMP_NUM_THREADS`` = the job's ``threads``, and every process that
    ``accelerate launch`` starts inherits it: read as the whole job's budget, it is shared out,
    so 2 processes of a 2-thread job use 1 thread each instead of 2 (4 on 2 cores).
    """
    budget = int(omp_num_threads) if omp_num_threads and omp_num_threads.isdigit() else (cpu_count or 1)
    return max(1, budget // max(1, local_world))


def configure_threads(local_world: int) -> None:
    """Avoid CPU oversubscription (see :func:`threads_per_process`)."""
    threads = threads_per_process(local_world, os.environ.get("OMP_NUM_THREADS"), os.cpu_count())
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything started later (tokenizer pools, workers)
    torch.set_num_threads(threads)


def make_runtime(compute: dict[str, Any]) -> Runtime:
    """Create the Accelerator for a training run and check it against ``compute`` settings."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    precision = compute.get("mixed_precision", "no")
    if precision == "fp16":
        raise ConfigError(
            "compute.mixed_precision: fp16 is not supported for training (no loss scaling in the inner loop); use bf16"
        )
    launched_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched_precision not in (None, precision):
        raise ConfigError(
            f"compute.mixed_precision: settings say {precision!r} "
            f"but accelerate was launched with {launched_precision!r}"
        )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    configure_threads(local_world)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    expected = int(compute.get("num_processes", 1))
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"compute.num_processes: settings say {expected} but {accelerator.num_processes} process(es) were started "
            f"(run `accelerate launch --num_processes {expected} ...`)"
        )
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        if not getattr(accelerator, "is_fsdp2", False):
            raise ConfigError("compute.accelerate_config: FSDP needs fsdp_version: 2 (FSDP1 is not supported)")
        mode: Literal["task", "fsdp"] = "fsdp"
    elif kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        mode = "task"
    else:
        raise ConfigError(f"compute.accelerate_config: distributed type {kind} is not supported (use DDP or FSDP2)")
    return Runtime(
        accelerator, mode, accelerator.num_processes, accelerator.process_index, local_world, accelerator.device
    )


# --------------------------------------------------------------------------------------- data


def load_task_split(tasks_dir: str | Path, task: str, split: str) -> list[dict[str, Any]]:
    """Rows of ``<tasks_dir>/<task>/<split>.parquet`` (sorted by id, so input order never matters)."""
    path = Path(tasks_dir) / task / f"{split}.parquet"
    frame = read_task_split(path, TASK_COLUMNS, missing_hint=" (run split-tasks, or check train_tasks)")
    return [{c: frame.at[i, c] for c in TASK_COLUMNS} for i in range(len(frame))]


def encode_rows(tokenizer: Any, rows: Sequence[dict[str, Any]], max_seq_len: int) -> list[EncodedExample]:
    return [encode_example(tokenizer, r["problem"], r["solution"], max_seq_len) for r in rows]


def require_rows(rows: Sequence[Any], needed: int, *, setting: str, what: str) -> None:
    """A batch size larger than a split is a configuration error, reported before training starts."""
    if len(rows) < needed:
        raise ConfigError(f"{setting}: {needed} examples per batch, but {what} has only {len(rows)}")


def data_fingerprint(tasks_dir: str | Path, tasks: Sequence[str], splits: Sequence[str]) -> str:
    """Content hash of the task files training reads (a re-split data set must not resume old checkpoints)."""
    digest = hashlib.sha256()
    for task in tasks:
        for split in splits:
            path = Path(tasks_dir) / task / f"{split}.parquet"
            digest.update(f"{task}/{split}:".encode())
            digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()[:16]


def model_fingerprint(name_or_path: str) -> str:
    """Identity of the base model: for a local folder its json files and weight file sizes/mtimes."""
    path = Path(name_or_path)
    if not path.is_dir():
        return f"hub:{name_or_path}"
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if not file.is_file():
            continue
        digest.update(file.name.encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
        else:
            stat = file.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def resume_key(settings: dict[str, Any], *, data: str, model: str) -> str:
    """Checkpoints resume only under the same key: settings (minus wandb), data and base model."""
    relevant = {k: v for k, v in settings.items() if k != "wandb"}
    return settings_hash({"settings": relevant, "data": data, "model": model})


# --------------------------------------------------------------------------------------- optimisation


class LRSchedule:
    """Multiplier of the base learning rate for optimizer step ``s`` (0-based), picklable for checkpoints.

    Warm-up: ``(s + 1) / (warmup + 1)`` for ``s < warmup``; then with ``p = (s - warmup) / (total - warmup)``
    cosine ``0.5 * (1 + cos(pi * p))``, linear ``1 - p``, constant ``1``.
    """

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int) -> None:
        if schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_schedule: expected cosine, linear or constant, got {schedule!r}")
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    params: Sequence[torch.nn.Parameter], *, lr: float, weight_decay: float, schedule: str, warmup: int, total: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (torch defaults: betas 0.9/0.999, eps 1e-8) and its warm-up + decay schedule."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(schedule, warmup, total))
    return optimizer, scheduler


def clip_and_norm(runtime: Runtime, model: Any, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradient to ``max_norm``; return its total L2 norm before clipping.

    ``clip_grad_norm_`` handles FSDP2's DTensor gradients (one device mesh) itself; the norm is then a
    DTensor that every process turns into the same full value.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    value = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(value)


def prepare_training(
    runtime: Runtime,
    model: Any,
    compute: dict[str, Any],
    *,
    lr: float,
    weight_decay: float,
    schedule: str,
    warmup: int,
    total: int,
) -> tuple[Any, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, list[torch.nn.Parameter]]:
    """Gradient checkpointing, device placement (task mode) or FSDP2 sharding (fsdp mode), AdamW + schedule.

    Returns the (possibly wrapped) model, optimizer, scheduler and the trainable parameters to update.
    """
    from fomaml_math.adapt import trainable_parameters

    model.config.use_cache = False
    if compute.get("gradient_checkpointing"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if runtime.mode == "fsdp":
        # accelerate's FSDP2 path shards the model and swaps the optimizer's parameters in one prepare call
        optimizer, scheduler = make_optimizer(
            trainable_parameters(model), lr=lr, weight_decay=weight_decay, schedule=schedule, warmup=warmup, total=total
        )
        model, optimizer = runtime.accelerator.prepare(model, optimizer)
        return model, optimizer, scheduler, trainable_parameters(model)
    model = model.to(runtime.device)
    params = trainable_parameters(model)
    optimizer, scheduler = make_optimizer(
        params, lr=lr, weight_decay=weight_decay, schedule=schedule, warmup=warmup, total=total
    )
    return model, optimizer, scheduler, params


def check_finite(values: dict[str, float], *, step: int, checkpoint_hint: str) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        first = ", ".join(f"{k}={v}" for k, v in list(bad.items())[:3])
        raise TrainingDivergedError(
            f"non-finite value at step {step} ({first}); no update was applied, {checkpoint_hint}; "
            "lower the learning rates or check the data"
        )


# --------------------------------------------------------------------------------------- metrics


class MetricsLog:
    """Append-only JSONL of per-step records; survives resume (entries after the resumed step are dropped)."""

    def __init__(self, path: Path, *, active: bool, resume_step: int | None) -> None:
        self.path = path
        self.active = active
        self.records: list[dict[str, Any]] = []
        if not active:
            return
        if path.is_file():
            with open(path) as handle:
                lines = [json.loads(line) for line in handle if line.strip()]
            keep = [r for r in lines if resume_step is not None and int(r["step"]) <= resume_step]
            self.records = keep
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a")  # noqa: SIM115  (kept open for the whole run)

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.records.append(record)
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self.active:
            self._handle.close()


def write_metrics_outputs(records: Sequence[dict[str, Any]], output_dir: Path) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` (one row per record, columns: step then the sorted union)."""
    write_text_lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    with atomic_path(output_dir / "metrics.jsonl") as tmp:
        tmp.write_text(write_text_lines)
    columns = ["step", *sorted({k for r in records for k in r} - {"step"})]
    with atomic_path(output_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(records)


def wandb_mode(requested: str) -> str:
    """``online`` only with WANDB_API_KEY in the environment (else ``offline``); the key is never written."""
    if requested == "online" and not os.environ.get("WANDB_API_KEY"):
        warnings.warn("wandb.mode is online but WANDB_API_KEY is not set: logging offline", stacklevel=2)
        return "offline"
    return requested


class WandbLogger:
    """Optional wandb run (main process only); its id is kept in the checkpoint folder so resumes continue it."""

    def __init__(self, settings: dict[str, Any], *, name: str, config: dict[str, Any], run_dir: Path, active: bool):
        self.run = None
        mode = wandb_mode(settings.get("mode", "disabled"))
        if not active or mode == "disabled":
            return
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / f"run_id-{name}.txt"  # a resumed run continues the same wandb run
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]  # wandb: [a-z0-9]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=settings.get("project", "fomaml-math"),
            entity=settings.get("entity"),
            mode=mode,
            dir=str(run_dir),
            name=name,
            id=run_id,
            resume="allow",
            config=config,
        )

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is not None:
            if summary:
                self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
            self.run.finish()


def progress_bar(*, total: int, initial: int, desc: str, active: bool) -> Any:
    from tqdm.auto import tqdm

    # In a log file (Snakemake) every refresh is a new line: refresh every 30 s there, not 10 times a second.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not active,
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=interval,
        maxinterval=max(interval, 10.0),
    )


# --------------------------------------------------------------------------------------- outputs


def save_final_model(runtime: Runtime, model: Any, tokenizer: Any, path: Path) -> None:
    """The trained weights as a Hugging Face folder (``from_pretrained`` loads it), written atomically."""
    from fomaml_math.io import atomic_dir

    if runtime.mode == "fsdp":
        state = runtime.accelerator.get_state_dict(model)  # collective: every process takes part
        unwrapped = runtime.accelerator.unwrap_model(model)
    else:
        state, unwrapped = None, model
    if runtime.is_main:
        config = unwrapped.config
        config.use_cache = True
        with atomic_dir(path) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
    runtime.barrier()


def versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_json(path, summary)


class StepTimer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def rng_for(*key: int) -> np.random.Generator:
    """A generator derived from integers only: the draws of step ``s`` do not depend on earlier steps,
    on the number of processes, or on where a run was resumed."""
    return np.random.default_rng([int(k) for k in key])


# --------------------------------------------------------------------------------------- held-out loss


def loss_fn_for(runtime: Runtime, *, split_rows: bool) -> Any:
    """``loss_fn(model, batch)`` for :func:`adapted` and the trainers: whole batches, or this process's rows.

    Autocast is opened per forward pass, never around the inner loop: autocast caches the low-precision
    copies of the weights until its outermost context exits, and in-place SGD updates would otherwise
    be computed against stale copies.
    """
    from fomaml_math.batching import sft_loss

    def loss_fn(model: Any, batch: SFTBatch) -> tuple[torch.Tensor, int]:
        normalizer = None
        if split_rows and runtime.world > 1:
            batch, normalizer = runtime.split_rows(batch)
        with runtime.autocast():
            return sft_loss(model, batch.to(runtime.device), normalizer=normalizer)

    return loss_fn


@dataclass
class HeldoutSet:
    """Fixed held-out examples of one task (``chunks``) and fixed support batches to adapt on (``support``)."""

    task: str
    chunks: list[SFTBatch]
    support: list[SFTBatch]


def build_heldout_sets(
    tasks: Sequence[str],
    heldout: dict[str, list[EncodedExample]],
    support: dict[str, list[EncodedExample]],
    *,
    seed: int,
    pad_token_id: int,
    chunk_size: int,
    max_examples: int,
    support_batch_size: int = 0,
    support_steps: int = 0,
    multiple_of: int = 1,
) -> list[HeldoutSet]:
    """Draw once (seeded) up to ``max_examples`` held-out examples and ``support_steps`` support batches per task."""
    from fomaml_math.batching import collate

    sets = []
    for index, task in enumerate(tasks):
        rng = rng_for(seed, 0x4E1D, index)
        pool = heldout.get(task, [])
        n = min(len(pool), max_examples)
        n -= n % multiple_of
        if n == 0:
            continue
        rows = [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))]
        chunks = [collate(rows[i : i + chunk_size], pad_token_id) for i in range(0, n, chunk_size)]
        batches = []
        if support_steps and support_batch_size <= len(support.get(task, [])):
            order = rng.permutation(len(support[task]))
            for step in range(support_steps):
                idx = [order[(step * support_batch_size + j) % len(order)] for j in range(support_batch_size)]
                batches.append(collate([support[task][i] for i in idx], pad_token_id))
        sets.append(HeldoutSet(task, chunks, batches))
    return sets


def _nll_sum_count(runtime: Runtime, model: Any, chunks: Sequence[SFTBatch], split_rows: bool) -> tuple[float, float]:
    from fomaml_math.batching import example_nll

    total, count = 0.0, 0.0
    for chunk in chunks:
        local = runtime.split_rows(chunk)[0] if split_rows and runtime.world > 1 else chunk
        with runtime.autocast():
            sums, counts = example_nll(model, local.to(runtime.device))
        total += float(sums.sum())
        count += float(counts.sum())
    return total, count


def heldout_losses(
    runtime: Runtime,
    model: Any,
    sets: Sequence[HeldoutSet],
    *,
    inner_lr: float | None = None,
    num_inner_steps: int = 0,
    snapshot: Any = None,
) -> dict[str, float]:
    """Token-weighted held-out NLL per task at the current weights and, with ``num_inner_steps``, after
    adapting on the task's fixed support batches (restored afterwards).  Every process must call it."""
    from fomaml_math.adapt import adapted

    split = runtime.mode == "fsdp"
    values = torch.zeros((len(sets), 4), dtype=torch.float64)
    mine = range(len(sets)) if split else range(runtime.rank, len(sets), runtime.world)
    loss_fn = loss_fn_for(runtime, split_rows=split)
    if snapshot is not None and num_inner_steps:
        snapshot.refresh()  # once: every adaptation below restores the weights it started from
    for i in mine:
        item = sets[i]
        values[i, 0], values[i, 1] = _nll_sum_count(runtime, model, item.chunks, split)
        if num_inner_steps and item.support:
            with adapted(
                model,
                item.support,
                inner_lr=float(inner_lr or 0.0),
                num_steps=num_inner_steps,
                snapshot=snapshot,
                loss_fn=loss_fn,
                grad_mode=runtime.grad_mode,
            ):
                values[i, 2], values[i, 3] = _nll_sum_count(runtime, model, item.chunks, split)
    reduced = runtime.all_reduce_sum(values.to(runtime.device)).cpu()
    out: dict[str, float] = {}
    before, after, gains = [], [], []
    for i, item in enumerate(sets):
        b = float(reduced[i, 0] / max(reduced[i, 1], 1.0))
        out[f"heldout/{item.task}/loss_before"] = b
        before.append(b)
        if reduced[i, 3] > 0:
            a = float(reduced[i, 2] / reduced[i, 3])
            out[f"heldout/{item.task}/loss_after"] = a
            after.append(a)
            gains.append(b - a)
    if before:
        out["heldout/loss_before"] = float(np.mean(before))
    if after:
        out["heldout/loss_after"] = float(np.mean(after))
        out["heldout/adaptation_gain"] = float(np.mean(gains))
    return out
