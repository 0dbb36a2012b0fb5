# Shared setup: config validation, the package on the path, the settings each rule passes, and paths.
import json
import os
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir).parent / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from snakemake.settings.types import DeploymentMethod

from fomaml_math.analysis.outputs import FIGURES, STATS_FILES
from fomaml_math.config import (
    control_eval_settings,
    control_shot_counts,
    control_tasks,
    evaluated_tasks,
    meta_test_tasks,
    metaloop_row,
    shot_seed,
    stage_settings,
    tuning_tasks,
    validate_config,
)
from fomaml_math.data.taskfiles import ROLES_FILE, SPLITS
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.rows import BASE, METHODS
from fomaml_math.launch import accelerate_launch_prefix
from fomaml_math.workflow import (
    adaptation_choice,
    choice_flag_name,
    export_package_path,
    job_interpreter_warning,
    output_dir,
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
EVAL_BACKEND = config["eval"]["backend"]
ENV_EVAL = "../../envs/vllm.yaml" if EVAL_BACKEND == "vllm" else ENV
_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
EVAL_PYTHON = (
    "python"
    if EVAL_BACKEND == "hf" or _CONDA
    else os.environ.get("FOMAML_VLLM_PYTHON", str(Path(workflow.basedir).parent / ".venv-vllm" / "bin" / "python"))
)
TASKS = list(config["tasks"]["names"])
EXPERIMENTS = [e["name"] for e in config["experiments"]]
SEEDS = [int(s) for s in config["replicates"]["seeds"]]
STATS_TABLES = [Path(name).stem for name in STATS_FILES]
SHOTS = [int(k) for k in config["eval"]["shots"]]
TINY = config["model"]["tiny"] is not None
BASE_MODEL = config["model"]["name_or_path"]
# With model.pretrain the tiny model is built here and pretrained into BASE_MODEL; without, built into BASE_MODEL.
PRETRAIN = TINY and config["model"]["pretrain"] is not None
TINY_INIT = "results/models/tiny-init" if PRETRAIN else BASE_MODEL
COMPUTE = config["compute"]
TRAIN_GPUS = COMPUTE["num_processes"] if COMPUTE["gpus"] > 0 else 0
# CPU threads of a training job (compute.train_threads; null: all --cores, which runs trainings one at a time)
TRAIN_THREADS = COMPUTE.get("train_threads") or workflow.cores
# The evaluation's checkpoint and adaptation come from the tuner, stage `calibrate` (finetune mode only).
CALIBRATED = config["calibration"]["enabled"] and config["eval"]["mode"] == "finetune"
CONTROL = config["replicates"]["negative_control"]
# The secondary row: every FOMAML run also adapted with its meta-training inner loop (docs/evaluation.md).
METALOOP_ROW = metaloop_row(config)
METALOOP_KIND = "eval-metaloop"

# A trained run's folder under results/ (the base is results/base/); one value per wildcard.
RUN = "{experiment}/{method}/seed-{seed}"
RUN_MODEL = f"results/{RUN}/model"
RUN_CANDIDATES = f"results/{RUN}/candidates"
# The base: tuned per experiment on that experiment's training tasks (true few-shot), so with the tuner it has a
# folder per experiment; untuned, one shared folder serves every experiment.
BASE_RUN = f"{{experiment}}/{BASE}" if CALIBRATED else BASE
TASKS_DIR = "results/data/tasks"
ROLES = f"{TASKS_DIR}/{ROLES_FILE}"


def settings(stage, **kwargs):
    """This stage's settings as JSON: a param, so changing any of them reruns the stage."""
    return json.dumps(stage_settings(config, stage, **kwargs), sort_keys=True)


EVAL_SETTINGS = settings("evaluate")


def task_files(splits=SPLITS):
    return expand(f"{TASKS_DIR}/{{task}}/{{split}}.parquet", task=TASKS, split=splits)


def evaluated_task_files(wildcards):
    """The dev_pool and test files an evaluation reads: every task but its experiment's meta_val ones (the
    untuned base is shared across experiments and has no experiment wildcard: every task)."""
    names = evaluated_tasks(config, wildcards.experiment) if "experiment" in wildcards.keys() else TASKS
    return expand(f"{TASKS_DIR}/{{task}}/{{split}}.parquet", task=names, split=["dev_pool", "test"])


def on_gpus(command):
    """``command`` under the slot allocator: it waits for ``resources.gpu`` free devices and sets
    CUDA_VISIBLE_DEVICES (Snakemake counts GPUs but gives a job no devices of its own)."""
    return f"python -m fomaml_math.devices run --per-job {{resources.gpu}} --lock-dir results/.gpu-locks -- {command}"


def base_model_input():
    """The tiny base model is built by a rule; a hub model or local folder is not a file target."""
    return [BASE_MODEL] if TINY else []


def tuning_task_files(wildcards):
    """The dev files of the experiment's tuning tasks (meta_val, else training): the only ones its tuning reads."""
    return expand(
        f"{TASKS_DIR}/{{task}}/{{split}}.parquet",
        task=tuning_tasks(config, wildcards.experiment),
        split=["dev_pool", "dev_monitor"],
    )


def train_seed_of(wildcards):
    """The training seed of a job's run (None: the base)."""
    return int(wildcards.seed) if "seed" in wildcards.keys() else None


def tuning_args(wildcards):
    """--experiment, --tasks (meta_val, else training tasks; never a held-out one), --shot-seed and, for a trained
    run, --train-seed of a tuner."""
    seed = train_seed_of(wildcards)
    return " ".join(
        [
            f"--experiment {wildcards.experiment}",
            "--tasks",
            *tuning_tasks(config, wildcards.experiment),
            f"--shot-seed {shot_seed(config, seed)}",
            *([] if seed is None else [f"--train-seed {seed}"]),
        ]
    )


def trained_candidates(wildcards, input):
    """A trained run's tuner candidates: the ones its train_summary.json lists."""
    return f"--train-summary {input.train_summary}"


def base_candidate(wildcards):
    """The base's one tuner candidate: its model."""
    return f"--model {BASE_MODEL}"


def base_runs():
    return [BASE_RUN.format(experiment=e) for e in EXPERIMENTS] if CALIBRATED else [BASE]


def trained_runs():
    return [RUN.format(experiment=e, method=m, seed=s) for e in EXPERIMENTS for m in METHODS for s in SEEDS]


def train_settings(wildcards):
    return settings(f"train_{wildcards.method}", experiment=wildcards.experiment, train_seed=int(wildcards.seed))


def run_args(wildcards):
    """--experiment/--train-seed of a trained run (the calibration and evaluation of its model)."""
    return f"--experiment {wildcards.experiment} --train-seed {int(wildcards.seed)}"


def is_control(wildcards):
    """Whether a job is the negative control's (a rule without a ``kind`` wildcard, like the secondary row's, is not)."""
    return "kind" in wildcards.keys() and wildcards.kind == "eval-control"


def shot_seed_args(wildcards):
    """--shot-seed of an evaluation: its run's draws (eval.shot_draws), the negative control's own stream."""
    control = is_control(wildcards)
    return [f"--shot-seed {shot_seed(config, train_seed_of(wildcards), control=control)}"]


def eval_settings(wildcards):
    """An evaluation's settings: the negative control's have replicates.control_draws repeats."""
    return json.dumps(control_eval_settings(config), sort_keys=True) if is_control(wildcards) else EVAL_SETTINGS


def evaluated_task_args(experiment, tasks=None):
    """--meta-test <the experiment's held-out tasks> (none: an empty list), and --tasks: ``tasks`` if given (the
    negative control's pool), else the experiment's evaluated tasks where they are not all of them (meta_val ones
    are never read by evaluation; with in_domain_rows false, only meta_test ones are)."""
    held_out = meta_test_tasks(config, experiment)
    if tasks is None and evaluated_tasks(config, experiment) != TASKS:
        tasks = evaluated_tasks(config, experiment)
    args = []
    if held_out:
        args.append(" ".join(["--meta-test", *held_out]))
    if tasks:
        args.append(" ".join(["--tasks", *tasks]))
    return args


def eval_args(wildcards):
    """--experiment/--train-seed/--meta-test, --tasks and --shot-seed of a trained run's evaluation; the negative
    control evaluates only its experiment's primary pool (--tasks), the only tasks its analysis reads."""
    tasks = control_tasks(config, wildcards.experiment) if is_control(wildcards) else None
    task_args = evaluated_task_args(wildcards.experiment, tasks)
    return " ".join([run_args(wildcards), *task_args, *shot_seed_args(wildcards)])


def base_eval_args(wildcards):
    """The base's evaluation: per experiment when tuned (its choice is the experiment's), else shared."""
    if not CALIBRATED:
        return " ".join(["--experiment shared", *shot_seed_args(wildcards)])
    experiment = wildcards.experiment
    return " ".join([f"--experiment {experiment}", *evaluated_task_args(experiment), *shot_seed_args(wildcards)])


def calibration_job(wildcards):
    """The tuner checkpoint of an evaluation's initialisation (a trained run, else the experiment's base)."""
    if "method" in wildcards.keys():
        return checkpoints.calibrate.get(experiment=wildcards.experiment, method=wildcards.method, seed=wildcards.seed)
    return checkpoints.calibrate_base.get(experiment=wildcards.experiment)


def chosen(wildcards):
    """(AdaptationChoice, model folder) the tuner chose for this evaluation's shot count; read once it has run."""
    return adaptation_choice(calibration_job(wildcards).output[0], int(wildcards.shots))


def choice_flag(wildcards):
    """A file named by the chosen value: an evaluation depends on the value, not on the tuner file's mtime,
    so a retuning that chooses the same value reruns no evaluation."""
    return [choice_flag_name(chosen(wildcards)[0])] if CALIBRATED else []


def eval_model(wildcards, input):
    """The weights evaluated: the tuner's chosen candidate, else the run's model/ (the base: its model)."""
    if CALIBRATED:
        return chosen(wildcards)[1]
    return input.model if "method" in wildcards.keys() else BASE_MODEL


def adapt_args(wildcards):
    """--adapt-lr/--adapt-steps: the tuner's choice, else the untuned eval settings."""
    if not CALIBRATED:
        return "--adapt-lr {!r} --adapt-steps {}".format(
            float(config["eval"]["inner_lr"]), int(config["eval"]["num_inner_steps"])
        )
    choice = chosen(wildcards)[0]
    return f"--adapt-lr {choice.lr!r} --adapt-steps {choice.num_steps}"


def metaloop_args(wildcards, input):
    """The secondary row's adaptation: the inner loop the run's train_summary.json says it was meta-trained with."""
    return f"--meta-inner-loop {input.train_summary}"


def eval_file(run, shots, kind="eval"):
    return f"results/{run}/{kind}/shots-{shots}.parquet"


def all_eval_files():
    return [eval_file(run, k) for run in [*base_runs(), *trained_runs()] for k in SHOTS]


def control_runs():
    return [RUN.format(experiment=EXPERIMENTS[0], method="fomaml", seed=SEEDS[0])] if CONTROL else []


def control_eval_files():
    return [eval_file(run, k, "eval-control") for run in control_runs() for k in control_shot_counts(config)]


def metaloop_eval_files():
    """The secondary row's files: every FOMAML run at every evaluated k > 0 (0 shots adapt nothing)."""
    if not METALOOP_ROW:
        return []
    runs = [RUN.format(experiment=e, method="fomaml", seed=s) for e in EXPERIMENTS for s in SEEDS]
    return [eval_file(run, k, METALOOP_KIND) for run in runs for k in SHOTS if k > 0]


def calibration_files():
    return [f"results/{run}/calibration.json" for run in [*base_runs(), *trained_runs()]] if CALIBRATED else []


def all_targets():
    """Every final product, so a deleted figure or table is rebuilt by a plain rerun."""
    return [
        "results/env/report.json",
        "results/data/split_stats.tsv",
        *metaloop_eval_files(),
        *expand("results/stats/{name}.tsv", name=STATS_TABLES),
        *expand("results/figures/{figure}.{ext}", figure=FIGURES, ext=["pdf", "png"]),
        "results/summary.md",
        "results/stats/per_task.md",
        "results/experiments.md",
        "results/experiments.csv",
        "results/manifest.json",
    ]
