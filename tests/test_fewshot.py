"""Few-shot evaluation: nested draws, restored initialisation, output schema, in-context limits, main()."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from fomaml_math.config import ConfigError, stage_settings
from fomaml_math.evaluation import fewshot
from fomaml_math.evaluation.fewshot import (
    OUTPUT_COLUMNS,
    EvalContext,
    check_in_context_lengths,
    draw_shots,
    evaluate_task_repeat,
    load_task,
    main,
    summary_path,
)
from fomaml_math.evaluation.generate import ContextLengthError
from fomaml_math.evaluation.grade import GradeResult, grade_unlimited
from tests.fixtures_tiny import TASKS, shared_workspace


@pytest.fixture(scope="module")
def workspace() -> dict[str, Path]:
    """The shared tiny task files (3 tasks; support 12, test 8 per task) and saved tiny model. Read-only."""
    root = shared_workspace()
    return {"tasks": root / "tasks", "model": root / "model"}


@pytest.fixture()
def settings(demo_config: dict, workspace: dict[str, Path]) -> dict[str, Any]:
    demo_config["model"]["name_or_path"] = str(workspace["model"])
    demo_config["eval"].update(
        repeats=2, max_test_problems=4, max_new_tokens=6, gen_batch_size=3, inner_batch_size=2, num_inner_steps=2
    )
    return stage_settings(demo_config, "eval")


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
    with pytest.raises(ConfigError, match="only 60 support"):
        draw_shots(ids, 61, seed=1, task="algebra", repeat=0)


def _context(
    model: Any, tokenizer: Any, settings: dict[str, Any], shots: int, mode: str = "finetune", limit: int = 2048
) -> EvalContext:
    return EvalContext(
        model=model,
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        init="fomaml",
        shots=shots,
        mode=mode,
        seed=settings["seed"],
        eval_settings=settings["eval"] | {"inner_lr": 0.5},  # large, so adaptation visibly changes the NLL
        max_seq_len=settings["model"]["max_seq_len"],
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
    assert len(shot_ids) == 3 and all(s.startswith("algebra-support-") for s in shot_ids)
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
    with pytest.raises(ContextLengthError, match=r"in_context, 12 shots, task algebra repeat 0: a prompt of \d+"):
        check_in_context_lengths(_context(model, tokenizer, settings, 12, "in_context", limit=256), tasks)
    # Through main(): a one-line settings error before any generation.
    settings["eval"]["max_new_tokens"] = 2048
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens 2048 exceeds the model's context length of 2048"):
        _run(settings, workspace, tmp_path / "ic-long.parquet", 1)


def test_user_errors(workspace: dict[str, Path], settings: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--shots 13: task 'algebra' has only 12 support examples"):
        _run(settings, workspace, tmp_path / "x.parquet", 13)
    with pytest.raises(ConfigError, match=r"--tasks: \['nope'\] not found"):
        _run(settings, workspace, tmp_path / "x.parquet", 1, "--tasks", "nope")
