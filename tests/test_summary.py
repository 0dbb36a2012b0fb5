"""Summary stage: the Markdown shows exactly the numbers of the stats tables, and says what is missing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from test_stats import SETTINGS, run_stats, write_control

from fomaml_math.analysis import summary
from fomaml_math.analysis.calibration import grid_edge
from fomaml_math.analysis.tables import StatsSettings, read_table


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}"


def calibration_record(init: str, lr: float) -> dict:
    grid = [
        {"lr": g, "num_steps": 5, "dev_loss": 1.0 + abs(g - lr) * 1e3, "dev_loss_before": 1.4} for g in (1e-4, 1e-3)
    ]
    curve = [{"lr": lr, "step": s, "dev_loss": 1.4 - 0.4 * min(s, 3) / 3} for s in range(6)]
    return {
        "init": init,
        "experiment": None,
        "train_seed": -1 if init == "base" else 0,
        "optimizer": "sgd",
        "chosen": {"lr": lr, "num_steps": 5},
        "grid": grid,
        "curve": curve,
    }


def write_calibration(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for init, lr in (("base", 1e-3), ("sft", 1e-4), ("fomaml", 1e-4)):
        path = directory / f"{init}.json"
        path.write_text(json.dumps(calibration_record(init, lr)))
        paths.append(path)
    return paths


def _summarise(stats_dir: Path, tmp_path: Path, calibration: list[Path] | None = None) -> str:
    out = tmp_path / "summary.md"
    argv = ["--settings", json.dumps(SETTINGS), "--stats-dir", str(stats_dir), "--output", str(out)]
    if calibration:
        argv += ["--calibration", *map(str, calibration)]
    assert summary.main(argv) == 0
    return out.read_text()


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("summary")
    return run_stats(tmp, control=write_control(tmp / "control"))


def test_primary_rows_carry_the_table_numbers_and_verdicts(stats_dir: Path, tmp_path: Path) -> None:
    text = _summarise(stats_dir, tmp_path, write_calibration(tmp_path / "cal"))
    primary = read_table(stats_dir, "per_shot.tsv")
    assert "### Experiment `in_domain`: all 3 task(s) pooled" in text
    assert "### Experiment `heldout_geometry`: held-out task(s) geometry pooled" in text
    for row in primary.itertuples():
        label = {"fomaml-sft": "FOMAML − SFT", "fomaml-base": "FOMAML − Base"}[row.comparison]
        diff = f"{_pp(row.acc_diff)} [{_pp(row.acc_diff_ci_low)}, {_pp(row.acc_diff_ci_high)}]"
        verdict = {"better": "**better**", "worse": "**worse**", "inconclusive": "inconclusive"}.get(
            row.verdict, "equivalent within ±2 pp"
        )
        line = f"| {row.shots} | {label} | {diff} | {summary.fmt_p(row.acc_p_holm, row.acc_stars)} | "
        line += f"{summary.fmt_p(row.tost_p_holm)} | {verdict}"
        assert line in text
        mde = f"{100 * row.mde:.1f}" if row.mde <= 1 else "> 100"
        assert f"| {mde} | {summary.fmt_percent(row.power_at_target)} | seed-t (3/" in text
    accuracy = read_table(stats_dir, "accuracy.tsv")
    row = accuracy[
        (accuracy.experiment == "in_domain")
        & (accuracy.task == "all")
        & (accuracy.init == "fomaml")
        & (accuracy.shots == 5)
        & (accuracy.train_seed == "all")
    ].iloc[0]
    assert f"(seed SD {100 * row.accuracy_seed_sd:.1f}, 3 seeds)" in text


def test_control_generation_adaptation_and_calibration_sections(stats_dir: Path, tmp_path: Path) -> None:
    text = _summarise(stats_dir, tmp_path, write_calibration(tmp_path / "cal"))
    control = read_table(stats_dir, "control.tsv")
    expected = "finds a difference where none exists" if control.significant.any() else "finds no difference"
    assert expected in text
    generation = read_table(stats_dir, "generation.tsv")
    row = generation.iloc[0]
    assert (
        f"| {row.experiment} | Base | {row.shots} | {100 * row.no_answer_rate:.1f} | {100 * row.truncation_rate:.1f} |"
        in text
    )
    # Chosen lr per init and the adaptation speed (curve reaches 90% of its drop at step 3).
    assert "| Base | shared | -1 | sgd | 0.001 | 5 | 1.400 → 1.000 | 3 of 5 |" in text
    assert "| FOMAML | shared | 0 | sgd | 0.0001 | 5 |" in text
    assert "## Held-out tasks" in text and "Geometry:" in text
    # The rule-adoption control (every gold answer of the synthetic study is "1": digit 1) comes first.
    assert text.index("## Positive control: rule adoption") < text.index("## Secondary positive control")
    adoption = read_table(stats_dir, "rule_adoption.tsv")
    held = adoption[(adoption.experiment == "heldout_geometry") & (adoption.pool == "meta_test")]
    assert "### `heldout_geometry`: held-out task(s) geometry pooled; Base 0-shot share " in text
    row = held[(held.init == "fomaml") & (held.shots == 10)].iloc[0]
    share = f"{100 * row.share:.1f} [{100 * row.share_ci_low:.1f}, {100 * row.share_ci_high:.1f}]"
    assert f"| FOMAML | 10 | {share} | {_pp(row['diff'])} [" in text
    assert "## Exploratory: per task (secondary family)" in text


def test_low_change_adaptation_is_flagged(stats_dir: Path) -> None:
    tables, _ = summary.read_tables(stats_dir)
    adaptation = tables["adaptation_summary.tsv"].copy()
    adaptation.loc[0, ["outputs_changed", "low_change"]] = [0.004, True]
    tables["adaptation_summary.tsv"] = adaptation
    text = summary.render_summary(tables, StatsSettings.from_settings(SETTINGS))
    row = adaptation.iloc[0]
    assert "changed 0.4% of outputs (< 1%)" in text
    assert f"at {row.shots} shots (`{row.experiment}`)" in text


def test_absent_inputs_degrade_to_one_line_notes(tmp_path: Path) -> None:
    out = run_stats(tmp_path, seeds=(0,), experiments={"in_domain": ()})
    (out / "sample_efficiency.tsv").unlink()
    text = _summarise(out, tmp_path)
    assert "No negative control was run" in text
    assert "No calibration files given" in text
    assert "No experiment holds out tasks" in text
    assert "One training seed: intervals and tests cover test-problem sampling only" in text
    assert "Not computed" in text


def test_summary_without_sft(tmp_path: Path) -> None:
    text = _summarise(run_stats(tmp_path, inits=("base", "fomaml")), tmp_path)
    assert "| Shots | Base | FOMAML |" in text
    assert "| FOMAML − SFT |" not in text


@pytest.mark.parametrize(("p", "expected"), [(0.0004, "<0.001"), (0.0123, "0.012"), (math.nan, "n/a")])
def test_p_value_format(p: float, expected: str) -> None:
    assert summary.fmt_p(p) == expected


def test_text_cells_read_back_as_text(stats_dir: Path) -> None:
    comparisons = read_table(stats_dir, "comparisons.tsv")
    assert pd.api.types.is_string_dtype(comparisons.acc_stars)
    assert not comparisons.acc_stars.isna().any()
    assert set(comparisons.verdict) <= {"better", "worse", "equivalent", "inconclusive"}


def test_an_untestable_negative_control_says_so() -> None:
    control = pd.DataFrame({"init": ["fomaml"], "experiment": ["main"], "train_seed": [0], "main_shot_seed": [1],
                            "control_shot_seed": [2], "shots": [5], "acc_diff": [0.0], "acc_p_holm": [float("nan")],
                            "significant": [False], "note": [""]})  # fmt: skip
    settings = StatsSettings.from_settings(SETTINGS)
    text = "\n".join(summary._control_lines(control, settings))
    assert "Not testable" in text and "identical outcomes" in text


def test_the_positive_control_line_names_the_detected_inits() -> None:
    table = pd.DataFrame({"experiment": ["heldout"] * 3, "init": ["base", "sft", "fomaml"], "pool": ["meta_test"] * 3,
                          "shots": [50] * 3, "acc_0": [0.1, 0.0, 0.0], "acc_k": [0.12, 0.4, 0.3],
                          "gain": [0.02, 0.4, 0.3], "gain_ci_low": [-0.02, 0.3, 0.1], "gain_ci_high": [0.06, 0.5, 0.5],
                          "p_holm": [0.4, 0.001, 0.02], "detected": [False, True, True]})  # fmt: skip
    settings = StatsSettings.from_settings(SETTINGS)
    text = "\n".join(summary._positive_control_lines(table, settings))
    assert "## Secondary positive control: accuracy gain" in text
    assert "**Accuracy gain detected** on the held-out tasks: SFT, FOMAML" in text
    assert "Positive control detected" not in text  # the phrase belongs to the rule-adoption control
    assert "| heldout | held-out | Base | 50 | 10.0 | 12.0 |" in text


def test_grid_edge() -> None:
    assert grid_edge(1e-3, [1e-2, 1e-3, 3e-3]) == "lowest" and grid_edge(1e-2, [1e-2, 1e-3]) == "highest"
    assert grid_edge(3e-3, [1e-2, 1e-3, 3e-3]) == "" and grid_edge(1e-3, [1e-3]) == ""
