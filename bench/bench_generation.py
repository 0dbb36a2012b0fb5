"""Batched greedy generation vs one prompt at a time, on the demo's tiny model (run by hand).

    PYTHONPATH=src python bench/bench_generation.py [--batch 16] [--new-tokens 64] [--repeats 3]

Prints generated tokens per second for: our batched loop (batch 16), our loop one prompt at a
time, and transformers' ``model.generate`` (greedy) one prompt at a time; and the ratio
batched / one-at-a-time ``generate`` (target >= 5). It also checks that the batched tokens equal
the one-at-a-time tokens. Timings are the best of ``--repeats`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
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
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    texts = [
        f"Compute {a} + {b}. We get {a + b}, so the answer is $\\boxed{{{a + b}}}$."
        for a in range(40)
        for b in range(9)
    ]
    model, tokenizer = build_tiny_model(TINY, texts, seed=0)
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


if __name__ == "__main__":
    main()
