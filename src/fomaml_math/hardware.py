"""The GPUs a study can name (``compute.gpu``): peak FLOP/s, memory, bandwidth, and decode throughput per backend.

``plan`` prices training and adaptation at ``peak_bf16_tflops`` x MFU, and generation at the configured backend's
decode throughput for a ~4B model on that GPU (``decode_tokens_per_s``). Every figure carries its source; decode
figures are assumptions until a pilot on the study's model and GPU measures them (``fomaml_math.pilot``).

Peak: dense (no 2:4 sparsity) bf16 tensor-core FLOP/s from NVIDIA's datasheets. Memory: what
``torch.cuda.get_device_properties(0).total_memory / 2**30`` reports (the marketing "80 GB" is 80 GiB of HBM less
the driver's reserve: about 79.2 GiB on an 80 GB A100 or H100; the lent H100 here reports about 79 GiB, its H200
about 139.8 GiB).

Usable memory (:func:`usable_memory_gib`, what ``plan`` and the config check size every job against): the card's
memory as torch reports it rounded down to a whole GiB (79.2 -> 79 on an 80 GB card, the old fixed default; 39.4 ->
39; 139.8 -> 139), the rest left to what torch's total counts but its allocator cannot hand out (the CUDA context);
an explicit ``compute.gpu_memory_gib`` overrides it.

Decode throughput, a ~4B model, batched greedy decoding of MATH answers (docs/plan.md, "Throughput"):

* **vllm**: one public offline benchmark of vLLM on one A100 80 GB with a long-answer (reasoning) model of the
  nearest size, DeepSeek-R1-Distill-Qwen-7B: 3,363 output tokens/s at vLLM's default configuration
  (https://www.morphllm.com/vllm-benchmarks, a collection of third-party runs, 2025-2026). Not scaled up for a 4B
  model: ``eval.vllm.gpu_memory_utilization`` gives the engine 0.3 of the card, which caps the concurrent
  sequences near 40 at 2,500 tokens each (Qwen3-4B: 144 KiB of bf16 KV cache per token). Other GPUs: scaled by
  HBM bandwidth (decoding is memory-bound).
* **hf**: the vllm figure / 4. The project's loop batches ``eval.gen_batch_size`` prompts statically (a batch
  decodes until its longest answer stops) with a growing ``DynamicCache``; it sits between Hugging Face TGI
  (vLLM 2.2-2.5x its throughput) and one-request-at-a-time ``transformers`` (vLLM 14-24x; both from the vLLM
  authors' benchmark, https://blog.vllm.ai/2023/06/20/vllm.html). 4 is our assumption, stated as such.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fomaml_math.errors import ConfigError

BACKENDS = ("hf", "vllm")
VLLM_A100_TOKENS_PER_S = 3363.0  # DeepSeek-R1-Distill-Qwen-7B, 1 x A100 80 GB, vLLM default config
VLLM_SOURCE = "vLLM offline benchmark, DeepSeek-R1-Distill-Qwen-7B on 1 x A100 80 GB, 3,363 tokens/s "
VLLM_SOURCE += "(morphllm.com/vllm-benchmarks)"
HF_RATIO = 4.0  # vLLM / the project's static-batch HF loop (assumed; between TGI's 2.2-2.5x and transformers' 14-24x)
HF_SOURCE = "the vllm figure / 4 (our ratio; vLLM is 2.2-2.5x TGI and 14-24x HF transformers, blog.vllm.ai 2023-06-20)"


@dataclass(frozen=True)
class GPU:
    name: str  # compute.gpu
    description: str
    peak_bf16_tflops: float  # dense, no sparsity
    memory_gib: float  # as torch reports total_memory
    bandwidth_tb_s: float  # HBM bandwidth
    source: str  # the datasheet


GPUS = {
    gpu.name: gpu
    for gpu in (
        GPU("a100-40gb", "NVIDIA A100 40 GB SXM", 312.0, 39.4, 1.555,
            "NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 312 TFLOPS bf16 dense, 1,555 GB/s"),
        GPU("a100-80gb", "NVIDIA A100 80 GB SXM", 312.0, 79.2, 2.039,
            "NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 312 TFLOPS bf16 dense, 2,039 GB/s"),
        GPU("h100-80gb", "NVIDIA H100 80 GB SXM", 989.0, 79.2, 3.35,
            "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): 1,979 TFLOPS bf16 with sparsity, "
            "989 dense, 3.35 TB/s"),
        GPU("h100-pcie", "NVIDIA H100 80 GB PCIe", 756.0, 79.2, 2.0,
            "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): 1,513 TFLOPS bf16 with sparsity, "
            "756 dense, 2 TB/s"),
        GPU("h200", "NVIDIA H200 141 GB SXM", 989.0, 139.8, 4.8,
            "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): 1,979 TFLOPS bf16 with sparsity, "
            "989 dense, 4.8 TB/s"),
    )
}  # fmt: skip
DEFAULT_GPU = "a100-80gb"  # the seed study ran on 4 x A100 80 GB


def gpu(name: str) -> GPU:
    """The catalog entry of ``compute.gpu``; a one-line error naming the setting otherwise."""
    if name not in GPUS:
        raise ConfigError(f"compute.gpu: unknown GPU {name!r}; expected one of {', '.join(GPUS)}")
    return GPUS[name]


def usable_memory_gib(compute: Mapping[str, Any]) -> float:
    """One GPU's memory in GiB for the memory estimate and check: ``compute.gpu_memory_gib`` when set, else
    ``compute.gpu``'s memory as torch reports it rounded down to a whole GiB (module docstring)."""
    explicit = compute.get("gpu_memory_gib")
    if explicit is not None:
        return float(explicit)
    return float(math.floor(gpu(str(compute.get("gpu", DEFAULT_GPU))).memory_gib))


@dataclass(frozen=True)
class Decode:
    """Decode throughput of one backend on one GPU, per GPU, for a ~4B model: an assumption with its source."""

    backend: str
    tokens_per_s: float
    source: str
    measured: bool = False


def decode_assumption(name: str, backend: str) -> Decode:
    """The assumed decode tokens/s of ``backend`` on GPU ``name`` (module docstring)."""
    card = gpu(name)
    if backend not in BACKENDS:
        raise ConfigError(f"eval.backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    scale = card.bandwidth_tb_s / GPUS["a100-80gb"].bandwidth_tb_s
    vllm = VLLM_A100_TOKENS_PER_S * scale
    scaled = "" if name == "a100-80gb" else f", x {scale:.2f} for {name}'s HBM bandwidth"
    if backend == "vllm":
        return Decode("vllm", round(vllm, -1), f"{VLLM_SOURCE}{scaled}")
    return Decode("hf", round(vllm / HF_RATIO, -1), f"{HF_SOURCE}{scaled}")
