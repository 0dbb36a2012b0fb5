"""Processes and devices of a training run: the accelerate state, work split and collectives.

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
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from fomaml_math.adapt import sft_loss_fn
from fomaml_math.batching import SFTBatch
from fomaml_math.errors import ConfigError

GRAD_BUCKET_ELEMENTS = 1 << 25  # 32M elements (128 MB in fp32) per all-reduce


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


def make_runtime(compute: Mapping[str, Any]) -> Runtime:
    """Create the Accelerator for a training run and check it against ``compute`` settings."""
    precision = compute["mixed_precision"]
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
    expected = int(compute["num_processes"])
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


def loss_fn_for(runtime: Runtime, *, split_rows: bool) -> Any:
    """``loss_fn(model, batch)`` for :func:`adapted` and the trainers: whole batches, or this process's rows.

    Autocast is opened per forward pass (:func:`fomaml_math.adapt.sft_loss_fn`), never around the
    inner loop; the evaluation builds its loss the same way.
    """
    rows = runtime.split_rows if split_rows and runtime.world > 1 else None
    return sft_loss_fn(runtime.device, runtime.autocast, rows)
