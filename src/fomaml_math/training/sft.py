"""The SFT baseline (stage ``train-sft``): the same model and data as FOMAML, plain supervised fine-tuning.

Training data: the support and query splits of the training tasks, pooled.  Each step takes the
next ``sft.batch_size`` examples of a seeded per-epoch permutation, computes the token-weighted
SFT loss, clips the gradient and takes one AdamW step with warm-up and decay.  ``sft.steps`` is the
budget ``config.stage_settings`` computed (matched to FOMAML's example forward/backward passes
unless ``sft.budget`` is ``steps``).  With several processes each takes a share of every batch's
rows; the loss is normalised by the whole batch's token count, so the update equals the
single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fomaml_math.batching import EncodedExample, SFTBatch, collate, sft_loss
from fomaml_math.errors import ConfigError
from fomaml_math.training import loop
from fomaml_math.training.data import TaskData, require_rows, rng_for
from fomaml_math.training.loop import StepContext, StepOutcome
from fomaml_math.training.optim import apply_update
from fomaml_math.training.runtime import Runtime
from fomaml_math.training.settings import TrainSettings

TAG_EPOCH = 0x5F70


class EpochSampler:
    """Example indices of step ``s``: positions ``(s-1)*B .. s*B-1`` of the concatenated per-epoch permutations.

    Epoch ``e``'s permutation comes from ``rng_for(seed, TAG_EPOCH, e)``, so the position (the step)
    is the sampler's whole state: resuming at step ``s`` continues exactly where the run stopped.
    """

    def __init__(self, seed: int, num_examples: int, batch_size: int) -> None:
        self.seed, self.n, self.batch_size = seed, num_examples, batch_size
        self._cache: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            self._cache = {e: o for e, o in self._cache.items() if e >= epoch - 1}  # a batch spans <= 2 epochs
            self._cache[epoch] = rng_for(self.seed, TAG_EPOCH, epoch).permutation(self.n).tolist()
        return self._cache[epoch]

    def indices(self, step: int) -> list[int]:
        first = (step - 1) * self.batch_size
        return [self._order(q // self.n)[q % self.n] for q in range(first, first + self.batch_size)]


def sft_step(
    runtime: Runtime,
    model: Any,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: Any,
    *,
    max_grad_norm: float,
    step: int = 0,
    checkpoint_hint: str = "no checkpoint was written",
) -> tuple[float, float]:
    """One SFT update on ``batch`` (every process passes the whole batch); returns (loss, pre-clip grad norm)."""
    local, normalizer = runtime.split_rows(batch)
    with runtime.autocast():
        loss, _ = sft_loss(model, local.to(runtime.device), normalizer=normalizer)
    loss.backward()
    value = runtime.all_reduce_sum(loss.detach().double().reshape(1).to(runtime.device)).cpu()
    if runtime.mode == "fsdp":
        value /= runtime.world
    loss_value = float(value[0])

    def checked(grad_norm: float) -> dict[str, float]:
        return {"sft/loss": loss_value, "sft/grad_norm": grad_norm}

    grad_norm = apply_update(
        runtime, model, params, optimizer, scheduler, max_grad_norm, checked, step, checkpoint_hint
    )
    return loss_value, grad_norm


@dataclass
class EpochBatch:
    batch: SFTBatch
    epoch: float  # examples drawn up to and including this step, in passes over the data


@dataclass
class EpochBatches:
    """Step ``s``'s batch: the sampler's examples of the pooled support and query splits of all training tasks."""

    examples: list[EncodedExample]
    sampler: EpochSampler
    pad_token_id: int

    def __call__(self, step: int) -> EpochBatch:
        batch = collate([self.examples[i] for i in self.sampler.indices(step)], self.pad_token_id)
        return EpochBatch(batch, (step * self.sampler.batch_size) / len(self.examples))


class SFT:
    """The loop's :class:`~fomaml_math.training.loop.Method` for the SFT baseline."""

    name, lr_key, steps_key = "sft", "lr", "steps"

    def check(self, settings: TrainSettings, runtime: Runtime) -> None:
        batch_size = int(settings.method["batch_size"])
        if runtime.world > 1 and batch_size % runtime.world:
            raise ConfigError(
                f"sft.batch_size: {batch_size} must be divisible by compute.num_processes ({runtime.world})"
            )

    def check_task(self, settings: TrainSettings, task: str, support: list[dict], query: list[dict]) -> None:
        pass  # the pooled data is checked once, in batches()

    def monitor_chunk_size(self, settings: TrainSettings) -> int:
        return int(settings.method["batch_size"])

    def batches(self, settings: TrainSettings, data: dict[str, TaskData], pad_token_id: int) -> EpochBatches:
        examples = [e for d in data.values() for e in (*d.support, *d.query)]
        batch_size = int(settings.method["batch_size"])
        require_rows(examples, batch_size, setting="sft.batch_size", what="the pooled support+query training data")
        return EpochBatches(examples, EpochSampler(settings.stream_seed, len(examples), batch_size), pad_token_id)

    def summary_facts(self, settings: TrainSettings) -> dict[str, Any]:
        return {}

    def step(self, ctx: StepContext, batch: EpochBatch, *, step: int, checkpoint_hint: str) -> StepOutcome:
        loss, grad_norm = sft_step(
            ctx.runtime,
            ctx.model,
            ctx.params,
            ctx.optimizer,
            ctx.scheduler,
            batch.batch,
            max_grad_norm=ctx.settings.method.max_grad_norm,
            step=step,
            checkpoint_hint=checkpoint_hint,
        )
        return StepOutcome(
            {"sft/loss": loss, "sft/grad_norm": grad_norm, "epoch": batch.epoch},
            loss=loss,
            grad_norm=grad_norm,
            tokens=batch.batch.num_tokens,
            examples=batch.batch.num_examples,
            truncated=batch.batch.num_truncated,
        )


def train(settings: dict[str, Any], tasks_dir: Path, output_dir: Path, checkpoint_dir: Path) -> dict[str, Any]:
    """Run (or resume) SFT and write the outputs; returns the summary."""
    return loop.train(SFT(), settings, tasks_dir, output_dir, checkpoint_dir)


def main(argv: list[str] | None = None) -> int:
    return loop.main(argv, SFT(), prog="fomaml_math train-sft")
