"""The rule-adoption positive control (analysis.rule_adoption, rule_adoption.tsv): the task's digit read off the
gold answers, the share of answers with that units digit against a hand computation, the base's 0-shot reference
and the difference, Holm per pool, the written table, the summary section and the figure, and its absence on
real MATH data."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from test_stats import SETTINGS

from fomaml_math.analysis import figures, rule_adoption, stats, summary
from fomaml_math.analysis.bounds import newcombe_difference
from fomaml_math.analysis.evaldata import load_eval, split_experiments
from fomaml_math.analysis.inference import DIFFERENCE_RANGE, crossed_estimate, t_interval
from fomaml_math.analysis.tables import RULE_ADOPTION_COLUMNS, StatsSettings, read_table
from fomaml_math.data.answers import extract_boxed_answer
from fomaml_math.data.synthetic import generate_synthetic, task_rule

STATS = StatsSettings.from_settings(SETTINGS)

# The hand-made study: algebra (in-domain, digit 7) and algebra_v1 (held out, digit 3), 4 problems each; the base
# (one model) and SFT (training seeds 0 and 1) at 0 shots (one repeat) and 5 shots (two repeats).
GOLD = {"algebra": ["7", "17", "-7", "27"], "algebra_v1": ["13", "-3", "23", "3"]}
# (init, train_seed, task, shots) -> one list of 4 extracted answers per repeat (None: no answer).
EXTRACTED = {
    ("base", -1, "algebra_v1", 0): [["3", None, "12", "x"]],  # follows 1, 0, 0, 0
    ("base", -1, "algebra_v1", 5): [["13", "-3", "5", "3"], ["13", "4", None, "3"]],  # 1, .5, 0, 1
    ("sft", 0, "algebra_v1", 0): [["7", "7", "7", None]],  # SFT writes the variant-0 digit: 0, 0, 0, 0
    ("sft", 1, "algebra_v1", 0): [["7", "3", "7", "7"]],  # 0, 1, 0, 0
    ("sft", 0, "algebra_v1", 5): [["3", "13", "7", "23"], ["3", "3", "3", "3"]],  # 1, 1, .5, 1
    ("sft", 1, "algebra_v1", 5): [["3", None, "3", "7"], ["3", None, "3", "7"]],  # 1, 0, 1, 0
    ("base", -1, "algebra", 0): [["7", "17", None, "8"]],  # 1, 1, 0, 0
    ("base", -1, "algebra", 5): [["7", "-17", "7", "8"], ["7", "17", "7", "8"]],  # 1, 1, 1, 0
    ("sft", 0, "algebra", 0): [["7", "7", "7", "7"]],
    ("sft", 1, "algebra", 0): [["7", "7", "7", "1"]],
    ("sft", 0, "algebra", 5): [["7", "7", "7", "7"], ["7", "7", "7", "7"]],
    ("sft", 1, "algebra", 5): [["7", "7", "7", "7"], ["7", "7", "7", "7"]],
}


def hand_frame(gold: dict[str, list[str]] = GOLD) -> pd.DataFrame:
    rows = []
    for (init, seed, task, shots), repeats in EXTRACTED.items():
        for repeat, answers in enumerate(repeats):
            for index, answer in enumerate(answers):
                rows.append(
                    {
                        "experiment": "heldout",
                        "init": init,
                        "train_seed": seed,
                        "shot_seed": 0,
                        "task": task,
                        "task_role": "meta_test" if task.endswith("_v1") else "train",
                        "shots": shots,
                        "repeat": repeat,
                        "problem_id": f"{task}-{index}",
                        "gold": gold[task][index],
                        "extracted": answer,
                        "generated": f"\\boxed{{{answer}}}" if answer is not None else "no answer",
                        "correct": answer == gold[task][index],
                        "grade_status": "ok" if answer is not None else "no_answer",
                        "nll": 1.0,
                        "gen_tokens": 10,
                        # Known adaptation settings: the summary's adaptation table reads "n/a" back as NaN.
                        "adapt_optimizer": "adam",
                        "adapt_lr": 1e-3,
                        "adapt_steps": 0 if shots == 0 else 5,
                    }
                )
    return pd.DataFrame(rows)


def write_frame(path: Path, frame: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def table_of(tmp_path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    evals = load_eval([write_frame(tmp_path / "eval.parquet", frame)])
    return rule_adoption.rule_adoption_table(split_experiments(evals), STATS)


def cell(table: pd.DataFrame, pool: str, init: str, shots: int) -> pd.Series:
    (index,) = table.index[(table.pool == pool) & (table.init == init) & (table.shots == shots)]
    return table.loc[index]


# --- definitions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "digit"),
    [("37", 7), ("-7", 7), (" 40 ", 0), ("+3", 3), ("3.5", None), ("\\frac{1}{2}", None), ("x=3", None),
     ("", None), (None, None), (math.nan, None)],
)  # fmt: skip
def test_units_digit_of_integer_literals_only(answer, digit) -> None:
    assert rule_adoption.units_digit(answer) == digit


def test_the_gold_answers_give_the_generators_digit() -> None:
    """By construction every synthetic gold answer ends in the task's digit: read off them, it is task_rule's."""
    tasks = ["algebra", "algebra_v1", "number_theory_v1", "precalculus_v3"]
    records = generate_synthetic(tasks, 60, seed=11)
    frame = pd.DataFrame(
        {"task": [r["task"] for r in records], "gold": [extract_boxed_answer(r["solution"]) for r in records]}
    )
    assert rule_adoption.task_digits(frame) == {task: task_rule(task, 11).digit for task in tasks}
    # The digits differ between variants of a family: the test is not passing by one digit everywhere.
    assert task_rule("algebra", 11).digit != task_rule("algebra_v1", 11).digit


def test_tasks_without_a_common_integer_units_digit_have_no_rule() -> None:
    frame = pd.DataFrame(
        {
            "task": ["algebra"] * 3 + ["geometry"] * 2 + ["my_task"] * 2 + ["prealgebra"] * 2,
            "gold": ["12", "\\frac{1}{2}", "2", "13", "24", "7", "17", "5", "15"],
        }
    )
    # algebra: a fraction; geometry: two digits; my_task: not a synthetic task name; prealgebra: digit 5.
    assert rule_adoption.task_digits(frame) == {"prealgebra": 5}


def test_real_math_answers_give_no_rule(math_sample_dir: Path) -> None:
    rows = [
        {"task": path.parent.name, "gold": extract_boxed_answer(json.loads(path.read_text())["solution"])}
        for path in sorted((math_sample_dir / "MATH" / "test").glob("*/*.json"))
    ]
    frame = pd.DataFrame(rows)
    assert frame["task"].nunique() == 7
    assert rule_adoption.task_digits(frame) == {}
    assert rule_adoption.task_digits(frame.groupby("task").head(3)) == {}  # not even on 3 problems per task


# --- the table against a hand computation ------------------------------------------------------


def test_shares_reference_and_difference_match_a_hand_computation(tmp_path: Path) -> None:
    table = table_of(tmp_path, hand_frame())
    assert list(table.columns) == list(RULE_ADOPTION_COLUMNS)
    # Pools: the held-out task, the held-out pool, the in-domain pool; no row of the in-domain task alone.
    assert list(dict.fromkeys(table.pool)) == ["algebra_v1", "meta_test", "in_domain"]

    base_0 = cell(table, "algebra_v1", "base", 0)
    assert base_0.share == pytest.approx(0.25)  # 1 of 4: the missing answer counts in the denominator
    assert base_0.no_answer_share == pytest.approx(0.25)
    assert base_0.base_share_0 == pytest.approx(0.25)
    assert math.isnan(base_0["diff"]) and math.isnan(base_0.p) and not base_0.detected  # k = 0: no comparison

    sft_0 = cell(table, "algebra_v1", "sft", 0)
    assert sft_0.share == pytest.approx((0 + 0.25) / 2) and sft_0.n_seeds == 2
    assert sft_0.no_answer_share == pytest.approx((0.25 + 0) / 2)

    # Base at 5 shots against its own 0-shot answers: the paired t-test over the 4 problems, by hand.
    base_5 = cell(table, "algebra_v1", "base", 5)
    assert base_5.share == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    differences = np.array([1, 0.5, 0, 1]) - np.array([1, 0, 0, 0])
    se = differences.std(ddof=1) / 2
    assert base_5["diff"] == pytest.approx(0.375)
    assert base_5.diff_se == pytest.approx(se) and base_5.diff_df == pytest.approx(3)
    assert base_5.p == pytest.approx(2 * scipy_stats.t.sf(0.375 / se, 3))
    half = scipy_stats.t.ppf(0.975, 3) * se
    assert (base_5.diff_ci_low, base_5.diff_ci_high) == pytest.approx((0.375 - half, min(1.0, 0.375 + half)))

    # SFT at 5 shots: seeds 0 and 1 per problem (1, 1, .5, 1) and (1, 0, 1, 0), against the base's 0-shot share.
    sft_5 = cell(table, "algebra_v1", "sft", 5)
    assert sft_5.share == pytest.approx((3.5 / 4 + 2 / 4) / 2)
    assert sft_5.base_share_0 == pytest.approx(0.25)
    assert sft_5["diff"] == pytest.approx(0.6875 - 0.25)
    seeds = np.array([[1, 1, 0.5, 1], [1, 0, 1, 0]])
    estimate = crossed_estimate(seeds, np.array([[1.0, 0, 0, 0]]), np.array(["algebra_v1"] * 4))
    assert sft_5.diff_se == pytest.approx(estimate.se)
    assert (sft_5.diff_ci_low, sft_5.diff_ci_high) == pytest.approx(t_interval(estimate, 0.95, DIFFERENCE_RANGE))
    assert 0 <= sft_5.share_ci_low <= sft_5.share <= sft_5.share_ci_high <= 1

    # Holm over the pool's two comparisons (base and SFT at 5 shots).
    family = table[table.pool == "algebra_v1"]
    tested = family[family.shots > 0]
    assert set(family.family_size) == {2}
    np.testing.assert_allclose(tested.p_holm, multipletests(tested.p, method="holm")[1])
    assert list(tested.detected) == list((tested.p_holm < 0.05) & (tested["diff"] > 0))

    # The in-domain pool has its own digit (7): the base's 0-shot share there is 2 of 4.
    assert cell(table, "in_domain", "base", 0).share == pytest.approx(0.5)
    assert cell(table, "in_domain", "sft", 0).share == pytest.approx((1 + 0.75) / 2)
    # The one held-out task is the whole held-out pool.
    pd.testing.assert_series_equal(
        table[table.pool == "meta_test"].drop(columns="pool").reset_index(drop=True).iloc[0],
        family.drop(columns="pool").reset_index(drop=True).iloc[0],
        check_names=False,
    )


def test_a_clear_adoption_is_detected_and_no_change_is_not(tmp_path: Path) -> None:
    """30 held-out problems: SFT adopts the digit at 5 shots on every problem, the base never changes."""
    rng = np.random.default_rng(0)
    rows = []
    for init, seeds in (("base", (-1,)), ("sft", (0, 1, 2))):
        for seed in seeds:
            for shots in (0, 5):
                for index in range(30):
                    plain = int(rng.integers(10, 99))
                    if init == "sft" and shots == 5:
                        answer = str(plain // 10 * 10 + 3)
                    else:
                        answer = str(plain // 10 * 10 + (3 if index < 3 else 8))  # 10% follow by chance
                    rows.append(
                        {"experiment": "heldout", "init": init, "train_seed": seed, "task": "number_theory_v1",
                         "task_role": "meta_test", "shots": shots, "repeat": 0, "problem_id": f"p{index}",
                         "gold": str(10 * index + 3), "extracted": answer, "correct": False, "grade_status": "ok",
                         "nll": 1.0}
                    )  # fmt: skip
    table = table_of(tmp_path, pd.DataFrame(rows))
    assert cell(table, "meta_test", "sft", 5).share == pytest.approx(1.0)
    assert cell(table, "meta_test", "sft", 5).detected
    assert cell(table, "meta_test", "base", 5)["diff"] == pytest.approx(0.0)
    assert not cell(table, "meta_test", "base", 5).detected
    assert not table.loc[table.shots == 0, "detected"].any()
    # All 30 follow: Clopper–Pearson over the 30 problems, not the point [100, 100].
    sft_5 = cell(table, "meta_test", "sft", 5)
    assert (sft_5.share_ci_low, sft_5.share_ci_high) == pytest.approx((0.025 ** (1 / 30), 1.0))
    # The base's 5-shot answers follow exactly where its 0-shot ones do (se 0): Newcombe's interval, not [0, 0].
    base_5 = cell(table, "meta_test", "base", 5)
    assert (base_5.diff_ci_low, base_5.diff_ci_high) == pytest.approx(newcombe_difference(0.1, 30, 0.1, 30, 0.95))
    assert base_5.diff_ci_low < 0 < base_5.diff_ci_high


# --- the stage, the summary and the figure -----------------------------------------------------


def run_stage(tmp_path: Path, frame: pd.DataFrame) -> Path:
    out = tmp_path / "stats"
    path = write_frame(tmp_path / "eval" / "shots.parquet", frame)
    assert stats.main(["--settings", json.dumps(SETTINGS), "--eval", str(path), "--output-dir", str(out)]) == 0
    return out


def test_the_stage_writes_the_table_and_the_summary_reports_it(tmp_path: Path) -> None:
    out = run_stage(tmp_path, hand_frame())
    header = (out / "rule_adoption.tsv").read_text().splitlines()[0].split("\t")
    assert header == list(RULE_ADOPTION_COLUMNS)
    table = read_table(out, "rule_adoption.tsv")
    assert table.detected.dtype == bool and pd.api.types.is_string_dtype(table.pool)
    assert cell(table, "meta_test", "sft", 5).share == pytest.approx(0.6875)

    tables, _ = summary.read_tables(out)
    text = summary.render_summary(tables, STATS)
    start = text.index("## Positive control: rule adoption")
    assert start < text.index("## Secondary positive control: accuracy gain")
    section = text[start : text.index("## Secondary positive control")]
    assert "### `heldout`: held-out task(s) algebra_v1 pooled; Base 0-shot share 25.0%" in section
    sft_5 = cell(table, "meta_test", "sft", 5)
    assert (
        f"| SFT | 5 | 68.8 [{100 * sft_5.share_ci_low:.1f}, {100 * sft_5.share_ci_high:.1f}] | "
        f"+43.8 [{100 * sft_5.diff_ci_low:+.1f}, {100 * sft_5.diff_ci_high:+.1f}] | {summary.fmt_p(sft_5.p_holm)} |"
    ) in section
    assert "| Base | 0 | 25.0 [" in section
    verdict = "**Positive control detected**" if table.detected.any() else "**Positive control not detected**"
    assert verdict in section


def test_the_summary_names_the_detected_inits_and_their_shot_counts() -> None:
    rows = []
    for init, shots, share, detected in (
        ("base", 0, 0.24, False),
        ("base", 50, 0.47, True),
        ("sft", 0, 0.0, False),
        ("sft", 20, 0.6, True),
        ("sft", 50, 0.71, True),
        ("fomaml", 50, 0.3, False),
    ):
        rows.append({"experiment": "heldout", "pool": "meta_test", "init": init, "shots": shots, "share": share,
                     "share_ci_low": share - 0.1, "share_ci_high": share + 0.1, "base_share_0": 0.24,
                     "diff": share - 0.24 if shots else math.nan, "diff_ci_low": 0.0, "diff_ci_high": 0.5,
                     "p_holm": 0.01 if detected else 0.3 if shots else math.nan, "detected": detected})  # fmt: skip
    rows.append(rows[1] | {"pool": "number_theory_v1"})
    text = "\n".join(summary._rule_adoption_lines(pd.DataFrame(rows), STATS))
    assert "held-out task(s) number_theory_v1 pooled; Base 0-shot share 24.0%" in text
    assert "**Positive control detected** on the held-out tasks: Base (k = 50); SFT (k = 20, 50) use(s)" in text
    assert "| FOMAML | 50 | 30.0 [20.0, 40.0] | +6.0 [+0.0, +50.0] | 0.300 | no |" in text
    assert "| SFT | 0 | 0.0 [-10.0, 10.0] | – | – | – |" in text


def test_the_figure_reads_back_as_the_held_out_pool(tmp_path: Path) -> None:
    table = read_table(run_stage(tmp_path, hand_frame()), "rule_adoption.tsv")
    fig = figures.rule_adoption_vs_shots_figure(table, 0.95)
    (ax,) = [ax for ax in fig.axes if ax.get_gid() == "experiment:heldout"]
    lines = {line.get_gid(): line for line in ax.get_lines()}
    for init in ("base", "sft"):
        rows = table[(table.pool == "meta_test") & (table.init == init)].sort_values("shots")
        np.testing.assert_array_equal(lines[f"adopt:{init}"].get_xdata(), rows.shots)
        np.testing.assert_allclose(lines[f"adopt:{init}"].get_ydata(), 100 * rows.share)
    reference = lines["adopt:base0"]
    np.testing.assert_allclose(reference.get_ydata(), [25.0, 25.0])
    assert reference.get_linestyle() == "--"


def real_math_frame() -> pd.DataFrame:
    """The hand-made study with MATH-like gold answers (no common integer units digit): no rule anywhere."""
    gold = {"algebra": ["\\frac{1}{2}", "17", "x^2", "3"], "algebra_v1": ["13", "-4", "\\sqrt{2}", "3"]}
    return hand_frame(gold)


def test_absent_on_real_math_data(tmp_path: Path) -> None:
    out = run_stage(tmp_path, real_math_frame())
    assert (out / "rule_adoption.tsv").read_text().strip().split("\t") == list(RULE_ADOPTION_COLUMNS)
    table = read_table(out, "rule_adoption.tsv")
    assert table.empty
    tables, _ = summary.read_tables(out)
    text = summary.render_summary(tables, STATS)
    assert "## Positive control: rule adoption\n\nDoes not apply: no evaluated task has a synthetic hidden rule" in text
    assert "Positive control detected" not in text and "Positive control not detected" not in text
    fig = figures.rule_adoption_vs_shots_figure(table, 0.95)
    (missing,) = fig.findobj(lambda artist: artist.get_gid() == "missing")
    assert "not applicable" in missing.get_text()


def test_older_files_without_answers_give_an_empty_table(tmp_path: Path) -> None:
    frame = hand_frame().drop(columns=["gold", "extracted"])
    assert table_of(tmp_path, frame).empty


def test_the_docs_list_the_tables_columns(repo_root: Path) -> None:
    """docs/statistics.md names the table's columns as tables.py declares them."""
    docs = (repo_root / "docs" / "statistics.md").read_text()
    match = re.search(r"`rule_adoption.tsv`: `([^`]+)`", docs)
    assert match is not None
    assert [c.strip() for c in match.group(1).split(",")] == list(RULE_ADOPTION_COLUMNS)
