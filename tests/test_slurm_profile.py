"""The SLURM workflow profile (workflow/profiles/slurm) with snakemake-executor-plugin-slurm.

Always: the profile parses, names only rules that exist and resources the plugin reads (Snakemake
ignores a typo'd rule or resource name there without a word), a dry run plans the full DAG, and
the profile's per-rule resources reach the jobs and the sbatch flags the plugin builds from them.

When a SLURM cluster answers (``.ci/slurm-setup.sh`` starts a one-node one from Debian's
packages): the data stages run through the slurm executor, with the profile fitted to that cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from fomaml_math.config import control_shot_counts
from tests.workflow_utils import REPO_ROOT, make_workspace, planned_jobs, read_config, snakemake

PROFILE = "workflow/profiles/slurm"
# Resource names snakemake-executor-plugin-slurm 2.8 (and its jobstep plugin) turns into sbatch/srun
# flags, plus Snakemake's standard ones. Anything else in the profile is silently ignored.
PLUGIN_RESOURCES = {
    "slurm_account",
    "slurm_partition",
    "slurm_cluster",
    "cluster",
    "clusters",
    "runtime",
    "mem_mb",
    "mem_mb_per_cpu",
    "cpus_per_task",
    "cpus_per_gpu",
    "nodes",
    "tasks",
    "tasks_per_node",
    "tasks_per_gpu",
    "mpi",
    "gpu",
    "gpus",
    "gpu_model",
    "gres",
    "constraint",
    "qos",
    "slurm_extra",
}
STANDARD_RESOURCES = {"mem", "disk", "disk_mb", "tmpdir"}
# The local test cluster: partition (FOMAML_SLURM_PARTITION, default "debug") and account
# (FOMAML_SLURM_ACCOUNT, default none: the plugin then tries to guess one and goes on without).
TEST_PARTITION = os.environ.get("FOMAML_SLURM_PARTITION", "debug")
TEST_ACCOUNT = os.environ.get("FOMAML_SLURM_ACCOUNT")


def load_profile() -> dict:
    return yaml.safe_load((REPO_ROOT / PROFILE / "profile.yaml").read_text())


def _value(text: str) -> int | str:
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def dry_run_jobs(root: Path, *args: str) -> list[dict]:
    """The jobs of a dry run with the SLURM profile: rule, wildcards, resources and shell command."""
    result = snakemake(root, "--workflow-profile", PROFILE, "--dry-run", *args)
    jobs: list[dict] = []
    for line in (result.stdout + result.stderr).splitlines():
        if match := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line):
            jobs.append({"rule": match.group(1), "wildcards": {}, "resources": {}, "shell": ""})
        elif jobs and (match := re.match(r"^\s+(wildcards|resources): (.*)$", line)):
            pairs = (item.split("=", 1) for item in match.group(2).split(", "))
            jobs[-1][match.group(1)] = {key: _value(value) for key, value in pairs}
        elif jobs and line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.removeprefix("Shell command: ")
    assert jobs, f"no jobs in the dry run:\n{result.stderr[-3000:]}"
    return [job for job in jobs if job["rule"] != "all"]


def expected_resources(profile: dict, rule: str) -> dict:
    return {**profile["default-resources"], **profile["set-resources"].get(rule, {})}


class _Resources(dict):
    """A job's resources as the plugin reads them: ``.get(name)`` and ``.name``."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def sbatch_command(job: dict) -> str:
    """The sbatch command line the plugin builds for a dry-run job (account and partition as given)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    resources = _Resources(job["resources"])
    fake = SimpleNamespace(resources=resources, threads=1, name=job["rule"], wildcards={}, is_group=lambda: False)
    params = {
        "run_uuid": "run",
        "slurm_logfile": "slurm.log",
        "comment_str": f"rule_{job['rule']}",
        "account": f"-A {resources['slurm_account']}",
        "partition": f"-p {resources['slurm_partition']}",
        "workdir": "",
    }
    return get_submit_command(fake, params) + set_gres_string(fake)


# ------------------------------------------------------------------------------ always (dry runs)


def test_profile_names_only_existing_rules_and_plugin_resources(tmp_path):
    profile = load_profile()
    assert profile["executor"] == "slurm"
    # The tiny-model config has every rule (build_tiny_model only exists there).
    root = make_workspace(tmp_path)
    rules = set(snakemake(root, "--list-rules").stdout.split())
    assert {"train", "evaluate", "evaluate_base", "calibrate_base", "check_env", "ingest", "split_tasks"} <= rules
    for section in ("set-resources", "set-threads"):
        unknown = set(profile.get(section, {})) - rules
        assert not unknown, f"{section} names rules that do not exist (Snakemake ignores them): {sorted(unknown)}"
    named = set(profile["default-resources"]).union(*profile["set-resources"].values())
    unknown = named - PLUGIN_RESOURCES - STANDARD_RESOURCES
    assert not unknown, f"resources the SLURM plugin does not read (silently ignored): {sorted(unknown)}"


def test_dry_run_plans_the_full_dag_with_the_profile_resources(tmp_path):
    root = make_workspace(tmp_path)
    profile = load_profile()
    jobs = dry_run_jobs(root)
    # The same jobs as a local run plans (the default profile), the whole DAG.
    assert Counter(job["rule"] for job in jobs) == planned_jobs(root)
    planned_rules = {job["rule"] for job in jobs}
    assert {"check_env", "ingest", "split_tasks", "build_tiny_model", "train", "evaluate", "evaluate_base"} <= (
        planned_rules
    )
    for job in jobs:
        for key, value in expected_resources(profile, job["rule"]).items():
            assert job["resources"].get(key) == value, (job["rule"], key, job["resources"])
    # The CPU-only test config asks for no GPUs: the GPU count comes from the config, not the profile.
    for job in jobs:
        if job["rule"] in ("train", "evaluate", "evaluate_base"):
            assert job["resources"]["gpu"] == 0
            assert "--gpus" not in sbatch_command(job)


def test_paper_config_asks_slurm_for_the_gpus_accelerate_uses(tmp_path):
    root = make_workspace(tmp_path, "config.yaml")
    compute = read_config(root)["compute"]
    jobs = dry_run_jobs(root)
    by_rule: dict[str, list[dict]] = {}
    for job in jobs:
        by_rule.setdefault(job["rule"], []).append(job)
    config = read_config(root)
    runs = len(config["experiments"]) * 2 * len(config["replicates"]["seeds"])
    shots = len(config["eval"]["shots"])
    experiments = len(config["experiments"])  # the base is tuned and evaluated per experiment
    assert len(by_rule["train"]) == runs and len(by_rule["calibrate"]) == runs
    assert len(by_rule["calibrate_base"]) == experiments
    # The evaluations wait for their tuner (a checkpoint); the dry run plans them all.
    assert len(by_rule["evaluate"]) == runs * shots + len(control_shot_counts(config))  # + the negative control
    assert len(by_rule["evaluate_base"]) == experiments * shots
    for job in by_rule["calibrate"] + by_rule["calibrate_base"]:
        command = sbatch_command(job)
        assert job["resources"]["gpu"] == 1 and " --gpus=1" in command and " -t 240" in command, command

    for job in by_rule["train"]:
        nproc = compute["num_processes"]
        assert job["resources"]["gpu"] == nproc == 4
        assert f"--per-job {nproc} " in job["shell"] and f"--num_processes {nproc} " in job["shell"]
        command = sbatch_command(job)
        for flag in ("-p gpu", "--gpus=4", "--nodes=1", "--cpus-per-task=32", "--mem 480000", "-t 2880"):
            assert f" {flag}" in command, (flag, command)
    for job in by_rule["evaluate"] + by_rule["evaluate_base"]:
        assert job["resources"]["gpu"] == compute["eval_gpus_per_job"] == 1
        assert "--per-job 1 " in job["shell"]
        command = sbatch_command(job)
        for flag in ("-p gpu", "--gpus=1", "--nodes=1", "--cpus-per-task=8", "--mem 64000", "-t 720"):
            assert f" {flag}" in command, (flag, command)
    # check_env must see the GPUs the config asks for.
    (check_env,) = by_rule["check_env"]
    assert check_env["resources"]["gpu"] == compute["gpus"]
    assert " --gpus=4" in sbatch_command(check_env)
    (download,) = by_rule["ingest"]
    command = sbatch_command(download)
    assert " -p cpu" in command and " -t 60" in command and " --mem 16000" in command and "--gpus" not in command


# ---------------------------------------------------------------------- on a SLURM cluster (slow)


def _slurm_unavailable() -> str | None:
    """Why the real-run test cannot run here, or None when the test partition takes jobs."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client (sinfo/sbatch); .ci/slurm-setup.sh installs a one-node cluster"
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-p", TEST_PARTITION, "-o", "%a %t"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    if result.returncode != 0:
        return f"sinfo failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}"
    if not re.search(r"^up (idle|mix|alloc)", result.stdout, flags=re.M):
        return f"SLURM partition {TEST_PARTITION!r} has no node that takes jobs: {result.stdout.strip()!r}"
    return None


def _accounting_enabled() -> bool:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
    match = re.search(r"^AccountingStorageType\s*=\s*(\S+)", config, flags=re.M)
    return bool(match) and match.group(1) != "accounting_storage/none"


def fit_profile_to_test_cluster(profile: dict, accounting: bool) -> dict:
    """The SLURM profile with its requests shrunk to a small test cluster: one partition, no GPUs.

    Every other setting is kept, and so is which rule overrides which resource. Without slurmdbd
    (accounting_storage/none) sacct has nothing, so the plugin polls job states with squeue.
    """

    def fit(resources: dict) -> dict:
        fitted = {key: value for key, value in resources.items() if key not in ("gpu", "slurm_account")}
        fitted["slurm_partition"] = TEST_PARTITION
        for key, cap in (("runtime", 10), ("mem_mb", 2000), ("cpus_per_task", 1)):
            if key in fitted:
                fitted[key] = min(fitted[key], cap)
        return fitted

    fitted = {k: v for k, v in profile.items() if k not in ("default-resources", "set-resources", "set-threads")}
    fitted["default-resources"] = fit(profile["default-resources"])
    if TEST_ACCOUNT:
        fitted["default-resources"]["slurm_account"] = TEST_ACCOUNT
    fitted["set-resources"] = {rule: fit(resources) for rule, resources in profile["set-resources"].items()}
    fitted["set-threads"] = dict.fromkeys(profile.get("set-threads", {}), 1)
    fitted.update(
        {
            "slurm-status-command": "sacct" if accounting else "squeue",
            "slurm-init-seconds-before-status-checks": 2,
            "seconds-between-status-checks": 3,
            "slurm-keep-successful-logs": True,
        }
    )
    return fitted


def slurm_job_record(job_id: str) -> dict[str, str]:
    """SLURM's record of a job (scontrol while slurmctld still holds it, else sacct)."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=20)
    if result.returncode == 0 and "JobState=" in result.stdout:
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))
    result = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,Partition,Comment"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    state, partition, comment = (result.stdout.strip().splitlines() or ["||"])[0].split("|")[:3]
    return {"JobState": state, "Partition": partition, "Comment": comment}


@pytest.mark.slow
def test_data_stages_run_through_slurm(tmp_path):
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)
    root = make_workspace(tmp_path)
    local = root / "workflow/profiles/slurm-test-cluster"
    local.mkdir()
    profile = fit_profile_to_test_cluster(load_profile(), _accounting_enabled())
    (local / "profile.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))

    result = snakemake(
        root, "--workflow-profile", str(local.relative_to(root)), "results/data/split_stats.tsv", timeout=600
    )
    output = result.stdout + result.stderr

    stats = pd.read_csv(root / "results/data/split_stats.tsv", sep="\t")
    assert {"algebra", "number_theory", "prealgebra"} <= set(stats["task"])
    assert (root / "results/data/tasks/algebra/support.parquet").exists()
    assert (root / "results/logs/split_tasks.log").exists()

    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", output)
    assert len(submitted) == 2, output[-4000:]
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    for rule, (job_id, log) in zip(["ingest", "split_tasks"], submitted, strict=True):
        record = slurm_job_record(job_id)
        assert record["JobState"] == "COMPLETED", record
        assert record["Partition"] == TEST_PARTITION and record["Comment"] == f"rule_{rule}", record
        if "JobName" in record:
            assert record["JobName"] == run_id
        # The job's own log: Snakemake ran the rule inside the allocation through the jobstep executor.
        text = Path(log).read_text()
        assert f"rule {rule}:" in text and "--executor slurm-jobstep" in text, text[-2000:]
        assert Path(log).parent.name == f"rule_{rule}"
    # A local rerun finds the SLURM-built outputs up to date.
    assert planned_jobs(root, "results/data/split_stats.tsv") == {}
