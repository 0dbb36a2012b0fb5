"""Optional generation backend ``eval.backend: vllm``: one vLLM engine per evaluation job.

The engine answers the test problems; adaptation and the gold NLL stay on the Hugging Face model,
and the hand-written loop of :mod:`fomaml_math.evaluation.generate` stays the reference (``hf``).
docs/vllm.md explains the choices; in short:

* **Same inputs, same outputs.** Prompts are the token ids of :func:`~.generate.encode_prompts` (the
  engine never renders or tokenizes: ``skip_tokenizer_init``), greedy decoding (temperature 0),
  ``max_tokens = eval.max_new_tokens``, stop tokens exactly :func:`~.generate.stop_token_ids`
  (``generation_config="vllm"``: the model's ``generation_config.json`` adds nothing), and texts,
  lengths and truncation flags come from :func:`~.generate.generations_from_ids`, as in the HF loop.
* **Adapted weights without a restart.** :meth:`VLLMBackend.load_weights_from` streams the HF
  model's ``state_dict`` through the engine's own in-place reload (the worker's ``reload_weights``,
  vLLM's layer-wise reload: it re-runs each layer's post-load processing, e.g. the CPU build's
  oneDNN weight packing, and copies into the original storage, so CUDA graphs stay valid), then
  drops the prefix cache. That needs the engine core in this process, so the V1 engine's
  multiprocessing is switched off (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as in TRL's colocated mode).
* **Restore.** :func:`~.generate.engine_follows` copies the weights again after the adaptation's
  block has restored the initialisation bitwise, so the engine ends every (task, repeat) holding the
  initialisation (in the engine's dtype: the cast of identical float32 values is identical).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.generate import Generations, check_context, generations_from_ids, stop_token_ids

DTYPES: dict[str, str] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# eval.vllm defaults (the schema repeats them, so a hand-written --settings JSON may omit the block).
DEFAULTS: dict[str, Any] = {
    "dtype": "auto",
    "gpu_memory_utilization": 0.3,
    "max_model_len": None,
    "max_num_seqs": 256,
    "enforce_eager": None,
}


def vllm_settings(ev: Mapping[str, Any]) -> dict[str, Any]:
    """``eval.vllm`` with defaults filled in; unknown keys are a :class:`ConfigError`."""
    given = dict(ev.get("vllm") or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"eval.vllm: unknown setting(s) {unknown} (known: {sorted(DEFAULTS)})")
    return {**DEFAULTS, **given}


def engine_dtype(choice: str, mixed_precision: str) -> str:
    """``auto``: float32 when the evaluation runs in float32 (token-identical to ``hf``), else the autocast dtype."""
    if choice == "auto":
        return {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[mixed_precision]
    if choice not in DTYPES:
        raise ConfigError(f"eval.vllm.dtype: expected auto or one of {sorted(DTYPES)}, got {choice!r}")
    return DTYPES[choice]


def import_vllm() -> Any:
    """Import vLLM with the engine core in this process; a missing install is a one-line :class:`ConfigError`."""
    # Must be set before the engine starts: the in-place weight update calls the worker directly.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as exc:  # also the CPU build against a mismatched torchvision (see docs/vllm.md)
        raise ConfigError(
            f"eval.backend vllm: vLLM is not importable in this environment ({exc}); "
            "use the vLLM environment (make setup-vllm; README 'vLLM backend')"
        ) from exc
    return vllm


class VLLMBackend:
    """A vLLM engine on the model folder ``model_path`` that generates like :class:`~.generate.HFBackend`."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        tokenizer: Any,
        model: Any = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        mixed_precision: str = "no",
        context_limit: int | None = None,
        seed: int = 0,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        options = {**DEFAULTS, **(settings or {})}
        vllm = import_vllm()  # lazy: optional (its own environment) and heavy
        from vllm.platforms import current_platform  # lazy, as import_vllm

        self.dtype = engine_dtype(str(options["dtype"]), mixed_precision)
        self.stop = stop_token_ids(tokenizer, model)
        self.max_model_len = int(options["max_model_len"] or context_limit or 0) or None
        if context_limit is not None and self.max_model_len is not None:
            self.max_model_len = min(self.max_model_len, int(context_limit))
        on_cpu = current_platform.is_cpu()
        eager = on_cpu if options["enforce_eager"] is None else bool(options["enforce_eager"])
        self.engine = vllm.LLM(
            model=str(model_path),
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=self.dtype,
            seed=int(seed),
            max_model_len=self.max_model_len,
            max_num_seqs=int(options["max_num_seqs"]),
            gpu_memory_utilization=float(options["gpu_memory_utilization"]),
            enforce_eager=eager,
            skip_tokenizer_init=True,  # prompts arrive as ids; texts are decoded by our tokenizer
            generation_config="vllm",  # no sampling defaults or extra eos ids from the model folder
            enable_prefix_caching=False,  # a cache computed under other weights must never be reused
        )
        client = type(self.engine.llm_engine.engine_core).__name__
        if client != "InprocClient":
            raise ConfigError(
                f"eval.backend vllm: the engine core runs in another process ({client}); "
                "unset VLLM_ENABLE_V1_MULTIPROCESSING so weights can be updated in place"
            )
        self.weight_updates = 0

    def generate(
        self,
        model: Any,
        tokenizer: Any,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        batch_size: int,
        max_context: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> Generations:
        """Greedy answers, in input order; ``batch_size`` is unused (the engine batches continuously)."""
        from vllm import SamplingParams  # lazy, as import_vllm (and only after it has run)
        from vllm.inputs import TokensPrompt

        del model, batch_size  # the engine holds its own weights (kept in step by load_weights_from)
        if max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens: must be >= 1, got {max_new_tokens}")
        if any(len(ids) == 0 for ids in prompt_ids):
            raise ValueError("generate: empty prompt")
        limits = [v for v in (max_context, self.max_model_len) if v]
        check_context(prompt_ids, max_new_tokens, min(limits) if limits else None, "generation (vllm)")
        if not prompt_ids:
            return generations_from_ids(tokenizer, [], self.stop, [])
        params = SamplingParams(
            temperature=0.0,
            max_tokens=int(max_new_tokens),
            stop_token_ids=list(self.stop),
            detokenize=False,
        )
        outputs = self.engine.generate(
            [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], params, use_tqdm=False
        )
        generated = [list(out.outputs[0].token_ids) for out in outputs]
        if on_batch is not None:
            on_batch(len(prompt_ids))
        return generations_from_ids(tokenizer, generated, self.stop, prompt_ids)

    def load_weights_from(self, model: Any) -> None:
        """Copy ``model``'s current weights (Hugging Face names) into the running engine, in place."""
        weights = ((name, tensor.detach()) for name, tensor in model.state_dict().items())
        self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.engine.reset_prefix_cache()  # disabled anyway; cheap insurance if a caller enables it
        self.weight_updates += 1

    def close(self) -> None:
        """Release the engine (its KV cache and weights)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            del engine
            gc.collect()
