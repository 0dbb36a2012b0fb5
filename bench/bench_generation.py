"""Greedy generation throughput: our batched loop vs one prompt at a time, or vs vLLM (run by hand).

    PYTHONPATH=src python bench/bench_generation.py [--batch 16] [--new-tokens 64] [--repeats 3]
    PYTHONPATH=src .venv-vllm/bin/python bench/bench_generation.py --backend vllm [--batch 32] [--new-tokens 128]

``--backend hf`` (default) prints generated tokens per second for: our batched loop (batch 16), our
loop one prompt at a time, and transformers' ``model.generate`` (greedy) one prompt at a time; and the
ratio batched / one-at-a-time ``generate`` (target >= 5). It also checks that the batched tokens equal
the one-at-a-time tokens.

``--backend vllm`` (in the vLLM environment, docs/vllm.md) runs the HF loop and a vLLM engine
(``fomaml_math.evaluation.vllm_backend``) on the same prompts, budget and float32 weights of a small
Qwen3 (``--shape small``: hidden 512, 8 layers, head_dim 64; vLLM's CPU attention has no head_dim 16),
prints both rates and the ratio vLLM / HF loop, whether the outputs are identical, and where the HF
loop's time goes (prefill and decode forwards vs the loop's own bookkeeping, and the top operators of
one profiled run). The HF loop runs first: once the engine has started, vLLM pins torch's CPU threads.
On a GPU machine with the CUDA vllm wheel the same command measures the GPU (``--device cuda``).

Timings are the best of ``--repeats`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fomaml_math.evaluation.generate import encode_prompts, generate_greedy, stop_token_ids
from fomaml_math.modeling import build_tiny_model

# The tiny model of config/demo.yaml.
TINY = {
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
# A small Qwen3 whose attention vLLM's CPU backend supports (head_dim 64): about 25M weights in the layers.
SMALL = {
    "vocab_size": 384,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
}


def _best_of(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    run()  # warm-up
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        best = min(best, time.perf_counter() - start)
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="vllm: HF loop vs vLLM engine")
    parser.add_argument("--shape", choices=("demo", "small"), default=None, help="default: demo (hf), small (vllm)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="--backend vllm only")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.backend == "vllm":
        compare_vllm(args)
        return

    model, tokenizer = build_tiny_model(SMALL if args.shape == "small" else TINY, _corpus(), seed=0)
    model.eval()
    prompts = [f"Compute {i} + {3 * i % 17}." + " Then double the result." * (i % 3) for i in range(args.batch)]
    max_new = args.new_tokens

    def ours_batched() -> int:
        out = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=args.batch)
        ours_batched.tokens = out.token_ids  # type: ignore[attr-defined]
        return sum(out.num_tokens)

    def ours_single() -> int:
        outs = [generate_greedy(model, tokenizer, [p], max_new_tokens=max_new, batch_size=1) for p in prompts]
        ours_single.tokens = [o.token_ids[0] for o in outs]  # type: ignore[attr-defined]
        return sum(o.num_tokens[0] for o in outs)

    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=stop_token_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id,
    )
    encoded = encode_prompts(tokenizer, prompts)

    def hf_single() -> int:
        total = 0
        for ids in encoded:
            x = torch.tensor([ids])
            with torch.inference_mode():
                y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
            total += y.shape[1] - x.shape[1]
        return total

    results: dict[str, tuple[float, int]] = {}
    for name, run in (("batched", ours_batched), ("single", ours_single), ("hf_single", hf_single)):
        results[name] = _best_of(args.repeats, run)
    same: Any = ours_batched.tokens == ours_single.tokens  # type: ignore[attr-defined]
    rate = {name: tokens / seconds for name, (seconds, tokens) in results.items()}
    print(f"tiny Qwen3 ({sum(p.numel() for p in model.parameters()):,} parameters), {args.batch} prompts, "
          f"{max_new} new tokens, {args.threads} thread(s), best of {args.repeats}")  # fmt: skip
    for name, (seconds, tokens) in results.items():
        print(f"  {name:10s} {tokens:6d} tokens in {seconds:7.3f}s = {rate[name]:9.1f} tokens/s")
    print(f"batched outputs equal one-at-a-time outputs: {same}")
    print(f"ratio batched / one-at-a-time model.generate: {rate['batched'] / rate['hf_single']:.1f}x (target >= 5)")
    print(f"ratio batched / one-at-a-time (our loop):     {rate['batched'] / rate['single']:.1f}x")


def _corpus() -> list[str]:
    return [
        f"Compute {a} + {b}. We get {a + b}, so the answer is $\\boxed{{{a + b}}}$."
        for a in range(40)
        for b in range(9)
    ]


def _hf_time_split(model: Any, run: Callable[[], int]) -> dict[str, float]:
    """Seconds of one HF-loop run spent in prefill forwards, decode forwards, and outside the model."""
    spent = {"prefill": 0.0, "decode": 0.0}
    started: list[float] = []

    def before(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        started.append(time.perf_counter())

    def after(_module: Any, _args: Any, kwargs: dict[str, Any], _output: Any) -> None:
        phase = "prefill" if kwargs["input_ids"].shape[1] > 1 else "decode"
        spent[phase] += time.perf_counter() - started.pop()

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]  # fmt: skip
    try:
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    return {**spent, "loop": total - spent["prefill"] - spent["decode"], "total": total}


def compare_vllm(args: argparse.Namespace) -> None:
    """HF loop vs vLLM on one saved model folder: rates, ratio, identical outputs, the HF loop's time split."""
    import os
    import tempfile

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from fomaml_math.evaluation.generate import HFBackend
    from fomaml_math.evaluation.vllm_backend import VLLMBackend
    from fomaml_math.modeling import load_model_and_tokenizer, save_model

    shape = TINY if args.shape == "demo" else SMALL
    model, tokenizer = build_tiny_model(shape, _corpus(), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger random weights: a fresh tiny model stops or repeats at once
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    folder = Path(tempfile.mkdtemp(prefix="bench-gen-")) / "model"
    save_model(model, tokenizer, folder)
    model, tokenizer = load_model_and_tokenizer(folder)
    model.to(args.device).eval()
    prompts = [f"Compute {i} + {3 * i % 17}." + " Then double the result." * (i % 3) for i in range(args.batch)]
    prompt_ids = encode_prompts(tokenizer, prompts)
    budget = {"max_new_tokens": args.new_tokens, "batch_size": args.batch}
    hf_backend = HFBackend()
    hf_out: list[Any] = []

    def hf_run() -> int:
        hf_out[:] = [hf_backend.generate(model, tokenizer, prompt_ids, **budget)]
        return sum(hf_out[0].num_tokens)

    hf_seconds, hf_tokens = _best_of(args.repeats, hf_run)
    split = _hf_time_split(model, hf_run)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hf_run()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    ops_total = sum(e.self_cpu_time_total for e in prof.key_averages())
    hf_threads = torch.get_num_threads()

    started = time.perf_counter()
    engine = VLLMBackend(str(folder), tokenizer=tokenizer, model=model, context_limit=2048, seed=0)
    start_s = time.perf_counter() - started
    vllm_out: list[Any] = []

    def vllm_run() -> int:
        vllm_out[:] = [engine.generate(model, tokenizer, prompt_ids, **budget)]
        return sum(vllm_out[0].num_tokens)

    vllm_seconds, vllm_tokens = _best_of(args.repeats, vllm_run)
    differ = [i for i, (a, b) in enumerate(zip(hf_out[0].token_ids, vllm_out[0].token_ids, strict=True)) if a != b]
    hf_rate, vllm_rate = hf_tokens / hf_seconds, vllm_tokens / vllm_seconds
    params = sum(p.numel() for p in model.parameters())
    print(f"Qwen3 {shape['hidden_size']}x{shape['num_hidden_layers']} ({params:,} parameters, float32, {args.device}), "
          f"{args.batch} prompts, {args.new_tokens} new tokens, best of {args.repeats}; "
          f"torch threads: HF {hf_threads}, after engine start {torch.get_num_threads()}")  # fmt: skip
    print(f"  hf loop  {hf_tokens:6d} tokens in {hf_seconds:7.3f}s = {hf_rate:9.1f} tokens/s")
    print(f"  vllm     {vllm_tokens:6d} tokens in {vllm_seconds:7.3f}s = {vllm_rate:9.1f} tokens/s "
          f"(engine start {start_s:.1f}s, not counted)")  # fmt: skip
    print(f"ratio vllm / hf loop: {vllm_rate / hf_rate:.2f}x")
    print(f"outputs identical: {not differ}" + (f" (rows {differ} differ)" if differ else ""))
    total = split["total"]
    parts = [f"{name} {split[name]:.3f}s ({100 * split[name] / total:.0f}%)" for name in ("prefill", "decode", "loop")]
    print(f"HF loop time split (one run, {total:.3f}s): " + ", ".join(parts))
    print("HF loop top operators by self CPU time (one profiled run):")
    for event in ops:
        share = 100 * event.self_cpu_time_total / ops_total
        print(f"  {event.key:40s} {event.self_cpu_time_total / 1e3:9.1f} ms ({share:4.1f}%)")
    engine.close()


if __name__ == "__main__":
    main()
