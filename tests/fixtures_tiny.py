"""Tiny offline models and task files for tests (importable as ``tests.fixtures_tiny``).

``make_task_files`` writes ``<root>/<task>/{support,query,dev_pool,dev_monitor,test}.parquet`` with
the columns of docs/architecture.md and the role index ``<root>/roles.parquet``;
``tiny_model_and_tokenizer`` builds an in-memory tiny Qwen3 model (hidden 32, 2 layers) with a BPE
tokenizer trained on those problems; ``tiny_model_dir`` saves one as a Hugging
Face folder that ``fomaml_math.modeling.load_model_and_tokenizer`` loads like a real model.
"""

from __future__ import annotations

import atexit
import copy
import functools
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

TINY: dict[str, int] = {
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
}
TASKS: tuple[str, ...] = ("algebra", "geometry", "number_theory")
SPLIT_SIZES: dict[str, int] = {"support": 12, "query": 12, "dev_pool": 10, "dev_monitor": 6, "test": 8}
_OPS = {"algebra": "+", "geometry": "*", "number_theory": "-", "prealgebra": "+", "precalculus": "*"}


def make_rows(task: str, split: str, n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` arithmetic problems of one task/split in the normalised table's columns (+ ``split``)."""
    rng = random.Random(f"{seed}-{task}-{split}")
    op = _OPS.get(task, "+")
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        value = {"+": a + b, "*": a * b, "-": a - b}[op]
        rows.append(
            {
                "id": f"{task}-{split}-{i:04d}",
                "task": task,
                "source_split": "test" if split == "test" else "train",
                "level": 1 + i % 5,
                "problem": f"Compute ${a} {op} {b}$.",
                "solution": f"We have ${a} {op} {b} = {value}$, so the answer is $\\boxed{{{value}}}$.",
                "answer": str(value),
                "split": split,
            }
        )
    return rows


def make_task_files(
    root: str | Path, tasks: Sequence[str] = TASKS, sizes: dict[str, int] | None = None, *, seed: int = 0
) -> Path:
    """Write tiny ``<root>/<task>/<split>.parquet`` files and ``<root>/roles.parquet``; returns ``root``."""
    root = Path(root)
    roles = []
    for task in tasks:
        for split, n in (sizes or SPLIT_SIZES).items():
            (root / task).mkdir(parents=True, exist_ok=True)
            rows = make_rows(task, split, n, seed=seed)
            pd.DataFrame(rows).to_parquet(root / task / f"{split}.parquet", index=False)
            roles.extend({"id": r["id"], "task": task, "split": split} for r in rows)
    pd.DataFrame(roles, columns=["id", "task", "split"]).to_parquet(root / "roles.parquet", index=False)
    return root


def corpus(tasks: Sequence[str] = TASKS, *, seed: int = 0) -> list[str]:
    texts = []
    for task in tasks:
        for split in ("support", "query"):
            for row in make_rows(task, split, SPLIT_SIZES[split], seed=seed):
                texts.extend((row["problem"], row["solution"]))
    return texts


def tiny_model_and_tokenizer(*, seed: int = 0, tiny: dict[str, int] | None = None) -> tuple[Any, Any]:
    """An in-memory tiny Qwen3 causal LM (float32, random init from ``seed``) and its tokenizer."""
    from fomaml_math.modeling import build_tiny_model

    return build_tiny_model(copy.deepcopy(tiny or TINY), corpus(), seed=seed, max_seq_len=128)


def tiny_model_dir(path: str | Path, *, seed: int = 0, tiny: dict[str, int] | None = None) -> Path:
    """Build and ``save_pretrained`` a tiny model + tokenizer into ``path`` (a loadable HF folder)."""
    from fomaml_math.modeling import save_model

    model, tokenizer = tiny_model_and_tokenizer(seed=seed, tiny=tiny)
    save_model(model, tokenizer, path)
    return Path(path)


def train_settings(model_dir: str | Path, *, method: str = "fomaml", tasks: Sequence[str] = TASKS) -> dict[str, Any]:
    """Settings as ``config.stage_settings`` gives ``train_fomaml`` / ``train_sft``, sized for seconds on CPU."""
    common = {
        "seed": 7,
        "model": {"name_or_path": str(model_dir), "revision": None, "trust_remote_code": False, "max_seq_len": 64},
        "compute": {
            "num_processes": 1,
            "mixed_precision": "no",
            "gradient_checkpointing": False,
            "snapshot_device": "cpu",
            "keep_finished_checkpoints": False,
        },
        "train_tasks": list(tasks),
        "train_seed": 7,
        "wandb": {"mode": "disabled", "project": "fomaml-math", "entity": None},
        "prompt": {"instruction": ""},
        "select": {"criterion": "last", "shots": 4, "draws": 1, "max_monitor_examples": 32},
        "adaptation": {"optimizer": "sgd", "inner_lr": 0.05, "num_inner_steps": 2, "inner_batch_size": 4},
    }
    optim = {
        "weight_decay": 0.0,
        "warmup_steps": 2,
        "lr_schedule": "cosine",
        "max_grad_norm": 1.0,
        "save_freq": 3,
        "test_freq": 3,
        "keep_checkpoints": 2,
    }
    if method == "fomaml":
        fomaml = {
            "total_steps": 6,
            "meta_batch_size": 2,
            "num_inner_steps": 2,
            "inner_lr": 0.05,
            "inner_optimizer": "sgd",
            "inner_batch_size": 4,
            "query_batch_size": 4,
            "outer_lr": 0.003,
            **optim,
        }
        return {**common, "fomaml": fomaml}
    sft = {"budget": "steps", "steps": 6, "batch_size": 4, "lr": 0.003, **optim}
    return {**common, "sft": sft}


@functools.cache
def shared_workspace() -> Path:
    """Task files (``tasks/``) and a saved tiny model (``model/``), built once per test process. Read-only!"""
    root = Path(tempfile.mkdtemp(prefix="fomaml-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    make_task_files(root / "tasks")
    tiny_model_dir(root / "model")
    return root
