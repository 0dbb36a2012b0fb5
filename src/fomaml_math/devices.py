"""GPU slots for concurrent jobs: a file-lock allocator that sets ``CUDA_VISIBLE_DEVICES``.

Snakemake's ``resources: gpu=1`` only counts GPUs; it assigns no device to a job, so four
concurrent evaluation jobs would all run on GPU 0. Each device here is a lock file
(``<lock-dir>/<host>[-slurm<job>]-gpu<id>.lock``, an OS ``flock`` through :mod:`filelock`); a job takes the
first free ones, without blocking on a busy one, and waits and retries when too few are free.
The kernel drops a ``flock`` when its holder dies, so a crashed or killed job never leaves a
slot taken.

From a Snakemake ``shell:`` (the command replaces the wrapper process via ``exec`` and inherits
the locked descriptors, so the slot is held exactly as long as the command runs)::

    python -m fomaml_math.devices run --gpus 4 --lock-dir results/.gpu-locks -- python -m fomaml_math evaluate ...

In Python::

    with gpu_slot(num_gpus=4, lock_dir="results/.gpu-locks") as ids:
        ...  # CUDA_VISIBLE_DEVICES is set to the ids (before CUDA is initialised!)

When ``CUDA_VISIBLE_DEVICES`` is already set (e.g. by a cluster scheduler), slots index into
that list instead of into ``0..gpus-1``. With ``--gpus 0`` or ``-n 0`` nothing is allocated or changed.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

ENV_VAR = "CUDA_VISIBLE_DEVICES"


def _visible_devices(num_gpus: int) -> list[str]:
    """Device names the slots map to: the first ``num_gpus`` of an existing CUDA_VISIBLE_DEVICES, or 0..n-1."""
    existing = os.environ.get(ENV_VAR)
    if existing is not None and existing.strip():
        return [d.strip() for d in existing.split(",") if d.strip()][:num_gpus]
    return [str(i) for i in range(num_gpus)]


def _lock_path(lock_dir: Path, device: str) -> Path:
    # The host name keeps nodes that share a results/ folder (NFS) from contending for each other's
    # GPUs; a SLURM job id scopes the locks to that job's own devices (with cgroups every job on a
    # node may call its GPU "0").
    scope = socket.gethostname()
    if os.environ.get("SLURM_JOB_ID"):
        scope += f"-slurm{os.environ['SLURM_JOB_ID']}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{scope}-gpu{device}")
    return lock_dir / f"{safe}.lock"


def acquire_slots(
    num_gpus: int,
    lock_dir: str | Path,
    n: int = 1,
    *,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
) -> tuple[list[int], list[str], list[FileLock], list[int]]:
    """Take ``n`` free slots: ``(slot ids, device names, held locks, their file descriptors)``.

    Tries every slot without blocking; when fewer than ``n`` are free it releases what it got
    (so two jobs that each hold part of what they need cannot deadlock) and retries after
    ``poll_s`` seconds (with jitter), until ``timeout_s`` (None: forever) raises TimeoutError.
    """
    devices = _visible_devices(num_gpus)
    if n < 1:
        raise ValueError(f"--num/n: must be >= 1, got {n}")
    if n > len(devices):
        raise ValueError(f"cannot take {n} GPU slot(s): only {len(devices)} device(s) ({','.join(devices) or 'none'})")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    announced = False
    while True:
        ids: list[int] = []
        locks: list[FileLock] = []
        fds: list[int] = []
        for slot, device in enumerate(devices):
            # fallback_to_soft=False: a soft (existence) lock would outlive a crashed holder.
            lock = FileLock(_lock_path(lock_dir, device), fallback_to_soft=False, on_acquired=fds.append)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            ids.append(slot)
            locks.append(lock)
            if len(ids) == n:
                return ids, [devices[i] for i in ids], locks, fds
        for lock in locks:
            lock.release()
        waited = time.monotonic() - start
        if timeout_s is not None and waited >= timeout_s:
            raise TimeoutError(f"no {n} free GPU slot(s) among {len(devices)} in {lock_dir} after {waited:.0f}s")
        if not announced:
            print(f"[devices] waiting for {n} free GPU slot(s) among {len(devices)} ({lock_dir})", file=sys.stderr)
            announced = True
        time.sleep(poll_s * random.uniform(0.5, 1.5))


@contextmanager
def gpu_slot(
    num_gpus: int,
    lock_dir: str | Path,
    n: int = 1,
    *,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
    set_env: bool = True,
) -> Iterator[list[int]]:
    """Hold ``n`` GPU slots for the block; yields the slot ids (``[]`` when ``num_gpus`` or ``n`` is 0).

    With ``set_env``, ``CUDA_VISIBLE_DEVICES`` names the held devices inside the block and is
    restored afterwards; it only takes effect if CUDA is initialised after this point.
    """
    if num_gpus <= 0 or n <= 0:
        yield []
        return
    ids, devices, locks, _ = acquire_slots(num_gpus, lock_dir, n, poll_s=poll_s, timeout_s=timeout_s)
    previous = os.environ.get(ENV_VAR)
    try:
        if set_env:
            os.environ[ENV_VAR] = ",".join(devices)
        yield ids
    finally:
        if set_env:
            if previous is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = previous
        for lock in locks:
            lock.release()


def run_with_slot(
    command: list[str],
    num_gpus: int,
    lock_dir: str | Path,
    n: int = 1,
    *,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
) -> None:
    """Replace this process with ``command``, holding ``n`` GPU slots for its lifetime (never returns)."""
    if not command:
        raise ValueError("devices run: no command given after --")
    if num_gpus <= 0 or n <= 0:  # a CPU job (e.g. compute.eval_gpus_per_job: 0): nothing to allocate
        os.execvp(command[0], command)
    _, devices, _locks, fds = acquire_slots(num_gpus, lock_dir, n, poll_s=poll_s, timeout_s=timeout_s)
    # The command inherits the locked descriptors: the flock lives until the command (and any
    # child it forks) exits, however it exits.
    for fd in fds:
        os.set_inheritable(fd, True)
    env = dict(os.environ, **{ENV_VAR: ",".join(devices)})
    print(f"[devices] {ENV_VAR}={env[ENV_VAR]}", file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)


def count_gpus() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else what ``nvidia-smi -L`` lists.

    Counted at run time, not passed from the config, so moving to a machine with more GPUs does
    not change a rule's params (which would rerun finished jobs).
    """
    existing = os.environ.get(ENV_VAR)
    if existing is not None:
        return len([d for d in existing.split(",") if d.strip() and d.strip() != "-1"])
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def _gpus_argument(value: str) -> int:
    if value == "auto":
        return count_gpus()
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fomaml_math.devices", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a command holding free GPU slot(s), with CUDA_VISIBLE_DEVICES set")
    run.add_argument(
        "--gpus",
        type=_gpus_argument,
        default="auto",
        help="GPUs on the machine, or 'auto' to count them (default); 0: run the command unchanged",
    )
    run.add_argument("--lock-dir", default="results/.gpu-locks", help="folder of the per-GPU lock files")
    run.add_argument(
        "-n", "--num", "--per-job", dest="num", type=int, default=1, help="GPUs this command needs (default 1; 0: none)"
    )
    run.add_argument("--poll", type=float, default=5.0, help="seconds between tries while all slots are busy")
    run.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: wait)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command and its arguments")
    args = parser.parse_args(argv)
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if args.num == 0:
        args.gpus = 0  # nothing to allocate: do not even look for GPUs
    if args.gpus < 0 or args.num < 0:
        parser.error(f"--gpus and --num: must be >= 0, got {args.gpus} and {args.num}")
    if not command:
        parser.error("give the command after --")
    try:
        run_with_slot(command, args.gpus, args.lock_dir, args.num, poll_s=args.poll, timeout_s=args.timeout)
    except (ValueError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: devices run: command not found: {command[0]} ({exc.strerror})", file=sys.stderr)
        return 127
    return 0  # unreachable: exec replaced the process


if __name__ == "__main__":
    sys.exit(main())
