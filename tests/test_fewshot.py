"""Few-shot evaluation: nested draws, restored initialisation, output schema, in-context limits, main()."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from fomaml_math.config import stage_settings
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation import fewshot
from fomaml_math.evaluation.fewshot import main, summary_path
from fomaml_math.evaluation.generate import ContextLengthError
from fomaml_math.evaluation.grade import GradeResult, grade_unlimited
from fomaml_math.evaluation.job import JobModel
from fomaml_math.evaluation.repeat import EvalContext, check_in_context_lengths, evaluate_task_repeat
from fomaml_math.evaluation.rows import OUTPUT_COLUMNS
from fomaml_math.evaluation.settings import EvalSettings
from fomaml_math.evaluation.tasks import load_task
from fomaml_math.kshot import STREAM_CALIBRATION, AdaptSpec, draw_shots
from tests.fixtures_tiny import TASKS, shared_workspace


@pytest.fixture(scope="module")
def workspace() -> dict[str, Path]:
    """The shared tiny task files (3 tasks; dev_pool 10, test 8 per task) and saved tiny model. Read-only."""
    root = shared_workspace()
    return {"tasks": root / "tasks", "model": root / "model"}


@pytest.fixture()
def settings(demo_config: dict, workspace: dict[str, Path]) -> dict[str, Any]:
    demo_config["model"]["name_or_path"] = str(workspace["model"])
    demo_config["eval"].update(
        repeats=2,
        max_test_problems=4,
        max_new_tokens=6,
        gen_batch_size=3,
        inner_batch_size=2,
        num_inner_steps=2,
        optimizer="sgd",  # these tests check the SGD inner loop (test_adapt.py covers adam)
    )
    return stage_settings(demo_config, "evaluate")


class InlineGrader:
    """The grader's interface without worker processes (grading has its own tests)."""

    def grade_many(self, golds: list[str], outputs: list[str]) -> list[GradeResult]:
        return [grade_unlimited(g, o) for g, o in zip(golds, outputs, strict=True)]


def _run(settings: dict[str, Any], workspace: dict[str, Path], out: Path, shots: int, *extra: str) -> int:
    return main(
        ["--settings", json.dumps(settings), "--init", "sft", "--model", str(workspace["model"]),
         "--tasks-dir", str(workspace["tasks"]), "--shots", str(shots), "--output", str(out), "--no-progress", *extra]
    )  # fmt: skip


def test_draws_are_nested_reproducible_and_paired() -> None:
    ids = [f"t/{i:03d}" for i in range(60)]
    draws = {k: draw_shots(ids, k, seed=1, task="algebra", repeat=0) for k in (5, 10, 25, 50)}
    assert draws[5] == draws[10][:5] and draws[10] == draws[25][:10] and draws[25] == draws[50][:25]
    assert len(set(draws[50])) == 50
    assert draw_shots(list(reversed(ids)), 10, seed=1, task="algebra", repeat=0) == draws[10]  # input order
    assert draw_shots(ids, 10, seed=1, task="algebra", repeat=1) != draws[10]
    assert draw_shots(ids, 10, seed=1, task="geometry", repeat=0) != draws[10]
    assert draw_shots(ids, 10, seed=2, task="algebra", repeat=0) != draws[10]
    assert draw_shots(ids, 0, seed=1, task="algebra", repeat=0) == []
    # Calibration draws its own shots: not the evaluation's.
    assert draw_shots(ids, 10, seed=1, task="algebra", repeat=0, stream=STREAM_CALIBRATION) != draws[10]
    with pytest.raises(ConfigError, match="only 60 dev_pool"):
        draw_shots(ids, 61, seed=1, task="algebra", repeat=0)


def _context(
    model: Any,
    tokenizer: Any,
    settings: dict[str, Any],
    shots: int,
    mode: str = "finetune",
    limit: int = 2048,
    lr: float | None = 0.5,  # large, so adaptation visibly changes the NLL; None: the settings' eval.inner_lr
) -> EvalContext:
    ev = settings["eval"] | {"mode": mode} | ({} if lr is None else {"inner_lr": lr})
    typed = EvalSettings.from_stage(settings | {"eval": ev})
    return EvalContext(
        job=JobModel(model, tokenizer, torch.device("cpu"), "no"),
        init="fomaml",
        shots=shots,
        settings=typed,
        spec=AdaptSpec.from_choice(typed.adaptation, typed.inner_batch_size),
        context_limit=limit,
    )


def test_initialisation_is_restored_bitwise(workspace: dict[str, Path], settings: dict[str, Any]) -> None:
    from fomaml_math.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(workspace["model"])
    model.eval()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    task = load_task(workspace["tasks"], "algebra", 4)
    zero, _ = evaluate_task_repeat(_context(model, tokenizer, settings, 0), task, 0, InlineGrader())
    adapted_rows, info = evaluate_task_repeat(_context(model, tokenizer, settings, 6), task, 1, InlineGrader())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"
    # The answers were produced by the adapted weights, not the initialisation:
    assert len(info["support_losses"]) == 2 and info["support_losses"][1] < info["support_losses"][0]
    assert not torch.allclose(torch.tensor(adapted_rows["nll"].to_numpy()), torch.tensor(zero["nll"].to_numpy()))
    again, _ = evaluate_task_repeat(_context(model, tokenizer, settings, 0), task, 0, InlineGrader())
    pd.testing.assert_frame_equal(again, zero)


def test_main_end_to_end_and_schema(workspace: dict[str, Path], settings: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "eval" / "sft" / "shots-3.parquet"
    assert _run(settings, workspace, out, 3) == 0
    frame = pd.read_parquet(out)
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    for column, dtype in OUTPUT_COLUMNS.items():
        check = {"str": pd.api.types.is_string_dtype, "int64": pd.api.types.is_integer_dtype,
                 "bool": pd.api.types.is_bool_dtype, "float64": pd.api.types.is_float_dtype}[dtype]  # fmt: skip
        assert check(frame[column]), f"{column}: {frame[column].dtype}"
    assert len(frame) == len(TASKS) * 2 * 4
    assert set(frame["init"]) == {"sft"} and set(frame["shots"]) == {3} and set(frame["repeat"]) == {0, 1}
    assert set(frame["grade_status"]) <= {"ok", "no_answer", "timeout", "error"}
    assert (frame["nll_tokens"] > 0).all() and frame["nll"].notna().all()
    assert (frame["gen_tokens"].between(1, 6)).all()
    assert frame.groupby(["task", "repeat"])["shot_ids"].nunique().eq(1).all()
    first = frame[(frame["task"] == "algebra") & (frame["repeat"] == 0)]
    shot_ids = first["shot_ids"].iloc[0].split(",")
    # Shots come only from dev_pool, never from the training splits (support/query).
    assert len(shot_ids) == 3 and all(s.startswith("algebra-dev_pool-") for s in shot_ids)
    adapted = frame[frame["shots"] > 0]
    assert (adapted["support_loss_after"] < adapted["support_loss_before"]).all()
    assert (adapted["weight_change"] > 0).all() and set(adapted["adapt_optimizer"]) == {"sgd"}
    assert set(frame["task_role"]) == {"train"} and set(frame["train_seed"]) == {-1}
    assert frame["truncated"].eq(frame["gen_tokens"] == 6).all()  # no stop token within the 6-token budget
    assert first["problem_id"].tolist() == [f"algebra-test-{i:04d}" for i in range(4)]  # stable order, cut at 4
    summary = json.loads(summary_path(out).read_text())
    assert summary["rows"] == len(frame) and summary["timeouts"] == 0
    assert len(summary["per_task_repeat"]) == len(TASKS) * 2 and "wall_time_s" in summary
    assert not any(p.name.endswith(".parts") for p in out.parent.iterdir())

    zero = tmp_path / "eval" / "sft" / "shots-0.parquet"
    assert _run(settings, workspace, zero, 0, "--tasks", "geometry") == 0
    frame0 = pd.read_parquet(zero)
    assert set(frame0["repeat"]) == {0} and set(frame0["task"]) == {"geometry"}
    assert (frame0["shot_ids"] == "").all()
    assert (frame0["weight_change"] == 0).all() and frame0["support_loss_before"].isna().all()


def test_resume_after_a_crash(
    workspace: dict[str, Path], settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "shots-2.parquet"
    two = ("--tasks", "algebra", "geometry")
    real = fewshot.evaluate_task_repeat
    calls: list[tuple[str, int]] = []

    def crash_after_two(ctx: Any, task: Any, repeat: int, *args: Any) -> Any:
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed
        calls.append((task.name, repeat))
        return real(ctx, task, repeat, *args)

    monkeypatch.setattr(fewshot, "evaluate_task_repeat", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        _run(settings, workspace, out, 2, *two)
    assert not out.exists()
    calls.clear()
    monkeypatch.setattr(fewshot, "evaluate_task_repeat", lambda *a: (calls.append((a[1].name, a[2])), real(*a))[1])
    assert _run(settings, workspace, out, 2, *two) == 0
    assert calls == [("geometry", 0), ("geometry", 1)]  # algebra r0 and r1 were resumed
    resumed = pd.read_parquet(out)
    monkeypatch.setattr(fewshot, "evaluate_task_repeat", real)
    fresh = tmp_path / "fresh.parquet"
    assert _run(settings, workspace, fresh, 2, *two) == 0
    pd.testing.assert_frame_equal(resumed, pd.read_parquet(fresh))
    assert json.loads(summary_path(out).read_text())["resumed_pieces"] == 2


def test_in_context_prompt_over_the_context_length(
    workspace: dict[str, Path], settings: dict[str, Any], tmp_path: Path
) -> None:
    from fomaml_math.modeling import load_model_and_tokenizer

    settings["eval"]["mode"] = "in_context"
    out = tmp_path / "ic.parquet"
    assert _run(settings, workspace, out, 2, "--tasks", "geometry") == 0
    frame = pd.read_parquet(out)
    assert frame["nll_tokens"].gt(0).all() and frame["shot_ids"].str.count(",").eq(1).all()

    model, tokenizer = load_model_and_tokenizer(workspace["model"])
    tasks = [load_task(workspace["tasks"], t, 4) for t in TASKS]
    check_in_context_lengths(_context(model, tokenizer, settings, 1, "in_context", limit=256), tasks)
    with pytest.raises(ContextLengthError, match=r"in_context, 10 shots, task algebra repeat 0: a prompt of \d+"):
        check_in_context_lengths(_context(model, tokenizer, settings, 10, "in_context", limit=256), tasks)
    # Through main(): a one-line settings error before any generation.
    settings["eval"]["max_new_tokens"] = 2048
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens 2048 exceeds the model's context length of 2048"):
        _run(settings, workspace, tmp_path / "ic-long.parquet", 1)


def test_user_errors(workspace: dict[str, Path], settings: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--shots 11: task 'algebra' has only 10 dev_pool examples"):
        _run(settings, workspace, tmp_path / "x.parquet", 11)
    with pytest.raises(ConfigError, match=r"--tasks: \['nope'\] not found"):
        _run(settings, workspace, tmp_path / "x.parquet", 1, "--tasks", "nope")


def _adapted_weights(ctx: EvalContext, task: Any, k: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Support losses and the adapted weights of the evaluation's k-shot adaptation (then restored)."""
    from fomaml_math.kshot import adapted_on_shots, shot_batches

    _, shots = task.draw(k, seed=ctx.draw_seed(), repeat=0)
    batches = shot_batches(ctx.tokenizer, shots, max_seq_len=ctx.settings.model.max_seq_len, batch_size=2,
                           instruction="")  # fmt: skip
    with adapted_on_shots(
        ctx.model, batches, ctx.spec, loss_fn=ctx.loss_fn(), snapshot=ctx.initialisation_snapshot()
    ) as result:
        weights = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    return result.support_losses, weights


def test_bf16_adaptation_takes_every_step_at_the_current_weights(
    workspace: dict[str, Path], settings: dict[str, Any]
) -> None:
    """Under bf16 autocast each inner step sees the weights the previous step left (not the initial ones).

    One autocast region around the whole adaptation (the old evaluation) caches bf16 copies of the
    initial weights: every step then has the same loss, and k steps equal one step at k times the lr.
    """
    from fomaml_math.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(workspace["model"])
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = load_task(workspace["tasks"], "algebra", 4)
    settings["eval"].update(num_inner_steps=4, inner_lr=0.5)
    reference_ctx = _context(model, tokenizer, settings, 6, lr=None)
    bf16_ctx = _context(model, tokenizer, settings, 6, lr=None)
    bf16_ctx.job = dataclasses.replace(bf16_ctx.job, mixed_precision="bf16")
    ref_losses, ref_weights = _adapted_weights(reference_ctx, task, 6)
    losses, weights = _adapted_weights(bf16_ctx, task, 6)
    assert len(losses) == 4 and all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses == pytest.approx(ref_losses, rel=3e-2)
    for name, ref in ref_weights.items():
        moved = (ref - before[name]).norm()
        if moved > 0:  # the bf16 update follows the float32 one within bf16 rounding
            assert (weights[name] - ref).norm() <= 0.05 * moved, name
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]), f"{name} not restored"


def test_training_and_evaluation_inner_loops_agree(workspace: dict[str, Path], settings: dict[str, Any]) -> None:
    """FOMAML's inner loop (training's loss function) and the evaluation's give the same adapted weights."""
    from fomaml_math.adapt import adapted
    from fomaml_math.batching import make_sft_batch
    from fomaml_math.modeling import load_model_and_tokenizer
    from fomaml_math.training.runtime import Runtime, loss_fn_for

    model, tokenizer = load_model_and_tokenizer(workspace["model"])
    model.eval()
    task = load_task(workspace["tasks"], "geometry", 4)
    settings["eval"].update(num_inner_steps=3, inner_lr=0.2, inner_batch_size=8)
    ctx = _context(model, tokenizer, settings, 6, lr=None)
    _, evaluation = _adapted_weights(ctx, task, 6)  # micro-batches of 2: accumulated gradients
    ids = draw_shots(task.pool["id"].tolist(), 6, seed=ctx.draw_seed(), task=task.name, repeat=0)
    by_id = task.pool.set_index("id")
    batch = make_sft_batch(tokenizer, [{"problem": by_id.at[i, "problem"], "solution": by_id.at[i, "solution"]}
                                       for i in ids], ctx.settings.model.max_seq_len)  # fmt: skip
    loss_fn = loss_fn_for(Runtime.local(), split_rows=False)
    with adapted(model, [batch], inner_lr=0.2, num_steps=3, loss_fn=loss_fn):
        training = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in training.items():
        torch.testing.assert_close(evaluation[name], value, rtol=1e-5, atol=1e-6)
