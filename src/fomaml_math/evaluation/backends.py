"""Which generation backend answers a job's test problems (``eval.backend``): ``hf`` or ``vllm``.

``hf`` is the reference loop on the evaluation's own model (:class:`~.generate.HFBackend`); ``vllm``
is one engine per job (:class:`~.vllm_backend.VLLMBackend`; vLLM itself is imported only then).
"""

from __future__ import annotations

from typing import Any

import torch

from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.generate import HFBackend
from fomaml_math.evaluation.job import JobModel
from fomaml_math.evaluation.settings import EvalSettings
from fomaml_math.evaluation.vllm_backend import VLLMBackend, check_sleep, vllm_settings

BACKENDS: tuple[str, ...] = ("hf", "vllm")  # eval.backend: who generates (hf: the reference loop)


def check_backend(settings: EvalSettings) -> None:
    """Fail on an unknown backend, unknown ``eval.vllm`` keys or sleep mode off a GPU before any model is loaded."""
    if settings.backend not in BACKENDS:
        raise ConfigError(f"eval.backend: expected one of {list(BACKENDS)}, got {settings.backend!r}")
    if settings.backend == "vllm":
        on_gpu = torch.cuda.is_available()  # also ROCm's torch; the engine repeats the check on vLLM's platform
        check_sleep(bool(vllm_settings(settings.eval)["sleep"]), on_gpu, "cuda" if on_gpu else "cpu")


def make_backend(settings: EvalSettings, job: JobModel, model_path: str, *, context_limit: int | None) -> Any:
    """The job's generation backend: the HF loop (``hf``) or one vLLM engine on ``model_path`` (``vllm``)."""
    if settings.backend == "hf":
        return HFBackend(job.autocast)
    return VLLMBackend(
        model_path,
        tokenizer=job.tokenizer,
        model=job.model,
        revision=settings.model.revision_for(model_path),
        trust_remote_code=settings.model.trust_remote_code,
        mixed_precision=job.mixed_precision,
        context_limit=context_limit,
        seed=settings.seed,
        settings=vllm_settings(settings.eval),
    )
