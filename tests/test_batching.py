"""Chat-formatted SFT batches: labels only on assistant tokens, token-weighted loss, truncation counted."""

from __future__ import annotations

import pytest
import torch

from fomaml_math.batching import (
    IGNORE_INDEX,
    chat_prompt,
    collate,
    encode_example,
    example_nll,
    make_sft_batch,
    sft_loss,
)
from tests.fixtures_tiny import make_rows, tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny() -> tuple:
    return tiny_model_and_tokenizer(seed=0)


EXAMPLES = [
    {"problem": "Compute $2 + 3$.", "solution": "It is $\\boxed{5}$."},
    {"problem": "Compute $12 * 11$, a longer problem with more words.", "solution": "$\\boxed{132}$"},
    {"problem": "Hi", "solution": "A much longer solution: $1 + 1 = 2$, then $2 + 2 = 4$, so $\\boxed{4}$."},
]


def test_labels_cover_exactly_the_assistant_turn(tiny: tuple) -> None:
    _, tok = tiny
    batch = make_sft_batch(tok, EXAMPLES, max_seq_len=256)
    assert batch.num_truncated == 0
    for row, example in enumerate(EXAMPLES):
        length = int(batch.attention_mask[row].sum())
        assert batch.attention_mask[row, :length].all() and not batch.attention_mask[row, length:].any()
        prompt_len = len(tok(chat_prompt(tok, example["problem"]), add_special_tokens=False)["input_ids"])
        labels = batch.labels[row]
        assert (labels[:prompt_len] == IGNORE_INDEX).all()
        assert (labels[length:] == IGNORE_INDEX).all()  # padding
        assert torch.equal(labels[prompt_len:length], batch.input_ids[row, prompt_len:length])
        assert tok.decode(labels[prompt_len:length]) == example["solution"] + "<|im_end|>"


def _hand_loss(model: torch.nn.Module, examples: list[dict], tok) -> torch.Tensor:
    """Each example alone, no padding: sum of -log p(assistant token) / number of assistant tokens."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for ex in examples:
        prompt = tok(chat_prompt(tok, ex["problem"]), add_special_tokens=False)["input_ids"]
        enc = encode_example(tok, ex["problem"], ex["solution"], 256)
        ids = torch.tensor([enc.input_ids])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for t in range(len(prompt), ids.shape[1]):
            total -= log_probs[t - 1, ids[0, t]]
            count += 1
    return total / count


def test_sft_loss_is_token_weighted_and_ignores_prompt_and_padding(tiny: tuple) -> None:
    model, tok = tiny
    batch = make_sft_batch(tok, EXAMPLES, max_seq_len=256)
    with torch.no_grad():
        loss, count = sft_loss(model, batch)
        expected = _hand_loss(model, EXAMPLES, tok)
    assert count == batch.num_target_tokens
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)


def test_example_nll_matches_single_example_losses(tiny: tuple) -> None:
    model, tok = tiny
    sums, counts = example_nll(model, make_sft_batch(tok, EXAMPLES, max_seq_len=256))
    for i, ex in enumerate(EXAMPLES):
        with torch.no_grad():
            alone = float(_hand_loss(model, [ex], tok))
        assert float(sums[i] / counts[i]) == pytest.approx(alone, abs=1e-5)
    with torch.no_grad():
        loss, count = sft_loss(model, make_sft_batch(tok, EXAMPLES, max_seq_len=256))
    assert count == int(counts.sum())
    assert float(loss) == pytest.approx(float(sums.sum() / counts.sum()), abs=1e-5)


def test_truncation_is_counted(tiny: tuple) -> None:
    _, tok = tiny
    full = make_sft_batch(tok, EXAMPLES, max_seq_len=256)
    short = make_sft_batch(tok, EXAMPLES, max_seq_len=24)
    lengths = full.attention_mask.sum(dim=1)
    assert short.num_truncated == int((lengths > 24).sum()) > 0
    assert short.input_ids.shape[1] <= 24
    assert torch.equal(short.input_ids, full.input_ids[:, : short.input_ids.shape[1]] * short.attention_mask
                       + (1 - short.attention_mask) * tok.pad_token_id)  # fmt: skip


def test_prompt_longer_than_limit_leaves_no_targets(tiny: tuple) -> None:
    model, tok = tiny
    batch = make_sft_batch(tok, [{"problem": "word " * 50, "solution": "x"}], max_seq_len=8)
    assert batch.num_truncated == 1 and batch.num_target_tokens == 0
    loss, count = sft_loss(model, batch)
    assert count == 0 and float(loss.detach()) == 0.0
    loss.backward()  # still a valid graph


def test_select_and_collate_keep_rows(tiny: tuple) -> None:
    _, tok = tiny
    rows = make_rows("algebra", "support", 5)
    encoded = [encode_example(tok, r["problem"], r["solution"], 64) for r in rows]
    batch = collate(encoded, tok.pad_token_id)
    part = batch.select(slice(1, None, 2))
    assert part.num_examples == 2
    again = collate(encoded[1::2], tok.pad_token_id)
    assert torch.equal(part.input_ids, again.input_ids) and torch.equal(part.labels, again.labels)
    assert batch.num_target_tokens == sum(e.num_target_tokens for e in encoded)
