"""Config validation: every bad value stops with one line naming the key; stage settings isolate stages."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from fomaml_math.config import (
    control_eval_settings,
    control_shot_counts,
    control_tasks,
    evaluated_tasks,
    load_config,
    settings_hash,
    sft_budget_steps,
    shot_seed,
    split_settings,
    stage_settings,
    training_tasks,
    tuning_tasks,
    validate_config,
)
from fomaml_math.errors import ConfigError
from fomaml_math.launch import accelerate_launch_prefix
from fomaml_math.subjects import MATH_TASKS


def _set(config: dict, dotted: str, value: object) -> dict:
    config = copy.deepcopy(config)
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return config


_DELETE = object()

BAD_CONFIGS = [
    ("fomaml.inner_lr", -1.0, "fomaml.inner_lr: expected a number > 0, got -1.0"),
    ("fomaml.meta_batch_size", 0, "fomaml.meta_batch_size: expected a number >= 1, got 0"),
    ("fomaml.total_steps", 2.5, "fomaml.total_steps: expected a value of type integer"),
    ("tasks.split.support", 1.2, "tasks.split.support: expected a number < 1, got 1.2"),
    ("tasks.split.query", 0, "tasks.split.query: expected a number > 0, got 0"),
    (
        "tasks.split",
        {"scheme": "pooled", "support": 0.5, "query": 0.3, "dev": 0.1, "test": 0.2},
        "tasks.split: with scheme pooled, support + query + dev + test must be <= 1, got 1.1",
    ),
    ("tasks.split.scheme", "mixed", "tasks.split.scheme: expected one of ['source_test', 'pooled']"),
    ("tasks.split.test_subset", "math5000", "tasks.split.test_subset: expected one of ['all', 'math500']"),
    ("tasks.split.dev_monitor", 0, "tasks.split.dev_monitor: expected a number >= 1, got 0"),
    (
        "tasks.split.dev_pool",
        99,
        "tasks.split.dev_pool: 99 problems per task, but eval.shots goes up to 50; the shot pool must hold "
        "at least 2 x 50 = 100",
    ),
    (
        "tasks.split.test_subset",
        "math500",
        "tasks.split.test_subset: math500 needs MATH itself (data.source hub or local), not synthetic problems",
    ),
    ("eval.shots", [0, -5], "eval.shots.1: expected a number >= 0, got -5"),
    ("eval.shots", [0, 2.5], "eval.shots.1: expected a value of type integer"),
    ("eval.shots", [5, 5], "eval.shots: expected a list without duplicates"),
    ("tasks.names", ["algebra", "calculus"], "tasks.names: 'calculus' is not a synthetic task; expected a MATH"),
    ("tasks.names", ["algebra", "algebra-1"], "tasks.names.1: 'algebra-1' does not match"),
    ("model.pretrain", {"steps": 0, "batch_size": 4, "lr": 0.1}, "model.pretrain.steps: expected a number >= 1"),
    ("data.source", "s3", "data.source: expected one of ['hub', 'local', 'synthetic'], got \"s3\""),
    ("fomaml.lr", 0.1, "Additional properties are not allowed ('lr' was unexpected)"),
    ("model.name_or_path", "", "model.name_or_path: expected a non-empty string"),
    ("sft.budget", "steps", "sft.steps: required (a positive integer) when sft.budget is 'steps'"),
    ("compute.mixed_precision", "fp8", "compute.mixed_precision: expected one of"),
    ("eval.repeats", 0, "eval.repeats: expected a number >= 1, got 0"),
    ("replicates.control_draws", 3, "replicates.control_draws: expected a number >= 4, got 3"),
    ("replicates.control_shots", [5, 20], "replicates.control_shots: [20] are not evaluated (eval.shots [0, 5, 10, "),
    ("stats.ci_level", 1.0, "stats.ci_level: expected a number < 1, got 1.0"),
    ("seed", _DELETE, "'seed' is a required property"),
    ("fomaml.inner_optimizer", "rmsprop", "fomaml.inner_optimizer: expected one of ['sgd', 'adam']"),
    ("select.criterion", "best", "select.criterion: expected one of ['last', 'best_dev', 'tuned']"),
    (
        "fomaml.inner_optimizer",
        "sgd",
        "fomaml.inner_optimizer: sgd, but eval.optimizer is adam (eval.mode finetune); FOMAML must be meta-trained "
        "with the optimizer it is evaluated with",
    ),
]


def test_fomaml_inner_optimizer_follows_the_evaluation_only_when_it_adapts(demo_config):
    """The mismatch matters only where the evaluation fine-tunes (in_context adapts nothing)."""
    assert demo_config["fomaml"]["inner_optimizer"] == demo_config["eval"]["optimizer"] == "adam"
    untuned = [{k: v for k, v in e.items() if k != "meta_val"} for e in demo_config["experiments"]]  # tuner-only
    in_context = _set(_set(_set(demo_config, "fomaml.inner_optimizer", "sgd"), "eval.mode", "in_context"),
                      "experiments", untuned)  # fmt: skip
    assert validate_config(in_context)["fomaml"]["inner_optimizer"] == "sgd"
    both_sgd = _set(_set(demo_config, "fomaml.inner_optimizer", "sgd"), "eval.optimizer", "sgd")
    validate_config(both_sgd)
    mismatch = r"^config error at fomaml\.inner_optimizer: adam, but eval\.optimizer is sgd"
    with pytest.raises(ConfigError, match=mismatch):
        validate_config(_set(demo_config, "eval.optimizer", "sgd"))


@pytest.mark.parametrize(("key", "value", "message"), BAD_CONFIGS, ids=lambda v: str(v)[:30])
def test_bad_config_is_rejected_with_one_line_naming_the_key(demo_config, key, value, message):
    with pytest.raises(ConfigError) as info:
        validate_config(_set(demo_config, key, value))
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_meta_validation_tasks_are_tuned_on_not_trained_on_nor_evaluated(demo_config):
    config = validate_config(_set(demo_config, "experiments", [
        {"name": "fold", "meta_test": ["algebra_v1"], "meta_val": ["number_theory_v1", "geometry"]},
        {"name": "plain", "meta_test": ["algebra_v1"]},
    ]))  # fmt: skip
    names = config["tasks"]["names"]
    assert tuning_tasks(config, "fold") == ["number_theory_v1", "geometry"]
    assert training_tasks(config, "fold") == [
        t for t in names if t not in ("algebra_v1", "number_theory_v1", "geometry")
    ]
    assert evaluated_tasks(config, "fold") == [t for t in names if t not in ("number_theory_v1", "geometry")]
    # without meta_val the tuner reads the training tasks, and every task is evaluated
    assert tuning_tasks(config, "plain") == training_tasks(config, "plain") == [t for t in names if t != "algebra_v1"]
    assert evaluated_tasks(config, "plain") == names


def test_cross_field_rules(demo_config):
    # MATH subjects only (the demo's variant tasks exist only for synthetic data), no pretraining (synthetic only)
    math_only = _set(_set(demo_config, "tasks.names", list(MATH_TASKS)), "experiments", [{"name": "main"}])
    local = _set(_set(math_only, "data.source", "local"), "model.pretrain", None)
    with pytest.raises(ConfigError, match=r"data\.local\.path: required when data\.source is 'local'"):
        validate_config(local)
    held_out = [
        {"name": "in_domain"},
        {"name": "lots", "meta_test": ["algebra", "geometry", "prealgebra", "precalculus"]},
    ]
    too_many = _set(math_only, "experiments", held_out)
    with pytest.raises(
        ConfigError, match=r"fomaml\.meta_batch_size: 4 tasks per step, but only 3 .* experiments\.lots"
    ):
        validate_config(too_many)
    unknown = _set(_set(demo_config, "tasks.names", ["algebra", "prealgebra"]), "experiments",
                   [{"name": "fold", "meta_test": ["geometry"]}])  # fmt: skip
    unknown["fomaml"]["meta_batch_size"] = 1
    with pytest.raises(ConfigError, match=r"experiments\.fold\.meta_test: \['geometry'\] are not in tasks\.names"):
        validate_config(unknown)
    with pytest.raises(ConfigError, match=r"tasks\.meta_test: moved to experiments\.<name>\.meta_test"):
        validate_config(_set(demo_config, "tasks.meta_test", ["geometry"]))
    overlap = _set(demo_config, "experiments", [{"name": "f", "meta_test": ["geometry"], "meta_val": ["geometry"]}])
    with pytest.raises(ConfigError, match=r"experiments\.f\.meta_val: \['geometry'\] are also in its meta_test"):
        validate_config(overlap)
    untuned = _set(_set(demo_config, "experiments", [{"name": "f", "meta_val": ["geometry"]}]), "calibration.enabled",
                   False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"experiments\.f\.meta_val: only the tuner reads .* calibration\.enabled"):
        validate_config(untuned)
    twice = _set(demo_config, "experiments", [{"name": "a"}, {"name": "a"}])
    with pytest.raises(ConfigError, match=r"experiments: names must be unique"):
        validate_config(twice)
    reserved = _set(demo_config, "experiments", [{"name": "stats"}])
    with pytest.raises(ConfigError, match=r"experiments\.0\.name"):
        validate_config(reserved)
    missing = _set(demo_config, "compute.accelerate_config", "config/accelerate/nope.yaml")
    with pytest.raises(ConfigError, match=r"compute\.accelerate_config: config/accelerate/nope\.yaml not found"):
        validate_config(missing)
    gpus = _set(_set(demo_config, "compute.gpus", 2), "compute.num_processes", 4)
    with pytest.raises(ConfigError, match=r"compute\.num_processes: 4 processes need as many GPUs"):
        validate_config(gpus)
    tiny_elsewhere = _set(demo_config, "model.name_or_path", "Qwen/Qwen3-4B-Instruct-2507")
    with pytest.raises(ConfigError, match=r"model\.name_or_path: with model\.tiny set"):
        validate_config(tiny_elsewhere)


def test_split_rules(demo_config):
    pooled_math500 = _set(
        _set(_set(demo_config, "tasks.split.scheme", "pooled"), "tasks.split.test_subset", "math500"),
        "data.source",
        "hub",
    )
    with pytest.raises(
        ConfigError, match=r"tasks\.split\.test_subset: math500 needs tasks\.split\.scheme: source_test"
    ):
        validate_config(pooled_math500)
    # the split stage holds hand-written --settings to the same rules, and fills the same defaults
    assert split_settings({"dev_pool": 12}) == {
        "dev_pool": 12,
        "scheme": "source_test",
        "test_subset": "all",
        "dev_monitor": 40,
        "support": 0.30,
        "query": 0.40,
        "dev": 0.15,
        "test": 0.15,
    }
    with pytest.raises(ConfigError, match=r"^config error at tasks\.split\.dev_pool: expected a number >= 1, got 0$"):
        split_settings({"dev_pool": 0})
    with pytest.raises(ConfigError, match=r"^config error at tasks\.split: with scheme pooled"):
        split_settings({"scheme": "pooled", "support": 0.5, "query": 0.5, "dev": 0.1, "test": 0.1})
    # an old config with the seed's three ratios still validates: the default scheme ignores test
    old = _set(demo_config, "tasks.split", {"support": 0.3, "query": 0.4, "test": 0.3})
    assert validate_config(old)["tasks"]["split"]["scheme"] == "source_test"


def test_defaults_are_filled(demo_config):
    del demo_config["fomaml"]["warmup_steps"]
    del demo_config["eval"]["mode"]
    del demo_config["select"]["criterion"]
    validate_config(demo_config)
    assert demo_config["fomaml"]["warmup_steps"] == 0
    assert demo_config["eval"]["mode"] == "finetune"
    assert demo_config["select"]["criterion"] == "tuned"  # candidates for the tuner
    # an old config without the new keys keeps its meaning: plain-SGD inner loop, evaluated with SGD
    old = {k: v for k, v in demo_config["fomaml"].items() if k != "inner_optimizer"}
    old_eval = {k: v for k, v in demo_config["eval"].items() if k != "optimizer"}
    config = validate_config(_set(_set(demo_config, "fomaml", old), "eval", old_eval))
    assert config["fomaml"]["inner_optimizer"] == config["eval"]["optimizer"] == "sgd"


def test_both_shipped_configs_are_valid(repo_root):
    paper = load_config(repo_root / "config" / "config.yaml")
    assert paper["model"]["name_or_path"] == "Qwen/Qwen3-4B-Instruct-2507"
    assert paper["compute"]["gpus"] == 4
    assert paper["fomaml"] | {} == paper["fomaml"]
    seed_hyper = {k: paper["fomaml"][k] for k in ("inner_lr", "num_inner_steps", "outer_lr", "meta_batch_size")}
    assert seed_hyper == {"inner_lr": 1e-4, "num_inner_steps": 5, "outer_lr": 3e-5, "meta_batch_size": 4}
    assert (paper["fomaml"]["total_steps"], paper["fomaml"]["save_freq"], paper["fomaml"]["test_freq"]) == (
        5000,
        500,
        1000,  # 5 candidate checkpoints per run (select.criterion tuned), not the seed's 50
    )
    assert sft_budget_steps(paper) / paper["sft"]["test_freq"] == paper["fomaml"]["total_steps"] / 1000 == 5
    assert paper["fomaml"]["inner_optimizer"] == paper["eval"]["optimizer"] == "adam"
    assert paper["fomaml"]["inner_lr"] in paper["calibration"]["lr_grid"]
    assert paper["select"]["criterion"] == "tuned"
    assert paper["tasks"]["split"] == {
        "scheme": "source_test",
        "test_subset": "all",
        "dev_pool": 100,
        "dev_monitor": 40,
        "support": 0.30,
        "query": 0.40,
        "dev": 0.15,
        "test": 0.15,
    }
    for name in ("config", "demo", "test"):  # every shipped config's shot pool holds two draws of its largest k
        config = load_config(repo_root / "config" / f"{name}.yaml")
        assert config["tasks"]["split"]["dev_pool"] >= 2 * max(config["eval"]["shots"]), name
    assert load_config(repo_root / "config" / "demo.yaml")["data"]["source"] == "synthetic"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(empty)


def test_sft_budget_matches_fomaml_example_passes(demo_config):
    fo = demo_config["fomaml"]
    # demo: 80 steps x 4 tasks x (2 inner steps x 8 + 8 query) = 7680 examples; / 16 per SFT step = 480
    assert (fo["total_steps"], fo["meta_batch_size"], fo["num_inner_steps"]) == (80, 4, 2)
    assert sft_budget_steps(demo_config) == 80 * 4 * (2 * 8 + 8) // 16 == 480
    fixed = _set(_set(demo_config, "sft.budget", "steps"), "sft.steps", 17)
    assert sft_budget_steps(fixed) == 17


def test_stage_settings_isolate_unrelated_changes(demo_config):
    changed = _set(demo_config, "fomaml.inner_lr", 0.5)
    for stage in ("ingest", "split_tasks", "build_tiny_model", "train_sft", "evaluate", "stats"):
        assert stage_settings(changed, stage) == stage_settings(demo_config, stage), stage
    assert stage_settings(changed, "train_fomaml") != stage_settings(demo_config, "train_fomaml")
    more_shots = _set(demo_config, "eval.shots", [0, 5, 10, 25, 50, 100])
    assert stage_settings(more_shots, "evaluate") == stage_settings(demo_config, "evaluate")
    # the SFT budget follows FOMAML's size, so it does rerun when total_steps changes
    longer = _set(demo_config, "fomaml.total_steps", 120)
    assert stage_settings(longer, "train_sft")["sft"]["steps"] == 720
    assert settings_hash(stage_settings(longer, "train_sft")) != settings_hash(stage_settings(demo_config, "train_sft"))


@pytest.mark.parametrize(
    ("key", "value", "retrains"),
    [
        ("eval.shots", [0, 5, 10, 25, 50], False),
        ("eval.repeats", 7, False),
        ("eval.max_new_tokens", 17, False),
        ("calibration.lr_grid", [0.1], False),
        ("calibration.steps_grid", [1, 2], False),
        ("stats.alpha", 0.01, False),
        ("compute.keep_finished_checkpoints", True, True),  # a training setting, but not in the resume key
        # the dev monitoring inside training adapts with the evaluation's protocol on select.shots shots
        ("eval.inner_lr", 0.123, True),
        ("select.shots", 3, True),
    ],
)
def test_which_downstream_keys_retrain(demo_config, key, value, retrains):
    """Training settings hold no eval, calibration or stats key but the adaptation the dev monitoring runs
    (docs/training.md, "Disk"): changing any other never reruns a training, so its candidates are never needed
    again from scratch."""
    changed = _set(demo_config, key, value)
    for stage in ("train_fomaml", "train_sft"):
        same = stage_settings(changed, stage, experiment="heldout", train_seed=0) == stage_settings(
            demo_config, stage, experiment="heldout", train_seed=0
        )
        assert same != retrains, (stage, key)


def test_accelerate_launch_prefix():
    cpu2 = {"gpus": 0, "num_processes": 2, "mixed_precision": "no", "accelerate_config": None}
    assert accelerate_launch_prefix(cpu2) == (
        "env ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
        "--dynamo_backend no --mixed_precision no"
    )
    gpu4 = {
        "gpus": 4,
        "num_processes": 4,
        "mixed_precision": "bf16",
        "accelerate_config": "config/accelerate/fsdp.yaml",
    }
    prefix = accelerate_launch_prefix(gpu4)
    assert prefix.startswith("accelerate launch --config_file config/accelerate/fsdp.yaml --num_processes 4")
    assert prefix.endswith("--mixed_precision bf16")


def test_conda_env_has_the_same_pins_as_requirements(repo_root):
    env = yaml.safe_load((repo_root / "envs" / "fomaml-math.yaml").read_text())
    pip_pins = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    lines = (repo_root / "requirements.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert sorted(pip_pins) == sorted(requirements)
    assert "torch==2.13.0" in requirements


def test_cli_reports_config_error_in_one_line(tmp_path, repo_root, demo_config):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(demo_config, "tasks.split.test", 1.5)))
    result = subprocess.run(
        [sys.executable, "-m", "fomaml_math", "check-env", "--configfile", str(bad), "--output", "x", "--summary", "y"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: config error at tasks.split.test: expected a number < 1, got 1.5"


def test_synthetic_task_names_and_pretraining_rules(demo_config):
    """Variants (own hidden rules) only for synthetic data; pretraining only for the offline tiny model."""
    assert "algebra_v1" in demo_config["tasks"]["names"]
    local = _set(_set(demo_config, "data.source", "local"), "data.local.path", "data/MATH")
    with pytest.raises(ConfigError, match=r"tasks\.names: 'algebra_v1' is not a MATH subject \(data\.source local\)"):
        validate_config(_set(local, "model.pretrain", None))
    with pytest.raises(ConfigError, match=r"^config error at tasks\.names: 'algebra_v0' is not a synthetic task"):
        validate_config(_set(demo_config, "tasks.names", ["algebra", "algebra_v0"]))
    with pytest.raises(ConfigError, match=r"model\.pretrain: pretrains the offline tiny model only"):
        validate_config(_set(demo_config, "model.tiny", None))
    settings = stage_settings(validate_config(copy.deepcopy(demo_config)), "pretrain_tiny_base")
    assert settings["families"] == sorted(MATH_TASKS)  # variants share their family's plain form
    assert settings["pretrain"]["problems_per_family"] == demo_config["model"]["pretrain"]["problems_per_family"]


def test_shot_draws_are_nested_in_training_seeds_unless_shared(demo_config):
    assert demo_config["eval"]["shot_draws"] == "per_seed"  # the default
    seeds = [shot_seed(demo_config, s) for s in (0, 1, 2)]
    controls = [shot_seed(demo_config, s, control=True) for s in (0, 1, 2)]
    assert len(set(seeds + controls + [demo_config["seed"]])) == 7  # every run and its control: their own draws
    assert shot_seed(demo_config, None) == demo_config["seed"]  # the base: one model, the global seed
    assert shot_seed(demo_config, 1) == shot_seed(copy.deepcopy(demo_config), 1)  # deterministic
    demo_config["eval"]["shot_draws"] = "shared"
    assert {shot_seed(demo_config, s) for s in (0, 1, None)} == {demo_config["seed"]}
    assert shot_seed(demo_config, 0, control=True) == demo_config["seed"] + 1_000_003


def test_the_negative_control_runs_many_draws_on_the_primary_pool_only(demo_config):
    """The control's evaluation: the main settings with replicates.control_draws repeats, on its experiment's
    held-out tasks (else every task), at replicates.control_shots (default: every evaluated k > 0)."""
    settings = control_eval_settings(demo_config)
    main = stage_settings(demo_config, "evaluate")
    assert settings["eval"]["repeats"] == demo_config["replicates"]["control_draws"] != main["eval"]["repeats"]
    assert {**settings, "eval": {**settings["eval"], "repeats": main["eval"]["repeats"]}} == main
    assert control_tasks(demo_config, "heldout") == ["algebra_v1", "intermediate_algebra_v1", "number_theory_v1"]
    assert control_shot_counts(demo_config) == [5]
    default = _set(demo_config, "replicates", {"seeds": [0]})
    validate_config(default)
    assert default["replicates"]["control_draws"] == 8 and default["replicates"]["control_shots"] is None
    assert control_shot_counts(default) == [5, 10, 25, 50]
    in_domain = _set(default, "experiments", [{"name": "main", "meta_test": []}])
    assert control_tasks(validate_config(in_domain), "main") == demo_config["tasks"]["names"]


def test_the_metaloop_row_setting(demo_config):
    """eval.metaloop_row: on in the paper's and the demo's configs, off by default, acting in finetune mode only;
    the evaluation's settings leave it out, so turning it on reruns no existing evaluation."""
    from fomaml_math.config import REPO_ROOT, metaloop_row

    for name in ("config.yaml", "demo.yaml"):
        assert load_config(REPO_ROOT / "config" / name)["eval"]["metaloop_row"] is True, name
    assert metaloop_row(demo_config)
    assert not metaloop_row(validate_config(_set(demo_config, "eval.metaloop_row", _DELETE)))
    untuned = [{k: v for k, v in e.items() if k != "meta_val"} for e in demo_config["experiments"]]  # tuner-only
    assert not metaloop_row(validate_config(_set(_set(demo_config, "eval.mode", "in_context"), "experiments", untuned)))
    with pytest.raises(ConfigError, match=r"^config error at eval\.metaloop_row: expected a value of type boolean"):
        validate_config(_set(demo_config, "eval.metaloop_row", "yes"))
    off = validate_config(_set(demo_config, "eval.metaloop_row", False))
    assert stage_settings(off, "evaluate") == stage_settings(demo_config, "evaluate")
    assert "metaloop_row" not in stage_settings(demo_config, "evaluate")["eval"]


@pytest.mark.parametrize("name", ["demo.yaml", "test.yaml"])
def test_shipped_configs_are_complete(name):
    """Snakemake merges a --configfile over config/config.yaml key by key: a key the file leaves out comes from the
    paper config (the test config once ran with the paper's control_shots that way). Each shipped config therefore
    states every key that config.yaml sets: merged or alone, it validates to the same settings."""
    from snakemake.utils import update_config

    from fomaml_math.config import REPO_ROOT

    paper = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    alone = yaml.safe_load((REPO_ROOT / "config" / name).read_text())
    merged = copy.deepcopy(paper)
    update_config(merged, copy.deepcopy(alone))
    assert validate_config(merged) == validate_config(alone)


def test_without_in_domain_rows_only_the_held_out_tasks_are_evaluated(demo_config):
    """``in_domain_rows: false``: the same trainings and tuning, the evaluation reads the meta_test tasks only; an
    experiment without meta_test would evaluate nothing and is refused in one line."""
    experiment = {"name": "fold", "meta_test": ["algebra_v1"], "meta_val": ["number_theory_v1"]}
    lean = validate_config(_set(demo_config, "experiments", [{**experiment, "in_domain_rows": False}]))
    every = validate_config(_set(demo_config, "experiments", [experiment]))
    assert evaluated_tasks(lean, "fold") == ["algebra_v1"] == control_tasks(lean, "fold")
    assert len(evaluated_tasks(every, "fold")) == len(every["tasks"]["names"]) - 1
    for fn in (training_tasks, tuning_tasks):
        assert fn(lean, "fold") == fn(every, "fold")
    with pytest.raises(ConfigError, match=r"^config error at experiments\.main\.in_domain_rows: false evaluates the "
                       r"meta_test tasks only, and the experiment has none") as info:  # fmt: skip
        validate_config(_set(demo_config, "experiments", [{"name": "main", "in_domain_rows": False}]))
    assert "\n" not in str(info.value)
