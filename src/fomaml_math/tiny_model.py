"""Stage ``build-tiny-model``: the offline tiny Qwen3 model, its tokenizer trained on the training tasks' texts.

The model and tokenizer themselves come from :mod:`fomaml_math.modeling`; this stage reads the support and
query texts, builds them with the configured ``model.tiny`` shape, and saves the Hugging Face folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fomaml_math.batching import user_turn
from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.errors import ConfigError
from fomaml_math.modeling import build_tiny_model, save_model


def read_task_texts(
    tasks_dir: str | Path, splits: tuple[str, ...] = ("support", "query"), *, instruction: str = ""
) -> list[str]:
    """User turns (problem + ``instruction``) and solutions of ``<tasks_dir>/<task>/<split>.parquet``, in a stable
    order (by task, split, id).  The instruction is in every user turn, so the tokenizer learns it as a few
    tokens instead of spending a short context on byte fallbacks."""
    tasks_dir = Path(tasks_dir)
    files = sorted(p for split in splits for p in tasks_dir.glob(f"*/{split}.parquet"))
    if not files:
        raise ConfigError(f"--tasks-dir: no {'/'.join(splits)} parquet files under {tasks_dir}")
    texts: list[str] = []
    for path in files:
        frame = pd.read_parquet(path, columns=["id", "problem", "solution"]).sort_values("id", kind="stable")
        for problem, solution in zip(frame["problem"], frame["solution"], strict=True):
            texts.extend((user_turn(str(problem), instruction), str(solution)))
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fomaml_math build-tiny-model", description=__doc__)
    add_settings_arguments(parser)
    parser.add_argument("--tasks-dir", required=True, help="results/data/tasks (support+query train the tokenizer)")
    parser.add_argument("--output", required=True, help="output HF model folder, e.g. results/models/tiny-base")
    args = parser.parse_args(argv)
    settings = settings_from_args(args, "build_tiny_model")
    tiny = settings["tiny"]
    if not tiny:
        raise ConfigError("model.tiny: must be a mapping to build a tiny model (it is null in this config)")
    texts = read_task_texts(args.tasks_dir, instruction=str(settings["instruction"]))
    seed, max_seq_len = int(settings["seed"]), int(settings["max_seq_len"])
    model, tokenizer = build_tiny_model(tiny, texts, seed=seed, max_seq_len=max_seq_len)
    info = {
        "settings": settings,
        "num_texts": len(texts),
        "tokenizer_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    save_model(model, tokenizer, args.output, extra=info)
    print(
        f"tiny Qwen3 model: {info['num_parameters']:,} parameters, tokenizer of {len(tokenizer)} tokens "
        f"trained on {len(texts)} texts -> {args.output}"
    )
    return 0
