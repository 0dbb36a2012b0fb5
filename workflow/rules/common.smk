# Shared setup: config validation, the package on the path, and the settings each rule passes.
import json
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir).parent / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from fomaml_math.config import ConfigError, stage_settings, validate_config
from fomaml_math.launch import accelerate_launch_prefix
from fomaml_math.workflow import export_package_path, job_interpreter_warning, output_dir, tasks_dir

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
TASKS = list(config["tasks"]["names"])
SPLITS = ["support", "query", "test"]
INITS = ["base", "sft", "fomaml"]
STATS_TABLES = ["accuracy", "comparisons", "across_tasks"]
FIGURES = ["accuracy_vs_shots", "accuracy_vs_shots_by_task", "gain_heatmap", "nll_vs_shots", "training_curves"]
SHOTS = [int(k) for k in config["eval"]["shots"]]
TINY = config["model"]["tiny"] is not None
BASE_MODEL = config["model"]["name_or_path"]
COMPUTE = config["compute"]
TRAIN_GPUS = COMPUTE["num_processes"] if COMPUTE["gpus"] > 0 else 0


wildcard_constraints:
    init="base|sft|fomaml",
    shots=r"\d+",
    method="sft|fomaml",


def settings(stage):
    """This stage's settings as JSON: a param, so changing any of them reruns the stage."""
    return json.dumps(stage_settings(config, stage), sort_keys=True)


def task_files(splits=SPLITS):
    return expand("results/data/tasks/{task}/{split}.parquet", task=TASKS, split=splits)


def base_model_input():
    """The tiny base model is built by a rule; a hub model or local folder is not a file target."""
    return [BASE_MODEL] if TINY else []


def eval_file(init, shots):
    return f"results/eval/{init}/shots-{shots}.parquet"


def all_eval_files():
    return [eval_file(init, k) for init in INITS for k in SHOTS]


def init_model(wildcards):
    return BASE_MODEL if wildcards.init == "base" else f"results/models/{wildcards.init}/model"


def init_model_input(wildcards):
    return base_model_input() if wildcards.init == "base" else [init_model(wildcards)]


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
    ]
