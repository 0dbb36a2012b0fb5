"""Leave-one-subject-out folds: the generator (config), the pooled primary row (analysis.primary), the summary's
Answer, plan, and the DAG the workflow plans for them."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from test_stats import SETTINGS, run_stats

from fomaml_math import plan
from fomaml_math.analysis import inference, summary
from fomaml_math.analysis.planted import planted_table
from fomaml_math.analysis.primary import primary_table
from fomaml_math.analysis.tables import FOLD_FAMILY, PRIMARY_FAMILY, StatsSettings, read_table
from fomaml_math.config import (
    LEAVE_ONE_SUBJECT_OUT,
    evaluated_tasks,
    experiment_names,
    loso_group,
    meta_test_tasks,
    stage_settings,
    training_tasks,
    validate_config,
)
from fomaml_math.errors import ConfigError
from fomaml_math.subjects import MATH_TASKS
from tests.workflow_utils import make_workspace, planned_jobs, planned_outputs, snakemake

GENERATOR = {"generate": LEAVE_ONE_SUBJECT_OUT}


def _raw(repo_root: Path, name: str, experiments: list[dict]) -> dict:
    """config/<name> as written (not validated), with ``experiments`` in place of its own."""
    config = yaml.safe_load((repo_root / "config" / name).read_text())
    config["experiments"] = copy.deepcopy(experiments)
    return config


# ---------------------------------------------------------------------------------------------
# The generator


def test_one_fold_per_subject_beside_the_explicit_experiments(repo_root: Path) -> None:
    config = validate_config(_raw(repo_root, "config.yaml", [{"name": "in_domain"}, GENERATOR]))
    folds = [f"loso-{subject}" for subject in MATH_TASKS]
    assert experiment_names(config) == ["in_domain", *folds]
    for subject, fold in zip(MATH_TASKS, folds, strict=True):
        assert meta_test_tasks(config, fold) == [subject]
        assert training_tasks(config, fold) == [t for t in MATH_TASKS if t != subject]
    assert loso_group(config) == ("loso-pooled", folds)
    # Snakemake validates the expanded config once more: nothing changes.
    assert validate_config(copy.deepcopy(config))["experiments"] == config["experiments"]
    # Only a study with folds gives the analysis stages the folds to pool (a study without keeps its settings).
    assert stage_settings(config, "stats")["loso"] == {"pooled": "loso-pooled", "folds": folds}
    plain = validate_config(_raw(repo_root, "config.yaml", [{"name": "in_domain"}]))
    assert "loso" not in stage_settings(plain, "summary") and loso_group(plain) is None


def test_a_synthetic_subject_is_held_out_with_its_variants(repo_root: Path) -> None:
    """The demo's tasks: seven families and three _v1 variants. A fold holds out a whole subject, variants
    included, so that none of its rules is trained on; the folds stand where the generator stood."""
    demo = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    raw = _raw(repo_root, "demo.yaml", [{**GENERATOR, "name_prefix": "fold"}, *demo["experiments"]])
    config = validate_config(raw)
    assert experiment_names(config) == [*(f"fold-{s}" for s in MATH_TASKS), "heldout"]
    assert meta_test_tasks(config, "fold-algebra") == ["algebra", "algebra_v1", "algebra_v2"]
    assert meta_test_tasks(config, "fold-geometry") == ["geometry"]
    assert "algebra_v1" not in training_tasks(config, "fold-algebra")
    assert "algebra_v1" in training_tasks(config, "fold-geometry")


@pytest.mark.parametrize(
    ("experiments", "names", "message"),
    [
        ([GENERATOR, {**GENERATOR, "name_prefix": "cv"}], None, "experiments: at most one generate: "
         "leave_one_subject_out entry, got 2 and 0 expanded set(s) of folds (name_prefix loso, cv)"),
        ([{"name": "loso-geometry"}, GENERATOR], None, "experiments.loso-geometry: the name of a generated fold "
         "(generate: leave_one_subject_out, name_prefix loso); rename the experiment or set another name_prefix"),
        ([{"name": "loso-pooled"}, GENERATOR], None, "experiments.loso-pooled: the name of the folds' pooled row"),
        ([{"name": "heldout_geometry", "meta_test": ["geometry"]}, GENERATOR], None,
         "experiments.heldout_geometry.meta_test: the tasks the generated fold loso-geometry holds out"),
        ([GENERATOR], ["algebra"], "experiments: generate: leave_one_subject_out needs at least 2 subjects in "
         "tasks.names, got ['algebra']"),
        ([{"generate": "leave_one_task_out"}], None,
         "experiments.0.generate: expected one of ['leave_one_subject_out'], got \"leave_one_task_out\""),
        ([{**GENERATOR, "name": "loso"}], None, "experiments.0: Additional properties are not allowed"),
        ([{"name": "loso-algebra", "meta_test": ["geometry"], "loso_group": "loso"}], None,
         "experiments: the entries with loso_group 'loso' are not the leave-one-subject-out folds of tasks.names"),
    ],
)  # fmt: skip
def test_generator_errors_are_one_line_naming_the_setting(
    repo_root: Path, experiments: list[dict], names: list[str] | None, message: str
) -> None:
    raw = _raw(repo_root, "config.yaml", experiments)
    if names is not None:
        raw["tasks"]["names"] = names
    with pytest.raises(ConfigError) as error:
        validate_config(raw)
    assert str(error.value).startswith(f"config error at {message}"), str(error.value)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# The pooled primary row, by hand on a tiny table

# Per fold: the held-out subject's per-problem accuracies (mean of 2 repeats at k = 5) of 2 seeds per arm, each
# matrix additive in seed and problem, so the seed x problem residual is 0 and the fold's se is, by hand,
# var(seed means)/S per arm (1 df) plus var(per-problem differences)/N (N - 1 df).
FOLDS = {
    "loso-algebra": ("algebra", [[0.5, 0, 0.5, 0], [1, 0.5, 1, 0.5]], [[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]),
    "loso-geometry": ("geometry", [[1, 0.5, 0.5, 0], [1, 0.5, 0.5, 0]], [[1, 0.5, 0.5, 0.5], [0.5, 0, 0, 0]]),
}


def _rows(experiment: str, task: str, role: str, arms: dict[str, list[list[float]]]) -> pd.DataFrame:
    """Evaluation rows whose repeat-averaged accuracy at k = 5 is the given matrix (and 0-shot rows that the
    primary contrast must ignore: FOMAML solves every problem there)."""
    rows = []
    for init, matrix in arms.items():
        for seed, scores in enumerate(matrix):
            for index, score in enumerate(scores):
                cell = {"experiment": experiment, "init": init, "train_seed": seed, "task": task, "task_role": role,
                        "problem_id": f"{task}-{index}", "nll": 1.0}  # fmt: skip
                rows.append(cell | {"shots": 0, "repeat": 0, "correct": float(init == "fomaml")})
                rows += [cell | {"shots": 5, "repeat": r, "correct": float(score >= (0.5, 1.0)[r])} for r in (0, 1)]
    return pd.DataFrame(rows)


def _by_hand(a: list[list[float]], b: list[list[float]]) -> tuple[float, float, float, float]:
    """(estimate, se², df, seed part) of one fold's contrast, from the formula in docs/statistics.md."""
    a_, b_ = np.asarray(a), np.asarray(b)
    seed_parts = [np.var(x.mean(axis=1), ddof=1) / x.shape[0] for x in (a_, b_)]
    differences = a_.mean(axis=0) - b_.mean(axis=0)
    problem_part = np.var(differences, ddof=1) / differences.size
    variance = sum(seed_parts) + problem_part
    df = variance**2 / (sum(v**2 / 1 for v in seed_parts) + problem_part**2 / (differences.size - 1))
    return float(differences.mean()), float(variance), float(df), float(sum(seed_parts))


def test_the_pooled_row_is_the_mean_over_folds_with_seeds_nested_in_folds() -> None:
    settings = StatsSettings.from_settings(SETTINGS | {"loso": {"pooled": "loso-pooled", "folds": list(FOLDS)}})
    # An explicit experiment beside the folds (its rows: the algebra fold's, in the train role), then the folds.
    task, a, b = FOLDS["loso-algebra"]
    experiments = {"in_domain": _rows("in_domain", task, "train", {"fomaml": a, "sft": b})}
    for name, (task, a, b) in FOLDS.items():
        experiments[name] = _rows(name, task, "meta_test", {"fomaml": a, "sft": b})
    table = primary_table(experiments, settings).set_index("experiment")

    hand = {name: _by_hand(a, b) for name, (_, a, b) in FOLDS.items()}
    for name, (estimate, variance, df, _) in hand.items():
        assert table.loc[name, "diff"] == pytest.approx(estimate)
        assert table.loc[name, "se"] ** 2 == pytest.approx(variance)
        assert table.loc[name, "df"] == pytest.approx(df)
    # Folds are separate trainings on disjoint problems: the mean's variance is the folds' variances over F².
    count = len(FOLDS)
    parts = [(variance / count**2, df) for _, variance, df, _ in hand.values()]
    pooled = table.loc["loso-pooled"]
    assert pooled["diff"] == pytest.approx(np.mean([h[0] for h in hand.values()]))  # 0.1875
    assert pooled["se"] ** 2 == pytest.approx(sum(v for v, _ in parts))
    assert pooled["df"] == pytest.approx(sum(v for v, _ in parts) ** 2 / sum(v**2 / d for v, d in parts))
    assert pooled["seed_var"] == pytest.approx(sum(h[3] for h in hand.values()) / count**2)
    assert pooled["seed_var"] + pooled["problem_var"] == pytest.approx(pooled["se"] ** 2)
    half = scipy_stats.t.ppf(0.975, pooled["df"]) * pooled["se"]
    assert (pooled["ci_low"], pooled["ci_high"]) == pytest.approx((pooled["diff"] - half, pooled["diff"] + half))
    assert -1 <= pooled["ci_low"] < pooled["ci_high"] <= 1
    assert pooled["n_problems"] == 8 and pooled["n_seeds_a"] == 4 and pooled["pool"] == "meta_test"
    assert pooled["p"] == pytest.approx(2 * scipy_stats.t.sf(pooled["diff"] / pooled["se"], pooled["df"]))

    # The confirmatory family: the explicit experiment and the pooled row; the folds are secondary, Holm over them.
    assert list(table.index) == ["in_domain", "loso-pooled", *FOLDS]
    assert list(table["family"]) == [PRIMARY_FAMILY, PRIMARY_FAMILY, FOLD_FAMILY, FOLD_FAMILY]
    for family in (PRIMARY_FAMILY, FOLD_FAMILY):
        rows = table[table["family"] == family]
        assert (rows["family_size"] == 2).all() and (rows["planned_alpha"] == 0.05 / 2).all()
        np.testing.assert_allclose(rows["p_holm"], multipletests(rows["p"], method="holm")[1])
    assert pooled["mde"] == pytest.approx(inference.minimum_detectable_effect(pooled["se"], pooled["df"], 0.025))
    assert pooled["power_at_target"] == pytest.approx(inference.power(0.03, pooled["se"], pooled["df"], 0.025))
    # The planted-effect check tests each row at the level it is planned with (here 2 tests in either family).
    planted = planted_table(experiments, settings).set_index("experiment")
    assert planted["alpha"].to_dict() == {name: 0.05 / 2 for name in experiments}


def test_a_missing_fold_leaves_no_pooled_row() -> None:
    """A mean over some subjects is not the held-out claim over all of them: no pooled row, said so."""
    settings = StatsSettings.from_settings(SETTINGS | {"loso": {"pooled": "loso-pooled", "folds": list(FOLDS)}})
    name, (task, a, b) = next(iter(FOLDS.items()))
    with pytest.warns(UserWarning, match=r"no row loso-pooled: folds \['loso-geometry'\] have no primary contrast"):
        table = primary_table({name: _rows(name, task, "meta_test", {"fomaml": a, "sft": b})}, settings)
    assert list(table["experiment"]) == [name] and list(table["family"]) == [FOLD_FAMILY]


def test_mean_of_independent_without_a_df_has_no_t_test() -> None:
    """A fold with variance but no df (one seed with a seed part) leaves the pooled row without a t-test."""
    assert inference.mean_se([(0.02, 10.0), (0.01, 0.0)])[1] == 0.0
    assert math.isnan(inference.mean_se([(0.02, 10.0), (math.nan, 5.0)])[0])
    se, df = inference.mean_se([(0.02, math.inf), (0.02, math.inf)])
    assert se == pytest.approx(0.02 / math.sqrt(2)) and math.isinf(df)


def test_the_summary_answers_with_the_pooled_row_and_lists_the_folds(tmp_path: Path) -> None:
    """The stage end to end on synthetic evaluations of three folds: the Answer is the pooled row."""
    folds = {f"loso-{t}": (t,) for t in ("algebra", "geometry", "number_theory")}
    settings = SETTINGS | {"loso": {"pooled": "loso-pooled", "folds": list(folds)}}
    stats_dir = run_stats(tmp_path, settings=settings, experiments=folds)
    primary = read_table(stats_dir, "primary.tsv").set_index("experiment")
    assert primary.loc["loso-pooled", "family"] == PRIMARY_FAMILY and primary.loc["loso-pooled", "family_size"] == 1
    assert primary.loc["loso-pooled", "diff"] == pytest.approx(primary.loc[list(folds), "diff"].mean())
    out = tmp_path / "summary.md"
    argv = ["--settings", json.dumps(settings), "--stats-dir", str(stats_dir), "--output", str(out),
            "--per-task-output", str(tmp_path / "per_task.md")]  # fmt: skip
    assert summary.main(argv) == 0
    answer = out.read_text().split("## Answer")[1].split("\n## ")[0]
    assert "- `loso-pooled` (the mean over 3 leave-one-subject-out folds, each on its held-out subject" in answer
    assert "over 1 confirmatory test(s)" in answer and "- `loso-algebra` (" not in answer  # no verdict line of its own
    assert "The folds of `loso-pooled` one by one (secondary: Holm over the 3 folds" in answer
    assert all(f"| `{fold}` |" in answer for fold in folds)
    assert "`loso-pooled` is the held-out claim over all subjects" in answer


# ---------------------------------------------------------------------------------------------
# plan and the workflow


def test_plan_prices_the_folds_and_sizes_their_pooled_row(repo_root: Path, tmp_path: Path, capsys) -> None:
    raw = _raw(repo_root, "config.yaml", [{"name": "in_domain"}, GENERATOR])
    path = tmp_path / "loso.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = validate_config(copy.deepcopy(raw))
    components, _ = plan.assumed_components(config)
    section = plan.power_section(config, Path("/nonexistent"), components, "")
    rows = {r["experiment"]: r for r in section["experiments"]}
    folds = loso_group(config)[1]
    assert section["family_size"] == 2  # in_domain and the pooled row
    assert all(rows[f]["family"] == FOLD_FAMILY and rows[f]["alpha"] == pytest.approx(0.05 / 7) for f in folds)
    pooled = rows["loso-pooled"]
    assert pooled["family"] == PRIMARY_FAMILY and pooled["alpha"] == pytest.approx(0.05 / 2)
    # The mean of 7 independent folds: se² = Σ se_f² / 7², so the pooled MDE is well under any fold's.
    assert pooled["se"] == pytest.approx(math.sqrt(sum(rows[f]["se"] ** 2 for f in folds)) / 7)
    assert pooled["mde"] < min(rows[f]["mde"] for f in folds) / 2
    # Each fold trains as many runs as an explicit experiment: the folds are 7 of the 8 experiments' trainings.
    hours = plan.build_plan(config, plan.Assumptions(), Path("/nonexistent"))
    alone = plan.build_plan(validate_config(_raw(repo_root, "config.yaml", [{"name": "in_domain"}])),
                            plan.Assumptions(), Path("/nonexistent"))  # fmt: skip
    assert hours["gpu_hours"]["train_fomaml"] == pytest.approx(8 * alone["gpu_hours"]["train_fomaml"])
    cost = plan.fold_cost(config, plan.Assumptions(), Path("/nonexistent"))
    assert cost["gpu_hours"] == pytest.approx(hours["gpu_hours_total"] - alone["gpu_hours_total"])
    assert plan.main(["--configfile", str(path), "--tasks-dir", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    assert "of which the 7 leave-one-subject-out folds" in out
    assert "(70 of 80 training runs; pooled as loso-pooled)" in out
    assert "alpha 0.05 / 2 confirmatory test(s)" in out and "(fold: alpha / 7)" in out
    assert "in_domain      loso-pooled" in out  # the alternative designs show the confirmatory tests only


def test_the_dag_trains_and_evaluates_every_fold(tmp_path: Path) -> None:
    """A dry run of the smallest config with the generator: one training per fold, method and seed, each fold's
    evaluations under its own results folder, and one analysis over them all."""
    root = make_workspace(tmp_path, experiments=[GENERATOR])
    jobs = planned_jobs(root)
    subjects = ("algebra", "number_theory", "prealgebra")  # config/test.yaml's tasks
    assert jobs["train"] == 2 * len(subjects) and jobs["calibrate_base"] == len(subjects) and jobs["stats"] == 1
    outputs = planned_outputs(root)
    for subject in subjects:
        for method in ("fomaml", "sft"):
            assert f"results/loso-{subject}/{method}/seed-0/train_summary.json" in outputs
        assert f"results/loso-{subject}/base/eval/shots-5.parquet" in outputs


def test_folds_without_in_domain_rows_evaluate_their_held_out_subject_only(repo_root: Path, tmp_path: Path) -> None:
    """``in_domain_rows: false`` on the generator: each fold evaluates only what it holds out (its trainings are the
    same), so the plan prices a seventh of the folds' evaluation problems, and the DAG passes the fold's tasks."""
    rows = {**GENERATOR, "in_domain_rows": False}
    config = validate_config(_raw(repo_root, "config.yaml", [{"name": "in_domain"}, rows]))
    assert validate_config(copy.deepcopy(config))["experiments"] == config["experiments"]  # idempotent
    for subject in MATH_TASKS:
        assert evaluated_tasks(config, f"loso-{subject}") == [subject]
        assert training_tasks(config, f"loso-{subject}") == [t for t in MATH_TASKS if t != subject]
    assert evaluated_tasks(config, "in_domain") == list(MATH_TASKS)
    full = validate_config(_raw(repo_root, "config.yaml", [{"name": "in_domain"}, GENERATOR]))
    lean, every = (plan.build_plan(c, plan.Assumptions(), Path("/nonexistent"))["gpu_hours"] for c in (config, full))
    alone = plan.build_plan(validate_config(_raw(repo_root, "config.yaml", [{"name": "in_domain"}])),
                            plan.Assumptions(), Path("/nonexistent"))["gpu_hours"]  # fmt: skip
    # the untuned base is shared; each fold's own generation: 1 task instead of 7 (its in-domain 6 dropped)
    assert every["train_fomaml"] == pytest.approx(lean["train_fomaml"])
    folds_every = every["evaluate_generation"] - alone["evaluate_generation"]
    folds_lean = lean["evaluate_generation"] - alone["evaluate_generation"]
    assert folds_lean == pytest.approx(folds_every / len(MATH_TASKS), rel=0.05)
    root = make_workspace(tmp_path, experiments=[rows])
    result = snakemake(root, "--dry-run", "--printshellcmds", "results/loso-algebra/sft/seed-0/eval/shots-5.parquet")
    command = next(line for line in (result.stdout + result.stderr).splitlines() if " evaluate " in line)
    assert "--tasks algebra " in command and "--meta-test algebra" in command
