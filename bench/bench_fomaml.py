"""FOMAML meta-step throughput: ours (adapt-then-restore) vs the seed's fast-weights loop (run by hand).

    .venv/bin/python bench/bench_fomaml.py            # CPU, 3.4M-parameter Qwen3, about a minute
    python bench/bench_fomaml.py --device cuda --dtype bf16 --hidden 2048 --layers 16 --intermediate 6144 \
        --heads 16 --kv-heads 8 --vocab 32000 --inner-batch 4 --query-batch 4 --parts 12 --seq-len 1024

One run, one model, the same pre-sampled meta-batches for every variant:

* ``ours/cpu`` and ``ours/same``: :func:`fomaml_math.training.fomaml.meta_step` with the snapshot in host
  memory or next to the weights (``compute.snapshot_device``);
* ``seed``: a re-implementation of the seed trainer's loop (``seeds/CHANGELOG_FIXES.md`` 1 and 2): a
  full state clone per meta-step, per task a ``fast_weights`` dict of clones, ``param.data`` swapped to
  the fast weights before every inner step, ``autograd.grad``, out-of-place ``fast - lr * grad``,
  ``.item()`` per loss, query loss ``backward()``, ``param.data`` swapped back to the state clone.

Both use the same loss function, gradient clipping, AdamW and schedule, so only the inner loop differs.
The script first checks that both give the same meta-gradient on the first meta-batch (relative
1e-5; the script stops otherwise), then runs two untimed meta-steps per variant (warm-up, and memory
of the second: on CUDA the caching allocator's peak, on CPU the allocation timeline recorded by
``torch.profiler``), then times ``--steps`` meta-steps per variant round-robin (one meta-step of each
per round, so load changes on a shared machine hit all alike).  Sampling and collating the batches is
not timed (identical for all variants).  Every variant holds its own model and AdamW state at once: on a
GPU size the model for three copies, or pass ``--variants``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fomaml_math.adapt import WeightSnapshot, _sgd_step, trainable_parameters
from fomaml_math.batching import encode_example
from fomaml_math.data.synthetic import generate_synthetic
from fomaml_math.modeling import build_tiny_model
from fomaml_math.subjects import MATH_TASKS
from fomaml_math.training import fomaml
from fomaml_math.training.optim import clip_and_norm, make_optimizer
from fomaml_math.training.runtime import Runtime, loss_fn_for

MiB = 1 << 20


@dataclass
class BenchRuntime(Runtime):
    """A one-process :class:`Runtime` whose autocast is plain ``torch.autocast`` (no accelerate needed)."""

    amp_dtype: torch.dtype | None = None

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


# --------------------------------------------------------------------------------------- data, model


def make_task_data(args: argparse.Namespace) -> tuple[Any, Any, dict[str, fomaml.TaskData]]:
    """The model, its tokenizer and per-task encoded examples of ``--parts`` synthetic problems each.

    Joining several problems per example gives MATH-like lengths (a few hundred tokens) from the
    synthetic families' one-sentence problems.
    """
    per_task = 2 * args.parts * max(args.inner_batch * args.inner_steps, args.query_batch, 16)
    rows = generate_synthetic(MATH_TASKS, per_task, seed=0)
    texts = [t for r in rows for t in (r["problem"], r["solution"])]
    tiny = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate or 3 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
    }
    model, tokenizer = build_tiny_model(tiny, texts, seed=0, max_seq_len=args.seq_len)
    data: dict[str, fomaml.TaskData] = {}
    for task in MATH_TASKS:
        own = [r for r in rows if r["task"] == task]
        examples = []
        for i in range(0, len(own) - args.parts + 1, args.parts):
            group = own[i : i + args.parts]
            problem = " ".join(f"({k + 1}) {r['problem']}" for k, r in enumerate(group))
            solution = " ".join(f"({k + 1}) {r['solution']}" for k, r in enumerate(group))
            examples.append(encode_example(tokenizer, problem, solution, args.seq_len))
        half = len(examples) // 2
        data[task] = fomaml.TaskData(support=examples[:half], query=examples[half:])
    return model, tokenizer, data


def make_meta_batches(args: argparse.Namespace, data: dict[str, fomaml.TaskData], pad: int) -> list[list[Any]]:
    """``--steps + 2`` meta-batches (two for warm-up and memory), drawn exactly as the trainer draws them."""
    fo = {
        "inner_batch_size": args.inner_batch,
        "num_inner_steps": args.inner_steps,
        "query_batch_size": args.query_batch,
    }
    batches = []
    for step in range(1, args.steps + 3):
        names = fomaml.sample_tasks(0, step, list(MATH_TASKS), args.meta_batch)
        batches.append([fomaml.sample_episode(0, step, s, t, data[t], fo, pad) for s, t in enumerate(names)])
    return batches


# --------------------------------------------------------------------------------------- the seed's loop


Named = list[tuple[str, torch.nn.Parameter]]


def seed_clone(named: Named) -> dict[str, torch.Tensor]:
    return {name: p.clone() for name, p in named}


@torch.no_grad()
def seed_apply(named: Named, weights: dict[str, torch.Tensor]) -> None:
    for name, p in named:
        p.data = weights[name].data


@torch.no_grad()
def seed_update(named: Named, fast: dict[str, torch.Tensor], grads: Any, inner_lr: float) -> None:
    for (name, _), g in zip(named, grads, strict=True):
        if g is not None:
            fast[name] = fast[name] - inner_lr * g  # out of place: a new tensor per parameter and step


def seed_accumulate(
    runtime: Runtime, model: Any, episodes: list[fomaml.Episode], *, inner_lr: float, num_inner_steps: int
) -> tuple[list[float], list[float]]:
    """The seed's meta-gradient: fast-weights dict per task, ``param.data`` swaps, state clone to restore.

    Leaves ``sum_tasks d(query loss / tasks)/d(weights)`` in ``.grad``; returns the support and query losses.
    """
    loss_fn = loss_fn_for(runtime, split_rows=False)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    original_state = seed_clone(named)  # the seed's "full state clone"
    support_losses: list[float] = []
    query_losses: list[float] = []
    for episode in episodes:
        fast_weights = seed_clone(named)
        for step in range(num_inner_steps):
            seed_apply(named, fast_weights)  # apply the fast weights first (fix 1)
            loss, _ = loss_fn(model, episode.support[step % len(episode.support)])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            seed_update(named, fast_weights, grads, inner_lr)
            support_losses.append(loss.item())
        seed_apply(named, fast_weights)
        query_loss, _ = loss_fn(model, episode.query)
        (query_loss / len(episodes)).backward()  # first-order: .grad accumulates the mean over tasks
        query_losses.append(query_loss.item())
        seed_apply(named, original_state)  # restore (fix 2)
    return support_losses, query_losses


def seed_meta_step(
    runtime: Runtime,
    model: Any,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    episodes: list[fomaml.Episode],
    *,
    inner_lr: float,
    num_inner_steps: int,
    max_grad_norm: float,
) -> float:
    seed_accumulate(runtime, model, episodes, inner_lr=inner_lr, num_inner_steps=num_inner_steps)
    grad_norm = clip_and_norm(runtime, model, params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# --------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    model: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: Callable[[list[fomaml.Episode]], float]
    snapshot: WeightSnapshot | None = None
    snapshot_bytes: int = 0  # resident copy of the weights kept between meta-steps
    times: list[float] = field(default_factory=list)


def make_variant(name: str, base: Any, runtime: Runtime, args: argparse.Namespace) -> Variant:
    model = copy.deepcopy(base)
    params = trainable_parameters(model)
    optimizer, scheduler = make_optimizer(
        params, lr=args.outer_lr, weight_decay=0.0, schedule="constant", warmup=0, total=1
    )
    hyper = {"inner_lr": args.inner_lr, "num_inner_steps": args.inner_steps, "max_grad_norm": args.max_grad_norm}
    if name == "seed":

        def step(episodes: list[fomaml.Episode]) -> float:
            return seed_meta_step(runtime, model, params, optimizer, scheduler, episodes, **hyper)

        return Variant(name, model, params, optimizer, scheduler, step)
    snapshot = WeightSnapshot(model, name.split("/")[1])

    def step(episodes: list[fomaml.Episode]) -> float:
        result = fomaml.meta_step(runtime, model, params, optimizer, scheduler, episodes, snapshot=snapshot, **hyper)
        return result.grad_norm

    size = sum(b.numel() * b.element_size() for b in snapshot.buffers)
    return Variant(name, model, params, optimizer, scheduler, step, snapshot, size)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_meta_gradient(base: Any, runtime: Runtime, episodes: list[fomaml.Episode], args: argparse.Namespace) -> None:
    """Both loops give the same meta-gradient (and losses) on the first meta-batch, or the script stops."""
    ours, seed = copy.deepcopy(base), copy.deepcopy(base)
    snapshot = WeightSnapshot(ours, "same")
    support, query = fomaml.accumulate_meta_gradient(
        runtime, ours, episodes, inner_lr=args.inner_lr, num_inner_steps=args.inner_steps, snapshot=snapshot
    )
    seed_support, seed_query = seed_accumulate(
        runtime, seed, episodes, inner_lr=args.inner_lr, num_inner_steps=args.inner_steps
    )
    ours_grad = [p.grad / len(episodes) for p in trainable_parameters(ours)]  # meta_step's averaging
    seed_grad = [p.grad for p in trainable_parameters(seed)]
    scale = max(float(g.abs().max()) for g in ours_grad)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours_grad, seed_grad, strict=True))
    loss_diff = max(
        abs(float(a) - b) for a, b in zip([*support.ravel(), *query], [*seed_support, *seed_query], strict=True)
    )
    tolerance = 1e-5 if args.dtype == "fp32" else 1e-2  # bf16: summation order differs between the loops
    print(
        f"meta-gradient check (first meta-batch): max |ours - seed| = {diff:.2e} "
        f"(largest entry {scale:.2e}, relative {diff / scale:.2e}); max loss difference {loss_diff:.2e}"
    )
    if not diff <= tolerance * scale:
        raise SystemExit(f"meta-gradients differ by more than {tolerance:g} relative: the comparison is not fair")


@contextlib.contextmanager
def cpu_allocation_timeline() -> Iterator[list[tuple[int, int]]]:
    """(time, bytes) of every CPU allocation (+) and free (-) inside the block, from torch.profiler.

    Uses the profiler's event tree (a private but long-standing API); the list stays empty if it is missing.
    """
    from torch.profiler import ProfilerActivity, profile

    events: list[tuple[int, int]] = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield events
    try:
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
                events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
            stack.extend(node.children)
    except (ImportError, AttributeError):
        return
    events.sort()


MARKER_BYTES = 7_777_777  # an allocation of this odd size separates the two profiled steps


@dataclass
class StepMemory:
    peak: int  # most bytes live above the start of the step
    allocated: int  # all bytes allocated during the step
    syncs: int | None = None  # CUDA only: operations that made the host wait for the GPU


def measure_memory(
    variant: Variant, warmup: list[fomaml.Episode], episodes: list[fomaml.Episode], device: torch.device
) -> StepMemory:
    """Run a warm-up meta-step, then measure the memory (and on CUDA the host syncs) of a second one.

    On CPU both steps run under the profiler: a block freed in the measured step must have been
    allocated while profiling, else its free is not recorded (the seed frees the previous step's clones).
    """
    if device.type == "cuda":
        variant.step(warmup)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_stats(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")  # one warning per synchronizing call
            try:
                variant.step(episodes)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
        after = torch.cuda.memory_stats(device)
        return StepMemory(
            after["allocated_bytes.all.peak"] - before["allocated_bytes.all.current"],
            after["allocated_bytes.all.allocated"] - before["allocated_bytes.all.allocated"],
            sum("synchroniz" in str(w.message) for w in caught),
        )
    with cpu_allocation_timeline() as events:
        variant.step(warmup)
        marker = torch.empty(MARKER_BYTES, dtype=torch.uint8)
        del marker
        variant.step(episodes)
    sizes = [size for _, size in events]
    if -MARKER_BYTES not in sizes:
        return StepMemory(-1, -1)  # the profiler recorded no allocations (private API changed)
    live = peak = allocated = 0
    for size in sizes[sizes.index(-MARKER_BYTES) + 1 :]:
        live += size
        peak = max(peak, live)
        allocated += max(size, 0)
    return StepMemory(peak, allocated)


def profile_ours(variant: Variant, episodes: list[fomaml.Episode], device: torch.device, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        variant.step(episodes)
        _synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def bookkeeping_seconds(variant: Variant, args: argparse.Namespace, device: torch.device, repeats: int = 3) -> float:
    """Seconds per meta-step of the weight bookkeeping alone: copies, swaps and SGD updates, no forward/backward.

    This is all that differs between the loops.  Zero stand-in gradients; the weights end where they started.
    """
    grads = [torch.zeros_like(p) for p in variant.params]
    snapshot = variant.snapshot
    if snapshot is not None:

        def once() -> None:
            snapshot.refresh()
            for _ in range(args.meta_batch):
                for _ in range(args.inner_steps):
                    _sgd_step(variant.params, grads, args.inner_lr)
                snapshot.restore()

    else:
        named = list(variant.model.named_parameters())

        def once() -> None:
            original = seed_clone(named)
            for _ in range(args.meta_batch):
                fast = seed_clone(named)
                for _ in range(args.inner_steps):
                    seed_apply(named, fast)
                    seed_update(named, fast, grads, args.inner_lr)
                seed_apply(named, fast)
                seed_apply(named, original)

    once()
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        once()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runtime = BenchRuntime(None, "task", 1, 0, 1, device, torch.bfloat16 if args.dtype == "bf16" else None)
    base, tokenizer, data = make_task_data(args)
    base.config.use_cache = False
    base.train()
    base.to(device)
    meta_batches = make_meta_batches(args, data, int(tokenizer.pad_token_id))
    warmup, measured, timed = meta_batches[0], meta_batches[1], meta_batches[2:]
    weights = sum(p.numel() * p.element_size() for p in trainable_parameters(base))
    tokens = [sum(e.num_tokens for e in episodes) for episodes in timed]
    rows = args.meta_batch * (args.inner_steps * args.inner_batch + args.query_batch)
    print(
        f"device {device} ({args.dtype}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n"
        f"model: {sum(p.numel() for p in trainable_parameters(base)) / 1e6:.2f}M parameters "
        f"({weights / MiB:.1f} MiB fp32), hidden {args.hidden}, {args.layers} layers, vocab {base.config.vocab_size}\n"
        f"meta-step: {args.meta_batch} tasks x ({args.inner_steps} support x {args.inner_batch} + "
        f"{args.query_batch} query rows) = {rows} sequences, {statistics.mean(tokens):.0f} non-padding tokens"
    )
    check_meta_gradient(base, runtime, warmup, args)
    variants = [make_variant(name, base, runtime, args) for name in args.variants.split(",")]

    # Warm-up (allocator, AdamW state) and memory: two untimed meta-steps per variant.
    memory: dict[str, StepMemory] = {}
    for variant in variants:
        if args.skip_memory:
            variant.step(warmup)
            variant.step(measured)
        else:
            memory[variant.name] = measure_memory(variant, warmup, measured, device)

    # Timing: round-robin, the order rotated each round, so load changes on a shared machine hit all alike.
    for index, episodes in enumerate(timed):
        for variant in variants[index % len(variants) :] + variants[: index % len(variants)]:
            _synchronize(device)
            start = time.perf_counter()
            variant.step(episodes)
            _synchronize(device)
            variant.times.append(time.perf_counter() - start)

    rates: dict[str, float] = {}
    print(f"\n{'variant':<10} {'meta-steps/s':>12} {'tokens/s':>10} {'median s/step':>14} {'min s/step':>11}")
    for variant in variants:
        total = sum(variant.times)
        rates[variant.name] = len(timed) / total
        print(
            f"{variant.name:<10} {len(timed) / total:>12.3f} {sum(tokens) / total:>10.0f} "
            f"{statistics.median(variant.times):>14.3f} {min(variant.times):>11.3f}"
        )
    fastest = {v.name: min(v.times) for v in variants}

    def ratio(a: str, b: str) -> None:
        if {a, b} <= rates.keys():
            print(
                f"speed ratio {a} / {b}: {rates[a] / rates[b]:.2f}x (mean), "
                f"{fastest[b] / fastest[a]:.2f}x (fastest steps, less sensitive to other load)"
            )

    ratio("ours/cpu", "seed")
    ratio("ours/same", "seed")
    ratio("ours/cpu", "ours/same")
    for variant in variants[1:]:
        with torch.no_grad():
            drift = max(float((a - b).abs().max()) for a, b in zip(variants[0].params, variant.params, strict=True))
        print(f"weights after {2 + len(timed)} meta-steps: max |{variants[0].name} - {variant.name}| = {drift:.1e}")
    print("weight bookkeeping alone per meta-step (copies, swaps, SGD updates; best of 3, no forward/backward):")
    for variant in variants:
        seconds = bookkeeping_seconds(variant, args, device)
        share = seconds / statistics.median(variant.times)
        print(f"  {variant.name:<10} {seconds * 1e3:8.1f} ms = {share:5.1%} of its median meta-step")

    if memory:
        where = "CUDA allocator" if device.type == "cuda" else "CPU allocations recorded by torch.profiler"
        print(f"\nmemory of one meta-step ({where}); weights {weights / MiB:.1f} MiB")
        print(f"{'variant':<10} {'snapshot':>9} {'step peak':>10} {'extra':>9} {'allocated':>10}")
        extras: dict[str, int] = {}
        for variant in variants:
            peak, allocated = memory[variant.name].peak, memory[variant.name].allocated
            pinned = device.type == "cuda" and variant.name == "ours/cpu"  # host memory, not in the GPU peak
            extras[variant.name] = extra = peak + (0 if pinned else variant.snapshot_bytes)
            print(
                f"{variant.name:<10} {variant.snapshot_bytes / MiB:>8.1f}M {peak / MiB:>9.1f}M {extra / MiB:>8.1f}M "
                f"{allocated / MiB:>9.0f}M  (extra = {extra / weights:.2f} x weights)"
            )
        for variant in variants:
            if memory[variant.name].syncs is not None:
                print(f"{variant.name}: {memory[variant.name].syncs} host syncs per meta-step (torch.cuda sync debug)")
        if {"seed", "ours/same"} <= extras.keys():
            saved = extras["seed"] - extras["ours/same"]
            print(f"extra memory, seed - ours/same: {saved / MiB:.1f}M = {saved / weights:.2f} x weights")
        print(
            "snapshot: ours' resident copy of the weights (host memory for ours/cpu); step peak: most bytes live "
            "above the step's start (activations, gradients, clones); extra = snapshot (if on the device) + step "
            "peak; allocated: all bytes allocated during the step"
        )

    if args.profile:
        ours = next((v for v in variants if v.name.startswith("ours")), None)
        if ours is not None:
            print(f"\nprofile of one {ours.name} meta-step:")
            profile_ours(ours, timed[0], device, args.profile)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args = parser.add_argument_group("model (a randomly initialised Qwen3, tied embeddings)")
    model_args.add_argument("--hidden", type=int, default=256)
    model_args.add_argument("--layers", type=int, default=4)
    model_args.add_argument("--intermediate", type=int, default=0, help="MLP width (0: 3 x hidden)")
    model_args.add_argument("--heads", type=int, default=4)
    model_args.add_argument("--kv-heads", type=int, default=2)
    model_args.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the synthetic text")
    data_args = parser.add_argument_group("meta-batches")
    data_args.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-step (paper: 4)")
    data_args.add_argument("--inner-steps", type=int, default=5, help="inner SGD steps per task (paper: 5)")
    data_args.add_argument("--inner-batch", type=int, default=2, help="rows per support batch")
    data_args.add_argument("--query-batch", type=int, default=2, help="rows per query batch")
    data_args.add_argument("--parts", type=int, default=1, help="synthetic problems joined into one example")
    data_args.add_argument("--seq-len", type=int, default=256, help="max tokens per example (longer are cut)")
    data_args.add_argument("--inner-lr", type=float, default=1e-3)
    data_args.add_argument("--outer-lr", type=float, default=1e-4)
    data_args.add_argument("--max-grad-norm", type=float, default=1.0)
    run_args = parser.add_argument_group("run")
    run_args.add_argument("--steps", type=int, default=5, help="timed meta-steps per variant")
    run_args.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run_args.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, fp32 master")
    run_args.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine; 0: default)"
    )
    run_args.add_argument("--variants", default="ours/cpu,ours/same,seed", help="comma-separated subset")
    run_args.add_argument(
        "--profile", type=int, default=0, metavar="ROWS", help="print the top ROWS ops of one meta-step of ours"
    )
    run_args.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - {"ours/cpu", "ours/same", "seed"}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from ours/cpu, ours/same, seed")
    raise SystemExit(run(args))


if __name__ == "__main__":
    main()
