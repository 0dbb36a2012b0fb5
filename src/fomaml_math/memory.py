"""Peak GPU memory per process of every job kind of a configured study, part by part, before it runs.

An estimate (``plan`` prints it, the config check refuses a job that exceeds the card's usable memory,
``hardware.usable_memory_gib``: ``compute.gpu_memory_gib``, else ``compute.gpu``'s), not a
measurement: tests/test_memory_model.py checks the parts a CPU can measure against torch's allocations of
scaled Qwen3 shapes (within 15%); docs/gpu.md lists what only a GPU can measure.

Parts (bytes; N parameters, L layers, h hidden, i intermediate, V vocab, q = heads x head_dim, kv = kv heads x
head_dim, n rows x T tokens of one micro-batch):

* weights 4N (float32, as loaded); gradients 4N (micro-batches accumulate in place in ``.grad``: one buffer);
  optimizer state 8N for Adam's two float32 moments, 0 for SGD; snapshot 4N when ``snapshot_device: same``.
* weight casts (bf16/fp16 autocast, GPU only): 2N while the forward's casts are alive.  Without checkpointing they
  are saved for the backward pass; with checkpointing and the adaptation's cache-less autocast only the output
  layer's copy stays (2Vh), or none with the chunked loss, which recomputes it per chunk.
* activations saved for backward, counted from the tensors Qwen3's decoder layer saves (float32, SDPA):
  per token and layer ``6h + 4i + 4q + 4kv + 2 heads + kv heads + 2`` elements, plus ``2h`` for the final norm;
  with checkpointing ``h`` per layer (the layer input) plus one layer recomputed in the backward pass.  The
  backward's peak over these (gradient temporaries included) is within 15% of them on CPU, in float32.
  Under autocast the linear layers' inputs are saved as extra half-precision copies (``5h`` x 2 bytes per
  layer, an upper-bound reading; unmeasured).
* logits and loss: the log-softmax of the selected logits and its gradient at the start of the backward pass,
  ``2 x targets x V x 4`` in float32 (targets up to n x (T - 1)), ``3 x`` under autocast (the float32 copy of
  the half-precision logits); with ``compute.loss_chunk_tokens`` one chunk's plus the output layer's
  weight-gradient transient (:func:`logits_bytes`).
* KV cache of the HF generation: ``gen_batch_size x (prompt + max_new_tokens) x 2 L kv x bytes``, the prompt
  taken at ``model.max_seq_len`` (the longest a row may be; ``in_context`` adds k assumed 350-token worked
  examples); generation runs with the casts cached (2N).
* the vLLM engine: ``eval.vllm.gpu_memory_utilization x card`` while awake beside the adapting model; 2 GiB while
  asleep (``eval.vllm.sleep``; vLLM's level-1 sleep: an assumed residual of ``ASLEEP_ENGINE_GIB``, unmeasured).

Worst case over the configured k (every k > inner_batch_size accumulates the same micro-batch), rows of
``model.max_seq_len`` tokens, and both generation backends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fomaml_math import hardware

GiB = 1024**3
MARGIN = 0.9  # the share of the card a job may plan to use (allocator fragmentation, CUDA context, kernels)
# What a vLLM engine asleep at level 1 still holds (weights offloaded, KV cache freed): its CUDA context, CUDA graph
# pools and buffers. Assumed, not measured (no GPU was lent); vLLM documents what is freed, not what remains.
ASLEEP_ENGINE_GIB = 2.0
IN_CONTEXT_EXAMPLE_TOKENS = 350  # plan.DEFAULT_EXAMPLE_TOKENS (an assumption; plan imports this module)


@dataclass(frozen=True)
class Shape:
    """What the model needs of an architecture."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = True

    @classmethod
    def of(cls, arch: Mapping[str, Any], params: int) -> Shape:
        heads = int(arch["num_attention_heads"])
        return cls(params, int(arch["num_hidden_layers"]), int(arch["hidden_size"]), int(arch["intermediate_size"]),
                   int(arch["vocab_size"]), heads, int(arch["num_key_value_heads"]),
                   int(arch.get("head_dim") or int(arch["hidden_size"]) // heads),
                   bool(arch.get("tie_word_embeddings", True)))  # fmt: skip

    @property
    def layer_params(self) -> int:
        return (self.params - self.vocab * self.hidden * (1 if self.tied else 2)) // max(self.layers, 1)


def layer_activation_elements(s: Shape) -> int:
    """Elements per token one decoder layer saves for backward (float32, SDPA; counted from torch's saved tensors)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return 6 * s.hidden + 4 * s.intermediate + 4 * q + 4 * kv + 2 * s.heads + s.kv_heads + 2


def activation_bytes(s: Shape, rows: int, tokens: int, *, checkpointing: bool, half: bool) -> int:
    """Saved activations of one forward over ``rows x tokens`` (the decoder's, not the logits)."""
    per_layer = layer_activation_elements(s) * 4 + (5 * s.hidden * 2 if half else 0)
    n = rows * tokens
    if checkpointing:  # each layer's input, and one layer's activations recomputed in the backward
        return n * (s.layers * s.hidden * 4 + per_layer + 2 * s.hidden * 4)
    return n * (s.layers * per_layer + 2 * s.hidden * 4)


def logits_bytes(s: Shape, targets: int, chunk: int | None, *, half: bool = True) -> int:
    """The loss part's peak at the backward's start.

    Whole (float32, measured on CPU within 15%): the log-softmax and its gradient, ``2 x targets x V x 4``;
    under autocast also the float32 copy of the half-precision logits (``3 x``, unmeasured).  Chunked: one
    chunk's, plus the gathered hidden states and the output layer's weight-gradient transient of each chunk's
    recomputation (``V x h x 4``; the CPU measures more than this sum at tiny shapes: unvalidated, docs/gpu.md).
    """
    if chunk:
        return 3 * min(targets, chunk) * s.vocab * 4 + targets * s.hidden * 4 + s.vocab * s.hidden * 4
    return (3 if half else 2) * targets * s.vocab * 4


def kv_cache_bytes(s: Shape, batch: int, tokens: int, *, half: bool) -> int:
    return batch * tokens * 2 * s.layers * s.kv_heads * s.head_dim * (2 if half else 4)


@dataclass
class JobEstimate:
    """One job kind's peak per process (GiB) and the parts of its largest phase."""

    kind: str
    parts: dict[str, float]  # GiB
    phase: str
    backend: str = "hf"
    assumed: bool = False  # rests on an assumed length (in_context prompts): a warning, never a refusal

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def setting(self, limit: float) -> str:
        """The setting of the largest part that can shrink, or the card when that part is smaller than the excess
        over ``limit`` (GiB)."""
        if self.kind.startswith("train"):
            return "compute.accelerate_config (FSDP over more processes) or compute.gradient_checkpointing"
        levers = {
            "activations": "compute.gradient_checkpointing or eval.inner_batch_size",
            "logits and loss": "compute.loss_chunk_tokens",
            "weight casts": "compute.gradient_checkpointing",
            "kv cache": "calibration.gen_batch_size" if self.kind == "calibrate" else "eval.gen_batch_size",
            "vllm engine": "eval.vllm.sleep or eval.vllm.gpu_memory_utilization",
        }
        largest = max(levers, key=lambda part: self.parts.get(part, 0.0))
        if self.parts.get(largest, 0.0) < self.total - limit:
            return "compute.gpu or compute.gpu_memory_gib (a larger card) or eval.optimizer sgd (no moments)"
        return levers[largest]


def _gib(parts: Mapping[str, float]) -> dict[str, float]:
    return {k: v / GiB for k, v in parts.items()}


def _accelerate(config: Mapping[str, Any]) -> tuple[bool, int]:
    """(sharded with FSDP, processes) of the training jobs' accelerate config."""
    processes = int(config["compute"]["num_processes"])
    path = config["compute"].get("accelerate_config")
    if not path or not Path(path).is_file():
        return False, processes
    accelerate = yaml.safe_load(Path(path).read_text()) or {}
    return accelerate.get("distributed_type") == "FSDP", processes


def adaptation_parts(
    s: Shape, *, rows: int, tokens: int, optimizer: str, checkpointing: bool, half: bool, chunk: int | None,
    snapshot_same: bool,
) -> dict[str, float]:  # fmt: skip
    """One adaptation step of an evaluation-like job (bytes): the peak at the start of the backward pass."""
    n = s.params
    # with checkpointing only the output layer's copy stays (saved outside the checkpoints), none when chunked
    casts = (0 if chunk else 2 * s.vocab * s.hidden) if checkpointing else 2 * n
    return {
        "weights": 4 * n,
        "gradients": 4 * n,
        "optimizer state": 8 * n if optimizer == "adam" else 0,
        "snapshot": 4 * n if snapshot_same else 0,
        "weight casts": casts if half else 0,
        "activations": activation_bytes(s, rows, tokens, checkpointing=checkpointing, half=half),
        "logits and loss": logits_bytes(s, rows * (tokens - 1), chunk, half=half),
    }


def generation_parts(s: Shape, *, batch: int, tokens: int, half: bool, optimizer_state: bool) -> dict[str, float]:
    """The HF generation (bytes): weights, cached casts, KV cache, a step's logits; Adam's moments when it runs
    inside an adaptation (the tuner grades between steps)."""
    n = s.params
    return {
        "weights": 4 * n,
        "optimizer state": 8 * n if optimizer_state else 0,
        "weight casts": 2 * n if half else 0,
        "kv cache": kv_cache_bytes(s, batch, tokens, half=half),
        "logits and loss": 2 * batch * s.vocab * 4,
    }


def _asleep(ev: Mapping[str, Any]) -> bool:
    """Whether the vLLM engine sleeps while the model adapts (``eval.vllm.sleep``)."""
    return bool((ev.get("vllm") or {}).get("sleep", False))


def estimate(config: Mapping[str, Any], s: Shape) -> list[JobEstimate]:
    """Every job kind's worst case (largest phase; both backends for the evaluation kinds)."""
    compute, ev, model = config["compute"], config["eval"], config["model"]
    half = compute["mixed_precision"] != "no"
    ckpt = bool(compute["gradient_checkpointing"])
    chunk = compute.get("loss_chunk_tokens")
    seq = int(model["max_seq_len"])
    card = hardware.usable_memory_gib(compute) * GiB
    shots = [int(k) for k in ev["shots"] if int(k) > 0]
    finetune = ev["mode"] == "finetune" and bool(shots)
    rows = min(int(ev["inner_batch_size"]), max(shots, default=1))
    # The prompt: at most a row (finetune); in_context adds k worked examples, whose length no setting bounds
    # (assumed at plan's 350 tokens per MATH example).
    in_context = ev["mode"] != "finetune"
    demonstrations = max(shots, default=0) * IN_CONTEXT_EXAMPLE_TOKENS if in_context else 0
    gen_tokens = seq + demonstrations + int(ev["max_new_tokens"])
    adapt = dict(rows=rows, tokens=seq, optimizer=str(ev["optimizer"]), checkpointing=ckpt, half=half, chunk=chunk,
                 snapshot_same=False)  # fmt: skip
    out: list[JobEstimate] = []

    def adapt_or_zero(**kw: Any) -> dict[str, float]:
        return adaptation_parts(s, **{**adapt, **kw}) if finetune else {"weights": 4 * s.params}

    # evaluate: the adaptation, then generation (HF) after the inner loop's moments are gone; vLLM: the engine
    for backend in ("hf", "vllm"):
        step = adapt_or_zero()
        if backend == "hf":
            gen = generation_parts(s, batch=int(ev["gen_batch_size"]), tokens=gen_tokens, half=half,
                                   optimizer_state=False)  # fmt: skip
            parts, phase = max((step, "adaptation"), (gen, "generation"), key=lambda x: sum(x[0].values()))
        else:
            share = float((ev.get("vllm") or {}).get("gpu_memory_utilization", 0.3)) * card
            parts, phase = {**step, "vllm engine": ASLEEP_ENGINE_GIB * GiB if _asleep(ev) else share}, "adaptation"
        for kind in ("evaluate", "negative control"):
            out.append(JobEstimate(kind, _gib(parts), phase, backend, assumed=phase == "generation" and in_context))
        if ev.get("metaloop_row") and finetune:  # the secondary row exists in finetune mode only
            fo = config["fomaml"]
            loop = adapt_or_zero(rows=min(int(fo["inner_batch_size"]), max(shots, default=1)),
                                 optimizer=str(fo["inner_optimizer"]), chunk=chunk)  # fmt: skip
            if backend == "hf":
                loop_parts = max(loop, gen, key=lambda x: sum(x.values()))
            else:
                loop_parts = {**loop, "vllm engine": parts["vllm engine"]}
            out.append(JobEstimate("meta-training inner loop row", _gib(loop_parts), phase, backend))
    # calibrate (the tuner): HF generation between the adaptation's steps, beside Adam's moments
    cal = config["calibration"]
    if cal["enabled"] and finetune:
        cal_batch = int(cal.get("gen_batch_size") or ev["gen_batch_size"])
        step = adapt_or_zero()
        gen = generation_parts(s, batch=cal_batch, tokens=gen_tokens, half=half,
                               optimizer_state=str(ev["optimizer"]) == "adam")  # fmt: skip
        parts, phase = max((step, "adaptation"), (gen, "generation"), key=lambda x: sum(x[0].values()))
        out.append(JobEstimate("calibrate", _gib(parts), phase))
    out += _training(config, s, half=half, ckpt=ckpt, seq=seq)
    return out


def _training(config: Mapping[str, Any], s: Shape, *, half: bool, ckpt: bool, seq: int) -> list[JobEstimate]:
    """FOMAML and SFT under the accelerate config: FSDP shards weights, gradients and optimizer states over the
    processes (each takes 1/P of every batch's rows); otherwise every process holds everything."""
    sharded, processes = _accelerate(config)
    share = processes if sharded else 1
    n = s.params
    snapshot_same = config["compute"]["snapshot_device"] == "same"
    fo, sft = config["fomaml"], config["sft"]
    out = []
    for method in ("fomaml", "sft"):
        rows = int(fo["inner_batch_size"] if method == "fomaml" else sft["batch_size"])
        if method == "fomaml":
            rows = max(rows, int(fo["query_batch_size"]))
        rows = max(1, -(-rows // share)) if sharded else rows
        parts = {
            "weights": 4 * n / share,
            "gradients": 4 * n / share * (2 if method == "fomaml" else 1),  # FOMAML: the meta-gradient, set aside
            "optimizer state": 8 * n / share
            + (8 * n / share if method == "fomaml" and fo["inner_optimizer"] == "adam" else 0),
            "snapshot": 4 * n / share if method == "fomaml" and snapshot_same else 0,
            # FSDP: the all-gathered low-precision root (embedding/output layer) and two layers, weights and
            # gradients; unsharded with accelerate's autocast: every cast until the forward ends
            "weight casts": (2 * 2 * (s.vocab * s.hidden + 2 * s.layer_params) if sharded else 2 * n) if half else 0,
            "activations": activation_bytes(s, rows, seq, checkpointing=ckpt, half=half),
            "logits and loss": logits_bytes(s, rows * (seq - 1), None, half=half),
        }
        out.append(JobEstimate(f"train {method}", _gib(parts), "meta-step" if method == "fomaml" else "step"))
    return out


def host_ram_gib(config: Mapping[str, Any], s: Shape) -> float:
    """Host RAM per node: each evaluation job's float32 load (before it moves to the GPU) and pinned snapshot;
    as many jobs as the node's GPUs hold; or a training job's per-process loads."""
    gpus = max(int(config["compute"]["gpus"]), 1)
    per_job = max(int(config["compute"]["eval_gpus_per_job"]), 1)
    evaluation = (gpus // per_job) * 8 * s.params
    sharded, processes = _accelerate(config)
    training = processes * 4 * s.params + 4 * s.params / (processes if sharded else 1) * processes
    return max(evaluation, training) / GiB


def summary(config: Mapping[str, Any], s: Shape) -> dict[str, Any]:
    """``memory_gib`` (worst per job kind over backends), the card, host RAM and the per-part table."""
    jobs = estimate(config, s)
    worst: dict[str, JobEstimate] = {}
    for job in jobs:
        if job.kind not in worst or job.total > worst[job.kind].total:
            worst[job.kind] = job
    return {
        "memory_gib": {kind: round(job.total, 2) for kind, job in worst.items()},
        "gpu_memory_gib": hardware.usable_memory_gib(config["compute"]),
        "host_ram_gib_per_node": round(host_ram_gib(config, s), 1),
        "vllm_asleep": _asleep(config["eval"]),
        "memory_parts_gib": [
            {
                "job": j.kind,
                "backend": j.backend,
                "phase": j.phase,
                "total": round(j.total, 2),
                **{k: round(v, 2) for k, v in j.parts.items()},
            }
            for j in jobs
        ],
    }


def problems(config: Mapping[str, Any], s: Shape) -> tuple[list[str], list[str]]:
    """(errors, warnings): a job of the configured backend over the card is an error; over the margin, or over the
    card only with the other backend, a warning."""
    card = hardware.usable_memory_gib(config["compute"])
    # the setting the card's size comes from: compute.gpu's catalog entry unless compute.gpu_memory_gib is set
    source = "compute.gpu" if config["compute"].get("gpu_memory_gib") is None else "compute.gpu_memory_gib"
    backend = str(config["eval"].get("backend", "hf"))
    errors, warnings = [], []
    for job in estimate(config, s):
        where = f"{job.kind} ({job.backend}, {job.phase})"
        if job.total > card and job.backend == backend and not job.assumed:
            errors.append(f"{source}: {where} needs about {job.total:.1f} GiB per GPU, more than the card's "
                          f"{card:g}; change {job.setting(card)} (docs/gpu.md)")  # fmt: skip
        elif job.total > MARGIN * card:
            other = "" if job.backend == backend else f" with eval.backend {job.backend}"
            other += " (in_context prompts of assumed length)" if job.assumed else ""
            warnings.append(f"memory: {where} needs about {job.total:.1f} GiB{other}, over {MARGIN:.0%} of the "
                            f"{card:g} GiB card; change {job.setting(MARGIN * card)} (docs/gpu.md)")  # fmt: skip
    return errors, warnings


def render(section: Mapping[str, Any]) -> str:
    card = section["gpu_memory_gib"]
    names = ["weights", "gradients", "optimizer state", "snapshot", "weight casts", "activations", "logits and loss",
             "kv cache", "vllm engine"]  # fmt: skip
    short = ["weights", "grads", "optim", "snap", "casts", "acts", "logits", "kv", "engine"]
    lines = [
        f"GPU memory per process (GiB, estimate; card {card:g}, limit {MARGIN:.0%} = {MARGIN * card:.1f}):",
        f"  {'job':<30} {'backend':<7} {'phase':<10} " + " ".join(f"{n:>7}" for n in short) + f" {'total':>7}",
    ]
    for row in section["memory_parts_gib"]:
        flag = "  OVER" if row["total"] > card else ("  >90%" if row["total"] > MARGIN * card else "")
        lines.append(
            f"  {row['job']:<30} {row['backend']:<7} {row['phase']:<10} "
            + " ".join(f"{row.get(n, 0.0):>7.1f}" for n in names)
            + f" {row['total']:>7.1f}{flag}"
        )
    if section.get("vllm_asleep"):
        lines.append(f"  vllm engine asleep while adapting (eval.vllm.sleep): {ASLEEP_ENGINE_GIB:g} GiB, an assumed "
                     "residual, unmeasured (docs/gpu.md)")  # fmt: skip
    lines.append(f"  host RAM per node: about {section['host_ram_gib_per_node']:.0f} GiB")
    return "\n".join(lines) + "\n"
