"""Adapt-then-restore: plain SGD in place, ``.grad`` untouched, the meta-weights restored bitwise."""

from __future__ import annotations

import copy

import pytest
import torch

from fomaml_math.adapt import MicroBatches, WeightSnapshot, adapted, trainable_parameters
from fomaml_math.batching import make_sft_batch, sft_loss
from fomaml_math.training.optim import enable_gradient_checkpointing
from tests.fixtures_tiny import make_rows, tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny() -> tuple:
    model, tok = tiny_model_and_tokenizer(seed=1)
    rows = make_rows("algebra", "support", 8)
    batches = [make_sft_batch(tok, rows[:4], 64), make_sft_batch(tok, rows[4:], 64)]
    return model, tok, batches


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("device", ["cpu", "same"])
def test_weights_are_restored_bitwise_and_grad_untouched(tiny: tuple, device: str) -> None:
    model, _, batches = tiny
    before = _weights(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    with adapted(model, batches, inner_lr=0.1, num_steps=3, snapshot_device=device) as result:
        assert not _same(before, _weights(model))  # adapted in place
        assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert _same(before, _weights(model))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert len(result.support_losses) == 3 and result.finite
    for p in model.parameters():
        p.grad = None


def test_restored_when_the_body_raises(tiny: tuple) -> None:
    model, _, batches = tiny
    before = _weights(model)
    with pytest.raises(RuntimeError, match="boom"), adapted(model, batches, inner_lr=0.1, num_steps=2):
        raise RuntimeError("boom")
    assert _same(before, _weights(model))


def test_restored_when_the_inner_loop_raises(tiny: tuple) -> None:
    model, _, batches = tiny
    before = _weights(model)
    calls = []

    def failing_loss(m: torch.nn.Module, batch: object) -> tuple[torch.Tensor, int]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("inner failure")
        return sft_loss(m, batch)

    with (
        pytest.raises(RuntimeError, match="inner failure"),
        adapted(model, batches, inner_lr=0.1, num_steps=3, loss_fn=failing_loss),
    ):
        pass
    assert _same(before, _weights(model))


def test_inner_loop_is_plain_sgd_cycling_through_batches(tiny: tuple) -> None:
    model, _, batches = tiny
    manual = copy.deepcopy(model)
    losses = []
    for step in range(3):
        loss, _ = sft_loss(manual, batches[step % 2])
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, list(manual.parameters()))
        with torch.no_grad():
            for p, g in zip(manual.parameters(), grads, strict=True):
                p -= 0.1 * g
    with adapted(model, batches, inner_lr=0.1, num_steps=3) as result:
        for a, b in zip(model.parameters(), manual.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert result.support_losses == pytest.approx(losses, abs=1e-6)
    with torch.no_grad():
        assert result.loss_before == pytest.approx(float(sft_loss(model, batches[0])[0]), abs=1e-6)
    assert result.final_loss == result.support_losses[-1]


def test_backward_mode_matches_autograd_mode_and_restores_grad(tiny: tuple) -> None:
    model, _, batches = tiny
    sentinel = [torch.randn_like(p) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel, strict=True):
        p.grad = s.clone()
    with adapted(model, batches, inner_lr=0.1, num_steps=2) as a:
        adapted_autograd = _weights(model)
    with adapted(model, batches, inner_lr=0.1, num_steps=2, grad_mode="backward") as b:
        assert _same(adapted_autograd, _weights(model))
        assert all(torch.equal(p.grad, s) for p, s in zip(model.parameters(), sentinel, strict=True))
    assert a.support_losses == b.support_losses
    for p in model.parameters():
        p.grad = None


def test_shared_snapshot_and_zero_steps(tiny: tuple) -> None:
    model, _, batches = tiny
    before = _weights(model)
    snapshot = WeightSnapshot(model, "cpu")
    assert snapshot.matches() and len(snapshot.params) == len(trainable_parameters(model))
    for _ in range(2):
        with adapted(model, batches, inner_lr=0.1, num_steps=1, snapshot=snapshot):
            assert not snapshot.matches()
        assert snapshot.matches()
    with adapted(model, batches, inner_lr=0.1, num_steps=0) as result:
        assert _same(before, _weights(model)) and result.support_losses == []
    assert _same(before, _weights(model))


def test_non_finite_losses_are_reported_not_raised(tiny: tuple) -> None:
    model, _, batches = tiny
    before = _weights(model)
    with adapted(model, batches, inner_lr=1e30, num_steps=3) as result:
        pass
    assert not result.finite
    assert _same(before, _weights(model))


def test_gradient_checkpointing_gives_the_same_adaptation(tiny: tuple) -> None:
    model, _, batches = tiny
    with adapted(model, batches, inner_lr=0.1, num_steps=2) as plain:
        expected = _weights(model)
    checkpointed = copy.deepcopy(model)
    enable_gradient_checkpointing(checkpointed)  # the method's name depends on the transformers version
    checkpointed.train()
    assert checkpointed.model.gradient_checkpointing
    with adapted(checkpointed, batches, inner_lr=0.1, num_steps=2) as result:
        assert _same(_weights(checkpointed), expected)  # recomputation keeps the order: bitwise
    assert result.support_losses == plain.support_losses


def _count_layer_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_checkpointing_acts_in_eval_mode_bitwise_and_only_in_gradient_steps(tiny: tuple) -> None:
    """The evaluation keeps its model in eval(): checkpointing still recomputes each layer in the gradient steps
    (2 forwards per step instead of 1), the adapted weights are bitwise those without it, and outside the steps
    (generation, NLL) the layers are not flagged as training."""
    model, _, batches = tiny
    with adapted(model, batches, inner_lr=0.1, num_steps=2) as plain:
        expected = _weights(model)
    checkpointed = copy.deepcopy(model).eval()
    enable_gradient_checkpointing(checkpointed)
    checkpointed.eval()
    calls = _count_layer_forwards(checkpointed)
    seen_training: list[bool] = []
    with adapted(checkpointed, batches, inner_lr=0.1, num_steps=2,
                 on_step=lambda _: seen_training.append(checkpointed.model.layers[0].training)) as result:  # fmt: skip
        assert _same(_weights(checkpointed), expected)
    assert calls[0] == 2 * 2  # forward + recomputation in each of the 2 steps
    assert seen_training == [False, False] and not any(m.training for m in checkpointed.modules())
    assert result.support_losses == plain.support_losses


def test_micro_batched_step_accumulates_in_place_bitwise_as_the_tuple_path(tiny: tuple) -> None:
    """Micro-batches accumulate in .grad (no second gradient tuple): bitwise the old autograd.grad + add_ path."""
    model, tok, _ = tiny
    rows = make_rows("algebra", "support", 6)
    parts = [make_sft_batch(tok, rows[:2], 64), make_sft_batch(tok, rows[2:4], 64), make_sft_batch(tok, rows[4:], 64)]
    micro = MicroBatches(parts)
    reference = copy.deepcopy(model)
    params = trainable_parameters(reference)
    for _ in range(2):
        grads = None
        for part in parts:
            loss, count = sft_loss(reference, part)
            part_grads = torch.autograd.grad(loss * (count / micro.num_tokens), params)
            grads = list(part_grads) if grads is None else [g.add_(h) for g, h in zip(grads, part_grads, strict=True)]
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-0.5)
    sentinel = [torch.randn_like(p) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel, strict=True):
        p.grad = s.clone()
    for mode in ("autograd", "backward"):
        with adapted(model, [micro], inner_lr=0.5, num_steps=2, grad_mode=mode):  # type: ignore[arg-type]
            assert _same(_weights(model), [p.detach() for p in params])
            assert all(torch.equal(p.grad, s) for p, s in zip(model.parameters(), sentinel, strict=True))
    for p in model.parameters():
        p.grad = None


def test_chunked_loss_equals_the_full_loss_within_float32_rounding(tiny: tuple) -> None:
    """The chunked loss sums the same terms in another order: loss and gradients within float32 tolerance
    (rtol 1e-5: a sum of ~100 float32 terms carries a relative error of ~100 x 2^-24 at worst); not bitwise."""
    from fomaml_math.adapt import chunked_sft_loss

    model, _, batches = tiny
    params = trainable_parameters(model)
    full, n_full = sft_loss(model, batches[0])
    g_full = torch.autograd.grad(full, params)
    for chunk in (1, 7, 10_000):
        loss, n = chunked_sft_loss(model, batches[0], chunk)
        grads = torch.autograd.grad(loss, params)
        assert n == n_full
        assert float(loss.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
        for a, b in zip(grads, g_full, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        chunked_sft_loss(model, batches[0], 0)


def test_micro_batches_step_equals_one_step_on_the_whole_batch(tiny: tuple) -> None:
    """Accumulated micro-batch gradients give the same SGD step as the concatenated batch."""
    model, tok, _ = tiny
    rows = make_rows("algebra", "support", 6)
    whole = make_sft_batch(tok, rows, 64)
    micro = MicroBatches([make_sft_batch(tok, rows[:2], 64), make_sft_batch(tok, rows[2:], 64)])
    assert micro.num_tokens == whole.num_target_tokens
    with adapted(model, [whole], inner_lr=0.5, num_steps=2) as expected_result:
        expected = _weights(model)
    with adapted(model, [micro], inner_lr=0.5, num_steps=2) as result:
        got = _weights(model)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert result.support_losses == pytest.approx(expected_result.support_losses, rel=1e-5)


def test_adam_inner_loop_matches_torch_adam_and_leaves_grad_alone(tiny: tuple) -> None:
    """``optimizer="adam"`` takes the same steps as ``torch.optim.Adam`` (no weight decay) on the same batches."""
    model, _, batches = tiny
    reference = copy.deepcopy(model)
    params = trainable_parameters(reference)
    optimizer = torch.optim.Adam(params, lr=0.01, foreach=False)
    for step in range(3):
        optimizer.zero_grad()
        loss, _ = sft_loss(reference, batches[step % 2])
        loss.backward()
        optimizer.step()
    expected = [p.detach().clone() for p in params]
    for p in model.parameters():
        p.grad = None
    with adapted(model, batches, inner_lr=0.01, num_steps=3, optimizer="adam", measure_change=True) as result:
        for got, want in zip(trainable_parameters(model), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert all(p.grad is None for p in model.parameters())
        assert result.weight_change > 0
    with (
        pytest.raises(ValueError, match="adaptation optimizer: expected one of"),
        adapted(model, batches, inner_lr=0.01, num_steps=1, optimizer="lion"),  # type: ignore[arg-type]
    ):
        pass


def test_relative_weight_change_is_the_norm_ratio(tiny: tuple) -> None:
    model, _, batches = tiny
    before = torch.cat([p.detach().reshape(-1).double() for p in trainable_parameters(model)])
    with adapted(model, batches, inner_lr=0.1, num_steps=2, measure_change=True) as result:
        after = torch.cat([p.detach().reshape(-1).double() for p in trainable_parameters(model)])
    expected = float((after - before).norm() / before.norm())
    # relative_change subtracts in float32 (a float64 copy of a 4B model's weights would not fit beside them):
    # each difference is rounded to 2^-24 relative, so the norm ratio agrees to a few float32 ulps, not to 1e-9.
    assert result.weight_change == pytest.approx(expected, rel=1e-6)
