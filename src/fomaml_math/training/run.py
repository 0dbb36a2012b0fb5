"""A training run's records: resume, metrics log, wandb, checkpoints, the best-dev slot, candidates, final outputs."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import accelerate
import torch
import transformers

from fomaml_math import measured
from fomaml_math.batching import EncodedExample
from fomaml_math.config import settings_hash
from fomaml_math.errors import ConfigError
from fomaml_math.io import atomic_dir, link_tree, write_json
from fomaml_math.training import checkpoint as ckpt
from fomaml_math.training.logs import MetricsLog, WandbLogger, progress_bar, write_metrics_outputs
from fomaml_math.training.monitor import SELECTION_METRIC
from fomaml_math.training.runtime import Runtime
from fomaml_math.training.settings import TrainSettings


def save_final_model(runtime: Runtime, model: Any, tokenizer: Any, path: Path) -> None:
    """The trained weights as a Hugging Face folder (``from_pretrained`` loads it), written atomically."""
    if runtime.mode == "fsdp":
        state = runtime.accelerator.get_state_dict(model)  # collective: every process takes part
        unwrapped = runtime.accelerator.unwrap_model(model)
    else:
        state, unwrapped = None, model
    if runtime.is_main:
        config = unwrapped.config
        training_value = config.use_cache
        config.use_cache = True  # the saved config generates with a KV cache
        try:
            with atomic_dir(path) as tmp:
                unwrapped.save_pretrained(tmp, state_dict=state)
                tokenizer.save_pretrained(tmp)
        finally:
            config.use_cache = training_value  # a candidate is saved mid-training: leave the live model as it was
    runtime.barrier()


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__}


class TrainingRun:
    """Resumes from the latest complete checkpoint in ``checkpoint_dir`` and keeps the records.

    ``state`` holds the counters that survive resume: tokens, examples, truncated rows, wall time.
    How often to evaluate and save comes from the method's settings section (``test_freq``,
    ``save_freq``, ``keep_checkpoints``); ``settings.raw`` is what the checkpoints and summary record.
    """

    def __init__(
        self,
        *,
        runtime: Runtime,
        settings: TrainSettings,
        key: str,
        checkpoint_dir: Path,
        model: Any,
        optimizer: Any,
        scheduler: Any,
    ) -> None:
        method = settings.method.name
        self.method = method
        self.runtime = runtime
        self.settings = settings.raw
        self.key = key
        self.root = Path(checkpoint_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.total_steps = settings.method.total_steps
        self.test_freq = settings.method.test_freq
        self.save_freq = settings.method.save_freq
        self.keep_checkpoints = settings.method.keep_checkpoints
        self.candidate_freq = settings.method.candidate_freq
        self.keep_finished_checkpoints = settings.keep_finished_checkpoints
        self.criterion = settings.criterion
        self.state: dict[str, Any] = {
            "tokens": 0,
            "examples": 0,
            "truncated_rows": 0,
            "wall_time_s": 0.0,
            "resumed_from": [],
        }
        self.start_step = 0
        if runtime.is_main:
            ckpt.remove_partial(self.root)
        ckpt.discard_stale(self.root, key, is_main=runtime.is_main)
        runtime.barrier()
        latest = ckpt.latest_checkpoint(self.root)
        if latest is None and runtime.is_main:
            print(f"{method}: starting fresh (no checkpoint in {self.root})", file=sys.stderr)
        if latest is not None:
            loaded = ckpt.load_checkpoint(
                latest, runtime=runtime, model=model, optimizer=optimizer, scheduler=scheduler, expected_key=key
            )
            self.state.update({k: loaded[k] for k in self.state if k in loaded})
            self.start_step = int(loaded["step"])
            self.state["resumed_from"] = [*self.state["resumed_from"], self.start_step]
            if runtime.is_main:
                print(f"{method}: resuming from checkpoint {latest} (step {self.start_step})", file=sys.stderr)
        self.metrics = MetricsLog(
            self.root / ".metrics.jsonl",
            active=runtime.is_main,
            resume_step=self.start_step if latest is not None else None,
        )
        self.wandb = WandbLogger(
            settings.wandb,
            name=f"{method}-{key}",
            config=settings.raw,
            run_dir=self.root / ".wandb",
            active=runtime.is_main,
        )
        self.last: dict[str, Any] = self.metrics.records[-1] if self.metrics.records else {}
        # The best-so-far dev step survives resume (its slot is keyed like the checkpoints).
        best = ckpt.read_best(self.root, key) if latest is not None else None
        if best is not None and int(best["step"]) > self.start_step:
            best = None  # written after the checkpoint we resume from: that step will be redone
        self.best: dict[str, Any] | None = best
        # Candidates (select.criterion tuned) live in the checkpoint dir, which Snakemake never deletes: the ones
        # written at or before the step we resume from are kept, later ones (and other keys') are redone.
        if runtime.is_main:
            kept = ckpt.prune_candidates(self.root, key, keep_upto=self.start_step)
            if kept and self.criterion == "tuned":
                print(f"{method}: keeping candidates at steps {kept}", file=sys.stderr)
        runtime.barrier()
        self._clock = time.perf_counter()
        self._wall_before = float(self.state["wall_time_s"])
        self.bar = progress_bar(
            total=self.total_steps, initial=self.start_step, desc=f"{method} steps", active=runtime.is_main
        )

    def wall_time(self) -> float:
        return self._wall_before + time.perf_counter() - self._clock

    def checkpoint_hint(self) -> str:
        done = ckpt.latest_checkpoint(self.root)
        return f"the last good checkpoint is {done}" if done else "no checkpoint was written yet"

    def log(self, record: dict[str, Any], *, postfix: dict[str, str] | None = None) -> None:
        self.metrics.log(record)
        self.wandb.log(record, step=int(record["step"]))
        if int(record["step"]) > 0:
            self.last = record
        if postfix is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)

    def count_step(self, *, elapsed: float, tokens: int, examples: int, truncated: int) -> dict[str, Any]:
        """Add one step's data to the counters that survive resume; returns the step's perf/ and data/ metrics."""
        self.state["tokens"] += tokens
        self.state["examples"] += examples
        self.state["truncated_rows"] += truncated
        return {
            "perf/step_time_s": elapsed,
            "perf/tokens_per_s": tokens / max(elapsed, 1e-9),
            "perf/tokens_total": self.state["tokens"],
            "data/truncated_rows": truncated,
        }

    def monitor_due(self, step: int) -> bool:
        """Whether step ``step`` logs the dev monitoring losses (every ``test_freq`` steps, and the last)."""
        return step % self.test_freq == 0 or step == self.total_steps

    def candidate_due(self, step: int) -> bool:
        """Whether ``select.criterion: tuned`` keeps step ``step`` (every ``candidate_freq`` steps, and the last)."""
        return step % self.candidate_freq == 0 or step == self.total_steps

    def candidate_steps(self) -> list[int]:
        """The steps ``select.criterion: tuned`` keeps (``candidate_due``), the last included."""
        return [s for s in range(1, self.total_steps + 1) if self.candidate_due(s)]

    def keep_candidate(self, step: int, tokenizer: Any) -> None:
        """With ``tuned``, at a candidate step (``candidate_due``): the weights as a Hugging Face folder in the
        checkpoint dir.

        Called before the step's checkpoint, so a resumed run never lacks a candidate of a step it skips.
        """
        if self.criterion != "tuned" or not self.candidate_due(step):
            return
        save_final_model(self.runtime, self.model, tokenizer, ckpt.candidate_folder(self.root, step))
        if self.runtime.is_main:
            ckpt.write_candidate_state(self.root, step, {"resume_key": self.key, "method": self.method})
        self.runtime.barrier()

    def _write_candidates(self, output_dir: Path, steps: list[int], source: dict[int, Path]) -> list[dict[str, Any]]:
        """``<output-dir>/candidates/step-N/`` for ``steps`` (hard links to ``source[N]``), written atomically."""
        listed = [{"step": s, "path": f"{ckpt.CANDIDATES_DIR}/{ckpt.candidate_name(s)}"} for s in steps]
        if self.runtime.is_main:
            with atomic_dir(output_dir / ckpt.CANDIDATES_DIR) as tmp:
                for s in steps:
                    link_tree(source[s], tmp / ckpt.candidate_name(s))
        self.runtime.barrier()
        return listed

    def maybe_save(self, step: int) -> None:
        """Checkpoint every ``save_freq`` steps and at the last step, keeping ``keep_checkpoints``."""
        if step % self.save_freq and step != self.total_steps:
            return
        self.state["wall_time_s"] = self.wall_time()
        ckpt.save_checkpoint(
            self.root,
            step,
            runtime=self.runtime,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={**self.state, "resume_key": self.key, "settings_hash": settings_hash(self.settings)},
            keep=self.keep_checkpoints,
        )

    def observe_dev(self, step: int, record: dict[str, Any]) -> None:
        """With ``select.criterion: best_dev``, keep the weights of the lowest dev criterion so far.

        Only trained steps compete (not step 0); ties keep the earlier step.
        """
        value = record.get(SELECTION_METRIC)
        if self.criterion != "best_dev" or step < 1 or value is None or not math.isfinite(float(value)):
            return
        if self.best is not None and float(value) >= float(self.best["dev_loss"]):
            return
        self.best = {"step": step, "dev_loss": float(value), "metric": SELECTION_METRIC, "resume_key": self.key}
        ckpt.save_best(self.root, step, runtime=self.runtime, model=self.model, state=self.best)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()

    def finish(
        self,
        output_dir: Path,
        tokenizer: Any,
        *,
        train_examples: Sequence[EncodedExample],
        started: float,
        facts: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write ``model/``, ``candidates/``, ``metrics.jsonl``, ``metrics.csv`` and (last) ``train_summary.json``.

        ``train_examples``: every example training draws from; ``started``: ``perf_counter()`` when
        this process's ``train`` began; ``facts``: the method's own summary entries.
        """
        this_run_wall_time = time.perf_counter() - started  # before the final save, as the trainers measured it
        self.close()
        output_dir = Path(output_dir)
        selected_step: int | None = self.total_steps
        if self.criterion == "tuned":
            # Training selects nothing: every monitored step is a candidate; model/ is the last step's
            # (the same folder as its candidate, hard-linked).
            selected_step = None
            steps = self.candidate_steps()
            have = dict(ckpt.list_candidates(self.root, self.key))
            missing = [s for s in steps if s not in have]
            if missing:
                raise RuntimeError(
                    f"select.criterion tuned: candidates {missing} are missing from {self.root / ckpt.CANDIDATES_DIR} "
                    "(deleted by hand?); delete the checkpoint dir to retrain"
                )
            if self.runtime.is_main:
                with atomic_dir(output_dir / "model") as tmp:
                    link_tree(have[self.total_steps], tmp)
            self.runtime.barrier()
            candidates = self._write_candidates(output_dir, steps, have)
        elif self.criterion == "best_dev":
            if self.best is None:
                raise ConfigError(
                    "select.criterion: best_dev, but no dev criterion was logged (select.shots must not exceed "
                    "tasks.split.dev_pool, and test_freq must divide into the training steps)"
                )
            selected_step = int(self.best["step"])
            if selected_step != self.total_steps:
                ckpt.load_best(self.root, runtime=self.runtime, model=self.model)
        if self.criterion != "tuned":
            save_final_model(self.runtime, self.model, tokenizer, output_dir / "model")
            # One candidate, the kept weights, so the rule's outputs are the same whatever the criterion.
            assert selected_step is not None
            candidates = self._write_candidates(output_dir, [selected_step], {selected_step: output_dir / "model"})
        model_step = self.total_steps if selected_step is None else selected_step
        wall_time = self.wall_time()  # one reading: the summary's wall time and its measured throughput agree
        summary = {
            "method": self.method,
            "steps": self.total_steps,
            "settings": self.settings,
            "settings_hash": settings_hash(self.settings),
            "resume_key": self.key,
            "num_processes": self.runtime.world,
            "work_split": self.runtime.mode,
            "tokens": int(self.state["tokens"]),
            "examples": int(self.state["examples"]),
            "truncated_rows": int(self.state["truncated_rows"]),
            "wall_time_s": wall_time,
            "resumed_from": self.state["resumed_from"],
            "selection": {
                "criterion": self.criterion,
                "selected_step": selected_step,
                "dev_loss": None if self.best is None else self.best["dev_loss"],
                "metric": None if self.best is None else self.best["metric"],
            },
            "selected_step": selected_step,
            "model_step": model_step,  # the step whose weights model/ holds
            "candidates": candidates,  # paths relative to the output dir, in step order
            "final_metrics": {
                k: v for k, v in self.last.items() if isinstance(v, int | float) and math.isfinite(float(v))
            },
            "versions": versions(),
            # the hub commit the base model resolved to (transformers records it when loading from the hub)
            "base_model_commit": getattr(getattr(self.model, "config", None), "_commit_hash", None),
            "num_train_examples": len(train_examples),
            "num_truncated_examples": sum(e.truncated for e in train_examples),
            "this_run_wall_time_s": this_run_wall_time,
            "measured": measured.training(
                model=self.settings["model"]["name_or_path"],
                tokens=self.state["tokens"],
                seconds=wall_time,
                processes=self.runtime.world,
                device=self.runtime.device,
            ),
            **(facts or {}),
        }
        if self.runtime.is_main:
            write_metrics_outputs(self.metrics.records, output_dir)
            write_json(output_dir / "train_summary.json", summary)
            if not self.keep_finished_checkpoints:  # after the summary: the outputs are complete
                removed = ckpt.remove_resumable(self.root)
                if removed:
                    print(
                        f"{self.method}: removed {len(removed)} resumable checkpoint(s) of the finished run "
                        "(compute.keep_finished_checkpoints: false)",
                        file=sys.stderr,
                    )
        self.wandb.finish(summary["final_metrics"])
        self.runtime.barrier()
        return summary
