"""The set-up every evaluation-like job (``evaluate``, ``calibrate``) shares: device, precision, model.

Weights are loaded in float32 and stay so; ``bf16``/``fp16`` act through ``torch.autocast`` regions
opened per forward pass (:func:`precision_context`), as in training, and only on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fomaml_math.adapt import LossFn, sft_loss_fn
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.settings import ModelSettings
from fomaml_math.modeling import load_model_and_tokenizer

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")  # the stages' --device choices


def pick_device(choice: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when visible, else the CPU; ``cuda`` without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    return torch.device(choice)


def precision_context(
    device: Any, mixed_precision: str, *, cache: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """A fresh autocast context for ``bf16``/``fp16`` (weights stay float32, as in training); else a no-op.

    Open it per forward pass (generation, NLL, and inside the adaptation's loss function), never
    around an adaptation: see :mod:`fomaml_math.adapt`.  ``cache=False`` drops each low-precision
    weight copy after its one use instead of keeping all of them (2 bytes per parameter) until the
    region exits: the same casts, so the same numbers (docs/gpu.md).
    """
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


@dataclass(frozen=True)
class JobModel:
    """The model of one job, on its device, with its tokenizer and the precision its forwards use."""

    model: Any
    tokenizer: Any
    device: torch.device
    mixed_precision: str  # "no" off the GPU, whatever compute.mixed_precision says
    loss_chunk_tokens: int | None = None  # compute.loss_chunk_tokens (the adaptation's chunked loss)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """A fresh mixed-precision context (or a no-op): open one per forward pass."""
        return precision_context(self.device, self.mixed_precision)

    def adapt_autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The adaptation's autocast: without the weight-cast cache.  A forward uses each weight once, so the
        cache saves nothing there, but it would keep every layer's bf16 copy alive to the end of the forward,
        which gradient checkpointing otherwise frees layer by layer (7.5 GiB at 4B parameters)."""
        return precision_context(self.device, self.mixed_precision, cache=False)

    def loss_fn(self) -> LossFn:
        """The adaptation loss (evaluation and tuner): autocast per forward pass, chunked when configured."""
        return sft_loss_fn(self.device, self.adapt_autocast, chunk_tokens=self.loss_chunk_tokens)


def load_job_model(
    model_path: str, model: ModelSettings, *, device: str, mixed_precision: str, memory: Mapping[str, Any] | None = None
) -> JobModel:
    """Load ``model_path`` in float32, move it to ``--device`` and switch off dropout (``eval()``).

    ``memory``: the stage settings' ``adapt_memory`` (``config.adapt_memory``): gradient checkpointing,
    acting in the adaptation's gradient steps only (:func:`fomaml_math.adapt.checkpointing_active`), and
    the chunked loss.
    """
    memory = memory or {}
    loaded, tokenizer = load_model_and_tokenizer(
        model_path,
        revision=model.revision_for(model_path),
        trust_remote_code=model.trust_remote_code,
        dtype=torch.float32,  # float32 weights; bf16/fp16 via autocast, as in training
    )
    where = pick_device(device)
    loaded.to(where)
    loaded.eval()  # no dropout in adaptation either: the same function for every init
    if memory.get("gradient_checkpointing"):
        from fomaml_math.training.optim import enable_gradient_checkpointing  # lazy: training's module

        enable_gradient_checkpointing(loaded)
        loaded.eval()
    precision = mixed_precision if where.type == "cuda" else "no"
    return JobModel(loaded, tokenizer, where, precision, memory.get("loss_chunk_tokens"))
