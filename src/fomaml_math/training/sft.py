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

import time
from pathlib import Path
from typing import Any

import torch

from fomaml_math.adapt import WeightSnapshot
from fomaml_math.batching import EncodedExample, collate, sft_loss
from fomaml_math.data.taskfiles import assert_disjoint, held_out_ids, load_task_split
from fomaml_math.errors import ConfigError
from fomaml_math.training.data import encode_rows, load_dev, require_rows, rng_for
from fomaml_math.training.monitor import build_monitor_sets, dev_losses
from fomaml_math.training.optim import TrainingDivergedError, check_finite, clip_and_norm
from fomaml_math.training.run import run_main, start_run
from fomaml_math.training.runtime import Runtime, make_runtime

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
    runtime.reduce_grads(params)
    grad_norm = clip_and_norm(runtime, model, params, max_grad_norm)
    value = runtime.all_reduce_sum(loss.detach().double().reshape(1).to(runtime.device)).cpu()
    if runtime.mode == "fsdp":
        value /= runtime.world
    loss_value = float(value[0])
    try:
        check_finite({"sft/loss": loss_value, "sft/grad_norm": grad_norm}, step=step, checkpoint_hint=checkpoint_hint)
    except TrainingDivergedError:
        optimizer.zero_grad(set_to_none=True)
        raise
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


def train(settings: dict[str, Any], tasks_dir: Path, output_dir: Path, checkpoint_dir: Path) -> dict[str, Any]:
    """Run (or resume) SFT and write the outputs; returns the summary."""
    from fomaml_math.modeling import load_model_and_tokenizer

    started = time.perf_counter()
    sft = settings["sft"]
    model_cfg = settings["model"]
    tasks = list(settings["train_tasks"])
    seed = int(settings["seed"])  # dev monitoring draws: the same for every training seed and method
    train_seed = int(settings.get("train_seed", seed))  # what a replicate changes: the order of the training data
    total = int(sft["steps"])
    batch_size = int(sft["batch_size"])
    runtime = make_runtime(settings["compute"])
    if not tasks:
        raise ConfigError("train_tasks: no training tasks (tasks.names minus tasks.meta_test is empty)")
    if runtime.world > 1 and batch_size % runtime.world:
        raise ConfigError(f"sft.batch_size: {batch_size} must be divisible by compute.num_processes ({runtime.world})")

    model, tokenizer = load_model_and_tokenizer(
        model_cfg["name_or_path"], revision=model_cfg.get("revision"), trust_remote_code=model_cfg["trust_remote_code"]
    )
    max_len = int(model_cfg["max_seq_len"])
    instruction = str(settings.get("prompt", {}).get("instruction", ""))
    examples: list[EncodedExample] = []
    held_out = held_out_ids(tasks_dir)  # every dev/test id, from the split's role index (no test file is opened)
    for task in tasks:
        rows = [*load_task_split(tasks_dir, task, "support"), *load_task_split(tasks_dir, task, "query")]
        assert_disjoint((r["id"] for r in rows), held_out, f"task {task}")
        examples.extend(encode_rows(tokenizer, rows, max_len, instruction=instruction))
    require_rows(examples, batch_size, setting="sft.batch_size", what="the pooled support+query training data")
    pad = int(tokenizer.pad_token_id)
    # The same dev criterion as FOMAML: dev_monitor loss after the evaluation's adaptation on the same draws.
    monitor_sets = build_monitor_sets(
        tasks,
        *load_dev(tasks_dir, tasks, tokenizer, max_len, instruction=instruction),
        tokenizer=tokenizer,
        seed=seed,
        chunk_size=batch_size,
        max_examples=int(settings["select"].get("max_monitor_examples", 32)),
        select=settings["select"],
        adaptation=settings["adaptation"],
        max_seq_len=max_len,
        instruction=instruction,
        multiple_of=runtime.world if runtime.mode == "fsdp" else 1,
    )
    run, params = start_run(
        "sft",
        runtime,
        settings,
        model,
        tasks_dir=tasks_dir,
        tasks=tasks,
        checkpoint_dir=checkpoint_dir,
        lr=float(sft["lr"]),
        total_steps=total,
    )
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    sampler = EpochSampler(train_seed, len(examples), batch_size)
    snapshot = WeightSnapshot(model, settings["compute"].get("snapshot_device", "cpu"))

    def monitor() -> dict[str, float]:
        return dev_losses(runtime, model, monitor_sets, adaptation=settings["adaptation"], snapshot=snapshot)

    try:
        if run.start_step == 0:
            run.log({"step": 0, **monitor()})
        for step in range(run.start_step + 1, total + 1):
            t0 = time.perf_counter()
            batch = collate([examples[i] for i in sampler.indices(step)], pad)
            lr = float(scheduler.get_last_lr()[0])
            try:
                loss, grad_norm = sft_step(
                    runtime,
                    model,
                    params,
                    optimizer,
                    scheduler,
                    batch,
                    max_grad_norm=float(sft.get("max_grad_norm", 1.0)),
                    step=step,
                    checkpoint_hint=run.checkpoint_hint(),
                )
            except TrainingDivergedError:
                run.log({"step": step, "diverged": 1})
                raise
            elapsed = time.perf_counter() - t0
            perf = run.count_step(
                elapsed=elapsed, tokens=batch.num_tokens, examples=batch.num_examples, truncated=batch.num_truncated
            )
            record = {
                "step": step,
                "sft/loss": loss,
                "sft/grad_norm": grad_norm,
                "lr": lr,
                "epoch": (step * batch_size) / len(examples),
                **perf,
            }
            if run.monitor_due(step):
                record.update(monitor())
            run.log(record, postfix={"loss": f"{loss:.4f}", "gnorm": f"{grad_norm:.3f}"})
            run.maybe_save(step)
            run.observe_dev(step, record)
    finally:
        run.close()
    return run.finish(output_dir, tokenizer, train_examples=examples, started=started)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, stage="train_sft", train_fn=train, prog="fomaml_math train-sft")
