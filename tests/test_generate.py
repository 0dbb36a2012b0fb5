"""Batched greedy generation: equal to one-at-a-time decoding and to transformers' own greedy search."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fomaml_math.evaluation.generate import (
    ContextLengthError,
    context_length,
    encode_prompts,
    generate_greedy,
    stop_token_ids,
)
from tests.fixtures_tiny import tiny_model_and_tokenizer

PROMPTS = [f"Compute ${i + 2} + {i * 7 % 11 + 2}$." + " Then double it." * (i % 4) for i in range(12)]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """The tiny Qwen3 model, re-initialised with larger weights: freshly built it repeats one token,
    which would make "batched equals one-at-a-time" trivially true."""
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval(), tokenizer


def _with_extra_stop(model: Any, tokenizer: Any) -> list[int]:
    """Add a frequent token as a stop token so rows stop at different steps (exercises row dropping)."""
    free = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=16)

    def spread(token: int) -> int:
        return len({ids.index(token) if token in ids else None for ids in free.token_ids})

    candidates = {t for ids in free.token_ids for t in ids} - set(stop_token_ids(tokenizer, model))
    extra = max(sorted(candidates), key=spread)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra]
    return [tokenizer.eos_token_id, extra]


def test_batched_equals_one_at_a_time(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    old = model.generation_config.eos_token_id
    try:
        _with_extra_stop(model, tokenizer)
        single = [generate_greedy(model, tokenizer, [p], max_new_tokens=16, batch_size=1) for p in PROMPTS]
        for batch_size in (5, 16):
            batched = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=batch_size)
            assert batched.token_ids == [s.token_ids[0] for s in single]
            assert batched.texts == [s.texts[0] for s in single]
            assert batched.num_tokens == [len(s.token_ids[0]) for s in single]
        lengths = set(batched.num_tokens)
        assert 16 in lengths and min(lengths) < 16, "want rows that stop early and rows that run to the limit"
    finally:
        model.generation_config.eos_token_id = old


def test_matches_transformers_greedy_search(tiny: tuple[Any, Any]) -> None:
    from transformers import GenerationConfig

    model, tokenizer = tiny
    stops = stop_token_ids(tokenizer, model)
    for prompt in PROMPTS[:4]:
        ours = generate_greedy(model, tokenizer, [prompt], max_new_tokens=12)
        ids = torch.tensor([encode_prompts(tokenizer, [prompt])[0]])
        config = GenerationConfig(
            do_sample=False, max_new_tokens=12, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id
        )
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert ours.token_ids[0] == theirs[0, ids.shape[1] :].tolist()


def test_prompts_use_the_chat_template(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert encode_prompts(tokenizer, ["1+1?"])[0] == tokenizer(text, add_special_tokens=False)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tokenizer)


def test_context_length_error(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    assert context_length(model) == model.config.max_position_embeddings
    n = len(encode_prompts(tokenizer, [PROMPTS[3]])[0])
    generate_greedy(model, tokenizer, [PROMPTS[3]], max_new_tokens=4, max_context=n + 4)
    with pytest.raises(ContextLengthError, match="context length of"):
        generate_greedy(model, tokenizer, [PROMPTS[3]], max_new_tokens=5, max_context=n + 4)
