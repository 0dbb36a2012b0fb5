"""check_env: what this machine has, and whether it can run the configured study.

Writes a JSON report and a readable summary. Fails (exit 1, after writing both) when the
config asks for more GPUs than exist or when the model or data cannot be reached.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub import constants

from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.io import write_json, write_text

PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "math-verify",
    "pandas",
    "pyarrow",
    "scipy",
    "statsmodels",
    "matplotlib",
    "wandb",
    "snakemake",
)


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _devices() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "device_count": torch.cuda.device_count(),
        "devices": [],
        "bf16_supported": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
    }
    for index in range(info["device_count"]):
        props = torch.cuda.get_device_properties(index)
        info["devices"].append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return info


def _hub_reachable(repo_id: str, revision: str | None, repo_type: str) -> tuple[bool, str]:
    """Is a hub repo usable: in the local cache, or (when online) answering on the hub?"""
    probe = "config.json" if repo_type == "model" else "README.md"
    cached = huggingface_hub.try_to_load_from_cache(repo_id, probe, revision=revision, repo_type=repo_type)
    if isinstance(cached, str):
        return True, f"in the local Hugging Face cache ({Path(cached).parent})"
    if constants.HF_HUB_OFFLINE:
        return False, "not in the local cache and HF_HUB_OFFLINE=1"
    try:
        api = huggingface_hub.HfApi()
        getter = api.model_info if repo_type == "model" else api.dataset_info
        getter(repo_id, revision=revision, timeout=10)
    except Exception as exc:  # network errors, gated repos, typos: all mean "not usable now"
        return False, f"hub lookup failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return True, "reachable on the Hugging Face hub"


def _model_status(model: dict[str, Any]) -> dict[str, Any]:
    name = model["name_or_path"]
    if model["tiny"]:
        return {"name_or_path": name, "ok": True, "detail": "tiny model built locally by the build_tiny_model rule"}
    if Path(name).exists():
        ok = (Path(name) / "config.json").is_file()
        detail = "local folder" if ok else "local folder without config.json (not a Hugging Face model folder)"
        return {"name_or_path": name, "ok": ok, "detail": detail}
    ok, detail = _hub_reachable(name, model["revision"], "model")
    return {"name_or_path": name, "ok": ok, "detail": detail}


def _data_status(data: dict[str, Any]) -> dict[str, Any]:
    source = data["source"]
    if source == "synthetic":
        return {"source": source, "ok": True, "detail": "generated offline"}
    if source == "local":
        path = Path(data["local"]["path"])
        return {
            "source": source,
            "path": str(path),
            "ok": path.exists(),
            "detail": "exists" if path.exists() else "missing",
        }
    dataset = data["hub"]["dataset"]
    if Path(dataset).is_dir():
        return {"source": source, "dataset": dataset, "ok": True, "detail": "local dataset folder"}
    ok, detail = _hub_reachable(dataset, data["hub"]["revision"], "dataset")
    return {"source": source, "dataset": dataset, "ok": ok, "detail": detail}


def build_report(settings: dict[str, Any]) -> dict[str, Any]:
    compute = settings["compute"]
    devices = _devices()
    problems: list[str] = []
    if compute["gpus"] > devices["device_count"]:
        problems.append(
            f"compute.gpus is {compute['gpus']} but {devices['device_count']} CUDA device(s) are visible; "
            "to run without GPUs use the offline demo: snakemake --configfile config/demo.yaml"
        )
    if (
        compute["mixed_precision"] == "bf16"
        and compute["gpus"] > 0
        and devices["device_count"]
        and not devices["bf16_supported"]
    ):
        problems.append("compute.mixed_precision is bf16 but the GPUs do not support bf16; use fp16 or no")
    model = _model_status(settings["model"])
    if not model["ok"]:
        problems.append(f"model.name_or_path {model['name_or_path']!r} is not usable: {model['detail']}")
    data = _data_status(settings["data"])
    if not data["ok"]:
        problems.append(f"data ({data['source']}) is not usable: {data['detail']}")
    return {
        "ok": not problems,
        "problems": problems,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": devices,
        "packages": _package_versions(),
        "offline": os.environ.get("HF_HUB_OFFLINE") == "1",
        "model": model,
        "data": data,
        "requested": {"gpus": compute["gpus"], "num_processes": compute["num_processes"]},
    }


def format_summary(report: dict[str, Any]) -> str:
    torch_info = report["torch"]
    lines = [
        f"status:    {'OK' if report['ok'] else 'PROBLEMS'}",
        f"python:    {report['python']} on {report['platform']} ({report['cpu_count']} CPUs)",
        f"cuda:      available={torch_info['cuda_available']} version={torch_info['cuda_version']} "
        f"devices={torch_info['device_count']} (config asks for {report['requested']['gpus']})",
    ]
    lines += [f"  gpu {d['index']}: {d['name']}, {d['memory_gib']} GiB" for d in torch_info["devices"]]
    lines.append("packages:  " + ", ".join(f"{k}={v}" for k, v in report["packages"].items()))
    lines.append(f"model:     {report['model']['name_or_path']}: {report['model']['detail']}")
    lines.append(f"data:      {report['data']['source']}: {report['data']['detail']}")
    lines += [f"PROBLEM:   {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fomaml_math check-env", description=__doc__)
    add_settings_arguments(parser)
    parser.add_argument("--output", required=True, help="JSON report path")
    parser.add_argument("--summary", required=True, help="readable summary path")
    args = parser.parse_args(argv)
    report = build_report(settings_from_args(args, "check_env"))
    summary = format_summary(report)
    write_json(args.output, report)
    write_text(args.summary, summary)
    print(summary, end="")
    if not report["ok"]:
        for problem in report["problems"]:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0
