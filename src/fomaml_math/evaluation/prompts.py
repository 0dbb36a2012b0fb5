"""Chat prompts of the evaluation: a test problem alone, or after k worked demonstrations (in-context).

A demonstration is one user turn (the problem) and one assistant turn (its worked solution), the
same rendering the training batches use (:mod:`fomaml_math.batching`, whose ``encode_example``
takes these turns as its ``context``), so k-shot in context and k-shot fine-tuning show the model
the same text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fomaml_math.batching import chat_messages

Message = dict[str, str]


def demonstration_messages(demos: Sequence[Mapping[str, Any]], *, instruction: str = "") -> list[Message]:
    """User/assistant turns for worked examples (dicts with ``problem`` and ``solution``)."""
    messages: list[Message] = []
    for demo in demos:
        messages.extend(chat_messages(demo["problem"], demo["solution"], instruction=instruction))
    return messages


def problem_messages(problem: str, context: Sequence[Message] = (), *, instruction: str = "") -> list[Message]:
    """The chat for answering ``problem``, after the ``context`` turns (demonstrations), if any."""
    return [*context, *chat_messages(problem, instruction=instruction)]
