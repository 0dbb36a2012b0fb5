"""What a job measured about its own cost, recorded in its summary's ``measured`` entry for ``plan --pilot``.

An evaluation records the tokens it generated, the seconds generation took, its answers, and the backend; a
training run its tokens, seconds and processes. Both record the study's model (``model.name_or_path``: the base the
study starts from, whichever checkpoint the job loaded), the GPU (``torch.cuda.get_device_name``, and its
``compute.gpu`` catalog name) and the peak GPU memory the caching allocator reserved and allocated in this process
(None on CPU). ``plan --pilot`` counts throughput and memory as measured only where model and GPU are the study's
(``fomaml_math.pilot``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# torch's device names -> compute.gpu (hardware.GPUS); the first match wins, so the specific names come first.
GPU_NAMES = (
    (r"H200", "h200"),
    (r"H100.*PCIe", "h100-pcie"),
    (r"H100", "h100-80gb"),
    (r"A100.*80\s?GB", "a100-80gb"),
    (r"A100", "a100-40gb"),
)


def catalog_gpu(device_name: str | None) -> str | None:
    """The ``compute.gpu`` name of a torch device name ("NVIDIA A100-SXM4-80GB" -> a100-80gb), None if unknown."""
    if not device_name:
        return None
    return next((name for pattern, name in GPU_NAMES if re.search(pattern, device_name, re.IGNORECASE)), None)


def device_facts(device: Any) -> dict[str, Any]:
    """The GPU this process ran on and its peak memory in GiB; all None on a CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"gpu_name": None, "gpu": None, "peak_gpu_memory_gib": None, "peak_gpu_reserved_gib": None}
    name = torch.cuda.get_device_name(device)
    return {
        "gpu_name": name,
        "gpu": catalog_gpu(name),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }


def evaluation(
    infos: Iterable[Mapping[str, Any]], *, model: str, backend: str, max_new_tokens: int, device: Any
) -> dict[str, Any]:
    """An evaluation job's generation cost from its per-(task, repeat) infos (``gen_tokens``, ``generate_s``, ``n``).

    Resumed pieces carry the seconds of the run that produced them, so a resumed job still measures every answer.
    """
    infos = list(infos)
    tokens = sum(int(i.get("gen_tokens", 0)) for i in infos)
    seconds = sum(float(i.get("generate_s", 0.0)) for i in infos)
    answers = sum(int(i.get("n", 0)) for i in infos)
    return {
        "model": model,
        "backend": backend,
        "max_new_tokens": int(max_new_tokens),
        "answers": answers,
        "generated_tokens": tokens,
        "generate_s": seconds,
        "decode_tokens_per_s": tokens / seconds if seconds > 0 else None,
        "mean_generated_tokens": tokens / answers if answers else None,
        **device_facts(device),
    }


def training(*, model: str, tokens: int, seconds: float, processes: int, device: Any) -> dict[str, Any]:
    """A training run's throughput per GPU: its tokens over its wall time (dev monitoring and saves included, so a
    slight underestimate of the training step's own speed) and processes."""
    return {
        "model": model,
        "tokens": int(tokens),
        "seconds": float(seconds),
        "processes": int(processes),
        "tokens_per_s_per_gpu": tokens / seconds / max(processes, 1) if seconds > 0 else None,
        **device_facts(device),
    }
