"""Run the real Snakemake workflow in a scratch copy of the repository and read what it planned."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def make_workspace(root: Path, config_name: str = "test.yaml", **overrides: object) -> Path:
    """Copy workflow/, config/ and envs/ into ``root`` (src/ linked) and write ``config/run.yaml``."""
    shutil.copytree(REPO_ROOT / "workflow", root / "workflow")
    shutil.copytree(REPO_ROOT / "config", root / "config")
    shutil.copytree(REPO_ROOT / "envs", root / "envs")
    (root / "src").symlink_to(REPO_ROOT / "src")
    config = yaml.safe_load((REPO_ROOT / "config" / config_name).read_text())
    write_config(root, config, **overrides)
    return root


def write_config(root: Path, config: dict, **overrides: object) -> dict:
    """Write ``config/run.yaml``; ``overrides`` use ``__`` for nesting (fomaml__inner_lr=0.1)."""
    for dotted, value in overrides.items():
        *parents, last = dotted.split("__")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    (root / "config" / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def read_config(root: Path) -> dict:
    return yaml.safe_load((root / "config" / "run.yaml").read_text())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake(root: Path, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "--configfile", "config/run.yaml", "--cores", "2", *args]
    result = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def start_snakemake(root: Path, *args: str) -> subprocess.Popen:
    """Start Snakemake in its own process group (so a test can SIGKILL the whole job tree)."""
    cmd = [SNAKEMAKE, "--configfile", "config/run.yaml", "--cores", "2", *args]
    return subprocess.Popen(
        cmd, cwd=root, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def planned_jobs(root: Path, *targets: str) -> Counter:
    """Jobs (rule -> count) that Snakemake would run now, from a dry run's job table."""
    result = snakemake(root, "--dry-run", *targets)
    output = result.stdout + result.stderr
    if "Nothing to be done" in output:
        return Counter()
    table = re.search(r"Job stats:\n(.*?)\ntotal\s+\d+", output, flags=re.S)
    assert table, f"no job table in dry-run output:\n{output[-3000:]}"
    jobs: Counter = Counter()
    for line in table.group(1).splitlines():
        match = re.match(r"^(\w+)\s+(\d+)\s*$", line)
        if match:
            jobs[match.group(1)] = int(match.group(2))
    jobs.pop("all", None)
    return jobs


def planned_outputs(root: Path, *targets: str) -> list[str]:
    """Output files of the jobs a dry run plans (one entry per output path)."""
    result = snakemake(root, "--dry-run", *targets)
    outputs: list[str] = []
    for line in (result.stdout + result.stderr).splitlines():
        if line.strip().startswith("output:"):
            outputs += [p.strip() for p in line.split(":", 1)[1].split(",")]
    return outputs
