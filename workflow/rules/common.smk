# Shared setup: config validation, the package on the path, the settings each rule passes, and paths.
import json
import os
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir).parent / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from fomaml_math.errors import ConfigError
from fomaml_math.config import control_shot_seed, meta_test_tasks, stage_settings, validate_config
from fomaml_math.launch import accelerate_launch_prefix
from snakemake.settings.types import DeploymentMethod
from fomaml_math.workflow import (
    adaptation_choice,
    export_package_path,
    job_interpreter_warning,
    output_dir,
    parse_run,
    tasks_dir,
)

# Jobs run `python -m fomaml_math ...` and find the package without an install (e.g. in conda envs).
export_package_path()
if (warning := job_interpreter_warning()) is not None:
    logger.warning(f"warning: {warning}")

try:
    validate_config(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None
validate(config, "../schemas/config.schema.yaml")

ENV = "../../envs/fomaml-math.yaml"
# eval.backend vllm: evaluation jobs run in the second pinned environment (transformers < 5.20, docs/vllm.md) -
# its conda env under --software-deployment-method conda, else the interpreter of .venv-vllm (make setup-vllm;
# FOMAML_VLLM_PYTHON overrides). Every other rule keeps the main environment.
EVAL_BACKEND = config["eval"].get("backend", "hf")
ENV_EVAL = "../../envs/vllm.yaml" if EVAL_BACKEND == "vllm" else ENV
_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
EVAL_PYTHON = (
    "python"
    if EVAL_BACKEND == "hf" or _CONDA
    else os.environ.get("FOMAML_VLLM_PYTHON", str(Path(workflow.basedir).parent / ".venv-vllm" / "bin" / "python"))
)
TASKS = list(config["tasks"]["names"])
SPLITS = ["support", "query", "dev_pool", "dev_monitor", "test"]
METHODS = ["sft", "fomaml"]
EXPERIMENTS = [e["name"] for e in config["experiments"]]
SEEDS = [int(s) for s in config["replicates"]["seeds"]]
from fomaml_math.analysis.outputs import FIGURES, STATS_FILES

STATS_TABLES = [Path(name).stem for name in STATS_FILES]
SHOTS = [int(k) for k in config["eval"]["shots"]]
TINY = config["model"]["tiny"] is not None
BASE_MODEL = config["model"]["name_or_path"]
# With model.pretrain the tiny model is built here and pretrained into BASE_MODEL; without, built into BASE_MODEL.
PRETRAIN = TINY and config["model"].get("pretrain") is not None
TINY_INIT = "results/models/tiny-init" if PRETRAIN else BASE_MODEL
COMPUTE = config["compute"]
TRAIN_GPUS = COMPUTE["num_processes"] if COMPUTE["gpus"] > 0 else 0
# The evaluation's learning rate comes from the calibration stage (finetune mode only).
CALIBRATED = config["calibration"]["enabled"] and config["eval"]["mode"] == "finetune"
CONTROL = config["replicates"]["negative_control"]


def settings(stage, **kwargs):
    """This stage's settings as JSON: a param, so changing any of them reruns the stage."""
    return json.dumps(stage_settings(config, stage, **kwargs), sort_keys=True)


def task_files(splits=SPLITS):
    return expand("results/data/tasks/{task}/{split}.parquet", task=TASKS, split=splits)


ROLES = "results/data/tasks/roles.parquet"


def base_model_input():
    """The tiny base model is built by a rule; a hub model or local folder is not a file target."""
    return [BASE_MODEL] if TINY else []


def trained_runs():
    return [f"{e}/{m}/seed-{s}" for e in EXPERIMENTS for m in METHODS for s in SEEDS]


def run_model(wildcards):
    return BASE_MODEL if wildcards.run == "base" else f"results/{wildcards.run}/model"


def run_model_input(wildcards):
    return base_model_input() if wildcards.run == "base" else [run_model(wildcards)]


def train_settings(wildcards):
    return settings(f"train_{wildcards.method}", experiment=wildcards.experiment, train_seed=int(wildcards.seed))


def eval_args(wildcards):
    """--experiment/--train-seed/--meta-test (and the control's --shot-seed) of one evaluation job."""
    experiment, _, seed = parse_run(wildcards.run)
    args = []
    if experiment is not None:
        args += ["--experiment", experiment, "--train-seed", str(seed)]
        held_out = meta_test_tasks(config, experiment)
        if held_out:
            args += ["--meta-test", *held_out]
    else:
        args += ["--experiment", "shared"]
    if wildcards.kind == "eval-control":
        args += ["--shot-seed", str(control_shot_seed(config))]
    return " ".join(args)


def calibrate_args(wildcards):
    experiment, _, seed = parse_run(wildcards.run)
    return "" if experiment is None else f"--experiment {experiment} --train-seed {seed}"


def chosen_adaptation(wildcards):
    """(lr, steps) the calibration chose for this run; read once the checkpoint has run."""
    if not CALIBRATED:
        return float(config["eval"]["inner_lr"]), int(config["eval"]["num_inner_steps"])
    return adaptation_choice(checkpoints.calibrate.get(run=wildcards.run).output[0])


def choice_flag(wildcards):
    """A file named by the chosen value: an evaluation depends on the value, not on the calibration's mtime,
    so a recalibration that chooses the same value reruns no evaluation."""
    if not CALIBRATED:
        return []
    lr, steps = chosen_adaptation(wildcards)
    return [f"results/calibration-choices/{config['eval']['optimizer']}-lr{lr!r}-steps{steps}.flag"]


def eval_file(run, shots, kind="eval"):
    return f"results/{run}/{kind}/shots-{shots}.parquet"


def all_eval_files():
    return [eval_file(run, k) for run in ["base", *trained_runs()] for k in SHOTS]


def control_runs():
    return [f"{EXPERIMENTS[0]}/fomaml/seed-{SEEDS[0]}"] if CONTROL else []


def control_eval_files():
    return [eval_file(run, k, "eval-control") for run in control_runs() for k in SHOTS if k > 0]


def calibration_files():
    return [f"results/{run}/calibration.json" for run in ["base", *trained_runs()]] if CALIBRATED else []


def all_targets():
    """Every final product, so a deleted figure or table is rebuilt by a plain rerun."""
    return [
        "results/env/report.json",
        "results/data/split_stats.tsv",
        *expand("results/stats/{name}.tsv", name=STATS_TABLES),
        *expand("results/figures/{figure}.{ext}", figure=FIGURES, ext=["pdf", "png"]),
        "results/summary.md",
        "results/experiments.md",
        "results/experiments.csv",
        "results/manifest.json",
    ]
