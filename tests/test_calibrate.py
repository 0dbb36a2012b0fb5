"""The tuner (stage ``calibrate``): the choice rule, bands, the criteria, the grid from one run per rate, main()."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from scipy import stats

from fomaml_math.batching import IGNORE_INDEX, collate, encode_example, summed_nll
from fomaml_math.config import stage_settings
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.calibrate import choose, main
from fomaml_math.evaluation.choice import AdaptationChoice, band_of, read_choice, read_chosen_model
from fomaml_math.evaluation.criteria import answer_span, dev_examples, score, spearman
from fomaml_math.evaluation.job import JobModel
from fomaml_math.evaluation.settings import lr_grid, steps_grid, tuned_shots
from fomaml_math.modeling import load_model_and_tokenizer
from tests.fixtures_tiny import TASKS, make_rows, shared_workspace


def _point(checkpoint: int, lr: float, steps: int, accuracy: float | None, answer_nll: float) -> dict[str, Any]:
    return {"checkpoint": checkpoint, "shots": 5, "lr": lr, "num_steps": steps, "accuracy": accuracy,
            "answer_nll": answer_nll, "nll": answer_nll}  # fmt: skip


def test_choose_takes_the_best_accuracy_and_breaks_ties_deterministically() -> None:
    points = [
        _point(40, 1e-3, 4, 0.50, 1.0),
        _point(40, 1e-2, 4, 0.75, 1.2),  # the best accuracy ...
        _point(80, 1e-2, 4, 0.75, 0.9),  # ... tied: the lower final-answer NLL wins
        _point(80, 1e-1, 4, None, math.inf),  # diverged: cannot win
    ]
    assert choose(points, "accuracy") == points[2]
    tied = [_point(40, 3e-3, 2, 0.5, 1.0), _point(80, 3e-3, 2, 0.5, 1.0), _point(80, 1e-3, 8, 0.5, 1.0),
            _point(80, 1e-3, 4, 0.5, 1.0)]  # fmt: skip
    assert choose(tied, "accuracy") == tied[3]  # then the smaller rate, then fewer steps
    assert choose(tied[:2], "accuracy") == tied[1]  # and last the later checkpoint
    assert choose(points, "answer_nll") == points[2] and choose(points, "nll") == points[2]
    with pytest.raises(ConfigError, match="no grid point has a finite accuracy"):
        choose([_point(0, 1.0, 1, None, math.nan)], "accuracy")


def test_bands_and_tuned_shots(demo_config: dict) -> None:
    assert band_of(50, [5, 20]) == 20 and band_of(5, [5, 20]) == 5
    assert band_of(10, [5, 20]) == 5  # equidistant on a log scale: the smaller
    assert band_of(0, [0, 5]) == 0
    assert tuned_shots(stage_settings(demo_config, "calibrate")) == [0, 5, 20]  # demo: bands [5, 20], 0 evaluated
    demo_config["eval"]["shots"] = [0, 5, 10, 20, 50]  # with bands an added k is not tuned: no tuner reruns
    assert tuned_shots(stage_settings(demo_config, "calibrate")) == [0, 5, 20]
    demo_config["calibration"]["shots"] = None
    assert tuned_shots(stage_settings(demo_config, "calibrate")) == [0, 5, 10, 20, 50]  # every evaluated k


def test_grid_always_holds_fomamls_inner_rate(demo_config: dict) -> None:
    demo_config["calibration"].update(lr_grid=[0.1, 0.001], steps_grid=None)
    demo_config["fomaml"]["inner_lr"] = 0.03
    settings = stage_settings(demo_config, "calibrate")
    assert lr_grid(settings) == [0.001, 0.03, 0.1]
    assert steps_grid(settings) == [demo_config["eval"]["num_inner_steps"]]


def test_spearman_matches_scipy_with_ties() -> None:
    x, y = [0.1, 0.4, 0.4, 0.9, 0.2], [1.0, 3.0, 2.0, 5.0, 1.0]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant: undefined


def test_answer_span_holds_exactly_the_boxed_answer() -> None:
    _, tokenizer = load_model_and_tokenizer(str(shared_workspace() / "model"))
    row = make_rows("algebra", "dev_monitor", 1)[0]
    first, last = answer_span(tokenizer, row["problem"], row["solution"], instruction="")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["problem"]}, {"role": "assistant", "content": row["solution"]}], tokenize=False
    )
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["problem"]}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    target = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(target[first:last]).strip() == row["answer"]
    assert answer_span(tokenizer, row["problem"], "no boxed answer here", instruction="") is None


def test_one_forward_gives_both_nlls_as_separate_forwards_would() -> None:
    """score's answer NLL (a subset of the one forward's tokens) equals the NLL of answer-only labels."""
    model, tokenizer = load_model_and_tokenizer(str(shared_workspace() / "model"))
    rows = make_rows("algebra", "dev_monitor", 5)
    rows[2]["solution"] = "no boxed answer here"  # counts for nll, not for answer_nll
    examples = dev_examples(tokenizer, "algebra", pd.DataFrame(rows), max_examples=5, max_seq_len=256,
                            instruction="", chunk_size=2)  # fmt: skip
    job = JobModel(model, tokenizer, torch.device("cpu"), "no")
    got = score(job, examples, grader=None, generation=None)
    full_sum, full_tokens = summed_nll(model, examples.chunks)
    answer_sum, answer_tokens = 0.0, 0
    for row in (r for r in rows if "\\boxed" in r["solution"]):
        first, last = answer_span(tokenizer, row["problem"], row["solution"], instruction="")
        encoded = encode_example(tokenizer, row["problem"], row["solution"], 256, instruction="")
        batch = collate([encoded], tokenizer.pad_token_id)
        keep = torch.zeros_like(batch.labels, dtype=torch.bool)
        keep[0, encoded.prompt_len + first : encoded.prompt_len + last] = True
        batch.labels[~keep] = IGNORE_INDEX
        row_sum, row_tokens = summed_nll(model, [batch])
        answer_sum, answer_tokens = answer_sum + row_sum, answer_tokens + row_tokens
    assert (got.nll_tokens, got.answer_tokens) == (full_tokens, answer_tokens) and 0 < answer_tokens < full_tokens
    assert got.nll_sum == pytest.approx(full_sum, rel=1e-6)
    assert got.answer_sum == pytest.approx(answer_sum, rel=1e-5)


@pytest.fixture()
def settings(demo_config: dict) -> dict[str, Any]:
    demo_config["model"]["name_or_path"] = str(shared_workspace() / "model")
    demo_config["eval"].update(inner_batch_size=4, shots=[0, 3], max_new_tokens=8)
    demo_config["calibration"].update(lr_grid=[0.01, 0.3], steps_grid=[1, 2], shots=None, draws=2,
                                      max_monitor_examples=4)  # fmt: skip
    demo_config["fomaml"]["inner_lr"] = 0.01
    return stage_settings(demo_config, "calibrate")


def _run(settings: dict[str, Any], tasks: Path, out: Path, *models: str, names=TASKS) -> dict[str, Any]:
    models = models or ("--model", str(shared_workspace() / "model"))
    argv = ["--settings", json.dumps(settings), "--init", "base", *models, "--tasks-dir", str(tasks),
            "--tasks", *names, "--output", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_main_reads_only_dev_and_reports_the_grid(settings: dict[str, Any], tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(shared_workspace() / "tasks", tasks)
    for task in TASKS:  # the tuner must not need (or read) the test split
        (tasks / task / "test.parquet").unlink()
    report = _run(settings, tasks, tmp_path / "base.json")
    assert report["tasks"] == list(TASKS) and report["optimizer"] == "adam" and report["shots"] == [0, 3]
    at_three = [p for p in report["grid"] if p["shots"] == 3]
    assert {(p["lr"], p["num_steps"]) for p in at_three} == {(0.01, 1), (0.01, 2), (0.3, 1), (0.3, 2)}
    assert [p["num_steps"] for p in report["grid"] if p["shots"] == 0] == [0]  # 0 shots: nothing adapted
    curve = [c for c in report["curve"] if c["shots"] == 3 and c["lr"] == 0.3]
    assert [c["step"] for c in curve] == [0, 1, 2]  # the curve starts at the loss before adapting
    assert len(report["per_task"]) == len(TASKS) * (1 + len(at_three))
    for entry in report["chosen"]:
        points = [p for p in report["grid"] if p["shots"] == entry["shots"]]
        assert entry["accuracy"] == max(p["accuracy"] for p in points)
        # The one reader of the choice (workflow, evaluation and analysis) gets the same record back.
        choice = read_choice(tmp_path / "base.json", entry["shots"])
        assert choice == AdaptationChoice("adam", entry["lr"], entry["num_steps"], 0)
    assert read_choice(tmp_path / "base.json", 50).num_steps == report["chosen"][1]["num_steps"]  # k=50 -> band 3
    # Adaptation moves the model: after two Adam steps at 0.01 the dev NLL is below the NLL before adapting.
    point = next(p for p in at_three if p["lr"] == 0.01 and p["num_steps"] == 2)
    assert point["nll"] < curve[0]["nll"]
    assert set(report["agreement"]) == {"all", "3"}


def test_one_run_per_rate_equals_separate_step_counts(settings: dict[str, Any], tmp_path: Path) -> None:
    """The NLL after step 1 of a 2-step run is what a 1-step adaptation gives (the curve's premise)."""
    both = _run(settings, shared_workspace() / "tasks", tmp_path / "both.json")
    settings["calibration"]["steps_grid"] = [1]
    one = _run(settings, shared_workspace() / "tasks", tmp_path / "one.json")
    for point in (p for p in one["grid"] if p["shots"] == 3):
        match = next(p for p in both["grid"] if p["shots"] == 3 and p["lr"] == point["lr"] and p["num_steps"] == 1)
        assert match["nll"] == pytest.approx(point["nll"], rel=1e-6)
        assert match["answer_nll"] == pytest.approx(point["answer_nll"], rel=1e-6)


def test_candidates_from_a_train_summary(settings: dict[str, Any], tmp_path: Path) -> None:
    """Two candidates with the same weights tie on every criterion: the later checkpoint is kept."""
    run = tmp_path / "run"
    for step in (3, 6):
        shutil.copytree(shared_workspace() / "model", run / "candidates" / f"step-{step}")
    summary = {"candidates": [{"step": 3, "path": "candidates/step-3"}, {"step": 6, "path": "candidates/step-6"}]}
    (run / "train_summary.json").write_text(json.dumps(summary))
    settings["calibration"].update(lr_grid=[0.01], steps_grid=[1], draws=1)
    report = _run(settings, shared_workspace() / "tasks", tmp_path / "run.json", "--train-summary",
                  str(run / "train_summary.json"))  # fmt: skip
    assert [c["step"] for c in report["candidates"]] == [3, 6]
    assert {e["checkpoint"] for e in report["chosen"]} == {6}
    assert read_chosen_model(tmp_path / "run.json", 3) == str(run / "candidates" / "step-6")


def test_a_shot_count_larger_than_a_pool_stops_before_any_work(settings: dict[str, Any], tmp_path: Path) -> None:
    settings["tuned_shots"] = [11]  # the tiny dev_pool holds 10 problems per task
    with pytest.raises(ConfigError, match=r"calibration\.shots: 11 shots, but task 'algebra' has only 10 dev_pool"):
        _run(settings, shared_workspace() / "tasks", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_not_adapting_can_win_and_is_no_edge(settings: dict[str, Any], tmp_path: Path) -> None:
    """With 0 in steps_grid and a rate that wrecks the model, the tuner chooses not to adapt: lr 0, no edge."""
    settings["calibration"].update(lr_grid=[30.0], steps_grid=[0, 1], draws=1)
    settings["fomaml_inner_lr"] = 30.0
    report = _run(settings, shared_workspace() / "tasks", tmp_path / "base.json")
    entry = next(e for e in report["chosen"] if e["shots"] == 3)
    assert (entry["num_steps"], entry["lr"], entry["edges"]) == (0, 0.0, [])
    assert read_choice(tmp_path / "base.json", 3) == AdaptationChoice("adam", 0.0, 0, 0)
