"""Configuration: one JSON schema, one-line errors, and the settings each stage receives.

The Snakefile and every hand-run entry point validate through :func:`validate_config`, so a
bad value stops both the same way, before any work starts.  Each stage sees only the
settings it uses (:func:`stage_settings`); Snakemake receives them as ``params`` so a change
reruns exactly the stages that depend on it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fomaml_math.errors import ConfigError
from fomaml_math.subjects import MATH_TASKS, is_synthetic_task, subjects_of, task_family

if TYPE_CHECKING:  # imported where it validates: `from fomaml_math.config import ConfigError` works without it
    import jsonschema

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
LEAVE_ONE_SUBJECT_OUT = "leave_one_subject_out"  # the one experiment generator (experiments[].generate)
POOLED_SUFFIX = "pooled"  # the pooled row of the folds is <name_prefix>-pooled (never a subject's name)


def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as handle:
        return yaml.safe_load(handle)


def _validator_with_defaults(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A Draft 2020-12 validator that also fills in ``default`` values (jsonschema's FAQ recipe)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    extended = jsonschema.validators.extend(base, {"properties": set_defaults})
    return extended(schema)


def _key_of(error: jsonschema.ValidationError) -> str:
    path = [str(part) for part in error.absolute_path]
    return ".".join(path) if path else "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    expected = {
        "enum": lambda: f"one of {error.validator_value}",
        "type": lambda: f"a value of type {error.validator_value}",
        "minimum": lambda: f"a number >= {error.validator_value}",
        "exclusiveMinimum": lambda: f"a number > {error.validator_value}",
        "maximum": lambda: f"a number <= {error.validator_value}",
        "exclusiveMaximum": lambda: f"a number < {error.validator_value}",
        "minItems": lambda: f"a list with at least {error.validator_value} item(s)",
        "uniqueItems": lambda: "a list without duplicates",
        "minLength": lambda: "a non-empty string",
    }.get(str(error.validator))
    if expected is not None:
        return f"expected {expected()}, got {json.dumps(error.instance)}"
    return error.message


def _iter_split_errors(split: dict[str, Any]) -> Iterator[str]:
    """Rules of ``tasks.split`` alone (defaults filled in); the split stage checks them too."""
    if split["scheme"] == "pooled":
        total = split["support"] + split["query"] + split["dev"] + split["test"]
        if total > 1 + 1e-9:
            yield f"tasks.split: with scheme pooled, support + query + dev + test must be <= 1, got {total:g}"
        if split["test_subset"] != "all":
            yield (
                f"tasks.split.test_subset: {split['test_subset']} needs tasks.split.scheme: source_test "
                "(MATH-500 is a subset of MATH's own test split)"
            )


def _iter_task_name_errors(config: dict[str, Any]) -> Iterator[str]:
    """MATH subjects for hub and local data; synthetic data also has variants (``prealgebra_v1``, own rules)."""
    source = config["data"]["source"]
    for name in config["tasks"]["names"]:
        if source == "synthetic" and not is_synthetic_task(name):
            yield (
                f"tasks.names: {name!r} is not a synthetic task; expected a MATH subject from {list(MATH_TASKS)}, "
                "optionally with a variant suffix _v1.._v9 (e.g. prealgebra_v1)"
            )
        elif source != "synthetic" and name not in MATH_TASKS:
            yield (
                f"tasks.names: {name!r} is not a MATH subject (data.source {source}); expected one of "
                f"{list(MATH_TASKS)} (variants such as prealgebra_v1 exist only with data.source: synthetic)"
            )


def _iter_task_errors(config: dict[str, Any]) -> Iterator[str]:
    """The rules of ``tasks`` a JSON schema cannot express well (checked before the experiments are expanded)."""
    split = config["tasks"]["split"]
    yield from _iter_split_errors(split)
    max_shots = max(config["eval"]["shots"])
    if split["dev_pool"] < 2 * max_shots:
        yield (
            f"tasks.split.dev_pool: {split['dev_pool']} problems per task, but eval.shots goes up to {max_shots}; "
            f"the shot pool must hold at least 2 x {max_shots} = {2 * max_shots} so that repeats draw different shots"
        )
    if split["test_subset"] == "math500" and config["data"]["source"] == "synthetic":
        yield "tasks.split.test_subset: math500 needs MATH itself (data.source hub or local), not synthetic problems"
    yield from _iter_task_name_errors(config)


def _iter_semantic_errors(config: dict[str, Any]) -> Iterator[str]:
    """The other rules a JSON schema cannot express well, each as a one-line message (experiments expanded)."""
    names = config["tasks"]["names"]
    names_seen = [e["name"] for e in config["experiments"]]
    if len(set(names_seen)) != len(names_seen):
        yield f"experiments: names must be unique, got {names_seen}"
    tuned = config["calibration"]["enabled"] and config["eval"]["mode"] == "finetune"
    for experiment in config["experiments"]:
        name = experiment["name"]
        unknown = [t for t in experiment.get("meta_test", []) if t not in names]
        if unknown:
            yield f"experiments.{name}.meta_test: {unknown} are not in tasks.names {names}"
        unknown = [t for t in experiment.get("meta_val", []) if t not in names]
        if unknown:
            yield f"experiments.{name}.meta_val: {unknown} are not in tasks.names {names}"
        both = [t for t in experiment.get("meta_val", []) if t in experiment.get("meta_test", [])]
        if both:
            yield f"experiments.{name}.meta_val: {both} are also in its meta_test (a task is tuned on or tested on)"
        if experiment.get("meta_val", []) and not tuned:
            yield (
                f"experiments.{name}.meta_val: only the tuner reads meta-validation tasks; it needs "
                "calibration.enabled: true and eval.mode: finetune"
            )
        if set(names) <= set(experiment.get("meta_test", [])) | set(experiment.get("meta_val", [])):
            yield f"experiments.{name}.meta_test/meta_val: at least one task must stay in meta-training"
        if not experiment.get("in_domain_rows", True) and not experiment.get("meta_test", []):
            yield (
                f"experiments.{name}.in_domain_rows: false evaluates the meta_test tasks only, and the experiment has "
                "none; set meta_test or in_domain_rows: true"
            )
    data = config["data"]
    if data["source"] == "local" and not data["local"].get("path"):
        yield "data.local.path: required when data.source is 'local' (MATH archive folder, .jsonl or .parquet)"
    inner, adapt = config["fomaml"]["inner_optimizer"], config["eval"]["optimizer"]
    if config["eval"]["mode"] == "finetune" and inner != adapt:
        yield (
            f"fomaml.inner_optimizer: {inner}, but eval.optimizer is {adapt} (eval.mode finetune); FOMAML must be "
            "meta-trained with the optimizer it is evaluated with: set both to the same value"
        )
    sft = config["sft"]
    if sft["budget"] == "steps" and not sft.get("steps"):
        yield "sft.steps: required (a positive integer) when sft.budget is 'steps'"
    compute = config["compute"]
    if compute["gpus"] > 0 and compute["num_processes"] > compute["gpus"]:
        yield (
            f"compute.num_processes: {compute['num_processes']} processes need as many GPUs, "
            f"but compute.gpus is {compute['gpus']}"
        )
    model = config["model"]
    if model["tiny"] is not None and not model["name_or_path"].startswith("results/"):
        yield (
            "model.name_or_path: with model.tiny set it is the folder the tiny model is built in, "
            f"and must lie under results/ (e.g. results/models/tiny-base), got {model['name_or_path']!r}"
        )
    if model.get("pretrain") is not None and model["tiny"] is None:
        yield "model.pretrain: pretrains the offline tiny model only; set model.tiny too, or model.pretrain: null"
    if model.get("pretrain") is not None and config["data"]["source"] != "synthetic":
        yield "model.pretrain: its corpus is the synthetic families' rule-free problems; needs data.source: synthetic"
    accelerate_config = compute.get("accelerate_config")
    if accelerate_config and not (REPO_ROOT / accelerate_config).is_file() and not Path(accelerate_config).is_file():
        yield f"compute.accelerate_config: {accelerate_config} not found (expected e.g. config/accelerate/ddp.yaml)"
    if compute["eval_gpus_per_job"] > compute["gpus"]:
        yield f"compute.eval_gpus_per_job: {compute['eval_gpus_per_job']} exceeds compute.gpus ({compute['gpus']})"
    for name in experiment_names(config):
        if config["fomaml"]["meta_batch_size"] > len(training_tasks(config, name)):
            yield (
                f"fomaml.meta_batch_size: {config['fomaml']['meta_batch_size']} tasks per step, but only "
                f"{len(training_tasks(config, name))} training task(s) remain after experiments.{name}.meta_test "
                "and meta_val"
            )
    control_shots = config["replicates"]["control_shots"] or []
    unknown_shots = [k for k in control_shots if k not in config["eval"]["shots"]]
    if unknown_shots:
        yield (
            f"replicates.control_shots: {unknown_shots} are not evaluated (eval.shots {config['eval']['shots']}); the "
            "control is compared with the main evaluation at its own shot counts"
        )


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` in place against the schema, fill defaults, and return it.

    Raises :class:`ConfigError` with one line naming the first offending key.
    """
    if not isinstance(config, dict):
        raise ConfigError("config: expected a mapping of settings (is the YAML file empty?)")
    if isinstance(config.get("tasks"), dict) and "meta_test" in config["tasks"]:
        raise ConfigError(
            "config error at tasks.meta_test: moved to experiments.<name>.meta_test (one held-out list per experiment)"
        )
    validator = _validator_with_defaults(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        import jsonschema

        error = jsonschema.exceptions.best_match(errors)
        raise ConfigError(f"config error at {_key_of(error)}: {_describe(error)}")
    for message in _iter_task_errors(config):
        raise ConfigError(f"config error at {message}")
    _expand_generated_experiments(config)  # the folds are built from the task names checked above
    for message in _iter_semantic_errors(config):
        raise ConfigError(f"config error at {message}")
    _check_memory(config)
    return config


def _check_memory(config: dict[str, Any]) -> None:
    """Refuse a job whose estimated GPU memory exceeds ``compute.gpu_memory_gib`` (fomaml_math.memory); a model the
    estimate cannot size (no architecture offline) is a warning, not a refusal."""
    import sys

    from fomaml_math import memory
    from fomaml_math.architecture import architecture, parameter_count

    try:
        arch = architecture(config)
        shape = memory.Shape.of(arch, parameter_count(arch))
    except (ConfigError, KeyError, ValueError, OSError) as exc:
        print(f"warning: memory: cannot estimate GPU memory for this model ({exc}); not checked", file=sys.stderr)
        return
    errors, warnings = memory.problems(config, shape)
    for message in warnings:
        print(f"warning: {message}", file=sys.stderr)
    for message in errors:
        raise ConfigError(f"config error at {message}")


def _loso_folds(tasks: list[str], prefix: str, in_domain_rows: bool = True) -> list[dict[str, Any]]:
    """The leave-one-subject-out folds of ``tasks``: one plain experiment per subject, holding out its tasks."""
    common = {"meta_val": [], "in_domain_rows": in_domain_rows, "loso_group": prefix}
    folds = subjects_of(tasks).items()
    return [{"name": f"{prefix}-{subject}", "meta_test": held_out, **common} for subject, held_out in folds]


def _expand_generated_experiments(config: dict[str, Any]) -> None:
    """Replace ``{generate: leave_one_subject_out}`` by its folds in place, where the entry stood.

    Runs on every validation: folds already expanded (``loso_group``) are checked to be exactly the folds of
    ``tasks.names``, so validating twice (the Snakefile, then Snakemake's own check) changes nothing.
    """
    entries = config["experiments"]
    generators = [e for e in entries if "generate" in e]
    expanded = [e for e in entries if "loso_group" in e]
    prefixes = list(dict.fromkeys([*(e["name_prefix"] for e in generators), *(e["loso_group"] for e in expanded)]))
    if not prefixes:
        return
    where = "config error at experiments"
    groups = {e["loso_group"] for e in expanded}
    if len(generators) + len(groups) > 1:
        raise ConfigError(
            f"{where}: at most one generate: {LEAVE_ONE_SUBJECT_OUT} entry, got {len(generators)} and "
            f"{len(groups)} expanded set(s) of folds (name_prefix {', '.join(prefixes)})"
        )
    prefix = prefixes[0]
    in_domain_rows = bool((generators or expanded)[0].get("in_domain_rows", True))
    folds = _loso_folds(config["tasks"]["names"], prefix, in_domain_rows)
    if len(folds) < 2:
        raise ConfigError(
            f"{where}: generate: {LEAVE_ONE_SUBJECT_OUT} needs at least 2 subjects in tasks.names, got "
            f"{config['tasks']['names']} (every fold keeps a subject to train on)"
        )
    if expanded and expanded != folds:
        raise ConfigError(
            f"{where}: the entries with loso_group {prefix!r} are not the leave-one-subject-out folds of tasks.names "
            f"(loso_group is written by generate: {LEAVE_ONE_SUBJECT_OUT}: write that entry instead)"
        )
    names = {fold["name"] for fold in folds}
    pooled = f"{prefix}-{POOLED_SUFFIX}"
    held_out = {frozenset(fold["meta_test"]): fold["name"] for fold in folds}
    explicit = [e for e in entries if "generate" not in e and "loso_group" not in e]
    for entry in explicit:
        if entry["name"] in names or entry["name"] == pooled:
            role = "a generated fold" if entry["name"] in names else "the folds' pooled row in the statistics"
            raise ConfigError(
                f"{where}.{entry['name']}: the name of {role} (generate: {LEAVE_ONE_SUBJECT_OUT}, name_prefix "
                f"{prefix}); rename the experiment or set another name_prefix"
            )
        if (fold := held_out.get(frozenset(entry["meta_test"]))) is not None:
            raise ConfigError(
                f"{where}.{entry['name']}.meta_test: the tasks the generated fold {fold} holds out (the same "
                "trainings twice); drop the experiment"
            )
    # The folds stand where the generator (or the first fold) stood, the explicit experiments keep their order.
    first = next(i for i, e in enumerate(entries) if "generate" in e or "loso_group" in e)
    config["experiments"] = [*explicit[:first], *folds, *explicit[first:]]


def split_settings(raw: dict[str, Any] | None) -> dict[str, Any]:
    """``tasks.split`` checked against its schema, defaults filled in (a copy).

    The split stage calls this, so settings passed by hand as ``--settings`` JSON are held to
    the same rules as a validated config file.
    """
    schema = load_schema()
    split_schema = schema["properties"]["tasks"]["properties"]["split"] | {"$defs": schema["$defs"]}
    split = copy.deepcopy(raw) if raw is not None else {}
    errors = sorted(_validator_with_defaults(split_schema).iter_errors(split), key=lambda e: list(e.absolute_path))
    if errors:
        import jsonschema

        error = jsonschema.exceptions.best_match(errors)
        key = ".".join(["tasks.split", *(str(part) for part in error.absolute_path)])
        raise ConfigError(f"config error at {key}: {_describe(error)}")
    for message in _iter_split_errors(split):
        raise ConfigError(f"config error at {message}")
    return split


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and validate it (defaults filled in)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    return validate_config(config)


def experiment_names(config: dict[str, Any]) -> list[str]:
    return [e["name"] for e in config["experiments"]]


def loso_group(config: dict[str, Any]) -> tuple[str, list[str]] | None:
    """(the pooled row's name, the fold experiments) of the generated leave-one-subject-out folds; None without."""
    folds = [e for e in config["experiments"] if "loso_group" in e]
    if not folds:
        return None
    return f"{folds[0]['loso_group']}-{POOLED_SUFFIX}", [e["name"] for e in folds]


def _experiment(config: dict[str, Any], experiment: str) -> dict[str, Any]:
    for entry in config["experiments"]:
        if entry["name"] == experiment:
            return entry
    raise ConfigError(f"experiments: no experiment named {experiment!r} (have {experiment_names(config)})")


def meta_test_tasks(config: dict[str, Any], experiment: str) -> list[str]:
    """The tasks experiment ``experiment`` holds out of training (evaluated only)."""
    return list(_experiment(config, experiment).get("meta_test", []))


def meta_val_tasks(config: dict[str, Any], experiment: str) -> list[str]:
    """The meta-validation tasks of ``experiment``: held out of training, never evaluated, tuned on."""
    return list(_experiment(config, experiment).get("meta_val", []))


def training_tasks(config: dict[str, Any], experiment: str | None = None) -> list[str]:
    """Tasks used for (meta-)training in ``experiment`` (default: the first): ``tasks.names`` minus its meta_test
    and meta_val tasks."""
    name = experiment or experiment_names(config)[0]
    held_out = set(meta_test_tasks(config, name)) | set(meta_val_tasks(config, name))
    return [t for t in config["tasks"]["names"] if t not in held_out]


def tuning_tasks(config: dict[str, Any], experiment: str) -> list[str]:
    """The tasks whose dev data the tuner reads: the meta_val tasks, else the training tasks (never meta_test)."""
    return meta_val_tasks(config, experiment) or training_tasks(config, experiment)


def evaluated_tasks(config: dict[str, Any], experiment: str) -> list[str]:
    """The tasks an evaluation reads (dev_pool and test): every task but the experiment's meta_val ones, or only its
    meta_test ones with ``in_domain_rows: false`` (no row of a task it trains on)."""
    if not _experiment(config, experiment).get("in_domain_rows", True):
        return meta_test_tasks(config, experiment)
    tuned_only = set(meta_val_tasks(config, experiment))
    return [t for t in config["tasks"]["names"] if t not in tuned_only]


def shot_seed(config: dict[str, Any], train_seed: int | None, *, control: bool = False) -> int:
    """The seed of the shot draws of a run's evaluation and tuning (``--shot-seed``).

    ``eval.shot_draws: per_seed`` (default): each training seed gets its own (crc32 of the global seed, the
    training seed and the stream), so draws are nested in seeds and the between-seed variance of every
    interval holds the between-draw variance too. The base (``train_seed`` None) and ``shared``: the global
    seed. The negative control (``control``) draws from a stream of its own, independent of the evaluation's.
    """
    seed = int(config["seed"])
    if config["eval"]["shot_draws"] == "per_seed" and train_seed is not None:
        return zlib.crc32(f"shots/{seed}/{int(train_seed)}/{'control' if control else 'eval'}".encode())
    return seed + 1_000_003 if control else seed


def control_shot_counts(config: dict[str, Any]) -> list[int]:
    """The negative control's shot counts: ``replicates.control_shots``, else every evaluated k > 0."""
    configured = config["replicates"]["control_shots"]
    return (
        sorted(int(k) for k in configured) if configured else sorted(int(k) for k in config["eval"]["shots"] if k > 0)
    )


def control_tasks(config: dict[str, Any], experiment: str) -> list[str]:
    """The tasks the negative control evaluates: its experiment's primary pool, the held-out tasks when it has any,
    else every task. The control's analysis reads that pool only, so no other task is run."""
    return meta_test_tasks(config, experiment) or evaluated_tasks(config, experiment)


def control_eval_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The ``evaluate`` settings of the negative control: the main evaluation's, with ``replicates.control_draws``
    independent draws as its repeats (the A/A splits need many; the evaluation code is the same)."""
    settings = stage_settings(config, "evaluate")
    settings["eval"] = settings["eval"] | {"repeats": int(config["replicates"]["control_draws"])}
    return settings


def metaloop_row(config: dict[str, Any]) -> bool:
    """Whether FOMAML's secondary meta-training inner loop row is evaluated: ``eval.metaloop_row``, in finetune mode
    (in_context adapts nothing, so it has no inner loop to mirror)."""
    return bool(config["eval"]["metaloop_row"]) and config["eval"]["mode"] == "finetune"


def sft_budget_steps(config: dict[str, Any]) -> int:
    """SFT optimizer steps: matched to FOMAML's example forward/backward passes, or ``sft.steps``.

    One FOMAML meta-step processes ``meta_batch_size * (num_inner_steps * inner_batch_size +
    query_batch_size)`` examples; SFT with ``batch_size`` examples per step gets as many in total.
    """
    sft = config["sft"]
    if sft["budget"] == "steps":
        return int(sft["steps"])
    fo = config["fomaml"]
    per_meta_step = fo["meta_batch_size"] * (fo["num_inner_steps"] * fo["inner_batch_size"] + fo["query_batch_size"])
    return max(1, round(fo["total_steps"] * per_meta_step / sft["batch_size"]))


def _model_settings(config: dict[str, Any]) -> dict[str, Any]:
    model = config["model"]
    return {
        "name_or_path": model["name_or_path"],
        "revision": model["revision"],
        "trust_remote_code": model["trust_remote_code"],
        "max_seq_len": model["max_seq_len"],
    }


def instruction(config: dict[str, Any]) -> str:
    """The user-turn instruction every stage renders (training, adaptation, evaluation)."""
    return str(config.get("prompt", {}).get("instruction", ""))


def adaptation_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's k-shot adaptation (before calibration), which model selection also uses."""
    ev = config["eval"]
    return {k: ev[k] for k in ("optimizer", "inner_lr", "num_inner_steps", "inner_batch_size")}


def _train_compute(config: dict[str, Any]) -> dict[str, Any]:
    compute = config["compute"]
    keys = ("num_processes", "mixed_precision", "gradient_checkpointing", "snapshot_device")
    return {**{k: compute[k] for k in keys}, "keep_finished_checkpoints": compute["keep_finished_checkpoints"]}


def _train_settings(
    config: dict[str, Any], method: str, section: dict[str, Any], *, experiment: str | None, train_seed: int
) -> dict[str, Any]:
    """The settings of ``train_fomaml`` / ``train_sft``: the same keys, with the method's own ``section``."""
    return {
        "seed": config["seed"],
        "model": _model_settings(config),
        "compute": _train_compute(config),
        method: section,
        "train_tasks": training_tasks(config, experiment),
        "train_seed": train_seed,
        "wandb": config["wandb"],
        "prompt": {"instruction": instruction(config)},
        "select": config["select"],
        "adaptation": adaptation_settings(config),
    }


def tuner_generation(config: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's generation settings as the tuner uses them (``calibration.gen_batch_size`` when set)."""
    generation = {k: config["eval"][k] for k in ("max_new_tokens", "gen_batch_size", "grade_timeout_s")}
    if config["calibration"].get("gen_batch_size"):
        generation["gen_batch_size"] = int(config["calibration"]["gen_batch_size"])
    return generation


def adapt_memory(config: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's and tuner's adaptation memory levers (docs/gpu.md), only when set: a config without them
    keeps its settings (gradient checkpointing and in-place accumulation leave float32 results bitwise equal)."""
    compute = config["compute"]
    memory = {"gradient_checkpointing": True} if compute["gradient_checkpointing"] else {}
    if compute.get("loss_chunk_tokens"):
        memory["loss_chunk_tokens"] = int(compute["loss_chunk_tokens"])
    return {"adapt_memory": memory} if memory else {}


def tuned_shot_counts(config: dict[str, Any]) -> list[int]:
    """The shot counts the tuner chooses for: ``calibration.shots`` (bands), or every evaluated k > 0; and 0
    whenever 0 shots are evaluated (its choice is the checkpoint alone: nothing is adapted)."""
    evaluated = {int(k) for k in config["eval"]["shots"]}
    configured = config["calibration"]["shots"]
    shots = {int(k) for k in configured} if configured else {k for k in evaluated if k > 0}
    return sorted(shots | ({0} & evaluated))


def stage_settings(
    config: dict[str, Any], stage: str, *, experiment: str | None = None, train_seed: int | None = None
) -> dict[str, Any]:
    """The settings one stage uses, and nothing else (so unrelated changes do not rerun it).

    Training stages take the ``experiment`` (its training tasks) and the ``train_seed`` (default: the
    first of ``replicates.seeds``); the data split and every shot draw keep the global ``seed``.
    """
    seed = config["seed"]
    if train_seed is None:
        train_seed = int(config["replicates"]["seeds"][0])
    if stage == "check_env":
        return {
            "compute": config["compute"],
            "model": _model_settings(config) | {"tiny": config["model"]["tiny"] is not None},
            "data": config["data"],
        }
    if stage == "ingest":
        return {"seed": seed, "data": config["data"], "tasks": config["tasks"]["names"]}
    if stage == "split_tasks":
        return {"seed": seed, "tasks": config["tasks"]}  # experiments split nothing: the roles are shared
    if stage == "build_tiny_model":
        return {
            "seed": seed,
            "tiny": config["model"]["tiny"],
            "max_seq_len": config["model"]["max_seq_len"],
            "instruction": instruction(config),
        }
    if stage == "pretrain_tiny_base":
        families = sorted({task_family(name)[0] for name in config["tasks"]["names"]})
        return {
            "seed": seed,
            "pretrain": config["model"]["pretrain"],
            "families": families,
            "max_seq_len": config["model"]["max_seq_len"],
            "instruction": instruction(config),
        }
    if stage == "train_fomaml":
        return _train_settings(config, "fomaml", config["fomaml"], experiment=experiment, train_seed=train_seed)
    if stage == "train_sft":
        sft = config["sft"] | {"steps": sft_budget_steps(config)}
        return _train_settings(config, "sft", sft, experiment=experiment, train_seed=train_seed)
    if stage == "evaluate":
        # ``shots`` is left out: each job gets its own shot count as a wildcard, so adding a
        # shot count must not rerun the evaluations that already exist. The generation backend's
        # settings appear only when they act (eval.backend vllm): the default hf keeps its old settings.
        # eval.metaloop_row only adds jobs (the rules read it), so turning it on reruns no evaluation either.
        hidden = {"shots", "metaloop_row"} | (
            {"backend", "vllm"} if config["eval"].get("backend", "hf") == "hf" else set()
        )
        return {
            "seed": seed,
            "eval": {k: v for k, v in config["eval"].items() if k not in hidden},
            "model": _model_settings(config),
            "mixed_precision": config["compute"]["mixed_precision"],
            "prompt": {"instruction": instruction(config)},
            **adapt_memory(config),
        }
    if stage == "calibrate":
        return {
            "seed": seed,
            "calibration": config["calibration"],
            "adaptation": adaptation_settings(config),
            "fomaml_inner_lr": config["fomaml"]["inner_lr"],  # always a candidate (see evaluation.calibrate)
            # the tuned shot counts (not the evaluated ones: with bands, adding an evaluated k reruns no
            # tuner) and the evaluation's generation, which the accuracy criterion uses as the evaluation does
            "tuned_shots": tuned_shot_counts(config),
            "generation": tuner_generation(config),
            "model": _model_settings(config),
            "mixed_precision": config["compute"]["mixed_precision"],
            "prompt": {"instruction": instruction(config)},
            **adapt_memory(config),
        }
    if stage in ("stats", "figures", "summary"):
        # The folds to pool appear only when generated, so a study without them keeps its settings (and tables).
        loso = loso_group(config)
        pooled = {} if loso is None else {"loso": {"pooled": loso[0], "folds": loso[1]}}
        return {"seed": seed, "stats": config["stats"], **pooled}
    raise KeyError(f"unknown stage {stage!r}")


def settings_hash(settings: dict[str, Any]) -> str:
    """A short, stable hash of a settings mapping (stored in checkpoints to refuse a mismatched resume)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """``--settings JSON`` (what Snakemake passes) or ``--configfile YAML`` (by hand)."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--settings", help="JSON of this stage's settings (as the Snakemake rule passes them)")
    group.add_argument("--configfile", help="a full config YAML (e.g. config/demo.yaml), validated first")


def settings_from_args(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    if args.configfile:
        return stage_settings(load_config(args.configfile), stage)
    try:
        return json.loads(args.settings)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--settings: not valid JSON ({exc})") from exc
