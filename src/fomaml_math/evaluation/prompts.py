"""Chat prompts of the evaluation: a test problem alone, or after k worked demonstrations (in-context).

A demonstration is one user turn (the problem) and one assistant turn (its worked solution), the
same rendering the training batches use (:mod:`fomaml_math.batching`), so k-shot in context and
k-shot fine-tuning show the model the same text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fomaml_math.batching import EncodedExample, _end_of_turn_id, chat_messages, encode_example

Message = dict[str, str]


def demonstration_messages(demos: Sequence[Mapping[str, Any]]) -> list[Message]:
    """User/assistant turns for worked examples (dicts with ``problem`` and ``solution``)."""
    messages: list[Message] = []
    for demo in demos:
        messages.extend(chat_messages(demo["problem"], demo["solution"]))
    return messages


def problem_messages(problem: str, context: Sequence[Message] = ()) -> list[Message]:
    """The chat for answering ``problem``, after the ``context`` turns (demonstrations), if any."""
    return [*context, *chat_messages(problem)]


def encode_with_context(
    tokenizer: Any, context: Sequence[Message], problem: str, solution: str, max_seq_len: int
) -> EncodedExample:
    """Tokenize ``context`` + problem + solution; only the final assistant turn is a target.

    With no context this is exactly :func:`fomaml_math.batching.encode_example`; with context it
    follows the same rules (split at the rendered prompt, keep the end-of-turn token, drop what the
    template writes after it, cut at ``max_seq_len``).
    """
    if not context:
        return encode_example(tokenizer, problem, solution, max_seq_len)
    prompt_messages = problem_messages(problem, context)
    prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*prompt_messages, {"role": "assistant", "content": str(solution)}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError(
            "chat template: the rendered conversation does not start with the rendered prompt "
            "(add_generation_prompt=True), so assistant tokens cannot be located"
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    eot = _end_of_turn_id(tokenizer)
    if eot is not None and eot in target_ids:
        last = len(target_ids) - 1 - target_ids[::-1].index(eot)
        target_ids = target_ids[: last + 1]
    ids = list(prompt_ids) + list(target_ids)
    truncated = len(ids) > max_seq_len
    ids = ids[:max_seq_len]
    return EncodedExample(tuple(ids), min(len(prompt_ids), len(ids)), truncated)
