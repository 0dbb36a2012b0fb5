"""Leave-one-subject-out folds: the generator (config)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fomaml_math.config import (
    LEAVE_ONE_SUBJECT_OUT,
    experiment_names,
    loso_group,
    meta_test_tasks,
    stage_settings,
    training_tasks,
    validate_config,
)
from fomaml_math.errors import ConfigError
from fomaml_math.subjects import MATH_TASKS

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
    assert meta_test_tasks(config, "fold-algebra") == ["algebra", "algebra_v1"]
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
