"""Task names: the 7 MATH subjects, and the synthetic variants ``<subject>_v<N>`` (docs/demo.md).

A leaf module (imports nothing of the package but :mod:`fomaml_math.errors`), so that the
configuration, the synthetic generator and the data stages all read one definition.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fomaml_math.errors import ConfigError

MATH_TASKS: tuple[str, ...] = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
NUM_VARIANTS = 10  # one per digit: the variants of a family are a permutation of 0..9
_VARIANT = re.compile(r"^(?P<family>[a-z_]+?)(?:_v(?P<variant>[1-9]))?$")


def task_family(task: str) -> tuple[str, int]:
    """``"prealgebra"`` -> ``("prealgebra", 0)``, ``"prealgebra_v2"`` -> ``("prealgebra", 2)``; else ConfigError."""
    match = _VARIANT.match(task)
    if match is None or match["family"] not in MATH_TASKS:
        raise ConfigError(
            f"tasks.names: {task!r} is not a synthetic task; expected a family from {list(MATH_TASKS)}, "
            "optionally with a variant suffix _v1.._v9 (e.g. prealgebra_v1)"
        )
    return match["family"], int(match["variant"] or 0)


def is_synthetic_task(task: str) -> bool:
    try:
        task_family(task)
    except ConfigError:
        return False
    return True


def subjects_of(tasks: Sequence[str]) -> dict[str, list[str]]:
    """The MATH subjects of ``tasks`` in order of first appearance, each with its tasks: the subject itself and its
    synthetic variants (``prealgebra_v1`` is prealgebra with another hidden rule: the same subject). ConfigError on a
    name that is neither."""
    subjects: dict[str, list[str]] = {}
    for task in tasks:
        subjects.setdefault(task_family(task)[0], []).append(task)
    return subjects
