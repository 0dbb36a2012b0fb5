"""Few-shot evaluation: nested draws, restored initialisation, output schema, in-context limits, main()."""

from __future__ import annotations

import contextlib
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
    measured = summary["measured"]  # what plan --pilot reads (fomaml_math.measured): on CPU no GPU facts
    assert measured["generated_tokens"] == frame["gen_tokens"].sum() and measured["answers"] == len(frame)
    assert measured["generate_s"] > 0 and measured["gpu"] is None and measured["peak_gpu_memory_gib"] is None
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


@pytest.mark.parametrize(("k", "batch_size"), [(5, 2), (3, 4)])
def test_meta_inner_loop_adapts_exactly_as_meta_training(
    workspace: dict[str, Path], settings: dict[str, Any], k: int, batch_size: int
) -> None:
    """The secondary row's adaptation (the evaluation's own code path, from FOMAML's summary facts) gives the weights
    of meta-training's inner loop run by hand: fomaml's optimizer, lr and steps, step i on the i-th mini-batch of
    ``inner_batch_size`` shots in draw order, wrapping around (5 shots by 2: 01, 23, 40); k < batch: all k shots."""
    from types import SimpleNamespace

    from fomaml_math.adapt import adapted
    from fomaml_math.batching import collate
    from fomaml_math.evaluation.repeat import _adapt
    from fomaml_math.modeling import load_model_and_tokenizer
    from fomaml_math.training.data import encode_rows
    from fomaml_math.training.fomaml import FOMAML
    from fomaml_math.training.runtime import Runtime, loss_fn_for

    model, tokenizer = load_model_and_tokenizer(workspace["model"])
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = load_task(workspace["tasks"], "geometry", 4)
    fo = {"inner_optimizer": "adam", "inner_lr": 0.02, "num_inner_steps": 3, "inner_batch_size": batch_size}
    ctx = _context(model, tokenizer, settings, k)
    ctx.spec = AdaptSpec.from_inner_loop(FOMAML().summary_facts(SimpleNamespace(method=fo))["inner_loop"])
    _, shots = task.draw(k, seed=ctx.draw_seed(), repeat=0)
    info: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        effect = _adapt(ctx, stack, shots, info, "test")
        evaluation = {n: p.detach().clone() for n, p in model.named_parameters()}
    encoded = encode_rows(tokenizer, shots, ctx.settings.model.max_seq_len, instruction=ctx.settings.instruction)
    size = min(batch_size, k)
    support = [collate([encoded[(i * size + j) % k] for j in range(size)], tokenizer.pad_token_id) for i in range(3)]
    loss_fn = loss_fn_for(Runtime.local(), split_rows=False)
    with adapted(model, support, inner_lr=0.02, num_steps=3, loss_fn=loss_fn, optimizer="adam") as result:
        training = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in training.items():
        torch.testing.assert_close(evaluation[name], value, rtol=1e-5, atol=1e-6)
    assert info["support_losses"] == pytest.approx(result.support_losses, rel=1e-5)
    assert ctx.spec.describe() == {"adapt_optimizer": "adam", "adapt_lr": 0.02, "adapt_steps": 3,
                                   "adapt_protocol": "meta_inner_loop"}  # fmt: skip
    assert effect["support_loss_after"] < effect["support_loss_before"]  # the loss of all k shots, both sides
    if k > batch_size:  # the primary protocol (every step on all k shots) moves the weights elsewhere
        ctx.spec = AdaptSpec("adam", 0.02, 3, batch_size)
        with contextlib.ExitStack() as stack:
            _adapt(ctx, stack, shots, {}, "test")
            assert any(not torch.allclose(p, evaluation[n]) for n, p in model.named_parameters())
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]), f"{name} not restored"


def test_meta_inner_loop_rows_pair_with_the_primary_rows(
    workspace: dict[str, Path], settings: dict[str, Any], tmp_path: Path
) -> None:
    """``evaluate --meta-inner-loop``: the same shots and test problems as the primary row of the same k, the run's
    inner loop in the adaptation columns, ``adapt_protocol`` saying which; misuse is a one-line error."""
    summary = tmp_path / "train_summary.json"
    summary.write_text(json.dumps({"inner_loop": {"optimizer": "adam", "lr": 0.01, "num_steps": 2, "batch_size": 2}}))

    def run(name: str, *extra: str, init: str = "fomaml", shots: int = 3) -> pd.DataFrame:
        main(["--settings", json.dumps(settings), "--init", init, "--model", str(workspace["model"]), "--tasks-dir",
              str(workspace["tasks"]), "--shots", str(shots), "--output", str(tmp_path / name), "--no-progress",
              "--tasks", "algebra", *extra])  # fmt: skip
        return pd.read_parquet(tmp_path / name)

    primary = run("primary.parquet")
    meta = run("meta.parquet", "--meta-inner-loop", str(summary))
    keys = ["task", "repeat", "problem_id", "shot_ids", "shot_seed", "init"]
    pd.testing.assert_frame_equal(meta[keys], primary[keys])
    assert set(meta.adapt_protocol) == {"meta_inner_loop"} and set(primary.adapt_protocol) == {"all_shots"}
    assert set(zip(meta.adapt_optimizer, meta.adapt_lr, meta.adapt_steps, strict=True)) == {("adam", 0.01, 2)}
    with pytest.raises(ConfigError, match="needs --init fomaml"):
        run("x.parquet", "--meta-inner-loop", str(summary), init="sft")
    with pytest.raises(ConfigError, match="--shots > 0"):
        run("x.parquet", "--meta-inner-loop", str(summary), shots=0)
    with pytest.raises(ConfigError, match="drop --adapt-lr"):
        run("x.parquet", "--meta-inner-loop", str(summary), "--adapt-lr", "0.1")
    with pytest.raises(ConfigError, match="adaptation protocol: expected one of"):
        AdaptSpec("adam", 0.01, 2, 2, "sometimes")
    (tmp_path / "sft_summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="no inner_loop entry"):
        run("x.parquet", "--meta-inner-loop", str(tmp_path / "sft_summary.json"))
