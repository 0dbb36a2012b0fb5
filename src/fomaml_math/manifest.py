"""Stage ``manifest``: ``results/manifest.json``, what a reader needs to reproduce the numbers.

It records the git commit of the workflow and whether the tree was dirty, the resolved config, a
content hash of the data (the normalised table and the role index, which together fix every task
file), the model and dataset revisions actually loaded (the hub commit a ``null`` revision resolved
to, read from the local Hugging Face cache, or the fingerprint of a local folder), the revisions the trained models were
built from (``train_summary.json``), and the installed versions of the packages the project pins.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, snapshot_download

from fomaml_math.config import REPO_ROOT
from fomaml_math.errors import ConfigError
from fomaml_math.io import write_json

PINNED_FILE = REPO_ROOT / "requirements.txt"


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit and dirtiness of the repository the workflow runs from (None where git is missing)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "changed_files": (status or "").count("\n") + bool(status),
    }


def files_hash(paths: Sequence[Path]) -> str:
    """sha256 over the named files' paths and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def resolved_revision(repo_id: str, revision: str | None, repo_type: str) -> dict[str, Any]:
    """The commit ``revision`` resolves to: for a local folder its fingerprint; for a hub repo the cached
    snapshot's commit (offline), or the hub's answer when online and nothing is cached."""
    path = Path(repo_id)
    if path.exists():
        # lazily: it imports torch (seconds), and only a local model folder needs it
        from fomaml_math.training.data import model_fingerprint

        return {
            "source": "local",
            "path": str(path),
            "fingerprint": model_fingerprint(str(path)) if path.is_dir() else None,
        }
    out: dict[str, Any] = {"source": "hub", "repo_id": repo_id, "requested": revision, "commit": None}
    try:
        snapshot = snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
        out["commit"] = Path(snapshot).name
        out["how"] = "local cache"
    except Exception as exc:  # not cached: ask the hub if we may
        try:
            info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision)
            out["commit"], out["how"] = info.sha, "hub"
        except Exception as online_exc:
            out["how"] = f"unresolved ({type(exc).__name__}; {type(online_exc).__name__})"
    return out


def pinned_versions(pins: Path = PINNED_FILE) -> dict[str, str | None]:
    names = []
    for line in pins.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(line.split("==")[0].split("[")[0].strip())
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_manifest(config: dict[str, Any], data_files: Sequence[Path], summaries: Sequence[Path]) -> dict[str, Any]:
    data = config["data"]
    model = config["model"]
    dataset = (
        resolved_revision(data["hub"]["dataset"], data["hub"]["revision"], "dataset")
        if data["source"] == "hub"
        else {"source": data["source"], "path": data["local"]["path"]}
    )
    base = (
        {"source": "built locally", "path": model["name_or_path"]}
        if model["tiny"]
        else resolved_revision(model["name_or_path"], model["revision"], "model")
    )
    trained = {}
    for path in summaries:
        summary = json.loads(path.read_text())
        trained[str(path.parent)] = {
            "base_model_commit": summary.get("base_model_commit"),
            "settings_hash": summary.get("settings_hash"),
            "selected_step": summary.get("selected_step"),
            "versions": summary.get("versions"),
        }
    return {
        "git": git_state(),
        "config": config,
        "data": {"sha256": files_hash(list(data_files)), "files": len(data_files), "dataset": dataset},
        "base_model": base,
        "trained_models": trained,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": pinned_versions(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fomaml_math manifest", description=__doc__.splitlines()[0])
    parser.add_argument("--config-json", required=True, help="the resolved config (as the Snakefile holds it)")
    parser.add_argument("--data", nargs="+", required=True, type=Path, help="data files to hash")
    parser.add_argument("--train-summaries", nargs="*", default=[], type=Path)
    parser.add_argument("--output", required=True, type=Path, help="results/manifest.json")
    args = parser.parse_args(argv)
    try:
        config = json.loads(args.config_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config-json: not valid JSON ({exc})") from exc
    missing = [str(p) for p in [*args.data, *args.train_summaries] if not p.is_file()]
    if missing:
        raise ConfigError(f"manifest: input file(s) not found: {missing[:3]}")
    manifest = build_manifest(config, args.data, args.train_summaries)
    write_json(args.output, manifest)
    git = manifest["git"]
    print(
        f"manifest: commit {git['commit']} (dirty: {git['dirty']}), "
        f"data {manifest['data']['sha256'][:12]} -> {args.output}"
    )
    return 0
