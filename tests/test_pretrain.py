"""Stage pretrain-tiny-base: a rule-free corpus that avoids every dev and test problem, a real training that lowers
the loss, and an ordinary save_pretrained folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fomaml_math.__main__ import main as cli_main
from fomaml_math.config import load_config, stage_settings
from fomaml_math.data.answers import extract_boxed_answer
from fomaml_math.data.synthetic import solve_synthetic
from fomaml_math.data.taskfiles import HELD_OUT_SPLITS
from fomaml_math.data.text import normalise_problem_text
from fomaml_math.errors import ConfigError
from fomaml_math.modeling import load_model_and_tokenizer
from fomaml_math.pretrain import held_out_texts, pretrain_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[dict, Path, Path]:
    """config/test.yaml's data and tiny model, built by the stages' command lines."""
    root = tmp_path_factory.mktemp("pretrain")
    config = load_config(REPO_ROOT / "config" / "test.yaml")
    table, tasks, init = root / "math.parquet", root / "tasks", root / "tiny-init"
    for stage, argv in (
        ("ingest", ["--output", str(table), "--report", str(root / "r.json")]),
        ("split_tasks", ["--input", str(table), "--out-dir", str(tasks), "--stats", str(root / "s.tsv")]),
        ("build_tiny_model", ["--tasks-dir", str(tasks), "--output", str(init)]),
    ):
        command = stage.replace("_", "-")  # the settings key, hyphenated
        assert cli_main([command, "--settings", json.dumps(stage_settings(config, stage)), *argv]) == 0
    return config, tasks, init


def test_corpus_is_rule_free_and_never_a_dev_or_test_problem(built) -> None:
    config, tasks, _ = built
    settings = stage_settings(config, "pretrain_tiny_base")
    held_out = held_out_texts(tasks)
    expected = {
        normalise_problem_text(p)
        for path in tasks.glob("*/*.parquet")
        if path.stem in HELD_OUT_SPLITS
        for p in pd.read_parquet(path)["problem"]
    }
    assert held_out == expected and len(held_out) > 0
    corpus = pretrain_corpus(settings, tasks)
    assert len(corpus) == len(settings["families"]) * settings["pretrain"]["problems_per_family"]
    assert not {normalise_problem_text(r["problem"]) for r in corpus} & held_out
    for record in corpus:  # the plain result is boxed: no task's rule
        assert int(extract_boxed_answer(record["solution"])) == solve_synthetic(record["family"], record["problem"])


def test_pretraining_lowers_the_loss_and_saves_a_loadable_base(built, tmp_path: Path) -> None:
    config, tasks, init = built
    settings = stage_settings(config, "pretrain_tiny_base")
    output = tmp_path / "tiny-base"
    argv = ["--settings", json.dumps(settings), "--init-model", str(init), "--tasks-dir", str(tasks)]
    assert cli_main(["pretrain-tiny-base", *argv, "--output", str(output)]) == 0
    info = json.loads((output / "build_info.json").read_text())
    assert info["steps"] == settings["pretrain"]["steps"]
    assert info["last_loss"] < 0.8 * info["first_loss"], info
    model, _ = load_model_and_tokenizer(output)
    fresh, _ = load_model_and_tokenizer(init)
    changed = [name for name, p in model.named_parameters() if not p.equal(dict(fresh.named_parameters())[name])]
    assert changed, "pretraining changed no weight"


def test_pretrain_needs_its_settings(built, tmp_path: Path) -> None:
    config, tasks, init = built
    settings = stage_settings(config, "pretrain_tiny_base") | {"pretrain": None}
    argv = ["--settings", json.dumps(settings), "--init-model", str(init), "--tasks-dir", str(tasks)]
    assert cli_main(["pretrain-tiny-base", *argv, "--output", str(tmp_path / "x")]) == 2
    with pytest.raises(ConfigError, match=r"--tasks-dir: no dev or test parquet files"):
        held_out_texts(tmp_path)
