"""Thread budget: Snakemake's OMP_NUM_THREADS is the job's, shared by the processes accelerate starts."""

from __future__ import annotations

import pytest

from fomaml_math.training.runtime import threads_per_process


@pytest.mark.parametrize(
    ("local_world", "omp", "cpus", "expected"),
    [
        (2, "2", 16, 1),  # Snakemake job with threads=2, two processes: one thread each
        (1, "2", 16, 2),
        (4, "16", 2, 4),  # the job's budget wins over the machine's count
        (4, "2", 16, 1),  # never zero
        (2, None, 8, 4),  # unset: the machine's cores shared out
        (2, "", 8, 4),
        (3, "junk", 7, 2),
    ],
)
def test_threads_per_process(local_world, omp, cpus, expected):
    assert threads_per_process(local_world, omp, cpus) == expected
