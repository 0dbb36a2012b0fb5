"""Summary stage: the Markdown shows exactly the numbers of the stats tables, and says what is missing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_stats import SETTINGS, run_stats, write_control

from fomaml_math.analysis import summary
from fomaml_math.analysis.calibration import cap_text as calibration_cap
from fomaml_math.analysis.calibration import load_calibration, steps_to_fraction
from fomaml_math.analysis.tables import StatsSettings, read_table
from fomaml_math.errors import ConfigError


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}"


# A tuner file (stage calibrate) in its format, by hand: checkpoint c starts at dev accuracy 0.2 + c/1000 and dev
# NLL 2 - c/100; at the best (checkpoint, rate) the NLL falls by 1.0 along the shape, elsewhere by 0.5; the largest
# rate diverges (NLL Infinity) except where it is the best.  Accuracy is graded at step 0 and the grid's step counts.
LR_GRID = (1e-4, 1e-3, 1e-2)
STEPS_GRID = (1, 3, 5)
TUNED_SHOTS = (5, 10)
SHAPES = {"fast": (1.0, 0.6, 0.3, 0.08, 0.04, 0.0), "slow": (1.0, 0.8, 0.5, 0.3, 0.15, 0.0)}  # 90% at step 3 / 5
# (init, experiment, train_seed, chosen checkpoint, chosen rate, shape): the base is tuned per experiment.
CALIBRATED = (
    ("base", "in_domain", -1, 0, 1e-3, "fast"),
    ("base", "heldout_geometry", -1, 0, 1e-3, "fast"),
    ("sft", "in_domain", 0, 80, 1e-2, "fast"),  # the highest rate: an edge
    ("fomaml", "in_domain", 0, 80, 1e-3, "fast"),
    ("fomaml", "in_domain", 1, 40, 1e-4, "slow"),  # another seed, another rate (the lowest: an edge)
)
NOTES = {
    1e-2: "highest rate 0.01: accuracy 0.34 against 0.31 at 0.001, so the optimum may lie beyond the grid",
    1e-4: "lowest rate 0.0001: accuracy 0.3 against 0.27 at 0.001, so the optimum may lie beyond the grid",
}


def calibration_record(init: str, experiment: str, seed: int, checkpoint: int, lr: float, shape: str,
                       criterion: str = "accuracy") -> dict:  # fmt: skip
    checkpoints = [0] if init == "base" else [40, 80]
    grid, curve = [], []
    for c in checkpoints:
        acc0, nll0 = 0.2 + c / 1000, 2.0 - c / 100
        zero = {"checkpoint": c, "shots": 0, "lr": 0.0, "nll": nll0, "answer_nll": nll0 + 0.5, "accuracy": acc0}
        curve.append(zero | {"step": 0})
        grid.append(zero | {"num_steps": 0, "accuracy_half_a": acc0, "accuracy_half_b": acc0})
        for k in TUNED_SHOTS:
            for g in LR_GRID:
                best = c == checkpoint and math.isclose(g, lr)
                for step, f in enumerate(SHAPES[shape]):
                    diverged = g == max(LR_GRID) and not best and step > 0
                    nll = math.inf if diverged else nll0 - (1.0 if best else 0.5) * (1 - f)
                    graded = step == 0 or step in STEPS_GRID
                    acc = acc0 + (0.1 if best else 0.05) * step / 5 * k / 5 if graded else None
                    point = {"checkpoint": c, "shots": k, "lr": g, "nll": nll, "answer_nll": nll + 0.5, "accuracy": acc}
                    curve.append(point | {"step": step})
                    if step in STEPS_GRID:
                        grid.append(point | {"num_steps": step, "accuracy_half_a": acc, "accuracy_half_b": acc})
    last = max(checkpoints)
    chosen = [next(p for p in grid if p["shots"] == 0 and p["checkpoint"] == last) | {"edges": [], "edge_note": ""}]
    for k in TUNED_SHOTS:
        point = next(
            p for p in grid if (p["checkpoint"], p["shots"], p["lr"], p["num_steps"]) == (checkpoint, k, lr, 3)
        )
        edges = {1e-4: ["lr:lowest"], 1e-2: ["lr:highest"]}.get(lr, [])
        chosen.append(point | {"edges": edges, "edge_note": NOTES.get(lr, "") if k == 5 else ""})
    for entry in chosen:
        entry["criterion_value"] = entry[criterion]
    rho = {"accuracy": 1.0, "answer_nll": 0.8, "nll": -0.25 - seed / 10, "split_half": 0.6}
    return {
        "init": init,
        "experiment": experiment,
        "train_seed": seed,
        "optimizer": "sgd",
        "criterion": criterion,
        "tasks": ["algebra", "geometry", "number_theory"],
        "candidates": [{"step": c, "path": f"models/{init}/candidates/step-{c}"} for c in checkpoints],
        "lr_grid": list(LR_GRID),
        "steps_grid": list(STEPS_GRID),
        "shots": [0, *TUNED_SHOTS],
        "bands": {"0": 0, "5": 5, "10": 10},
        "chosen": chosen,
        "grid": grid,
        "curve": curve,
        "agreement": {"all": rho, "5": rho | {"nll": None}, "10": rho},
        "per_task": [],
        "wall_time_s": 1.0,
        "settings": {},
    }


def write_calibration(directory: Path, criterion: str = "accuracy") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for init, experiment, seed, checkpoint, lr, shape in CALIBRATED:
        path = directory / f"{experiment}-{init}-{seed}.json"
        record = calibration_record(init, experiment, seed, checkpoint, lr, shape, criterion)
        path.write_text(json.dumps(record))  # NLLs of diverged points as Infinity, as the tuner writes them
        paths.append(path)
    return paths


def _summarise(stats_dir: Path, tmp_path: Path, calibration: list[Path] | None = None) -> str:
    out = tmp_path / "summary.md"
    argv = ["--settings", json.dumps(SETTINGS), "--stats-dir", str(stats_dir), "--output", str(out),
            "--per-task-output", str(tmp_path / "per_task.md")]  # fmt: skip
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
        # Beside the Holm verdict: the interval simultaneous over the family (Bonferroni), not the marginal one.
        diff = f"{_pp(row.acc_diff)} [{_pp(row.acc_diff_sci_low)}, {_pp(row.acc_diff_sci_high)}]"
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
    # The tuning section, from the files given on the command line (its rows: test_calibration_section_...).
    assert text.index("## Adaptation effect") < text.index("## Tuning (checkpoint and adaptation)")
    assert "| FOMAML | in_domain | 1 | 5 | 40 | sgd | 0.0001 | 3 |" in text and "### Criterion agreement" in text
    assert "## Held-out tasks" in text and "Geometry:" in text
    # The rule-adoption control (every gold answer of the synthetic study is "1": digit 1) comes first.
    assert text.index("## Positive control: rule adoption") < text.index("## Secondary positive control")
    adoption = read_table(stats_dir, "rule_adoption.tsv")
    held = adoption[(adoption.experiment == "heldout_geometry") & (adoption.pool == "meta_test")]
    assert "### `heldout_geometry`: held-out task(s) geometry pooled; Base 0-shot share " in text
    row = held[(held.init == "fomaml") & (held.shots == 10)].iloc[0]
    share = f"{100 * row.share:.1f} [{100 * row.share_ci_low:.1f}, {100 * row.share_ci_high:.1f}]"
    assert f"| FOMAML | 10 | {share} | {_pp(row['diff'])} [" in text
    # The per-task detail is a file of its own; the summary points to it.
    assert "## Exploratory" not in text and "`results/stats/per_task.md`" in text
    per_task = (tmp_path / "per_task.md").read_text()
    assert (
        "## Exploratory: per task (secondary family)" in per_task and "Cross-task analysis (tasks a random" in per_task
    )


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
    text = "\n".join(summary._control_lines(control, None, settings))
    assert "Not testable" in text and "identical outcomes" in text


def test_the_split_lines_give_the_shares_and_the_seed_message(stats_dir: Path, tmp_path: Path) -> None:
    """The 3-seed study: no seed split (the message says why); the control's 2 draws: none either."""
    text = _summarise(stats_dir, tmp_path)
    assert (
        "- Seed splits (`in_domain`): not run, needs >= 4 seeds, has 3: each half needs >= 2 for a seed variance."
        in text
    )
    assert "- Draw splits of FOMAML (seed 0), its control draws: not run, needs >= 4 draws, has 2:" in text
    aa = pd.DataFrame(
        {
            "experiment": ["main"] * 3,
            "control": ["draws", "seeds", "seeds"],
            "init": ["fomaml", "fomaml", "sft"],
            "train_seeds": ["0", "0,1,2,3", "0,1,2,3"],
            "shots": ["5", "5,20", "5,20"],
            "n_units": [8, 4, 4],
            "half_size": [4, 2, 2],
            "n_splits": [35, 3, 3],
            "exhaustive": [True] * 3,
            "n_rejected": [2, 0, 1],
            "false_positive_rate": [2 / 35, 0.0, 1 / 3],
            "false_positive_rate_mc_se": [0.0] * 3,
            "note": [""] * 3,
        }
    )
    lines = summary._split_lines(aa, StatsSettings.from_settings(SETTINGS))
    assert lines[2] == (
        "- Draw splits of FOMAML (seed 0), its control draws (8 draws split 4 vs 4): k = 5: 2 of all "
        "35 splits reject (5.7%). The splits share draws: the rate is conditional on these draws."
    )
    assert lines[3] == (
        "- Seed splits (`main`, primary analysis, 4 seeds split 2 vs 2): FOMAML 0 of all 3 splits "
        "reject (0.0%); SFT 1 of all 3 splits reject (33.3%)."
    )
    sampled = aa.iloc[:1].assign(
        exhaustive=False, n_splits=500, n_rejected=30, false_positive_rate=0.06, false_positive_rate_mc_se=0.0106
    )
    assert (
        "k = 5: 30 of 500 random splits reject (6.0% ± 1.1)"
        in summary._split_lines(sampled, StatsSettings.from_settings(SETTINGS))[2]
    )


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


def test_steps_to_fraction_by_hand() -> None:
    # reduction 2.0 - 1.0 = 1.0: 90% of it is reached at NLL <= 1.1, first at step 2 (step 0 itself counts)
    assert steps_to_fraction([0, 1, 2, 3], [2.0, 1.5, 1.05, 1.0], 2.0) == 2
    assert steps_to_fraction([3, 0, 2, 1], [1.0, 2.0, 1.05, 1.5], 2.0) == 2  # order of the points does not matter
    assert steps_to_fraction([0, 1, 2], [2.0, math.inf, 1.0], 2.0) == 2  # a diverged step is no reduction
    assert math.isnan(steps_to_fraction([0, 1, 2], [2.0, 2.1, 2.0], 2.0))  # never falls
    assert math.isnan(steps_to_fraction([0], [2.0], 2.0))  # 0 shots: nothing adapted
    assert math.isnan(steps_to_fraction([0, 1], [math.inf, 1.0], math.inf))


def test_load_calibration_one_row_per_seed_and_k(tmp_path: Path) -> None:
    tables = load_calibration(write_calibration(tmp_path))
    chosen = tables["chosen"]
    assert len(chosen) == len(CALIBRATED) * (1 + len(TUNED_SHOTS))
    fomaml = chosen[(chosen.init == "fomaml") & (chosen.shots == 5)].set_index("train_seed")
    assert sorted(fomaml.index) == [0, 1]  # per seed, never averaged
    # seed 0: checkpoint 80 (acc 0.28, NLL 1.2 unadapted); at lr 1e-3, 3 steps: acc 0.28 + 0.1 * 3/5 = 0.34,
    # NLL 1.2 - 1.0 * (1 - 0.08) = 0.28; fast shape: 90% of the drop (NLL <= 1.2 - 0.9) first at step 3.
    s0 = fomaml.loc[0]
    assert (s0.checkpoint, s0.lr, s0.num_steps, s0.curve_steps) == (80, 1e-3, 3, 5)
    assert s0.accuracy_before == pytest.approx(0.28) and s0.accuracy == pytest.approx(0.34)
    assert s0.nll_before == pytest.approx(1.2) and s0.nll == pytest.approx(0.28)
    assert s0.steps_to_90 == 3 and s0.edges == "" and s0.edge_note == ""
    # seed 1: checkpoint 40, the lowest rate (an edge), slow shape: 90% first reached at the last step
    s1 = fomaml.loc[1]
    assert (s1.checkpoint, s1.lr, s1.steps_to_90) == (40, 1e-4, 5)
    assert s1.accuracy_before == pytest.approx(0.24) and s1.nll_before == pytest.approx(1.6)
    assert s1.edges == "lr:lowest" and s1.edge_note == NOTES[1e-4]
    zero = chosen[(chosen.init == "fomaml") & (chosen.train_seed == 1) & (chosen.shots == 0)].iloc[0]
    assert (zero.checkpoint, zero.lr, zero.num_steps, zero.curve_steps) == (80, 0.0, 0, 0)
    assert math.isnan(zero.steps_to_90) and zero.accuracy_before == zero.accuracy == pytest.approx(0.28)
    # the diverged points are read back as inf, and a null accuracy as NaN
    curve = tables["curve"]
    assert np.isinf(curve.nll).any() and curve.accuracy.isna().any()
    agreement = tables["agreement"]
    rows = agreement[(agreement.init == "fomaml") & (agreement.train_seed == 1)]
    assert list(rows.group) == ["all", "5", "10"]
    assert rows.nll.iloc[0] == pytest.approx(-0.35) and math.isnan(rows.nll.iloc[1])


def _broken(tmp_path: Path, change) -> Path:
    record = calibration_record(*CALIBRATED[3])
    change(record)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("agreement"), r"missing key 'agreement'"),
        (lambda r: r["chosen"][1].pop("lr"), r"chosen\[1\] lacks lr"),
        (lambda r: r["grid"][2].update(nll="low"), r"grid\[2\]\.nll: expected a number, got 'low'"),
        (lambda r: r["curve"][1].update(step=1.5), r"curve\[1\]\.step: expected an integer"),
        (lambda r: r.update(criterion="loss"), r"criterion must be one of accuracy, answer_nll, nll"),
        (lambda r: r.update(chosen={"lr": 1e-3, "num_steps": 5}), r"chosen must be a non-empty list"),
        (lambda r: r["agreement"]["all"].pop("split_half"), r"agreement\['all'\] lacks split_half"),
        (lambda r: r["chosen"][2].update(edges="lr:lowest"), r"chosen\[2\]\.edges must be a list"),
    ],
)
def test_a_bad_calibration_file_is_a_one_line_error(tmp_path: Path, change, message: str) -> None:
    path = _broken(tmp_path, change)
    with pytest.raises(ConfigError, match=message) as caught:
        load_calibration([path])
    assert str(caught.value).startswith(f"--calibration {path}: ") and "\n" not in str(caught.value)


def test_calibration_section_rows_edges_and_agreement(tmp_path: Path) -> None:
    text = "\n".join(summary._calibration_lines(load_calibration(write_calibration(tmp_path))))
    assert "## Tuning (checkpoint and adaptation) and adaptation speed" in text
    # the hand computations of test_load_calibration_one_row_per_seed_and_k, one row per seed and k
    assert (
        "| FOMAML | in_domain | 0 | 5 | 80 | sgd | 0.001 | 3 | accuracy 34.0% | 28.0 → 34.0 | 1.200 → 0.280 | 3 of 5 |"
        in text
    )
    assert (
        "| FOMAML | in_domain | 1 | 5 | 40 | sgd | 0.0001 | 3 | accuracy 30.0% | 24.0 → 30.0 | 1.600 → 0.900 | 5 of 5 |"
        in text
    )
    # k = 10: accuracy gain twice as large, the same NLL curve
    assert (
        "| FOMAML | in_domain | 0 | 10 | 80 | sgd | 0.001 | 3 | accuracy 40.0% | 28.0 → 40.0 | 1.200 → 0.280 |" in text
    )
    # 0 shots: only the checkpoint (the later one), nothing adapted
    assert (
        "| FOMAML | in_domain | 1 | 0 | 80 | sgd | – | 0 | accuracy 28.0% | 28.0 → 28.0 | 1.200 → 1.200 | n/a |" in text
    )
    assert "| Base | heldout_geometry | – | 5 | 0 | sgd | 0.001 | 3 |" in text
    assert sum(line.startswith("| FOMAML | in_domain |") and "| 5 | " in line for line in text.splitlines()) == 2
    # an edge bullet exactly for the two edge choices (k = 10's note is empty: the edge is named instead)
    bullets = [line for line in text.splitlines() if line.startswith("- **At the grid's edge**")]
    assert bullets == [
        f"- **At the grid's edge**: SFT (in_domain, seed 0, k = 5): {NOTES[1e-2]} (`calibration.lr_grid`).",
        "- **At the grid's edge**: SFT (in_domain, seed 0, k = 10): the highest rate (`calibration.lr_grid`).",
        f"- **At the grid's edge**: FOMAML (in_domain, seed 1, k = 5): {NOTES[1e-4]} (`calibration.lr_grid`).",
        "- **At the grid's edge**: FOMAML (in_domain, seed 1, k = 10): the lowest rate (`calibration.lr_grid`).",
    ]
    # the agreement table: group "all", one row per file, the configured criterion in bold
    assert "### Criterion agreement" in text and "noise ceiling" in text
    assert "| FOMAML | in_domain | 0 | accuracy | **1.00** | 0.80 | -0.25 | 0.60 |" in text
    assert "| FOMAML | in_domain | 1 | accuracy | **1.00** | 0.80 | -0.35 | 0.60 |" in text
    assert "| Base | in_domain | – | accuracy | **1.00** | 0.80 | -0.15 | 0.60 |" in text
    table = text[text.index("### Criterion agreement") :]
    assert sum(line.startswith("| ") and "**" in line for line in table.splitlines()) == len(CALIBRATED)
    nll = "\n".join(summary._calibration_lines(load_calibration(write_calibration(tmp_path / "nll", "nll"))))
    assert "| FOMAML | in_domain | 0 | 5 | 80 | sgd | 0.001 | 3 | nll 0.280 |" in nll
    assert "| FOMAML | in_domain | 0 | nll | 1.00 | 0.80 | **-0.25** | 0.60 |" in nll


def test_grid_edges_qualify_the_answer_when_most_of_an_arms_runs_sit_there(tmp_path: Path) -> None:
    """SFT's one run chose the highest rate (1 of 1: more than half), FOMAML's seed 1 the lowest (1 of 2: not more
    than half): one line, for SFT only; a file flagged "cap" by the tuner says the grid was extended to its cap."""
    settings = StatsSettings.from_settings(SETTINGS)
    paths = write_calibration(tmp_path / "cal")
    lines = summary._grid_edge_lines(load_calibration(paths), None, settings)
    assert lines == [
        "- **Tuned at a grid edge** (`in_domain`): the adaptation the tuner chose sits at an edge of its grid for SFT "
        "in 1 of 1 runs (highest rate in 1). The best adaptation may lie outside the grid, so this contrast compares "
        "arms that may be under-tuned by different amounts (see Tuning below).",
        "",
    ]
    # FOMAML's seed 0 moved to the edge too (2 of 2), and both its edge choices stopped at the tuner's cap.
    record = json.loads(paths[3].read_text())
    for entry in record["chosen"][1:]:
        entry |= {"edges": ["lr:highest"], "cap": True}
    paths[3].write_text(json.dumps(record))
    (line, _) = summary._grid_edge_lines(load_calibration(paths), None, settings)
    assert "FOMAML in 2 of 2 runs (highest rate in 1, lowest rate in 1; 1 stopped at the grid-extension cap)" in line
    assert line.index("FOMAML in 2 of 2") < line.index("SFT in 1 of 1")  # in the contrast's order (fomaml-sft)
    # No calibration files, or every arm mostly inside the grid: no line.
    assert summary._grid_edge_lines(None, None, settings) == []
    assert summary._grid_edge_lines(load_calibration(paths[3:]), None, settings)[0].count("runs") == 1
    # The cap flag as the tuner may write it: a key, or the word in an edge or note; files without it read as "".
    assert load_calibration(paths)["chosen"]["cap"].tolist().count("cap") == 2
    assert calibration_cap({"edges": ["lr:highest:cap"], "edge_note": ""}) == "cap"
    assert calibration_cap({"edges": ["lr:highest"], "edge_note": "stopped at the cap of 4 extensions"}) == "cap"
    assert calibration_cap({"edges": ["lr:highest"], "edge_note": "capacity"}) == ""
    assert calibration_cap({"edges": [], "edge_note": "", "cap": "lr 0.1"}) == "lr 0.1"
    # A self-extending tuner (open_edges in every choice): an end of the final grid within the dev noise is no edge,
    # so SFT's one run no longer qualifies the Answer; an edge it resolves at its cap does, and names the cap.
    for path in paths:
        record = json.loads(path.read_text())
        for entry in record["chosen"]:
            entry |= {"open_edges": [], "at_cap": False, "cap": False}
        path.write_text(json.dumps(record))
    assert summary._grid_edge_lines(load_calibration(paths), None, settings) == []
    (sft_path,) = [path for path in paths if json.loads(path.read_text())["init"] == "sft"]
    record = json.loads(sft_path.read_text())
    for entry in record["chosen"]:
        if entry["shots"] > 0:
            entry |= {"open_edges": ["lr:highest"], "at_cap": True, "edge_note": "still on an edge at the cap"}
    sft_path.write_text(json.dumps(record))
    (line, _) = summary._grid_edge_lines(load_calibration(paths), None, settings)
    assert "(highest rate in 1; 1 stopped at the grid-extension cap)" in line


def test_the_grid_edge_line_sits_in_the_answer(stats_dir: Path, tmp_path: Path) -> None:
    text = _summarise(stats_dir, tmp_path, write_calibration(tmp_path / "cal"))
    answer = text[text.index("## Answer") : text.index("## Per-shot comparisons")]
    assert "- **Tuned at a grid edge** (`in_domain`)" in answer and "SFT in 1 of 1 runs" in answer


def test_unknown_adaptation_settings_read_back_as_n_a(stats_dir: Path, tmp_path: Path) -> None:
    """The stats stage writes "n/a" where the adaptation was not recorded; read_table reads it back as NaN."""
    copy = tmp_path / "stats"
    shutil.copytree(stats_dir, copy)
    table = read_table(copy, "adaptation_summary.tsv")
    table["adapt_choices"] = "n/a"
    table.to_csv(copy / "adaptation_summary.tsv", sep="\t", index=False)
    assert read_table(copy, "adaptation_summary.tsv")["adapt_choices"].isna().all()
    text = _summarise(copy, tmp_path)
    row = table.iloc[0]
    assert f"| {row.experiment} | {summary.init_label(row.init)} | {row.shots} | n/a | " in text


def test_the_metaloop_row_in_the_summary_and_the_figure(tmp_path: Path) -> None:
    """The secondary row: a column after the three main initialisations in every accuracy table (seed-aware
    intervals), its own section with the secondary comparison against FOMAML per k, a dashed figure line."""
    from test_stats import metaloop_rows, synthetic_eval_frame

    from fomaml_math.analysis import figures, stats, style

    frame = synthetic_eval_frame()
    path = tmp_path / "eval.parquet"
    pd.concat([frame, metaloop_rows(frame)], ignore_index=True).to_parquet(path, index=False)
    out = tmp_path / "stats"
    assert stats.main(["--settings", json.dumps(SETTINGS), "--eval", str(path), "--output-dir", str(out)]) == 0
    text = _summarise(out, tmp_path)
    assert "| Shots | Base | SFT | FOMAML | FOMAML (meta-training inner loop) |" in text
    accuracy, comparisons = read_table(out, "accuracy.tsv"), read_table(out, "comparisons.tsv")
    cell = accuracy[(accuracy.experiment == "in_domain") & (accuracy.task == "all") & (accuracy.shots == 5)
                    & (accuracy.init == "fomaml_metaloop") & (accuracy.train_seed == "all")].iloc[0]  # fmt: skip
    shown = f"{100 * cell.accuracy:.1f} [{100 * cell.accuracy_ci_low:.1f}, {100 * cell.accuracy_ci_high:.1f}]"
    assert f"{shown} (seed SD" in text
    section = text.split("## Secondary: FOMAML (meta-training inner loop)", 1)[1].split("\n## ", 1)[0]
    assert "FOMAML (meta-training inner loop) − FOMAML" in section
    for row in comparisons[(comparisons.comparison == "fomaml_metaloop-fomaml")
                           & comparisons.task.isin(["all", "meta_test"])].itertuples():  # fmt: skip
        assert row.family == "secondary"
        assert f"| {int(row.shots)} | {_pp(row.acc_diff)} [{_pp(row.acc_diff_sci_low)}, " in section
    assert "fomaml_metaloop" not in read_table(out, "primary.tsv").contrast.str.cat()
    fig = figures.accuracy_vs_shots_figure(accuracy, comparisons, 0.95)
    (ax,) = [ax for ax in fig.axes if ax.get_gid() == "experiment:in_domain"]
    (line,) = [line for line in ax.get_lines() if line.get_gid() == "acc:fomaml_metaloop"]
    assert line.get_linestyle() == "--" and line.get_color() == style.INIT_STYLE["fomaml"]["color"]
    assert list(line.get_xdata()) == [5, 10]


def test_the_answer_is_exploratory_below_the_confirmatory_seed_count(stats_dir: Path, tmp_path: Path) -> None:
    """3 seeds per arm (< the default 5): the Answer's first words say so, and it gives estimate, interval,
    direction and the permutation p with its floor, but no bold verdict. At a minimum of 3 the verdicts return."""
    answer = _summarise(stats_dir, tmp_path).split("## Answer\n\n")[1].split("\n## ")[0]
    assert answer.startswith("Exploratory: ")
    assert "fewer than the 5 a confirmatory verdict needs" in answer
    for bold in ("**FOMAML is better**", "**FOMAML is worse**", "**equivalent", "**inconclusive**"):
        assert bold not in answer
    primary = read_table(stats_dir, "primary.tsv")
    for row in primary.itertuples():
        assert f"`{row.experiment}` (" in answer and "exploratory: FOMAML − SFT = " in answer
        direction = "higher" if row.diff > 0 else "lower"
        assert f"direction: FOMAML scored {direction} than SFT" in answer
        assert f"the smallest it can be here: {summary.fmt_p(row.perm_p_floor)}" in answer
    out = tmp_path / "confirmatory.md"
    settings = {**SETTINGS, "stats": {**SETTINGS["stats"], "primary": {**SETTINGS["stats"]["primary"],
                                                                      "min_seeds_confirmatory": 3}}}  # fmt: skip
    argv = ["--settings", json.dumps(settings), "--stats-dir", str(stats_dir), "--output", str(out),
            "--per-task-output", str(tmp_path / "per_task.md")]  # fmt: skip
    assert summary.main(argv) == 0
    confirmatory = out.read_text().split("## Answer\n\n")[1].split("\n## ")[0]
    assert not confirmatory.startswith("Exploratory") and "confirmatory test(s): **" in confirmatory
