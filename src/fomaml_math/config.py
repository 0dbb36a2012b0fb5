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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # imported where it validates: `from fomaml_math.config import ConfigError` works without it
    import jsonschema

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"

MATH_TASKS: tuple[str, ...] = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message is one line naming the key."""


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


def _iter_semantic_errors(config: dict[str, Any]) -> Iterator[str]:
    """Rules a JSON schema cannot express well, each as a one-line message."""
    split = config["tasks"]["split"]
    total = split["support"] + split["query"] + split["test"]
    if total > 1 + 1e-9:
        yield f"tasks.split: support + query + test must be <= 1, got {total:g}"
    names = config["tasks"]["names"]
    unknown = [t for t in config["tasks"]["meta_test"] if t not in names]
    if unknown:
        yield f"tasks.meta_test: {unknown} are not in tasks.names {names}"
    if set(names) == set(config["tasks"]["meta_test"]):
        yield "tasks.meta_test: at least one task must stay in meta-training"
    data = config["data"]
    if data["source"] == "local" and not data["local"].get("path"):
        yield "data.local.path: required when data.source is 'local' (MATH archive folder, .jsonl or .parquet)"
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
    if compute["eval_gpus_per_job"] > compute["gpus"]:
        yield f"compute.eval_gpus_per_job: {compute['eval_gpus_per_job']} exceeds compute.gpus ({compute['gpus']})"
    if config["fomaml"]["meta_batch_size"] > len(training_tasks(config)):
        yield (
            f"fomaml.meta_batch_size: {config['fomaml']['meta_batch_size']} tasks per step, "
            f"but only {len(training_tasks(config))} training task(s) remain after tasks.meta_test"
        )


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` in place against the schema, fill defaults, and return it.

    Raises :class:`ConfigError` with one line naming the first offending key.
    """
    if not isinstance(config, dict):
        raise ConfigError("config: expected a mapping of settings (is the YAML file empty?)")
    validator = _validator_with_defaults(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        import jsonschema

        error = jsonschema.exceptions.best_match(errors)
        raise ConfigError(f"config error at {_key_of(error)}: {_describe(error)}")
    for message in _iter_semantic_errors(config):
        raise ConfigError(f"config error at {message}")
    return config


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


def training_tasks(config: dict[str, Any]) -> list[str]:
    """Tasks used for (meta-)training: ``tasks.names`` minus ``tasks.meta_test``."""
    held_out = set(config["tasks"].get("meta_test", []))
    return [t for t in config["tasks"]["names"] if t not in held_out]


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


def _train_compute(config: dict[str, Any]) -> dict[str, Any]:
    compute = config["compute"]
    keys = ("num_processes", "mixed_precision", "gradient_checkpointing", "snapshot_device")
    return {k: compute[k] for k in keys}


def stage_settings(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """The settings one stage uses, and nothing else (so unrelated changes do not rerun it)."""
    seed = config["seed"]
    if stage == "check_env":
        return {
            "compute": config["compute"],
            "model": _model_settings(config) | {"tiny": config["model"]["tiny"] is not None},
            "data": config["data"],
        }
    if stage == "ingest":
        return {"seed": seed, "data": config["data"], "tasks": config["tasks"]["names"]}
    if stage == "split":
        return {"seed": seed, "tasks": config["tasks"]}
    if stage == "build_tiny_model":
        return {"seed": seed, "tiny": config["model"]["tiny"], "max_seq_len": config["model"]["max_seq_len"]}
    if stage == "train_fomaml":
        return {
            "seed": seed,
            "model": _model_settings(config),
            "compute": _train_compute(config),
            "fomaml": config["fomaml"],
            "train_tasks": training_tasks(config),
            "wandb": config["wandb"],
        }
    if stage == "train_sft":
        return {
            "seed": seed,
            "model": _model_settings(config),
            "compute": _train_compute(config),
            "sft": config["sft"] | {"steps": sft_budget_steps(config)},
            "train_tasks": training_tasks(config),
            "wandb": config["wandb"],
        }
    if stage == "eval":
        # ``shots`` is left out: each job gets its own shot count as a wildcard, so adding a
        # shot count must not rerun the evaluations that already exist.
        return {
            "seed": seed,
            "eval": {k: v for k, v in config["eval"].items() if k != "shots"},
            "model": _model_settings(config),
            "mixed_precision": config["compute"]["mixed_precision"],
        }
    if stage in ("stats", "figures", "report"):
        return {"seed": seed, "stats": config["stats"]}
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
