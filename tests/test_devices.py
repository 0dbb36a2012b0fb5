"""GPU slot allocator, exercised on CPU with fake device ids and real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fomaml_math.devices import ENV_VAR, acquire_slots, gpu_slot

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def _no_inherited_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "SLURM_JOB_ID")}
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    return env


def _wrapper(lock_dir: Path, gpus: int, command: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "fomaml_math.devices", "run", "--gpus", str(gpus), "--lock-dir", str(lock_dir),
            "--poll", "0.05", *extra, "--", *command]  # fmt: skip


def test_slots_are_distinct_and_released(tmp_path: Path) -> None:
    with gpu_slot(3, tmp_path, set_env=False) as first:
        assert first == [0]
        with gpu_slot(3, tmp_path, n=2, set_env=False) as second:
            assert second == [1, 2]
            with pytest.raises(TimeoutError):
                acquire_slots(3, tmp_path, 1, poll_s=0.01, timeout_s=0.05)
        with gpu_slot(3, tmp_path) as third:  # [1, 2] were released
            assert third == [1]
            assert os.environ[ENV_VAR] == "1"
    assert ENV_VAR not in os.environ
    with gpu_slot(3, tmp_path, n=3) as all_ids:
        assert all_ids == [0, 1, 2]
        assert os.environ[ENV_VAR] == "0,1,2"


def test_zero_gpus_changes_nothing(tmp_path: Path) -> None:
    with gpu_slot(0, tmp_path / "locks") as ids, gpu_slot(4, tmp_path / "locks", n=0) as none:
        assert ids == [] and none == []
        assert ENV_VAR not in os.environ
    assert not (tmp_path / "locks").exists()
    code = f"import os; print(os.environ.get({ENV_VAR!r}, 'unset'))"
    for gpus, n in ((0, 1), (4, 0)):
        command = _wrapper(tmp_path / "locks", gpus, [sys.executable, "-c", code], "-n", str(n))
        out = subprocess.run(command, env=_env(), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "unset"
    assert not (tmp_path / "locks").exists()


def test_too_many_requested(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only 2 device"):
        acquire_slots(2, tmp_path, 3)


def test_existing_visible_devices_are_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "5,7")
    with gpu_slot(4, tmp_path) as ids:
        assert ids == [0]
        assert os.environ[ENV_VAR] == "5"
    assert os.environ[ENV_VAR] == "5,7"


def test_cross_process_exclusion_and_crash_release(tmp_path: Path) -> None:
    """A wrapped command holds its slot while it runs; a SIGKILL frees it."""
    hold = f"import os, time; print(os.environ[{ENV_VAR!r}], flush=True); time.sleep(60)"
    holder = subprocess.Popen(
        _wrapper(tmp_path, 2, [sys.executable, "-c", hold]), env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "0"
        with gpu_slot(2, tmp_path, set_env=False) as ids:
            assert ids == [1]
        with pytest.raises(TimeoutError):
            acquire_slots(2, tmp_path, 2, poll_s=0.01, timeout_s=0.05)
    finally:
        holder.send_signal(signal.SIGKILL)  # exec'd: this is the command itself, which held the lock
        holder.wait()
    with gpu_slot(2, tmp_path, n=2, timeout_s=5, poll_s=0.02) as ids:
        assert ids == [0, 1]


def test_concurrent_processes_never_share_a_device(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    job = (
        f"import os, sys, time; d = os.environ[{ENV_VAR!r}]; t0 = time.time(); time.sleep(0.3); "
        f"open(os.path.join({str(log)!r}, sys.argv[1]), 'w').write(f'{{d}} {{t0}} {{time.time()}}')"
    )
    procs = [
        subprocess.Popen(_wrapper(tmp_path / "locks", 2, [sys.executable, "-c", job, str(i)]), env=_env())
        for i in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    spans = []
    for path in log.iterdir():
        device, start, end = path.read_text().split()
        spans.append((device, float(start), float(end)))
    assert len(spans) == 4
    assert {d for d, _, _ in spans} <= {"0", "1"}
    for i, (dev_a, start_a, end_a) in enumerate(spans):
        for dev_b, start_b, end_b in spans[i + 1 :]:
            if dev_a == dev_b:
                assert end_a <= start_b or end_b <= start_a, "two jobs ran on one device at the same time"


def test_slurm_jobs_have_their_own_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "0")  # under SLURM with cgroups, every job may see its GPU as "0"
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    with gpu_slot(4, tmp_path, set_env=False):
        monkeypatch.setenv("SLURM_JOB_ID", "102")
        with gpu_slot(4, tmp_path, set_env=False, timeout_s=0.1) as ids:
            assert ids == [0]


def test_cli_reports_bad_request(tmp_path: Path) -> None:
    out = subprocess.run(
        _wrapper(tmp_path, 1, ["true"], "--per-job", "2"), env=_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "only 1 device" in out.stderr


def test_count_gpus_follows_cuda_visible_devices(monkeypatch):
    from fomaml_math.devices import count_gpus, main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert count_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert count_gpus() == 0
    # nothing to allocate: the command is not even looked up before exec, so a bad one fails clearly
    assert main(["run", "--per-job", "0", "--", "definitely-not-a-command-xyz"]) == 127
