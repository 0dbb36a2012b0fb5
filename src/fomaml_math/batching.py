"""Chat-formatted SFT batches and their losses (used by FOMAML, SFT and the few-shot evaluation).

An example is a dict with ``problem`` and ``solution``.  It is rendered with the tokenizer's chat
template: the problem, followed by the configured ``prompt.instruction`` (:func:`user_turn`), is the
user turn, the solution the assistant turn.  Training batches, k-shot adaptation, in-context
demonstrations and evaluation prompts all go through :func:`chat_messages`, so they render alike.
Only the assistant turn is trained on: its content and the end-of-turn token (``<|im_end|>`` for Qwen); the prompt (user
turn and the assistant header) and the padding get label ``-100``.  Anything the template writes
after the end-of-turn token (Qwen writes a newline) is dropped.

Tokens are split at the character boundary between the prompt (rendered with
``add_generation_prompt=True``) and the rest of the conversation, each part tokenized on its own,
so the label mask is exact for any template whose full rendering starts with the prompt rendering.
Batches are padded on the right, so positions and causal attention of real tokens do not depend on
padding.  Examples longer than ``max_seq_len`` are cut at the end (the solution loses its tail) and
counted in ``num_truncated``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def user_turn(problem: str, instruction: str = "") -> str:
    """The user turn's text: the problem, then the instruction (e.g. to answer in ``\\boxed{}``) after a blank line."""
    problem = str(problem)
    return f"{problem}\n\n{instruction}" if instruction else problem


def chat_messages(problem: str, solution: str | None = None, *, instruction: str = "") -> list[dict[str, str]]:
    messages = [{"role": "user", "content": user_turn(problem, instruction)}]
    if solution is not None:
        messages.append({"role": "assistant", "content": str(solution)})
    return messages


def chat_prompt(
    tokenizer: Any, problem: str, context: Sequence[Mapping[str, str]] = (), *, instruction: str = ""
) -> str:
    """The chat-formatted prompt for ``problem`` after the ``context`` turns (if any), ending with the
    opened assistant turn (for generation)."""
    return tokenizer.apply_chat_template(
        [*context, *chat_messages(problem, instruction=instruction)], tokenize=False, add_generation_prompt=True
    )


def end_of_turn_id(tokenizer: Any) -> int | None:
    """Id of the token that ends a chat turn (``<|im_end|>``, else the eos token), if the vocabulary has one."""
    for token in ("<|im_end|>", tokenizer.eos_token):
        if token is not None and token in tokenizer.get_vocab():
            return int(tokenizer.convert_tokens_to_ids(token))
    return None


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one chat-formatted example; the first ``prompt_len`` ids are the prompt (not trained on)."""

    input_ids: tuple[int, ...]
    prompt_len: int
    truncated: bool

    @property
    def num_target_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


def encode_example(
    tokenizer: Any,
    problem: str,
    solution: str,
    max_seq_len: int,
    context: Sequence[Mapping[str, str]] = (),
    *,
    instruction: str = "",
) -> EncodedExample:
    """Tokenize one (problem, solution) pair as a user/assistant chat; see the module docstring.

    ``context``: chat turns before the problem (in-context demonstrations); they are part of the
    prompt, so only the final assistant turn is a target.
    """
    prompt = chat_prompt(tokenizer, problem, context, instruction=instruction)
    full = tokenizer.apply_chat_template(
        [*context, *chat_messages(problem, solution, instruction=instruction)], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError(
            "chat template: the rendered conversation does not start with the rendered prompt "
            "(add_generation_prompt=True), so assistant tokens cannot be located"
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    eot = end_of_turn_id(tokenizer)
    if eot is not None and eot in target_ids:
        last = len(target_ids) - 1 - target_ids[::-1].index(eot)
        target_ids = target_ids[: last + 1]  # keep the end-of-turn token, drop the template's trailing newline
    ids = list(prompt_ids) + list(target_ids)
    truncated = len(ids) > max_seq_len
    ids = ids[:max_seq_len]
    return EncodedExample(tuple(ids), min(len(prompt_ids), len(ids)), truncated)


def encode_examples(
    tokenizer: Any, examples: Iterable[Mapping[str, Any]], max_seq_len: int, *, instruction: str = ""
) -> list[EncodedExample]:
    return [
        encode_example(tokenizer, e["problem"], e["solution"], max_seq_len, instruction=instruction) for e in examples
    ]


@dataclass(frozen=True)
class SFTBatch:
    """A right-padded batch: ``labels`` is -100 on prompt and padding tokens."""

    input_ids: torch.Tensor  # [batch, seq] long
    attention_mask: torch.Tensor  # [batch, seq] long, 1 on real tokens
    labels: torch.Tensor  # [batch, seq] long, IGNORE_INDEX where no loss
    num_truncated: int = 0

    @property
    def num_examples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_target_tokens(self) -> int:
        """Number of tokens the loss is taken over (assistant tokens after the causal shift)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        """Number of real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> SFTBatch:
        # A blocking host-to-GPU copy waits for all queued GPU work (a sync per batch); copies to the host
        # stay blocking, so their values are there when read.
        non_blocking = torch.device(device).type != "cpu"
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            attention_mask=self.attention_mask.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )

    def select(self, rows: Sequence[int] | slice) -> SFTBatch:
        """A sub-batch of the given rows (e.g. one process's share), trimmed to its longest row."""
        index = torch.arange(self.num_examples)[rows] if isinstance(rows, slice) else torch.as_tensor(list(rows))
        mask = self.attention_mask[index]
        width = max(1, int(mask.sum(dim=1).max())) if len(index) else 1
        return SFTBatch(
            self.input_ids[index, :width],
            mask[:, :width],
            self.labels[index, :width],
            num_truncated=0,
        )


def collate(encoded: Sequence[EncodedExample], pad_token_id: int) -> SFTBatch:
    """Right-pad encoded examples into an :class:`SFTBatch`."""
    if not encoded:
        raise ValueError("collate: empty batch")
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(encoded):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, example.prompt_len : len(ids)] = ids[example.prompt_len :]
    return SFTBatch(input_ids, attention_mask, labels, num_truncated=sum(e.truncated for e in encoded))


def make_sft_batch(
    tokenizer: Any, examples: Sequence[Mapping[str, Any]], max_seq_len: int, *, instruction: str = ""
) -> SFTBatch:
    """Chat-format, tokenize and right-pad ``examples`` (dicts with ``problem`` and ``solution``)."""
    return collate(encode_examples(tokenizer, examples, max_seq_len, instruction=instruction), tokenizer.pad_token_id)


def _target_logits_and_labels(model: Any, batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict an assistant token, their labels and their row index."""
    device = next(model.parameters()).device
    if batch.input_ids.device != device and batch.input_ids.device.type == "cpu":
        batch = batch.to(device)  # convenience; callers with CPU-offloaded weights move batches themselves
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    labels = batch.labels[:, 1:]
    # One nonzero (a host sync on a GPU) shared by both selections; boolean-mask indexing syncs once per use.
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    # Select before upcasting: only assistant positions are turned into float32 (memory at 150k vocab).
    return logits[:, :-1][rows, cols].float(), labels[rows, cols], rows


def sft_loss(model: Any, batch: SFTBatch, *, normalizer: float | None = None) -> tuple[torch.Tensor, int]:
    """Token-weighted mean NLL over assistant tokens: ``sum of token NLL / number of assistant tokens``.

    ``normalizer`` replaces the denominator (e.g. the token count of the whole batch when each process
    holds a slice), so the gradients of the slices add up to the gradient of the whole batch.
    Returns ``(loss, number of assistant tokens in this batch)``; a batch without assistant tokens
    gives a zero loss that still depends on the parameters.
    """
    logits, labels, _ = _target_logits_and_labels(model, batch)
    total = F.cross_entropy(logits, labels, reduction="sum")
    count = int(labels.numel())
    denominator = normalizer if normalizer is not None else max(count, 1)
    return total / denominator, count


@torch.no_grad()
def example_nll(model: Any, batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed NLL of its assistant tokens (float64, CPU) and their number (long, CPU)."""
    logits, labels, rows = _target_logits_and_labels(model, batch)
    token_nll = F.cross_entropy(logits, labels, reduction="none").double().cpu()
    rows = rows.cpu()
    sums = torch.zeros(batch.num_examples, dtype=torch.float64).index_add_(0, rows, token_nll)
    counts = torch.zeros(batch.num_examples, dtype=torch.long).index_add_(0, rows, torch.ones_like(rows))
    return sums, counts


@torch.no_grad()
def token_nll(model: Any, batch: SFTBatch) -> torch.Tensor:
    """The NLL of every assistant token of ``batch`` (float64, CPU), in the row-major order of its targets
    (``batch.labels[:, 1:] != IGNORE_INDEX``): one forward serves any subset of the targets."""
    logits, labels, _ = _target_logits_and_labels(model, batch)
    return F.cross_entropy(logits, labels, reduction="none").double().cpu()


def summed_nll(
    model: Any, batches: Iterable[SFTBatch], autocast: Any = None, device: torch.device | str | None = None
) -> tuple[float, int]:
    """Summed NLL of the assistant tokens of ``batches`` and their number, without gradients.

    ``autocast`` makes a fresh mixed-precision context per forward (default: none); ``device`` moves each batch.
    """
    from contextlib import nullcontext

    make_context = autocast or nullcontext
    total, count = 0.0, 0
    for batch in batches:
        with make_context():
            sums, counts = example_nll(model, batch if device is None else batch.to(device))
        total += float(sums.sum())
        count += int(counts.sum())
    return total, count


def cycled_slices(n: int, batch_size: int, num_steps: int) -> list[list[int]]:
    """Positions of each inner step's support batch in an ordering of ``n`` examples: step ``i`` takes the
    ``batch_size`` positions after step ``i - 1``'s, wrapping around to the start (FOMAML's episodes, and the
    evaluation's meta-training inner loop, which caps ``batch_size`` at ``n``)."""
    return [[(i * batch_size + j) % n for j in range(batch_size)] for i in range(num_steps)]
