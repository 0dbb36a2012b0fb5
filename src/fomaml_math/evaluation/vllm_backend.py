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
* **Guard.** After the engine starts, after every push and after every wake-up, a checksum of the
  weights the engine serves, computed inside the worker (:func:`engine_checksum`), must equal the same
  checksum of the pushed weights cast to the engine's dtype (:func:`pushed_checksum`); else a one-line
  :class:`StaleEngineError` names the job, task and repeat. Upstream reloads have failed silently
  (vllm#32718; TRL #5312: a reload after wake-up overwrote the synced weights).
* **Sleep** (``eval.vllm.sleep``, CUDA only): the engine sleeps (level 1: weights to host memory, KV
  cache dropped) while the HF model adapts, and wakes before the adapted weights are pushed.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

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
    "sleep": False,
}

# The weight checksum (docs/vllm.md "The weight guard"): the sum, over every element, of a nonlinear hash of
# its bit pattern in the engine's dtype. Integer arithmetic, so it is exact and independent of summation order
# and of layout (vLLM stacks q/k/v and gate/up; the CPU build packs weights): two sets of weights that differ in
# any element give different sums except with a chance of about 1 in 2**31 per check. Changed elements do not
# cancel the way they could in a plain sum of values or bits (an Adam step moves weights by +-lr alike).
_PRIME = 2**31 - 1  # every intermediate stays below 2**62: int64 never overflows
_MIX = (1_103_515_245, 12_345, 740_421_813)
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_CHUNK = 1 << 24  # elements per step: bounds the int64 temporaries (128 MB) on a 4B model


class StaleEngineError(RuntimeError):
    """The engine does not serve the weights last pushed to it (the run must stop: its answers would be wrong)."""


def tensor_checksum(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Checksum of ``tensor``'s elements in ``dtype`` (default: its own), chunk by chunk on its device."""
    flat = tensor.detach().reshape(-1)
    dtype = dtype or flat.dtype
    if dtype not in _BITS:
        raise TypeError(f"weight checksum: unsupported dtype {dtype}")
    mask = (1 << (8 * torch.empty((), dtype=dtype).element_size())) - 1
    total = 0
    for start in range(0, flat.numel(), _CHUNK):
        bits = flat[start : start + _CHUNK].to(dtype).view(_BITS[dtype]).to(torch.int64) & mask
        x = bits % _PRIME
        h = (x * _MIX[0] + _MIX[1]) % _PRIME
        h = (h * h) % _PRIME
        h = (h * _MIX[2] + x) % _PRIME
        total += int(h.sum())
    return total


def pushed_checksum(tensors: Iterable[torch.Tensor], dtype: torch.dtype) -> int:
    """Checksum of the pushed weights cast to the engine's ``dtype``; a tensor shared by two names counts once."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor_checksum(tensor, dtype)
    return total


def _served_weight(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The weight a module computes with. vLLM's CPU build packs a linear layer's weight into a oneDNN (or SGL)
    handle at load time and leaves an empty parameter: there, the layer's own kernel applied to the identity
    returns exactly W^T (one nonzero product per output), the weights the kernel actually reads."""
    linear = getattr(module, "cpu_linear", None)
    packed = weight.numel() == 0  # the parameter left behind is empty (and 1-D)
    if linear is None or (weight.dim() != 2 and not packed):
        return weight
    in_features = int(module.input_size_per_partition) if packed else weight.shape[1]
    eye = torch.eye(in_features, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        served = linear(eye, weight, None).t()
    if not packed and not torch.equal(served, weight):
        return served.new_full(served.shape, float("nan"))  # the kernel's copy and the parameter disagree: poison
    return served


def engine_checksum(worker: Any) -> int:
    """Run inside the worker (``collective_rpc``): the checksum of the weights its model serves, each once."""
    model = worker.model_runner.get_model()
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            weight = _served_weight(module, param)
            vocab = getattr(module, "org_vocab_size", None)
            if vocab is not None and weight.dim() == 2:
                weight = weight[:vocab]  # vocabulary padding rows are the engine's, never pushed
            total += tensor_checksum(weight)
    return total


def vllm_settings(ev: Mapping[str, Any]) -> dict[str, Any]:
    """``eval.vllm`` with defaults filled in; unknown keys are a :class:`ConfigError`."""
    given = dict(ev.get("vllm") or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"eval.vllm: unknown setting(s) {unknown} (known: {sorted(DEFAULTS)})")
    return {**DEFAULTS, **given}


def check_sleep(sleep: bool, on_gpu: bool, device: str) -> None:
    """``eval.vllm.sleep`` needs vLLM's sleep mode, which exists on CUDA (and ROCm) only: elsewhere a one-line error."""
    if sleep and not on_gpu:
        raise ConfigError(
            f"eval.vllm.sleep: vLLM's sleep mode needs a CUDA (or ROCm) GPU, this engine would run on {device}; "
            "set eval.vllm.sleep: false"
        )


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
        self.sleeps = bool(options["sleep"])
        check_sleep(self.sleeps, current_platform.is_cuda_alike(), current_platform.device_type or "cpu")
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
            enable_sleep_mode=self.sleeps,
        )
        client = type(self.engine.llm_engine.engine_core).__name__
        if client != "InprocClient":
            raise ConfigError(
                f"eval.backend vllm: the engine core runs in another process ({client}); "
                "unset VLLM_ENABLE_V1_MULTIPROCESSING so weights can be updated in place"
            )
        self.weight_updates = 0
        self.asleep = False
        self.expected: int | None = None  # checksum of the weights the engine must serve (None: not known)
        if model is not None:  # the engine loaded the folder the HF model came from: same weights
            self.expected = pushed_checksum(model.state_dict().values(), self.torch_dtype)
            self.check_weights(f"at engine start ({model_path})")

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
        self.wake_up("before generation")
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

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def load_weights_from(self, model: Any, where: str = "") -> None:
        """Copy ``model``'s current weights (Hugging Face names) into the running engine, in place, and check
        that the engine serves them (:meth:`check_weights`; ``where`` names the job, task and repeat)."""
        self.wake_up(where)
        state = model.state_dict()
        weights = ((name, tensor.detach()) for name, tensor in state.items())
        self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.engine.reset_prefix_cache()  # disabled anyway; cheap insurance if a caller enables it
        self.weight_updates += 1
        self.expected = pushed_checksum(state.values(), self.torch_dtype)
        self.check_weights(f"after a weight push ({where})" if where else "after a weight push")

    def check_weights(self, when: str) -> None:
        """Stop with :class:`StaleEngineError` unless the engine's weights hash to :attr:`expected`."""
        if self.expected is None:
            return
        served = self.engine.collective_rpc(engine_checksum)
        if any(value != self.expected for value in served):
            raise StaleEngineError(
                f"eval.backend vllm: the engine does not serve the pushed weights {when}: weight checksum "
                f"{served} != {self.expected} (docs/vllm.md 'The weight guard'); its answers would be wrong"
            )

    def sleep(self) -> None:
        """``eval.vllm.sleep``: free the engine's GPU memory (level 1) while the HF model adapts; else nothing."""
        if self.sleeps and not self.asleep:
            self.engine.sleep(level=1)
            self.asleep = True

    def wake_up(self, where: str = "") -> None:
        """Wake a sleeping engine and check that it still serves the last pushed weights."""
        if self.asleep:
            self.engine.wake_up()
            self.asleep = False
            self.check_weights(f"after a wake-up ({where})" if where else "after a wake-up")

    def close(self) -> None:
        """Release the engine (its KV cache and weights)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            del engine
            gc.collect()
