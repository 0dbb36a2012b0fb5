"""The ``accelerate launch`` command line for a training job, from the ``compute`` settings."""

from __future__ import annotations

import shlex
from typing import Any


def accelerate_launch_prefix(compute: dict[str, Any]) -> str:
    """Return ``accelerate launch <flags>`` for the configured processes and devices.

    On CPU, ``accelerate launch --cpu --num_processes N`` silently starts one process; what
    starts N gloo processes is ``--multi_gpu`` with ``ACCELERATE_USE_CPU=1``. The training
    code asserts the world size it gets, so a wrong launch fails loudly instead.
    """
    nproc = int(compute["num_processes"])
    flags = ["--num_processes", str(nproc), "--num_machines", "1", "--dynamo_backend", "no"]
    env = ""
    if compute["accelerate_config"]:
        flags = ["--config_file", str(compute["accelerate_config"]), *flags]
    if compute["gpus"] == 0:
        env = "env ACCELERATE_USE_CPU=1 "
        flags += ["--mixed_precision", "no"]
        if nproc > 1:
            flags.insert(0, "--multi_gpu")
    else:
        flags += ["--mixed_precision", str(compute["mixed_precision"])]
        if nproc > 1 and not compute["accelerate_config"]:
            flags.insert(0, "--multi_gpu")
    return env + "accelerate launch " + shlex.join(flags)
