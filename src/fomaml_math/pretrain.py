"""Stage ``pretrain-tiny-base``: a brief pretraining of the offline tiny model, so that the base can answer.

A randomly initialised tiny Qwen3 scores 0 at every shot count, so the study's base row and every comparison
with it say nothing. This stage trains the freshly built tiny model (``build-tiny-model``) on rule-free worked
problems of the synthetic families (:func:`fomaml_math.data.synthetic.generate_plain`): the same templates,
chat rendering and ``prompt.instruction`` as the tasks, but with the plain result boxed and none of the tasks'
hidden rules. The corpus never holds a problem whose normalised text is a dev or test problem of any task (read
from the task files), so the base has not seen what it is later adapted on or graded on. The result is an
ordinary ``save_pretrained`` folder that every later stage loads as ``model.name_or_path``.

The loop reuses the project's training pieces (:func:`fomaml_math.batching.encode_example`/``collate``/
``sft_loss`` and :func:`fomaml_math.training.optim.make_optimizer`): plain AdamW steps on shuffled batches, one
process, CPU or one GPU. Settings: ``model.pretrain`` (docs/demo.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fomaml_math.batching import collate, encode_example, sft_loss
from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.data.synthetic import generate_plain
from fomaml_math.data.taskfiles import HELD_OUT_SPLITS
from fomaml_math.data.text import normalise_problem_text
from fomaml_math.errors import ConfigError
from fomaml_math.modeling import load_model_and_tokenizer, save_model
from fomaml_math.training.optim import make_optimizer

logger = logging.getLogger(__name__)

LOG_EVERY = 50


def held_out_texts(tasks_dir: str | Path) -> frozenset[str]:
    """Normalised problem texts of every task's dev_pool, dev_monitor and test files under ``tasks_dir``."""
    files = sorted(p for split in HELD_OUT_SPLITS for p in Path(tasks_dir).glob(f"*/{split}.parquet"))
    if not files:
        raise ConfigError(f"--tasks-dir: no dev or test parquet files under {tasks_dir} (run split-tasks first)")
    texts: set[str] = set()
    for path in files:
        texts.update(normalise_problem_text(str(t)) for t in pd.read_parquet(path, columns=["problem"])["problem"])
    return frozenset(texts)


def pretrain_corpus(settings: Mapping[str, Any], tasks_dir: str | Path) -> list[dict[str, str]]:
    """The rule-free corpus: ``problems_per_family`` plain problems per family, none of them a dev/test problem."""
    families: Sequence[str] = settings["families"]
    if not families:
        raise ConfigError("tasks.names: no synthetic family to pretrain on")
    per_family = int(settings["pretrain"]["problems_per_family"])
    return generate_plain(families, per_family, int(settings["seed"]), exclude=held_out_texts(tasks_dir))


def pretrain(model: Any, tokenizer: Any, corpus: Sequence[Mapping[str, str]], settings: Mapping[str, Any]) -> dict:
    """``pretrain.steps`` AdamW steps on shuffled batches of ``corpus`` (epochs reshuffled); returns a log."""
    options = settings["pretrain"]
    steps, batch_size = int(options["steps"]), int(options["batch_size"])
    instruction, max_seq_len = str(settings["instruction"]), int(settings["max_seq_len"])
    encoded = [
        encode_example(tokenizer, e["problem"], e["solution"], max_seq_len, instruction=instruction) for e in corpus
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(
        params,
        lr=float(options["lr"]),
        weight_decay=float(options["weight_decay"]),
        schedule=str(options["lr_schedule"]),
        warmup=int(options["warmup_steps"]),
        total=steps,
    )
    rng = random.Random(f"pretrain:{settings['seed']}")
    order: list[int] = []
    losses: list[float] = []
    curve: list[dict[str, float]] = []
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:  # a new epoch: every example once more, in a new order
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = collate([encoded[i] for i in order[:batch_size]], tokenizer.pad_token_id)
        del order[:batch_size]
        loss, _ = sft_loss(model, batch)
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"pretraining diverged at step {step} (loss {value}); lower model.pretrain.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(options["max_grad_norm"]))
        optimizer.step()
        scheduler.step()
        losses.append(value)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            window = losses[-LOG_EVERY:]
            curve.append({"step": step + 1, "loss": sum(window) / len(window)})
            logger.info("pretrain step %d/%d: loss %.4f", step + 1, steps, curve[-1]["loss"])
    model.eval()
    return {
        "steps": steps,
        "examples_seen": steps * batch_size,
        "epochs": steps * batch_size / max(1, len(encoded)),
        "truncated_examples": sum(e.truncated for e in encoded),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "final_loss": curve[-1]["loss"],  # mean over the last logging window
        "loss_curve": curve,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fomaml_math pretrain-tiny-base", description=__doc__)
    add_settings_arguments(parser)
    parser.add_argument("--init-model", required=True, help="the built tiny model, e.g. results/models/tiny-init")
    parser.add_argument("--tasks-dir", required=True, help="results/data/tasks (dev and test problems are excluded)")
    parser.add_argument("--output", required=True, help="the pretrained base folder (model.name_or_path)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args, "pretrain_tiny_base")
    if not settings["pretrain"]:
        raise ConfigError("model.pretrain: null in this config, so there is nothing to pretrain")
    corpus = pretrain_corpus(settings, args.tasks_dir)
    model, tokenizer = load_model_and_tokenizer(args.init_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(settings["seed"]))
        log = pretrain(model, tokenizer, corpus, settings)
    info = {"settings": settings, "init_model": str(args.init_model), "corpus_size": len(corpus), **log}
    save_model(model, tokenizer, args.output, extra=info)
    print(
        f"pretrained the tiny base on {len(corpus)} rule-free problems for {log['steps']} steps "
        f"(loss {log['first_loss']:.3f} -> {log['final_loss']:.3f}, {log['seconds']:.0f} s) -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
