"""The prepared GPU check (issue 13): one command that measures the paper's training path on one lent GPU.

    python bench/gpu_check.py --out DIR                         # a CUDA machine: about 5 minutes on an H200
    python bench/gpu_check.py --device cpu --quick --out DIR    # the same code on a tiny config (CI, < 1 minute)
    make gpu-check OUT=DIR [ARGS="--budget-s 200"]

It runs with the lent machine's preinstalled stack (torch 2.11, transformers 5.17, accelerate 1.15; no
snakemake, math-verify, wandb, datasets or jsonschema) and imports the package from ``src/`` next to it.
``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` are rewritten after every section (and inside the long
ones), so a run cut short still returns what it measured; every section is in both files from the start
(``pending`` until it runs).  Each section is independent: an exception is recorded with the tail of its
traceback and the next section runs.

Sections (README "Performance: the GPU check" says how to read them):

1. bf16 adaptation correctness: the training inner loop (``loss_fn_for`` with a bf16-autocast Runtime) and
   an evaluation-style loop (``adapted`` + a loss that opens ``torch.autocast`` per forward, over
   ``MicroBatches``) against a float32 reference: support losses change step to step on a repeated batch,
   the adapted weights' update is within bf16 tolerance, restore is bitwise; plus a control with autocast
   around the whole inner loop (today's evaluation), whose stale weight-cast cache the check must see.
2. FOMAML meta-step vs SFT step on a randomly initialised Qwen3 of paper-like shape (about 1.1B parameters,
   2k tokens per row, sdpa attention, gradient checkpointing on and off): tokens/s, MFU, and the targets
   P1 (meta-step / the same forward+backward passes in a bare loop, <= 1.10), P2 (FOMAML's peak memory
   minus SFT's, in parameter-bytes, <= 1.2, for ``snapshot_device`` cpu and same) and P3 (ours / the
   seed-style clone loop of ``bench_fomaml.py``: time <= 0.8, memory <= 0.6).
3. The 4B estimate: the paper config's 5000 meta-steps projected on 4 x H200 and 4 x A100 from the measured
   MFU (assumptions printed), a memory estimate of Qwen3-4B's real shape on one H200, and, if the budget
   allows, one real meta-step at that shape with random weights.
4. Generation: the HF greedy loop (``generate_greedy``) at batch 1, 8, 32, 64 with ``max_new_tokens`` 512.
5. Single-process FSDP2: ``fully_shard`` through the project's fsdp training path (same meta-gradient as the
   unsharded model, a meta-step, a checkpoint save/load).  Multi-GPU paths remain untested.
6. The GPU slot allocator (``fomaml_math.devices``) with real ``CUDA_VISIBLE_DEVICES``.
7. FOMAML's configured inner loop (``--config``, default the paper config: ``fomaml.inner_optimizer``,
   ``inner_lr``, ``num_inner_steps``, ``inner_batch_size``) at Qwen3-4B's shape (random weights, synthetic
   MATH-like rows of one task): the relative weight change ``||dw|| / ||w||``, the largest per-weight change,
   and the support and held-out NLL before and after the inner loop, beside the other optimizer at the same
   rate for contrast; the evidence for choosing the paper's inner loop (``--quick``: the tiny shape).
8. Evaluation memory (issue 27): one evaluation adaptation as ``evaluate`` runs it, with the config's settings
   (``eval.optimizer``, ``inner_batch_size``, ``compute.gradient_checkpointing``, ``loss_chunk_tokens``,
   ``mixed_precision``) at k = 50 on rows of ``model.max_seq_len`` tokens at Qwen3-4B's shape (random weights),
   then one generation batch of ``eval.gen_batch_size``: the measured CUDA peak beside ``fomaml_math.memory``'s
   estimate, part by part.  At most 3 minutes: one inner step (the peak is reached at the first step's second
   micro-batch; Adam's moments exist from the start) and as many new tokens as the budget allows (the estimate is
   taken at the same length).  ``--quick`` / CPU: the tiny shape, the code path only (no CUDA peak to read).

FLOPs (model FLOPs, as in MFU; gradient-checkpointing recompute is not counted): a training pass over a row of
``s`` tokens costs ``6 * N * s + 6 * L * H * d_head * s**2``.  ``N`` counts the weights of every matrix
multiply (attention q/k/v/o and MLP of each layer, plus the LM head ``V * d`` once although it is tied to the
embedding, whose lookup costs nothing); the second term is causal attention (QK^T and AV, ``2 * 2 * s**2 / 2 *
H * d_head`` forward per layer, x3 for forward + backward; PaLM's ``12 * L * H * Q * T`` counts the full
square, twice ours).  MFU = FLOPs / time / peak, with the peak named: H200 dense bf16 790 TFLOP/s measured on
the lent machine (8192^3 bf16 matmul), 990 TFLOP/s datasheet; A100 312 TFLOP/s datasheet.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT / "src")):  # the package from this checkout (no install on the lent machine)
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_fomaml  # noqa: E402  (BenchRuntime, the seed-style loop, memory measurement, synthetic task data)
import torch  # noqa: E402

import fomaml_math  # noqa: E402
from fomaml_math import devices  # noqa: E402
from fomaml_math.adapt import MicroBatches, WeightSnapshot, adapted, sft_loss_fn, trainable_parameters  # noqa: E402
from fomaml_math.batching import EncodedExample, SFTBatch, collate, encode_example, summed_nll  # noqa: E402
from fomaml_math.data.synthetic import generate_synthetic  # noqa: E402
from fomaml_math.evaluation.generate import generate_greedy, stop_token_ids  # noqa: E402
from fomaml_math.evaluation.job import precision_context  # noqa: E402
from fomaml_math.io import write_json, write_text  # noqa: E402
from fomaml_math.modeling import build_tiny_model  # noqa: E402
from fomaml_math.subjects import MATH_TASKS  # noqa: E402
from fomaml_math.training import checkpoint  # noqa: E402
from fomaml_math.training.fomaml import Episode, accumulate_meta_gradient, meta_step  # noqa: E402
from fomaml_math.training.optim import clip_and_norm, make_optimizer, prepare_training  # noqa: E402
from fomaml_math.training.runtime import Runtime, loss_fn_for  # noqa: E402
from fomaml_math.training.sft import sft_step  # noqa: E402

BenchRuntime = bench_fomaml.BenchRuntime
GiB = 1 << 30
SHAPE_4B = json.loads((Path(fomaml_math.__file__).parent / "resources" / "qwen3_4b_instruct_2507.json").read_text())
BLOCKED_ON_DEVICE = ("snakemake", "math_verify", "wandb", "datasets", "jsonschema")
# Dense bf16 peaks in FLOP/s: "measured" is the lent H200's 8192^3 bf16 matmul (device library KINDS.md).
PEAKS = {
    "H200": {"measured": 790e12, "datasheet": 990e12},
    "H100": {"datasheet": 990e12},
    "A100": {"datasheet": 312e12},
}
TARGETS = {"P1": 1.10, "P2": 1.2, "P3_time": 0.8, "P3_memory": 0.6}
SEED_STEPS_PER_HOUR = (10, 12)  # the seed trainer on 4 x A100 (issue 13)

# Shares of the global budget; a section's budget is its share of what is left (leftovers flow on).
SECTIONS: list[tuple[str, str, float]] = [
    ("1_bf16_adaptation", "bf16 adaptation correctness", 0.05),
    ("2_meta_step_vs_sft", "FOMAML meta-step vs SFT step", 0.42),
    ("3_estimate_4b", "The 4B estimate", 0.17),
    ("4_generation", "HF greedy generation", 0.21),
    ("5_fsdp2_single", "Single-process FSDP2 smoke", 0.10),
    ("6_slot_allocator", "GPU slot allocator", 0.05),
    ("7_inner_loop", "FOMAML inner loop: weight and NLL change", 0.10),
    ("8_eval_memory", "Evaluation memory: measured peak vs plan's estimate", 0.30),
]
EVAL_MEMORY_MAX_S = 180.0  # issue 27: at most 3 of the lent machine's 15 minutes


# --------------------------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    """Every size the check uses; ``--quick`` swaps in :func:`quick_sizes`."""

    perf: dict[str, int] = field(
        default_factory=lambda: {  # Qwen3-1.7B's widths with 16 layers: 1.1B parameters
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 16,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
        }
    )
    small: dict[str, int] = field(
        default_factory=lambda: {  # sections 1 and 5
            "vocab_size": 1024,
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
        }
    )
    seq_len: int = 2048  # tokens per row in section 2 (all rows full: no padding)
    prompt_len: int = 256  # untrained prompt tokens per row; also the generation prompt length
    meta_batch: int = 4  # the paper's meta-batch and inner steps
    inner_steps: int = 5
    inner_batch: int = 2  # rows per support / query / SFT batch in section 2
    query_batch: int = 2
    timed_steps: int = 2
    small_seq_len: int = 256
    gen_batches: tuple[int, ...] = (1, 8, 32, 64)
    gen_new_tokens: int = 512
    paper_rows_tokens: int = 625  # assumed tokens per MATH row (docs/training.md: ~60k per 96-row meta-step)
    run_4b: bool = True  # section 3's real-shape meta-step (CUDA only)


def quick_sizes() -> Sizes:
    tiny = {
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    return Sizes(
        perf=dict(tiny),
        small=dict(tiny),
        seq_len=64,
        prompt_len=16,
        meta_batch=2,
        inner_steps=3,
        timed_steps=1,
        small_seq_len=96,
        gen_new_tokens=8,
        run_4b=False,
    )


# --------------------------------------------------------------------------------------- report


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null, tuples lists, unknown objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


@dataclass
class Section:
    key: str
    title: str
    status: str = "pending"  # pending | running | ok | fail | skipped | error
    seconds: float | None = None
    budget_s: float | None = None
    results: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)  # correctness: decides ok / fail
    targets: list[dict[str, Any]] = field(default_factory=list)  # performance goals: reported, not a failure
    skipped: list[str] = field(default_factory=list)  # "what: why" of parts that did not run
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # tracebacks (tail) of parts that raised

    def check(self, name: str, passed: bool, value: Any = None, expected: str = "") -> bool:
        self.checks.append({"name": name, "passed": bool(passed), "value": value, "expected": expected})
        return bool(passed)

    def target(self, name: str, value: float | None, limit: float, what: str) -> None:
        passed = value is not None and math.isfinite(value) and value <= limit
        self.targets.append({"name": name, "value": value, "limit": limit, "passed": passed, "what": what})

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")

    def record_error(self, what: str) -> None:
        tail = "".join(traceback.format_exc().splitlines(keepends=True)[-12:])
        self.errors.append(f"{what}: {tail}")


class Report:
    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.meta = meta
        self.sections = {key: Section(key, title) for key, title, _ in SECTIONS}

    def write(self) -> None:
        data = {"meta": self.meta, "sections": {k: vars(s) for k, s in self.sections.items()}}
        write_json(self.out / "gpu_check.json", _clean(data))
        write_text(self.out / "gpu_check.md", self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [
            "# GPU check",
            "",
            f"- device: {m['device']} ({m.get('device_name', '')}); quick: {m['quick']}; budget {m['budget_s']:.0f} s",
            f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
            f"- packages absent as on the lent machine: {m['absent_packages']}",
            f"- compat: {m['compat']}",
            "",
            "## Targets",
            "",
        ]
        targets = [t for s in self.sections.values() for t in s.targets]
        for t in targets:
            value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            verdict = "PASS" if t["passed"] else "FAIL"
            lines.append(f"- {t['name']}: {value} (target <= {t['limit']}) **{verdict}** - {t['what']}")
        if not targets:
            lines.append("- none measured yet")
        for index, section in enumerate(self.sections.values(), start=1):
            took = "" if section.seconds is None else f", {section.seconds:.1f} s of {section.budget_s or 0:.0f} s"
            lines += ["", f"## {index}. {section.title}: {section.status}{took}", ""]
            for c in section.checks:
                mark = "x" if c["passed"] else " "
                lines.append(
                    f"- [{mark}] {c['name']}: {_short(c['value'])}" + (f" ({c['expected']})" if c["expected"] else "")
                )
            for s in section.skipped:
                lines.append(f"- skipped: {s}")
            for n in section.notes:
                lines.append(f"- note: {n}")
            if section.results:
                lines += ["", "```json", json.dumps(_clean(section.results), indent=1, sort_keys=True), "```"]
            for e in section.errors:
                lines += ["", "```text", e.rstrip(), "```"]
        return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(_short(v) for v in value[:8])}, ...]"
    if isinstance(value, list):
        return f"[{', '.join(_short(v) for v in value)}]"
    return str(value)


class SkipSection(Exception):
    """The whole section cannot run here (e.g. it needs CUDA)."""


@dataclass
class Deadline:
    end: float

    def left(self) -> float:
        return self.end - time.perf_counter()

    def has(self, seconds: float) -> bool:
        return self.left() >= seconds


# --------------------------------------------------------------------------------------- shared helpers


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    amp: torch.dtype | None
    report: Report
    shared: dict[str, Any] = field(default_factory=dict)  # results later sections use (the perf model, MFU)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def runtime(self, amp: torch.dtype | None = None, mode: str = "task") -> Runtime:
        return BenchRuntime(None, mode, 1, 0, 1, self.device, amp)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def corpus_texts() -> list[str]:
    rows = generate_synthetic(MATH_TASKS, 24, seed=0)
    return [t for r in rows for t in (r["problem"], r["solution"])]


def build_model(shape: dict[str, int], device: torch.device, seq_len: int) -> tuple[Any, Any]:
    """The project's tiny-Qwen3 construction at ``shape``, weights created (randomly) directly on ``device``."""
    with torch.device(device):
        model, tokenizer = build_tiny_model(shape, corpus_texts(), seed=0, max_seq_len=seq_len)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    model.config.use_cache = False
    return model, tokenizer


def shape_of(model: Any) -> dict[str, int]:
    c = model.config
    return {
        "vocab_size": int(c.vocab_size),
        "hidden_size": int(c.hidden_size),
        "intermediate_size": int(c.intermediate_size),
        "num_hidden_layers": int(c.num_hidden_layers),
        "num_attention_heads": int(c.num_attention_heads),
        "num_key_value_heads": int(c.num_key_value_heads),
        "head_dim": int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads),
    }


def matmul_params(shape: dict[str, int]) -> int:
    """Weights in matrix multiplies per token: attention q/k/v/o and MLP per layer, plus the LM head."""
    d, heads, kv, hd = (
        shape["hidden_size"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        shape["head_dim"],
    )
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * shape["intermediate_size"]
    return shape["num_hidden_layers"] * per_layer + shape["vocab_size"] * d


def total_params(shape: dict[str, int]) -> int:
    """All parameters of a tied-embedding Qwen3 (embedding once, RMSNorm weights included)."""
    d, hd = shape["hidden_size"], shape["head_dim"]
    norms = shape["num_hidden_layers"] * (2 * d + 2 * hd) + d
    return matmul_params(shape) + norms


def train_flops(shape: dict[str, int], lengths: Sequence[int]) -> float:
    """Model FLOPs of one forward + backward over rows of the given lengths (module docstring)."""
    attention = 6 * shape["num_hidden_layers"] * shape["num_attention_heads"] * shape["head_dim"]
    return float(sum(6 * matmul_params(shape) * s + attention * s * s for s in lengths))


def batch_lengths(batch: SFTBatch) -> list[int]:
    return [int(x) for x in batch.attention_mask.sum(dim=1)]


def episode_flops(shape: dict[str, int], episodes: Sequence[Episode]) -> float:
    return sum(train_flops(shape, batch_lengths(b)) for e in episodes for b in (*e.support, e.query))


def peaks_for(ctx: Context) -> dict[str, float]:
    if ctx.args.peak_tflops:
        return {"given": ctx.args.peak_tflops * 1e12}
    if not ctx.cuda:
        return {}
    name = torch.cuda.get_device_name(ctx.device)
    return next((dict(p) for key, p in PEAKS.items() if key in name), {})


def mfu(ctx: Context, flops_per_s: float) -> dict[str, float]:
    return {f"vs_{k}_{v / 1e12:.0f}T": flops_per_s / v for k, v in peaks_for(ctx).items()}


def random_rows(generator: torch.Generator, n: int, length: int, prompt_len: int, vocab: int) -> list[EncodedExample]:
    """Full-length rows of random token ids (no padding), the first ``prompt_len`` not trained on."""
    ids = torch.randint(3, vocab, (n, length), generator=generator)
    return [EncodedExample(tuple(int(t) for t in row), min(prompt_len, length - 1), False) for row in ids]


def random_episodes(ctx: Context, vocab: int, *, seed: int, rows: int, query_rows: int, length: int) -> list[Episode]:
    s = ctx.sizes
    g = torch.Generator().manual_seed(seed)

    def batch(n: int) -> SFTBatch:
        return collate(random_rows(g, n, length, s.prompt_len, vocab), 0)

    return [
        Episode(MATH_TASKS[i % len(MATH_TASKS)], [batch(rows) for _ in range(s.inner_steps)], batch(query_rows))
        for i in range(s.meta_batch)
    ]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """CUDA: the allocator's peak above the block's start (``peak``) and at the end (``end``)."""
    out: dict[str, int] = {}
    if device.type != "cuda":
        yield out
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield out
    torch.cuda.synchronize(device)
    out["start"] = start
    out["peak"] = torch.cuda.max_memory_allocated(device) - start
    out["end"] = torch.cuda.memory_allocated(device) - start


# --------------------------------------------------------------------------------------- 1: bf16 adaptation


def _small_task_batches(ctx: Context) -> tuple[Any, SFTBatch, SFTBatch]:
    """A small model (the bench's synthetic tasks, real chat-formatted rows) and two support batches."""
    s = ctx.sizes
    shape = s.small
    args = argparse.Namespace(
        parts=1 if ctx.args.quick else 2,
        inner_batch=4,
        inner_steps=1,
        query_batch=4,
        vocab=shape["vocab_size"],
        hidden=shape["hidden_size"],
        intermediate=shape["intermediate_size"],
        layers=shape["num_hidden_layers"],
        heads=shape["num_attention_heads"],
        kv_heads=shape["num_key_value_heads"],
        seq_len=s.small_seq_len,
    )
    model, tokenizer, data = bench_fomaml.make_task_data(args)
    model.config.use_cache = False
    model.to(ctx.device).train()
    support = data[MATH_TASKS[0]].support
    pad = int(tokenizer.pad_token_id)
    return model, collate(support[:4], pad), collate(support[4:8], pad)


def _adapt_once(
    model: Any, batches: list[Any], *, lr: float, steps: int, loss_fn: Any, snapshot_device: str, outer: Any = None
) -> tuple[list[float], list[torch.Tensor], bool]:
    """Support losses, adapted weights (CPU copies) and whether restore was bitwise, for one ``adapted`` block."""
    params = trainable_parameters(model)
    before = [p.detach().cpu().clone() for p in params]
    with (
        outer if outer is not None else contextlib.nullcontext(),
        adapted(
            model, batches, inner_lr=lr, num_steps=steps, snapshot_device=snapshot_device, loss_fn=loss_fn
        ) as result,
    ):
        adapted_weights = [p.detach().cpu().clone() for p in params]
    restored = all(torch.equal(b, p.detach().cpu()) for b, p in zip(before, params, strict=True))
    return result.support_losses, [a - b for a, b in zip(adapted_weights, before, strict=True)], restored


def _update_error(delta: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """Relative L2 error of an update against the reference update, and their cosine similarity."""
    a = torch.cat([d.flatten().double() for d in delta])
    b = torch.cat([d.flatten().double() for d in reference])
    rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return rel, cos


def section_bf16(ctx: Context, sec: Section, deadline: Deadline) -> None:
    model, batch, other = _small_task_batches(ctx)
    device_type = ctx.device.type
    lr, steps = ctx.args.check_lr, 5
    bf16 = ctx.runtime(torch.bfloat16)
    fp32 = ctx.runtime(None)

    # The evaluation's own loss: autocast opened per forward pass (EvalContext.loss_fn builds exactly this).
    eval_loss = sft_loss_fn(ctx.device, lambda: precision_context(ctx.device, "bf16"))
    eval_loss_fp32 = sft_loss_fn(ctx.device, lambda: precision_context(ctx.device, "no"))

    micro = [MicroBatches([batch, other])]  # the evaluation's k-shot step: gradients accumulated over micro-batches
    loops = {
        "training": ([batch], loss_fn_for(bf16, split_rows=False), loss_fn_for(fp32, split_rows=False), "cpu"),
        "evaluation": (micro, eval_loss, eval_loss_fp32, "same"),
    }
    tol = ctx.args.bf16_update_tol
    for name, (batches, loss_bf16, loss_ref, snap) in loops.items():
        losses, delta, restored = _adapt_once(
            model, batches, lr=lr, steps=steps, loss_fn=loss_bf16, snapshot_device=snap
        )
        ref_losses, ref_delta, ref_restored = _adapt_once(
            model, batches, lr=lr, steps=steps, loss_fn=loss_ref, snapshot_device=snap
        )
        rel, cos = _update_error(delta, ref_delta)
        changes = [abs(b - a) for a, b in itertools.pairwise(losses)]
        loss_gap = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
        sec.results[name] = {
            "batches": "one batch repeated" if name == "training" else "MicroBatches of two batches, repeated",
            "snapshot_device": snap,
            "support_losses_bf16": losses,
            "support_losses_fp32": ref_losses,
            "update_rel_error": rel,
            "update_cosine": cos,
            "max_loss_gap": loss_gap,
        }
        sec.check(f"{name}: bf16 support losses change every step", min(changes) > 0, min(changes), "> 0")
        sec.check(f"{name}: bf16 losses decrease overall", losses[-1] < losses[0], [losses[0], losses[-1]])
        sec.check(f"{name}: adapted-weight update vs fp32", rel <= tol, rel, f"relative L2 error <= {tol}")
        sec.check(f"{name}: restore bitwise (bf16 and fp32 runs, snapshot {snap})", restored and ref_restored, restored)
    # Control: autocast around the whole inner loop (what evaluation/fewshot.py did): the weight casts are cached
    # until the outermost autocast exits, so the repeated batch's loss cannot change. The check above must see it.
    stale_losses, _stale_delta, restored = _adapt_once(
        model,
        [batch],
        lr=lr,
        steps=steps,
        loss_fn=eval_loss_fp32,
        snapshot_device="cpu",
        outer=torch.autocast(device_type, dtype=torch.bfloat16),
    )
    stale = max(abs(b - a) for a, b in itertools.pairwise(stale_losses)) == 0.0
    sec.results["control_autocast_around_loop"] = {"support_losses": stale_losses, "stale_cache_reproduced": stale}
    sec.check("control (autocast around the loop): restore bitwise", restored, restored)
    sec.notes.append(
        "control: autocast around the whole inner loop "
        + (
            "keeps the losses constant (stale weight-cast cache): the per-forward autocast fix is needed"
            if stale
            else "did not keep the losses constant on this torch (its cache did not go stale)"
        )
    )
    sec.results["inner_lr"] = lr
    sec.results["inner_steps"] = steps


# --------------------------------------------------------------------------------------- 2: meta-step vs SFT


@dataclass
class Phase:
    name: str
    gc: bool
    times: list[float] = field(default_factory=list)
    tokens: int = 0
    flops: float = 0.0
    memory: Any = None
    snapshot_bytes: int = 0  # resident on the device between steps (snapshot "same"; on CPU also "cpu")


def _perf_setup(ctx: Context) -> dict[str, Any]:
    if "perf" in ctx.shared:
        return ctx.shared["perf"]
    s = ctx.sizes
    base, tokenizer = build_model(s.perf, ctx.device, s.seq_len)
    base.train()
    shape = shape_of(base)
    vocab = shape["vocab_size"]
    episodes = [
        random_episodes(ctx, vocab, seed=i, rows=s.inner_batch, query_rows=s.query_batch, length=s.seq_len)
        for i in range(2 + s.timed_steps)
    ]
    g = torch.Generator().manual_seed(99)
    sft_batches = [
        collate(random_rows(g, s.inner_batch, s.seq_len, s.prompt_len, vocab), 0) for _ in range(2 + s.timed_steps)
    ]
    perf = {"base": base, "tokenizer": tokenizer, "shape": shape, "episodes": episodes, "sft": sft_batches}
    ctx.shared["perf"] = perf
    return perf


def _prepared(runtime: Any, model: Any, gc_on: bool) -> tuple[Any, Any, Any, Any]:
    """The project's ``prepare_training`` at a constant rate: model, optimizer, scheduler, parameters.

    It enables checkpointing under either transformers name (5.17 has only ``gradient_checkpointing_*``).
    """
    return prepare_training(
        runtime,
        model,
        {"gradient_checkpointing": gc_on},
        lr=1e-5,
        weight_decay=0.0,
        schedule="constant",
        warmup=0,
        total=1,
    )


def _make_step(ctx: Context, kind: str, model: Any, gc_on: bool) -> tuple[Callable[[Any], Any], Any]:
    """A step function on a fresh copy of the base model (set up through ``prepare_training``)."""
    runtime = ctx.runtime(ctx.amp)
    model, optimizer, scheduler, params = _prepared(runtime, model, gc_on)
    a = ctx.args
    snapshot = None
    if kind in ("ours/cpu", "ours/same"):
        snapshot = WeightSnapshot(model, kind.split("/")[1])

        def step(episodes: list[Episode]) -> Any:
            return meta_step(
                runtime,
                model,
                params,
                optimizer,
                scheduler,
                episodes,
                inner_lr=a.inner_lr,
                num_inner_steps=ctx.sizes.inner_steps,
                max_grad_norm=1.0,
                snapshot=snapshot,
            )

    elif kind == "seed":

        def step(episodes: list[Episode]) -> Any:
            return bench_fomaml.seed_meta_step(
                runtime,
                model,
                params,
                optimizer,
                scheduler,
                episodes,
                inner_lr=a.inner_lr,
                num_inner_steps=ctx.sizes.inner_steps,
                max_grad_norm=1.0,
            )

    elif kind == "bare":
        loss_fn = loss_fn_for(runtime, split_rows=False)

        def step(episodes: list[Episode]) -> Any:
            # The meta-step's forward/backward passes (same batches, same loss and autocast), accumulated into
            # .grad with no weight bookkeeping, then the same clip and AdamW step.
            for episode in episodes:
                for b in (*episode.support, episode.query):
                    loss, _ = loss_fn(model, b)
                    loss.backward()
            clip_and_norm(runtime, model, params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    elif kind == "sft":

        def step(batch: SFTBatch) -> Any:
            return sft_step(runtime, model, params, optimizer, scheduler, batch, max_grad_norm=1.0)

    else:
        raise ValueError(kind)
    return step, snapshot


def _run_phase(ctx: Context, sec: Section, perf: dict[str, Any], kind: str, gc_on: bool, deadline: Deadline) -> Phase:
    """Warm-up, memory and timed steps of one variant on its own copy of the model, freed afterwards."""
    phase = Phase(f"{kind} (gc {'on' if gc_on else 'off'})", gc_on)
    try:
        _time_phase(ctx, sec, perf, kind, phase, deadline)
    finally:
        free_memory()  # the copy, its optimizer state and snapshot died with _time_phase's frame
    return phase


def _time_phase(ctx: Context, sec: Section, perf: dict[str, Any], kind: str, phase: Phase, deadline: Deadline) -> None:
    inputs = perf["sft"] if kind == "sft" else perf["episodes"]
    step, snapshot = _make_step(ctx, kind, copy.deepcopy(perf["base"]), phase.gc)
    if snapshot is not None and (snapshot.device == "same" or not ctx.cuda):
        phase.snapshot_bytes = sum(b.numel() * b.element_size() for b in snapshot.buffers)
    variant = bench_fomaml.Variant(phase.name, None, [], None, None, step)  # type: ignore[arg-type]
    phase.memory = bench_fomaml.measure_memory(variant, inputs[0], inputs[1], ctx.device)  # warm-up + memory
    for item in inputs[2:]:
        if phase.times and not deadline.has(1.5 * max(phase.times)):
            sec.skip(f"{phase.name}: timed steps after {len(phase.times)}", "section budget")
            break
        synchronize(ctx.device)
        start = time.perf_counter()
        step(item)
        synchronize(ctx.device)
        phase.times.append(time.perf_counter() - start)
        if kind == "sft":
            phase.tokens, phase.flops = item.num_tokens, train_flops(perf["shape"], batch_lengths(item))
        else:
            phase.tokens, phase.flops = sum(e.num_tokens for e in item), episode_flops(perf["shape"], item)


def section_meta_step(ctx: Context, sec: Section, deadline: Deadline) -> None:
    s = ctx.sizes
    perf = _perf_setup(ctx)
    base, shape = perf["base"], perf["shape"]
    weights = sum(p.numel() * p.element_size() for p in trainable_parameters(base))
    sec.results["model"] = {
        **shape,
        "parameters": sum(p.numel() for p in trainable_parameters(base)),
        "matmul_parameters_per_token": matmul_params(shape),
        "weight_bytes_fp32": weights,
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "autocast": str(ctx.amp),
    }
    episode = perf["episodes"][0]
    sec.results["meta_step_shape"] = {
        "tasks": s.meta_batch,
        "inner_steps": s.inner_steps,
        "rows_per_batch": s.inner_batch,
        "tokens_per_row": s.seq_len,
        "tokens": sum(e.num_tokens for e in episode),
        "model_tflop": episode_flops(shape, episode) / 1e12,
    }
    sec.results["peaks_tflops"] = {k: v / 1e12 for k, v in peaks_for(ctx).items()}
    order = [  # most informative first: later phases are skipped when the budget runs out
        ("ours/cpu", True),
        ("bare", True),
        ("sft", True),
        ("seed", True),
        ("ours/same", True),
        ("ours/cpu", False),
        ("bare", False),
        ("sft", False),
    ]
    phases: dict[str, Phase] = {}
    first_cost = None
    for kind, gc_on in order:
        label = f"{kind} (gc {'on' if gc_on else 'off'})"
        if first_cost is not None and not deadline.has(first_cost * (0.3 if kind == "sft" else 1.0)):
            sec.skip(label, "section budget")
            continue
        started = time.perf_counter()
        try:
            phase = _run_phase(ctx, sec, perf, kind, gc_on, deadline)
        except Exception:
            sec.record_error(label)
            free_memory()
            continue
        if first_cost is None:
            first_cost = time.perf_counter() - started
        phases[label] = phase
        mem = phase.memory
        extra = None if mem is None or mem.peak < 0 else mem.peak + phase.snapshot_bytes
        t = median(phase.times)
        sec.results.setdefault("phases", {})[label] = {
            "timed_steps": len(phase.times),
            "median_s": t,
            "min_s": min(phase.times) if phase.times else None,
            "tokens_per_s": phase.tokens / t if phase.times else None,
            "model_tflops_per_s": phase.flops / t / 1e12 if phase.times else None,
            "mfu": mfu(ctx, phase.flops / t) if phase.times else {},
            "step_peak_bytes": None if mem is None else mem.peak,
            "resident_snapshot_bytes": phase.snapshot_bytes,
            "extra_bytes": extra,
            "extra_param_bytes": None if extra is None else extra / weights,
            "allocated_bytes": None if mem is None else mem.allocated,
            "host_syncs": None if mem is None else mem.syncs,
        }
        ctx.report.write()
    results = sec.results.get("phases", {})

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = results.get(a, {}).get(key), results.get(b, {}).get(key)
        return None if x is None or y is None or not y else x / y

    def diff(a: str, b: str) -> float | None:
        x, y = results.get(a, {}).get("extra_bytes"), results.get(b, {}).get("extra_bytes")
        return None if x is None or y is None else (x - y) / weights

    sec.target(
        "P1",
        ratio("ours/cpu (gc on)", "bare (gc on)", "median_s"),
        TARGETS["P1"],
        "FOMAML meta-step time / the same fwd+bwd passes in a bare loop (gc on, snapshot cpu)",
    )
    if "ours/cpu (gc off)" in results and "bare (gc off)" in results:
        sec.notes.append(f"P1 with gc off: {ratio('ours/cpu (gc off)', 'bare (gc off)', 'median_s')}")
    for snap in ("cpu", "same"):
        sec.target(
            f"P2 ({snap})",
            diff(f"ours/{snap} (gc on)", "sft (gc on)"),
            TARGETS["P2"],
            f"FOMAML peak memory - SFT peak memory, in parameter-bytes (snapshot_device {snap}, gc on)",
        )
    sec.target(
        "P3 time",
        ratio("ours/cpu (gc on)", "seed (gc on)", "median_s"),
        TARGETS["P3_time"],
        "our meta-step time / the seed-style clone loop's (gc on)",
    )
    sec.target(
        "P3 memory",
        ratio("ours/cpu (gc on)", "seed (gc on)", "extra_bytes"),
        TARGETS["P3_memory"],
        "our extra memory (step peak + resident snapshot) / the seed loop's (gc on)",
    )
    if not ctx.cuda:
        sec.notes.append("CPU: memory from torch.profiler's allocation timeline, no MFU; the ratios are CPU-sized")
        sec.notes.append("CPU: the 'cpu' snapshot lives in the same memory as the weights, so it is counted")
    best = results.get("ours/cpu (gc on)", {})
    if best.get("model_tflops_per_s"):
        ctx.shared["meta_step_tflops"] = best["model_tflops_per_s"]
        ctx.shared["meta_step_mfu"] = best.get("mfu", {})
    sec.check("every phase ran without an error", not sec.errors, len(sec.errors), "0 errors")


# --------------------------------------------------------------------------------------- 3: the 4B estimate


def memory_estimate_4b(rows: int, tokens: int, snapshot_device: str) -> dict[str, float]:
    """GiB on one GPU for a FOMAML meta-step at Qwen3-4B's shape (task mode, fp32 master, bf16 autocast, gc on)."""
    shape = SHAPE_4B
    n = total_params(shape)
    d, v, layers = shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"]
    parts = {
        "weights_fp32": 4 * n,
        "meta_grad_fp32": 4 * n,
        "inner_grad_fp32 (transient)": 4 * n,
        "adamw_state_fp32": 8 * n,
        "snapshot": 4 * n if snapshot_device == "same" else 0,
        "bf16_weight_casts_saved_for_backward": 2 * n,
        "checkpointed_layer_inputs_bf16": 2 * layers * rows * tokens * d,
        "one_layer_recompute (~34 bytes/token/hidden)": 34 * rows * tokens * d,
        "logits_bf16 + fp32 targets + grad": rows * tokens * v * (2 + 4 + 4),
    }
    return {k: b / GiB for k, b in parts.items()}


def section_estimate(ctx: Context, sec: Section, deadline: Deadline) -> None:
    s = ctx.sizes
    paper = {
        "meta_batch_size": 4,
        "num_inner_steps": 5,
        "inner_batch_size": 4,
        "query_batch_size": 4,
        "total_steps": 5000,
    }
    rows_per_task = paper["num_inner_steps"] * paper["inner_batch_size"] + paper["query_batch_size"]
    rows = paper["meta_batch_size"] * rows_per_task
    shape = SHAPE_4B
    flops = {
        f"{tok} tokens/row": train_flops(shape, [tok] * rows) for tok in (s.paper_rows_tokens, 2048)
    }  # 2048: every row at max_seq_len (the worst case)
    sec.results["qwen3_4b"] = {
        "parameters": total_params(shape),
        "matmul_parameters_per_token": matmul_params(shape),
        "meta_step_rows": rows,
        "meta_step_model_pflop": {k: v / 1e15 for k, v in flops.items()},
    }
    measured = ctx.shared.get("meta_step_mfu", {})
    mfus = {"goal 40%": 0.40}
    if "vs_measured_790T" in measured:
        mfus["measured (section 2, vs 790 TFLOP/s)"] = measured["vs_measured_790T"]
    elif measured:
        key, value = next(iter(measured.items()))
        mfus[f"measured (section 2, {key})"] = value
    clusters = {"4 x H200 (790 TFLOP/s measured peak)": 4 * 790e12, "4 x A100 (312 TFLOP/s datasheet)": 4 * 312e12}
    projection: dict[str, Any] = {}
    for cluster, peak in clusters.items():
        for mfu_name, value in mfus.items():
            for tok_name, f in flops.items():
                seconds = f / (peak * value)
                projection[f"{cluster}, MFU {mfu_name}, {tok_name}"] = {
                    "s_per_meta_step": seconds,
                    "hours_for_5000": paper["total_steps"] * seconds / 3600,
                }
    sec.results["projection"] = projection
    sec.results["seed_hours_for_5000 (10-12 steps/h on 4 x A100)"] = [
        paper["total_steps"] / r for r in reversed(SEED_STEPS_PER_HOUR)
    ]
    sec.results["assumptions"] = [
        f"paper meta-step: {paper['meta_batch_size']} tasks x ({paper['num_inner_steps']} support x "
        f"{paper['inner_batch_size']} + {paper['query_batch_size']} query) = {rows} rows",
        f"tokens per row: {s.paper_rows_tokens} (MATH lengths, docs/training.md) and 2048 (every row at max_seq_len)",
        "model FLOPs as in the module docstring; gradient-checkpointing recompute not counted (MFU, not HFU)",
        "the MFU measured on one H200 at the ~1.1B shape carries over to 4B on 4 GPUs: perfect scaling, FSDP "
        "communication hidden, and the same fraction of peak on an A100 (none of this is measured)",
        "under FSDP all 4 GPUs work on the same task, so each sees 1 of the 4 rows of a batch: smaller per-GPU "
        "matmuls than measured here, likely a lower MFU",
        "weight bookkeeping (snapshot refresh/restore over PCIe with snapshot_device cpu) is inside the measured MFU",
    ]
    if not measured:
        sec.notes.append("no measured GPU MFU (section 2 did not run on CUDA): only the 40% goal is projected")
    h200 = 139.0
    estimates = {snap: memory_estimate_4b(paper["inner_batch_size"], 2048, snap) for snap in ("cpu", "same")}
    sec.results["memory_estimate_one_h200_gib (task mode, rows of 2048 tokens)"] = {
        snap: {**parts, "total": sum(parts.values())} for snap, parts in estimates.items()
    }
    for snap, parts in estimates.items():
        total = sum(parts.values())
        sec.notes.append(f"estimate: a 4B meta-step on one H200 (snapshot {snap}) needs ~{total:.0f} GiB of {h200:.0f}")
    what = "Qwen3-4B real shape, random weights, one meta-step"
    if not ctx.cuda:
        sec.skip(what, "needs CUDA")
        # The same code path on the tiny shape, so the GPU-only run cannot rot (its numbers mean nothing).
        _run_shape(ctx, sec, deadline, s.perf, "stand_in_run (tiny shape, CPU)", tokens=16, steps=1)
        return
    if not s.run_4b:
        sec.skip(what, "disabled (--quick or --no-4b)")
        return
    if not deadline.has(25):
        sec.skip(what, f"budget ({deadline.left():.0f} s left, needs ~25)")
        return
    free_memory()
    shape = {k: int(v) for k, v in SHAPE_4B.items() if not k.startswith("_") and k != "tie_word_embeddings"}
    try:
        t = _run_shape(ctx, sec, deadline, shape, "qwen3_4b_run", tokens=s.paper_rows_tokens)
        sec.check("Qwen3-4B meta-step fits one H200 (random weights, gc on, snapshot cpu)", True, f"{t:.1f} s")
    except torch.cuda.OutOfMemoryError:
        sec.record_error("4B meta-step: out of memory")
        sec.check("Qwen3-4B meta-step fits one H200", False, "out of memory")
    finally:
        free_memory()


def _run_shape(
    ctx: Context, sec: Section, deadline: Deadline, shape: dict[str, int], key: str, *, tokens: int, steps: int = 2
) -> float:
    """Build ``shape`` with random weights and run the paper's meta-step on it (gc on, snapshot cpu) ``steps`` times."""
    s = ctx.sizes
    started = time.perf_counter()
    model, _tokenizer = build_model(shape, ctx.device, 2048)
    built = time.perf_counter() - started
    runtime = ctx.runtime(ctx.amp)
    model, optimizer, scheduler, params = _prepared(runtime, model, True)  # the paper config: gc on, snapshot cpu
    snapshot = WeightSnapshot(model, "cpu")
    g = torch.Generator().manual_seed(7)

    def batch(n: int) -> SFTBatch:
        return collate(random_rows(g, n, tokens, min(s.prompt_len, tokens // 4), shape["vocab_size"]), 0)

    # The paper's meta-step: 4 tasks x (5 support batches of 4 rows + a query batch of 4 rows).
    episodes = [Episode(MATH_TASKS[i], [batch(4) for _ in range(5)], batch(4)) for i in range(4)]
    times: list[float] = []
    with peak_memory(ctx.device) as mem:
        for _ in range(steps):
            if times and not deadline.has(1.3 * times[-1]):
                sec.skip(f"{key}: second meta-step", "section budget")
                break
            synchronize(ctx.device)
            t0 = time.perf_counter()
            result = meta_step(
                runtime,
                model,
                params,
                optimizer,
                scheduler,
                episodes,
                inner_lr=1e-4,
                num_inner_steps=5,
                max_grad_norm=1.0,
                snapshot=snapshot,
            )
            synchronize(ctx.device)
            times.append(time.perf_counter() - t0)
    flops = episode_flops(shape_of(model), episodes)
    t = times[-1]
    sec.results[key] = {
        "parameters": sum(p.numel() for p in params),
        "tokens_per_row": tokens,
        "build_s": built,
        "meta_step_s": times,
        "tokens_per_s": sum(e.num_tokens for e in episodes) / t,
        "model_tflops_per_s": flops / t / 1e12,
        "mfu": mfu(ctx, flops / t),
        "query_losses": [float(x) for x in result.query_losses],
        "projected_hours_5000_one_gpu": 5000 * t / 3600,
        "projected_hours_5000_4_gpus_perfect_scaling": 5000 * t / 4 / 3600,
    }
    if mem:
        sec.results[key]["peak_allocated_gib"] = (mem["start"] + mem["peak"]) / GiB  # includes section 2's model
        sec.results[key]["meta_step_peak_above_start_gib"] = mem["peak"] / GiB
        sec.results[key]["device_total_gib"] = torch.cuda.get_device_properties(ctx.device).total_memory / GiB
    return t


# --------------------------------------------------------------------------------------- 4: generation


def section_generation(ctx: Context, sec: Section, deadline: Deadline) -> None:
    s = ctx.sizes
    perf = _perf_setup(ctx)
    model, tokenizer = perf["base"], perf["tokenizer"]
    model.eval()
    stops = set(stop_token_ids(tokenizer, model))
    vocab = [i for i in range(min(len(tokenizer), model.config.vocab_size)) if i not in stops and i > 2]
    g = torch.Generator().manual_seed(5)
    sec.results["prompt_tokens"] = s.prompt_len
    sec.results["max_new_tokens"] = s.gen_new_tokens
    sec.results["precision"] = "bf16 autocast (as evaluation)" if ctx.amp is not None and ctx.cuda else "fp32"
    autocast = (
        torch.autocast(ctx.device.type, dtype=ctx.amp) if ctx.amp is not None and ctx.cuda else contextlib.nullcontext()
    )
    per_token: float | None = None
    try:
        for batch in s.gen_batches:
            if per_token is not None and not deadline.has(per_token * s.gen_new_tokens * (1 + batch / 64) + 2):
                sec.skip(f"batch {batch}", f"budget ({deadline.left():.0f} s left)")
                continue
            pick = torch.randint(0, len(vocab), (batch, s.prompt_len), generator=g)
            prompts = [[vocab[int(i)] for i in row] for row in pick]
            synchronize(ctx.device)
            start = time.perf_counter()
            with autocast:
                out = generate_greedy(
                    model, tokenizer, prompt_ids=prompts, max_new_tokens=s.gen_new_tokens, batch_size=batch
                )
            synchronize(ctx.device)
            seconds = time.perf_counter() - start
            tokens = sum(out.num_tokens)
            per_token = seconds / max(1, max(out.num_tokens))
            sec.results.setdefault("batches", {})[str(batch)] = {
                "seconds": seconds,
                "generated_tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "tokens_per_s_per_sequence": tokens / seconds / batch,
                "rows_stopped_early": sum(n < s.gen_new_tokens for n in out.num_tokens),
            }
            ctx.report.write()
    finally:
        model.train()
    done = sec.results.get("batches", {})
    sec.check(
        "generated at every batch size that ran", all(v["generated_tokens"] > 0 for v in done.values()), len(done)
    )
    sec.notes.append("the baseline a vLLM comparison measures against (random weights: rows rarely stop early)")


# --------------------------------------------------------------------------------------- 5: FSDP2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def section_fsdp(ctx: Context, sec: Section, deadline: Deadline) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sec.notes.append("one process only: the multi-GPU FSDP2 paths (and accelerate's FSDP2 prepare) remain untested")
    backend = "nccl" if ctx.cuda else "gloo"
    if ctx.cuda:  # nccl binds the process group to the current device
        torch.cuda.set_device(ctx.device.index if ctx.device.index is not None else torch.cuda.current_device())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model, _, episodes = _fsdp_model(ctx)
        reference = copy.deepcopy(model)
        mesh = init_device_mesh(ctx.device.type, (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sec.results["backend"] = backend
        sec.results["sharded_parameter_type"] = type(next(model.parameters())).__name__
        fsdp = ctx.runtime(ctx.amp, mode="fsdp")
        plain = ctx.runtime(ctx.amp)
        kwargs = {"inner_lr": ctx.args.inner_lr, "num_inner_steps": ctx.sizes.inner_steps}

        def full(t: torch.Tensor) -> torch.Tensor:
            # a copy: on one CPU process full_tensor() and .cpu() can return the live storage itself
            return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()

        # Same meta-gradient as the unsharded model (grad_mode "backward" with .grad stashed under FSDP).
        snap = WeightSnapshot(model, "cpu")
        before = {n: full(p) for n, p in model.named_parameters()}
        accumulate_meta_gradient(fsdp, model, episodes, snapshot=snap, **kwargs)
        restored = all(torch.equal(before[n], full(p)) for n, p in model.named_parameters())
        accumulate_meta_gradient(plain, reference, episodes, snapshot=WeightSnapshot(reference, "same"), **kwargs)
        ours = torch.cat([full(p.grad).flatten() for p in trainable_parameters(model)])
        ref = torch.cat([p.grad.detach().cpu().flatten() for p in trainable_parameters(reference)])
        rel = float((ours - ref).norm() / ref.norm().clamp_min(1e-30))
        tol = 1e-4 if ctx.amp is None else ctx.args.fsdp_grad_tol
        sec.results["meta_gradient_rel_error_vs_unsharded"] = rel
        sec.check("FSDP2 meta-gradient equals the unsharded one", rel <= tol, rel, f"relative L2 <= {tol}")
        sec.check("FSDP2 weights restored bitwise after the inner loops", restored, restored)
        del reference
        for p in trainable_parameters(model):
            p.grad = None
        params = trainable_parameters(model)
        optimizer, scheduler = make_optimizer(params, lr=1e-4, weight_decay=0.0, schedule="constant", warmup=0, total=1)
        result = meta_step(
            fsdp, model, params, optimizer, scheduler, episodes, max_grad_norm=1.0, snapshot=snap, **kwargs
        )
        sec.results["meta_step_grad_norm"] = result.grad_norm
        sec.check("FSDP2 meta-step: finite losses and gradient norm", math.isfinite(result.grad_norm), result.grad_norm)
        with tempfile.TemporaryDirectory() as tmp:
            state = {"resume_key": "gpu-check"}
            path = checkpoint.save_checkpoint(
                Path(tmp), 1, runtime=fsdp, model=model, optimizer=optimizer, scheduler=scheduler, state=state, keep=1
            )
            saved = {n: full(p) for n, p in model.named_parameters()}
            meta_step(fsdp, model, params, optimizer, scheduler, episodes, max_grad_norm=1.0, snapshot=snap, **kwargs)
            moved = any(not torch.equal(saved[n], full(p)) for n, p in model.named_parameters())
            loaded = checkpoint.load_checkpoint(
                path, runtime=fsdp, model=model, optimizer=optimizer, scheduler=scheduler, expected_key="gpu-check"
            )
            back = all(torch.equal(saved[n], full(p)) for n, p in model.named_parameters())
            sec.results["checkpoint_files"] = sorted(f.name for f in path.iterdir())
        sec.check("checkpoint: the step after saving changed the weights", moved, moved)
        sec.check("checkpoint load restores the saved weights bitwise", back and loaded["step"] == 1, back)
    finally:
        dist.destroy_process_group()


def _fsdp_model(ctx: Context) -> tuple[Any, Any, list[Episode]]:
    model, batch, _ = _small_task_batches(ctx)
    s = ctx.sizes
    vocab = min(model.config.vocab_size, 300)
    episodes = random_episodes(ctx, vocab, seed=11, rows=2, query_rows=2, length=min(64, s.small_seq_len))
    return model, batch, episodes


# --------------------------------------------------------------------------------------- 6: slot allocator

PROBE = (
    "import json, os, sys\n"
    "out = {'cvd': os.environ.get('CUDA_VISIBLE_DEVICES')}\n"
    "if sys.argv[1] == 'cuda':\n"
    "    import torch\n"
    "    out['count'] = torch.cuda.device_count()\n"
    "    out['name'] = torch.cuda.get_device_name(0) if out['count'] else None\n"
    "print('PROBE' + json.dumps(out))\n"
)


def _slot_run(lock_dir: Path, gpus: str, mode: str, env: dict[str, str], timeout: float = 60) -> tuple[int, Any, str]:
    command = [
        sys.executable,
        "-m",
        "fomaml_math.devices",
        "run",
        "--gpus",
        gpus,
        "--lock-dir",
        str(lock_dir),
        "--poll",
        "0.2",
        "--timeout",
        "1",
        "--",
        sys.executable,
        "-c",
        PROBE,
        mode,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    probe = next((json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("PROBE")), None)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return done.returncode, probe, last


def section_slots(ctx: Context, sec: Section, deadline: Deadline) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        locks = Path(tmp) / "locks"
        # The lock logic with two stand-in devices (runs anywhere): free slots in order, then busy.
        rc, probe, _ = _slot_run(locks, "2", "plain", env)
        sec.check("2 slots, none held: the command gets device 0", rc == 0 and probe["cvd"] == "0", probe)
        saved = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        try:
            with devices.gpu_slot(2, locks, 1, set_env=False):
                rc, probe, _ = _slot_run(locks, "2", "plain", env)
                sec.check("slot 0 held here: the command gets device 1", rc == 0 and probe["cvd"] == "1", probe)
                with devices.gpu_slot(2, locks, 1, set_env=False):
                    rc, probe, err = _slot_run(locks, "2", "plain", env)
                    sec.check("both held: the command times out (exit 2)", rc == 2 and probe is None, err)
        finally:
            if saved is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        counted = devices.count_gpus()
        sec.results["count_gpus"] = counted
        if not ctx.cuda:
            sec.skip("real CUDA_VISIBLE_DEVICES (device count and name seen by the command)", "needs CUDA")
            return
        sec.check("count_gpus() (nvidia-smi -L) sees the GPU", counted >= 1, counted)
        rc, probe, err = _slot_run(locks, "auto", "cuda", env)
        sec.results["auto"] = probe
        sec.check(
            "--gpus auto: the command sees exactly one CUDA device, id 0",
            rc == 0 and probe is not None and probe["cvd"] == "0" and probe["count"] == 1,
            probe or err,
        )
        uuid = _gpu_uuid()
        if uuid is None:
            sec.skip("CUDA_VISIBLE_DEVICES given as a GPU UUID", "nvidia-smi -L shows no UUID")
            return
        rc, probe, err = _slot_run(locks, "1", "cuda", {**env, "CUDA_VISIBLE_DEVICES": uuid})
        sec.results["uuid"] = probe
        sec.check(
            "CUDA_VISIBLE_DEVICES=<GPU UUID> (a scheduler's form) is passed through and names the GPU",
            rc == 0 and probe is not None and probe["cvd"] == uuid and probe["count"] == 1,
            probe or err,
        )


def _gpu_uuid() -> str | None:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        if "UUID: " in line:
            return line.split("UUID: ", 1)[1].rstrip(")").strip()
    return None


# --------------------------------------------------------------------------------------- main


# --------------------------------------------------------------------------------------- 7: the inner loop


def inner_loop_config(path: Path) -> dict[str, Any]:
    """FOMAML's inner loop as a config file sets it (plain YAML: no jsonschema on the lent machine).

    The schema's default for a missing ``inner_optimizer`` is ``sgd`` (what old configs meant).
    """
    import yaml  # PyYAML: a dependency of transformers / huggingface_hub, present wherever they are

    fo = yaml.safe_load(path.read_text())["fomaml"]
    return {
        "optimizer": str(fo.get("inner_optimizer", "sgd")),
        "lr": float(fo["inner_lr"]),
        "num_steps": int(fo["num_inner_steps"]),
        "batch_size": int(fo["inner_batch_size"]),
        "query_batch_size": int(fo["query_batch_size"]),
    }


def _nll(runtime: Any, model: Any, batches: Sequence[SFTBatch]) -> float:
    """Token-weighted NLL over ``batches`` (no grad; autocast per forward as in training)."""
    total, count = summed_nll(model, batches, runtime.autocast, runtime.device)
    return total / max(count, 1)


def _measure_inner_loop(
    runtime: Any, model: Any, support: list[SFTBatch], held_out: list[SFTBatch], loop: dict[str, Any], optimizer: str
) -> dict[str, Any]:
    """One ``adapted`` block as FOMAML runs it: weight change and NLLs before/after, restore checked."""
    snapshot = WeightSnapshot(model, "same" if runtime.device.type == "cuda" else "cpu")
    before = {"support": _nll(runtime, model, support), "held_out": _nll(runtime, model, held_out)}
    synchronize(runtime.device)
    t0 = time.perf_counter()
    with adapted(
        model,
        support,
        inner_lr=loop["lr"],
        num_steps=loop["num_steps"],
        snapshot=snapshot,
        loss_fn=loss_fn_for(runtime, split_rows=False),
        optimizer=optimizer,  # type: ignore[arg-type]
        measure_change=True,
    ) as result:
        synchronize(runtime.device)
        seconds = time.perf_counter() - t0
        after = {"support": _nll(runtime, model, support), "held_out": _nll(runtime, model, held_out)}
        with torch.no_grad():
            pairs = zip(snapshot.params, snapshot.buffers, strict=True)
            largest = max(float((p.detach() - b.to(p.device)).abs().max()) for p, b in pairs)
    return {
        "optimizer": optimizer,
        "inner_loop_s": seconds,
        "weight_change_rel": result.weight_change,
        "max_abs_weight_change": largest,
        "max_abs_change_over_lr_x_steps": largest / (loop["lr"] * loop["num_steps"]),
        "support_losses_per_step": result.support_losses,
        "support_nll_before": before["support"],
        "support_nll_after": after["support"],
        "support_nll_change": after["support"] - before["support"],
        "held_out_nll_before": before["held_out"],
        "held_out_nll_after": after["held_out"],
        "held_out_nll_change": after["held_out"] - before["held_out"],
        "restored_bitwise": snapshot.matches(),
    }


def section_inner_loop(ctx: Context, sec: Section, deadline: Deadline) -> None:
    s = ctx.sizes
    loop = inner_loop_config(ctx.args.config)
    sec.results["config"] = {"file": str(ctx.args.config), **loop}
    if ctx.cuda and s.run_4b:
        shape = {k: int(v) for k, v in SHAPE_4B.items() if not k.startswith("_") and k != "tie_word_embeddings"}
        where = "Qwen3-4B shape"
        if not deadline.has(40):
            raise SkipSection(f"budget ({deadline.left():.0f} s left, the 4B build needs ~40)")
    else:
        shape = dict(s.small)
        where = "small shape (no CUDA or --quick / --no-4b): the code path, not the 4B numbers"
        sec.skip("Qwen3-4B shape", "needs CUDA" if not ctx.cuda else "disabled (--quick or --no-4b)")
    free_memory()
    started = time.perf_counter()
    model, tokenizer = build_model(shape, ctx.device, 2048)
    model.train()
    sec.results["model"] = {"where": where, "shape": shape, "parameters": total_params(shape)}
    sec.results["model"]["build_s"] = time.perf_counter() - started
    # One task's rows, problems the tokenizer's corpus (seed 0) never saw: support batches and a held-out batch.
    rows = [r for r in generate_synthetic(MATH_TASKS[:1], 64, seed=11)]
    encoded = [encode_example(tokenizer, r["problem"], r["solution"], 512) for r in rows]
    pad, bs = int(tokenizer.pad_token_id), loop["batch_size"]
    support = [collate(encoded[i * bs : (i + 1) * bs], pad) for i in range(loop["num_steps"])]
    rest = encoded[loop["num_steps"] * bs :]
    held_out = [collate(rest[i : i + 8], pad) for i in range(0, min(len(rest), 32), 8)]
    sec.results["data"] = {
        "task": MATH_TASKS[0],
        "support_rows": loop["num_steps"] * bs,
        "held_out_rows": sum(b.num_examples for b in held_out),
        "mean_tokens_per_row": sum(len(e.input_ids) for e in encoded) / len(encoded),
    }
    runtime = ctx.runtime(ctx.amp)
    other = "sgd" if loop["optimizer"] == "adam" else "adam"
    for label, optimizer in (("configured", loop["optimizer"]), (f"contrast ({other}, same lr)", other)):
        if label != "configured" and not deadline.has(2 * sec.results["configured"]["inner_loop_s"] + 5):
            sec.skip(label, "section budget")
            continue
        measured = _measure_inner_loop(runtime, model, support, held_out, loop, optimizer)
        sec.results[label] = measured
        finite = all(math.isfinite(x) for x in measured["support_losses_per_step"])
        sec.check(f"{label}: support losses finite", finite, measured["support_losses_per_step"])
        sec.check(f"{label}: meta-weights restored bitwise", measured["restored_bitwise"], measured["restored_bitwise"])
    c = sec.results["configured"]
    sec.notes.append(
        f"{where}: {loop['optimizer']} at lr {loop['lr']:g} x {loop['num_steps']} steps moves the weights by "
        f"{c['weight_change_rel']:.3g} of their norm; support NLL {c['support_nll_before']:.3f} -> "
        f"{c['support_nll_after']:.3f}, held-out {c['held_out_nll_before']:.3f} -> {c['held_out_nll_after']:.3f}"
    )
    sec.notes.append(
        "random weights: the NLLs are not a pretrained model's, but Adam's per-weight step (~lr, whatever the "
        "gradient's scale), so ||dw|| / ||w|| should roughly carry over to pretrained weights of similar norm"
    )
    del model
    free_memory()


def eval_memory_config(path: Path) -> dict[str, Any]:
    """The settings an evaluation's memory depends on, from a config file (plain YAML; the schema's defaults)."""
    import yaml  # as inner_loop_config

    raw = yaml.safe_load(path.read_text())
    ev, compute, model = raw.get("eval", {}), raw.get("compute", {}), raw.get("model", {})
    return {
        "optimizer": str(ev.get("optimizer", "sgd")),
        "inner_lr": float(ev.get("inner_lr", 1e-4)),
        "num_inner_steps": int(ev.get("num_inner_steps", 5)),
        "inner_batch_size": int(ev.get("inner_batch_size", 4)),
        "gen_batch_size": int(ev.get("gen_batch_size", 32)),
        "max_new_tokens": int(ev.get("max_new_tokens", 4096)),
        "gradient_checkpointing": bool(compute.get("gradient_checkpointing", False)),
        "loss_chunk_tokens": compute.get("loss_chunk_tokens"),
        "mixed_precision": str(compute.get("mixed_precision", "no")),
        "max_seq_len": int(model.get("max_seq_len", 2048)),
    }


def section_eval_memory(ctx: Context, sec: Section, deadline: Deadline) -> None:
    from fomaml_math import memory
    from fomaml_math.evaluation.job import JobModel
    from fomaml_math.training.optim import enable_gradient_checkpointing

    deadline = Deadline(min(deadline.end, time.perf_counter() + EVAL_MEMORY_MAX_S))
    cfg = eval_memory_config(ctx.args.config)
    sec.results["config"] = {"file": str(ctx.args.config), **cfg}
    full = ctx.cuda and ctx.sizes.run_4b
    if full:
        if not deadline.has(90):
            raise SkipSection(
                f"budget ({deadline.left():.0f} s left; the 4B build, adaptation and generation need 90+)"
            )
        shape = {k: int(v) for k, v in SHAPE_4B.items() if not k.startswith("_") and k != "tie_word_embeddings"}
        tokens, prompt_len = cfg["max_seq_len"], ctx.sizes.prompt_len
    else:
        shape, tokens, prompt_len = dict(ctx.sizes.small), ctx.sizes.seq_len, ctx.sizes.prompt_len
        sec.skip("Qwen3-4B shape", "needs CUDA" if not ctx.cuda else "disabled (--quick or --no-4b)")
    shots = 50
    half = ctx.cuda and cfg["mixed_precision"] != "no"
    free_memory()
    model, tokenizer = build_model(shape, ctx.device, max(tokens, 64) + cfg["max_new_tokens"])
    if cfg["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    model.eval()  # as load_job_model: checkpointing acts in the gradient steps only
    job = JobModel(model, tokenizer, ctx.device, cfg["mixed_precision"] if half else "no", cfg["loss_chunk_tokens"])
    s = memory.Shape.of({**shape, "tie_word_embeddings": True}, total_params(shape))
    rows = random_rows(torch.Generator().manual_seed(5), shots, tokens, prompt_len, shape["vocab_size"])
    pad, size = int(tokenizer.pad_token_id), cfg["inner_batch_size"]
    micro = MicroBatches([collate(rows[i : i + size], pad) for i in range(0, shots, size)])
    estimate = memory.adaptation_parts(
        s, rows=min(size, shots), tokens=tokens, optimizer=cfg["optimizer"],
        checkpointing=cfg["gradient_checkpointing"], half=half, chunk=cfg["loss_chunk_tokens"], snapshot_same=False,
    )  # fmt: skip
    sec.results["model"] = {"shape": shape, "parameters": s.params, "shots": shots, "tokens_per_row": tokens,
                            "micro_batches": len(micro.batches)}  # fmt: skip
    started = time.perf_counter()
    with peak_memory(ctx.device) as mem:
        with adapted(model, [micro], inner_lr=cfg["inner_lr"], num_steps=1, snapshot=WeightSnapshot(model, "cpu"),
                     loss_fn=job.loss_fn(), optimizer=cfg["optimizer"]) as result:  # type: ignore[arg-type]  # fmt: skip
            pass
        synchronize(ctx.device)
    sec.results["adaptation"] = {
        "seconds": time.perf_counter() - started,
        "estimate_gib": {k: v / GiB for k, v in estimate.items()},
        "estimate_total_gib": sum(estimate.values()) / GiB,
        "measured_peak_gib": (mem["start"] + mem["peak"]) / GiB if mem else None,
        "support_loss": result.support_losses,
    }
    sec.check("adaptation: support loss finite", result.finite, result.support_losses)
    if mem:
        measured, estimated = (mem["start"] + mem["peak"]) / GiB, sum(estimate.values()) / GiB
        sec.check("adaptation: measured peak within the estimate", measured <= estimated, measured,
                  f"estimate {estimated:.1f} GiB")  # fmt: skip
    # Generation: eval.gen_batch_size prompts, as many new tokens as the budget allows (at most max_new_tokens).
    batch = cfg["gen_batch_size"]
    new_tokens = min(cfg["max_new_tokens"], ctx.sizes.gen_new_tokens if not full else cfg["max_new_tokens"])
    if full:  # a decode step of the 4B model at batch 32 takes ~30 ms on an H100 with the HF loop (section 4)
        new_tokens = max(16, min(new_tokens, int(deadline.left() * 0.8 / 0.035)))
    prompts = [list(r.input_ids[:prompt_len]) for r in rows[:batch]]
    gen_est = memory.generation_parts(s, batch=len(prompts), tokens=prompt_len + new_tokens, half=half,
                                      optimizer_state=False)  # fmt: skip
    free_memory()
    started = time.perf_counter()
    with peak_memory(ctx.device) as gmem, torch.no_grad(), job.autocast():
        out = generate_greedy(model, tokenizer, prompt_ids=prompts, max_new_tokens=new_tokens, batch_size=batch)
    sec.results["generation"] = {
        "seconds": time.perf_counter() - started,
        "batch": len(prompts),
        "new_tokens": new_tokens,
        "max_new_tokens_configured": cfg["max_new_tokens"],
        "generated_tokens": int(sum(out.num_tokens)),
        "estimate_gib": {k: v / GiB for k, v in gen_est.items()},
        "estimate_total_gib": sum(gen_est.values()) / GiB,
        "measured_peak_gib": (gmem["start"] + gmem["peak"]) / GiB if gmem else None,
    }
    if gmem:
        measured, estimated = (gmem["start"] + gmem["peak"]) / GiB, sum(gen_est.values()) / GiB
        sec.check("generation: measured peak within the estimate", measured <= estimated, measured,
                  f"estimate {estimated:.1f} GiB")  # fmt: skip
    else:
        sec.notes.append("CPU: the code path ran; no CUDA allocator peak to compare with the estimate")
    del model, job
    free_memory()


SECTION_FUNCS: dict[str, Callable[[Context, Section, Deadline], None]] = {
    "1_bf16_adaptation": section_bf16,
    "2_meta_step_vs_sft": section_meta_step,
    "3_estimate_4b": section_estimate,
    "4_generation": section_generation,
    "5_fsdp2_single": section_fsdp,
    "6_slot_allocator": section_slots,
    "7_inner_loop": section_inner_loop,
    "8_eval_memory": section_eval_memory,
}


def absent_packages() -> dict[str, bool]:
    """Which of the packages the lent machine lacks are importable here (``True``: importable)."""
    import importlib.util

    found = {}
    for name in BLOCKED_ON_DEVICE:
        try:
            found[name] = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found[name] = False
    return found


def metadata(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import transformers
    from transformers import PreTrainedModel

    try:
        import accelerate

        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = "absent"
    meta: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "quick": args.quick,
        "budget_s": args.budget_s,
        "argv": sys.argv[1:],
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate_version,
        },
        "absent_packages": absent_packages(),
        "compat": {
            # which name prepare_training uses (activation_checkpointing_enable is missing in transformers 5.17)
            "transformers_has_activation_checkpointing_enable": hasattr(
                PreTrainedModel, "activation_checkpointing_enable"
            ),
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["device_memory_gib"] = props.total_memory / GiB
        meta["cuda"] = torch.version.cuda
    return meta


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    end = started + args.budget_s
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu)")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = quick_sizes() if args.quick else Sizes()
    if args.no_4b:
        sizes.run_4b = False
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, metadata(args, device))
    # Section 1 always checks bf16; elsewhere CPU bf16 matmuls are slow and add nothing to the code path.
    amp = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda") else None
    ctx = Context(args, sizes, device, amp, report)
    wanted = set(args.sections.split(",")) if args.sections else None
    report.write()
    remaining = [(key, share) for key, _, share in SECTIONS]
    while remaining:
        key, share = remaining.pop(0)
        sec = report.sections[key]
        left = end - time.perf_counter()
        sec.budget_s = max(0.0, left * share / (share + sum(s for _, s in remaining)))
        if wanted is not None and key.split("_")[0] not in wanted and key not in wanted:
            sec.status = "skipped"
            sec.skip("section", "not in --sections")
            report.write()
            continue
        if left < 1:
            sec.status = "skipped"
            sec.skip("section", "global budget spent")
            report.write()
            continue
        sec.status = "running"
        report.write()
        t0 = time.perf_counter()
        try:
            SECTION_FUNCS[key](ctx, sec, Deadline(t0 + sec.budget_s))
        except SkipSection as exc:
            sec.skip("section", str(exc))
        except Exception:
            sec.record_error("section")
        sec.seconds = time.perf_counter() - t0
        if sec.errors and not sec.checks:
            sec.status = "error"
        elif any(not c["passed"] for c in sec.checks) or sec.errors:
            sec.status = "fail"
        elif sec.checks or sec.results:
            sec.status = "ok"
        else:
            sec.status = "skipped"
        print(f"[gpu-check] {key}: {sec.status} in {sec.seconds:.1f} s (budget {sec.budget_s:.0f} s)", flush=True)
        report.write()
        free_memory()
    report.meta["total_s"] = time.perf_counter() - started
    report.write()
    print(f"[gpu-check] wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}", flush=True)
    return 1 if any(s.status in ("error", "fail") for s in report.sections.values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (CPU CI: well under a minute)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="global time budget, shared out over sections")
    parser.add_argument(
        "--config",
        type=Path,
        default=ROOT / "config" / "config.yaml",
        help="sections 7 and 8: the config whose inner loop and evaluation are measured (default: the paper config)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="autocast of sections 2-5 (auto: bf16 on CUDA)",
    )
    parser.add_argument("--sections", default="", help="comma-separated section numbers to run (default: all)")
    parser.add_argument("--no-4b", action="store_true", help="skip the real-shape Qwen3-4B meta-step of section 3")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for MFU on an unlisted device")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--inner-lr", type=float, default=1e-4, help="inner SGD learning rate of sections 2 and 5")
    parser.add_argument(
        "--check-lr", type=float, default=0.05, help="section 1's inner lr (updates above bf16 rounding)"
    )
    parser.add_argument("--bf16-update-tol", type=float, default=0.05, help="section 1: relative error of the update")
    parser.add_argument(
        "--fsdp-grad-tol", type=float, default=0.02, help="section 5: relative meta-gradient error (bf16)"
    )
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
