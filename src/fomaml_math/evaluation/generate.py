"""Batched greedy generation through the chat template: left padding, KV cache, early stop.

A small hand-written decoding loop rather than ``model.generate``: ``generate`` merges in the
model's ``generation_config.json`` (hub models ship sampling settings, sometimes repetition
penalties), so "greedy" would depend on files we do not control; the loop below is plain argmax,
one forward per token with a :class:`~transformers.DynamicCache`.

Batching never changes the result: prompts are left-padded with an attention mask and explicit
position ids (each row's positions start at 0 at its first real token), rows that have stopped
are dropped from the batch (and the cache), and the outputs come back in input order.
In float32 the batched output equals one-at-a-time decoding token for token (tested); in bf16
different batch shapes can round differently, so an exact near-tie may resolve otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from fomaml_math.errors import ConfigError

Message = dict[str, str]
# A prompt is a chat (list of messages) or a bare string, taken as one user turn.
Prompt = Sequence[Message] | str


class ContextLengthError(ConfigError):
    """A prompt plus the generation budget does not fit in the model's context (a settings error)."""


@dataclass(frozen=True)
class Generations:
    """Outputs in input order; ``token_ids``/``num_tokens`` include the stop token when one was produced."""

    texts: list[str]
    token_ids: list[list[int]]
    num_tokens: list[int]
    prompt_tokens: list[int]
    truncated: list[bool]  # cut at max_new_tokens: no stop token was produced


def context_length(model: Any) -> int | None:
    """The model's maximum number of positions (``max_position_embeddings``), if it declares one."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def stop_token_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """EOS, the chat end-of-turn token ``<|im_end|>`` and the model's generation eos ids, if present."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        if token in vocab:
            ids.add(int(vocab[token]))
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is not None:
        ids.update(int(i) for i in (eos if isinstance(eos, list | tuple) else [eos]))
    if not ids:
        raise ValueError("tokenizer: no eos or end-of-turn token to stop generation at")
    return sorted(ids)


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt rendered with the chat template, assistant turn opened."""
    encoded = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        # Render to text first: apply_chat_template(tokenize=True) changed return types across versions.
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        encoded.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return encoded


def check_context(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, limit: int | None, what: str) -> None:
    """Raise :class:`ContextLengthError` if the longest prompt + ``max_new_tokens`` exceeds ``limit``."""
    if limit is None or not prompt_ids:
        return
    longest = max(len(ids) for ids in prompt_ids)
    if longest + max_new_tokens > limit:
        raise ContextLengthError(
            f"{what}: a prompt of {longest} tokens + eval.max_new_tokens {max_new_tokens} exceeds the model's "
            f"context length of {limit} tokens (use fewer shots or a smaller eval.max_new_tokens)"
        )


@torch.inference_mode()
def _decode_batch(
    model: Any, prompts: Sequence[Sequence[int]], *, pad_id: int, stop_ids: torch.Tensor, max_new_tokens: int
) -> list[list[int]]:
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Positions count real tokens only, so a left-padded row sees the same positions as alone.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits
    next_position = positions[:, -1:] + 1
    outputs: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(len(prompts), device=device)  # which prompt each live batch row is
    stop_ids = stop_ids.to(device)
    for step in range(max_new_tokens):
        tokens = logits[:, -1].argmax(dim=-1)
        live = ~torch.isin(tokens, stop_ids)
        # One device-to-host transfer per step (rows, tokens and stop flags together).
        host_rows, host_tokens, host_live = torch.stack([rows, tokens, live.long()]).tolist()
        for row, token in zip(host_rows, host_tokens, strict=True):
            outputs[row].append(token)
        if step == max_new_tokens - 1 or not any(host_live):
            break
        if not all(host_live):
            # Drop finished rows: less work per step, and no dependence on how others finish.
            keep = live.nonzero(as_tuple=True)[0]
            cache.batch_select_indices(keep)
            rows, tokens = rows[keep], tokens[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        ).logits
        next_position = next_position + 1
    return outputs


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt] | None = None,
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    max_context: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Generations:
    """Greedy answers to chat ``prompts`` (or pre-encoded ``prompt_ids``), in input order.

    Prompts are sorted by length so each batch pads little, decoded ``batch_size`` at a time, and
    put back in input order. Decoding stops at EOS or the end-of-turn token, or after
    ``max_new_tokens``. ``max_context`` (default: the model's ``max_position_embeddings``) makes an
    over-long prompt a :class:`ContextLengthError` before any work. ``on_batch(n)`` reports progress.
    Call under ``torch.autocast`` for mixed precision.
    """
    if max_new_tokens < 1:
        raise ValueError(f"eval.max_new_tokens: must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"eval.gen_batch_size: must be >= 1, got {batch_size}")
    if prompt_ids is None:
        if prompts is None:
            raise ValueError("generate_greedy: give prompts or prompt_ids")
        prompt_ids = encode_prompts(tokenizer, prompts)
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("generate_greedy: empty prompt")
    limit = context_length(model) if max_context is None else max_context
    check_context(prompt_ids, max_new_tokens, limit, "generation")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids(tokenizer, model)[0]
    stop = stop_token_ids(tokenizer, model)
    stop_tensor = torch.tensor(stop, dtype=torch.long)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    generated: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        outputs = _decode_batch(
            model, [prompt_ids[i] for i in chunk], pad_id=pad_id, stop_ids=stop_tensor, max_new_tokens=max_new_tokens
        )
        for index, ids in zip(chunk, outputs, strict=True):
            generated[index] = ids
        if on_batch is not None:
            on_batch(len(chunk))
    return generations_from_ids(tokenizer, generated, stop, prompt_ids)


def generations_from_ids(
    tokenizer: Any, generated: Sequence[Sequence[int]], stop: Sequence[int], prompt_ids: Sequence[Sequence[int]]
) -> Generations:
    """Texts, lengths and truncation flags of generated token ids (every backend goes through here, so
    the text rendering and the truncation count cannot differ between backends)."""
    stop_set = set(stop)
    ids_out = [list(ids) for ids in generated]
    texts = [
        tokenizer.decode([t for t in ids if t not in stop_set], skip_special_tokens=True).strip() for ids in ids_out
    ]
    truncated = [not ids or ids[-1] not in stop_set for ids in ids_out]
    return Generations(texts, ids_out, [len(ids) for ids in ids_out], [len(ids) for ids in prompt_ids], truncated)


class HFBackend:
    """The reference backend: :func:`generate_greedy` on the evaluation's own model.

    It generates with the very weights the adaptation changed, so there is no second copy to keep in
    sync; :meth:`load_weights_from` is a no-op. Mixed precision is autocast per generation, as before.
    """

    name = "hf"

    def __init__(self, autocast: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        self.autocast = autocast or nullcontext  # a fresh autocast context per call (mixed precision)

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
        with self.autocast():
            return generate_greedy(
                model,
                tokenizer,
                prompt_ids=prompt_ids,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                max_context=max_context,
                on_batch=on_batch,
            )

    def load_weights_from(self, model: Any, where: str = "") -> None:
        """Nothing to copy: this backend generates with ``model`` itself."""

    def sleep(self) -> None:
        """Nothing to free while the model adapts."""

    def close(self) -> None:
        """Nothing to release."""


@contextmanager
def engine_follows(backend: Any, model: Any, where: str = "") -> Iterator[Callable[[], None]]:
    """Keep a backend's copy of the weights in step with ``model`` for one (task, repeat).

    Yields ``sync()``, which copies ``model``'s current (adapted) weights into the backend. On exit, if
    ``sync`` was called, the weights are copied once more: enter this block *before* the adaptation's,
    so that it exits *after* it, when ``model`` holds the initialisation again (bitwise), and the
    engine ends the block with the initialisation too, even on error. ``where`` (job, task, repeat)
    names the push in the backend's errors.
    """
    synced = False

    def sync() -> None:
        nonlocal synced
        synced = True  # set first: a sync that fails half-way must still be undone
        backend.load_weights_from(model, where)

    try:
        yield sync
    finally:
        if synced:
            backend.load_weights_from(model, f"{where}, restoring the initialisation" if where else "")
