"""Positive control: the pipeline detects a known adaptation effect on synthetic tasks whose shots carry information.

A real run of the stages, by their command lines, on a small offline config: synthetic tasks with hidden rules,
the tiny base pretrained on rule-free problems, k-shot adaptation of that base (an adapted initialisation: it
has never seen any task's rule), greedy generation and math-verify grading. The rule of each task (its units
digit) is visible only in its shots, so accuracy at the largest k must exceed 0-shot accuracy, with the paired
test over the same test problems significant (the statistics' own estimator, ``crossed_estimate``: with one
cluster per side it is the paired t-test).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fomaml_math.__main__ import main as cli_main
from fomaml_math.analysis.inference import crossed_estimate, t_interval, t_test_p
from fomaml_math.analysis.positive_control import positive_control_table
from fomaml_math.analysis.tables import StatsSettings
from fomaml_math.config import stage_settings, validate_config
from fomaml_math.data.synthetic import solve_synthetic

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = ["algebra", "algebra_v1", "number_theory_v1"]
LARGEST_K = 20


def control_config() -> dict:
    """config/test.yaml with synthetic variant tasks, the demo's tiny model, a short pretraining, Adam adaptation."""
    config = yaml.safe_load((REPO_ROOT / "config" / "test.yaml").read_text())
    demo = yaml.safe_load((REPO_ROOT / "config" / "demo.yaml").read_text())
    config["data"]["synthetic"]["problems_per_task"] = 150
    config["tasks"]["names"] = TASKS
    config["tasks"]["split"].update(dev_pool=2 * LARGEST_K, dev_monitor=6)
    config["experiments"] = [{"name": "main", "meta_test": []}]
    config["fomaml"]["meta_batch_size"] = 2
    config["fomaml"]["inner_optimizer"] = "adam"  # must match eval.optimizer (checked by the config)
    config["prompt"]["instruction"] = demo["prompt"]["instruction"]
    config["model"]["tiny"] = copy.deepcopy(demo["model"]["tiny"])
    config["model"]["pretrain"] = {"problems_per_family": 400, "steps": 200, "batch_size": 32, "lr": 3.0e-3}
    config["model"]["pretrain"]["warmup_steps"] = 20
    config["eval"].update(
        shots=[0, LARGEST_K], repeats=2, optimizer="adam", inner_lr=3.0e-3, num_inner_steps=5, inner_batch_size=8
    )
    config["eval"].update(max_test_problems=None, max_new_tokens=64, gen_batch_size=16)
    return validate_config(config)


def run_stage(*argv: str) -> None:
    assert cli_main(list(argv)) == 0, argv


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[dict, dict[int, pd.DataFrame], Path]:
    root = tmp_path_factory.mktemp("positive-control")
    config = control_config()

    def settings(stage: str) -> str:
        return json.dumps(stage_settings(config, stage))

    table, tasks = root / "math.parquet", root / "tasks"
    run_stage("ingest", "--settings", settings("ingest"), "--output", str(table), "--report", str(root / "r.json"))
    run_stage(
        "split-tasks", "--settings", settings("split_tasks"), "--input", str(table), "--out-dir", str(tasks),
        "--stats", str(root / "split_stats.tsv"),
    )  # fmt: skip
    init, base = root / "tiny-init", root / "tiny-base"
    run_stage(
        "build-tiny-model", "--settings", settings("build_tiny_model"), "--tasks-dir", str(tasks), "--output", str(init)
    )
    run_stage(
        "pretrain-tiny-base", "--settings", settings("pretrain_tiny_base"), "--init-model", str(init),
        "--tasks-dir", str(tasks), "--output", str(base),
    )  # fmt: skip
    frames = {}
    for k in (0, LARGEST_K):
        output = root / f"base/shots-{k}.parquet"
        run_stage(
            "evaluate", "--settings", settings("evaluate"), "--init", "base", "--model", str(base), "--tasks-dir",
            str(tasks), "--shots", str(k), "--output", str(output), "--no-progress",
        )  # fmt: skip
        frames[k] = pd.read_parquet(output)
    return config, frames, tasks


def per_problem(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per test problem, averaged over the repeats (draws of the shots), as the statistics do."""
    return frame.groupby(["task", "problem_id"], as_index=False)["correct"].mean().sort_values(["task", "problem_id"])


def test_gold_answers_follow_the_hidden_rules(evaluated) -> None:
    """What the grader compares against is the task's rule applied to the problem (the rule column of the task
    files, never rendered), and for most problems that differs from the plain result."""
    _, frames, tasks_dir = evaluated
    rows = frames[0]
    assert set(rows["task"]) == set(TASKS)
    changed = 0
    for task in TASKS:
        test = pd.read_parquet(tasks_dir / task / "test.parquet").set_index("id")
        graded = rows[rows["task"] == task]
        for problem_id, gold in zip(graded["problem_id"], graded["gold"], strict=True):
            problem, rule = test.loc[problem_id, ["problem", "rule"]]
            assert int(gold) == solve_synthetic(task, problem, rule)
            changed += int(gold) != solve_synthetic(task, problem)
    assert changed > 0.7 * len(rows)


def test_the_base_writes_boxed_answers_and_scores_above_zero_unadapted(evaluated) -> None:
    _, frames, _ = evaluated
    zero = frames[0]
    assert (zero["grade_status"] == "no_answer").mean() < 0.2  # pretraining taught the answer format
    assert zero["correct"].mean() > 0  # where a rule leaves the plain result unchanged


def test_positive_control_detected_at_the_largest_k(evaluated) -> None:
    config, frames, _ = evaluated
    before, after = per_problem(frames[0]), per_problem(frames[LARGEST_K])
    assert before[["task", "problem_id"]].equals(after[["task", "problem_id"]])  # paired: the same problems
    estimate = crossed_estimate(
        after["correct"].to_numpy()[None, :], before["correct"].to_numpy()[None, :], after["task"].to_numpy()
    )
    low, high = t_interval(estimate, config["stats"]["ci_level"])
    p = t_test_p(estimate)
    gain = float(after["correct"].mean() - before["correct"].mean())
    assert np.isclose(estimate.estimate, gain)
    print(f"positive control: base accuracy {before['correct'].mean():.3f} at 0 shots, {after['correct'].mean():.3f}"
          f" at {LARGEST_K}; gain {gain:+.3f} [{low:+.3f}, {high:+.3f}], p {p:.2g}")  # fmt: skip
    assert gain > 0 and low > 0 and p < config["stats"]["alpha"], (gain, low, high, p)
    # adaptation did something measurable: the weights moved and greedy outputs changed (the support loss over all
    # tokens need not fall: at this rate Adam's first steps overshoot slightly while the answer digit is learnt)
    shots = frames[LARGEST_K]
    assert (shots["weight_change"] > 0).all()
    outputs = shots.merge(
        frames[0][["task", "problem_id", "generated"]], on=["task", "problem_id"], suffixes=("", "_0")
    )
    assert (outputs["generated"] != outputs["generated_0"]).mean() > 0.2


def test_adapted_answers_use_the_tasks_digit(evaluated) -> None:
    """The gain comes from the rule: adapted answers end in the task's digit more often than unadapted ones."""
    _, frames, _ = evaluated

    def share_with_digit(frame: pd.DataFrame) -> float:
        digits = frame["gold"].str[-1]
        return float((frame["extracted"].fillna("").str[-1:] == digits).mean())

    assert share_with_digit(frames[LARGEST_K]) > share_with_digit(frames[0])


def test_positive_control_table_on_the_real_run(evaluated) -> None:
    """The table function for the stats stage agrees with the direct computation above."""
    config, frames, _ = evaluated
    settings = StatsSettings.from_settings(stage_settings(config, "stats"))
    table = positive_control_table(pd.concat([frames[0], frames[LARGEST_K]], ignore_index=True), settings)
    row = table[(table["init"] == "base") & (table["pool"] == "all")].iloc[0]
    before, after = per_problem(frames[0]), per_problem(frames[LARGEST_K])
    assert np.isclose(row["gain"], after["correct"].mean() - before["correct"].mean())
    assert row["shots"] == LARGEST_K and row["n_seeds"] == 1 and bool(row["detected"])
