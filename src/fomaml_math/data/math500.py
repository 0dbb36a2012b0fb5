"""MATH-500: the 500-problem MATH test subset of OpenAI's PRM800K, shipped as ids and text hashes.

``math500.tsv`` (next to this module) holds, for each of the 500 problems, its ``unique_id``
(the original archive path, e.g. ``test/precalculus/807.json``), its task, its level and
``problem_sha256`` (:func:`fomaml_math.data.text.problem_sha256` of the problem text). It is
built by :func:`build_reference` from PRM800K's ``prm800k/math_splits/test.jsonl``; the file's
header names the exact source (docs/data.md has the provenance). Regenerate it with
``python -m fomaml_math.data.math500 --jsonl test.jsonl --output src/fomaml_math/data/math500.tsv``.

A row of the ingest table is a MATH-500 problem when its id is the archive path without ``.json``
(``test/<task>/<n>``: the ``local`` archive source) or, failing that, when the hash of its text is
a MATH-500 hash of the same task (the hub and file sources carry no file names; some archive
copies renumber files). :func:`select_math500` stops when fewer problems match than MATH-500
holds for the configured tasks, so a partial or altered copy cannot pass for MATH-500.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from fomaml_math.data.text import problem_sha256
from fomaml_math.errors import ConfigError
from fomaml_math.io import write_text
from fomaml_math.subjects import MATH_TASKS

MATH500_PATH = Path(__file__).with_name("math500.tsv")
REFERENCE_COLUMNS: tuple[str, ...] = ("unique_id", "task", "level", "problem_sha256")
MATH500_SIZE = 500
SOURCE_NOTE = (
    "MATH-500 = the 500 MATH test problems of OpenAI's PRM800K split (Lightman et al. 2023, 'Let's Verify Step by "
    "Step'), file prm800k/math_splits/test.jsonl of github.com/openai/prm800k (commit "
    "7ecc794703b2877f63226f2477a49b34f9b25163; git-lfs object sha256 "
    "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132, 446564 bytes; the hub dataset "
    "HuggingFaceH4/MATH-500 republishes it, per its dataset card)."
)
_HASH_NOTE = "problem_sha256 = sha256 of fomaml_math.data.text.normalise_problem_text(problem), UTF-8, hex."


def _task_of_unique_id(unique_id: str) -> str:
    parts = unique_id.split("/")
    if len(parts) != 3 or parts[0] != "test" or parts[1] not in MATH_TASKS or not parts[2].endswith(".json"):
        raise ConfigError(f"MATH-500 unique_id {unique_id!r}: expected test/<subject>/<n>.json")
    return parts[1]


def build_reference(records: Iterable[Mapping[str, object]]) -> pd.DataFrame:
    """The reference table from PRM800K-style records (``unique_id``, ``problem``, ``level``), sorted by id."""
    rows = []
    for record in records:
        unique_id = str(record["unique_id"])
        rows.append(
            {
                "unique_id": unique_id,
                "task": _task_of_unique_id(unique_id),
                "level": int(record["level"]),  # type: ignore[call-overload]
                "problem_sha256": problem_sha256(str(record["problem"])),
            }
        )
    frame = pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS)).sort_values("unique_id", ignore_index=True)
    for column in ("unique_id", "problem_sha256"):
        repeated = frame[column][frame[column].duplicated()]
        if not repeated.empty:
            raise ConfigError(f"MATH-500 source: duplicate {column} {repeated.iloc[0]}")
    return frame


def write_reference(frame: pd.DataFrame, path: str | Path) -> None:
    """The TSV with its provenance header (``#`` lines), written atomically."""
    header = f"# {SOURCE_NOTE}\n# {_HASH_NOTE}\n"
    write_text(path, header + frame.to_csv(sep="\t", index=False, lineterminator="\n"))


def load_math500(path: str | Path = MATH500_PATH) -> pd.DataFrame:
    """The shipped reference table (``#`` header lines skipped), checked for its columns."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tasks.split.test_subset: the MATH-500 reference {path} is missing")
    frame = pd.read_csv(path, sep="\t", comment="#", dtype={"unique_id": str, "task": str, "problem_sha256": str})
    if list(frame.columns) != list(REFERENCE_COLUMNS):
        raise ConfigError(f"{path}: columns {list(frame.columns)}, expected {list(REFERENCE_COLUMNS)}")
    return frame


def match_math500(rows: pd.DataFrame, reference: pd.DataFrame) -> pd.Series:
    """The MATH-500 ``unique_id`` of each row (``id``, ``task``, ``problem`` columns), or None; indexed like ``rows``.

    By id first (archive ids are ``test/<task>/<n>``), then by the text hash within the same task.
    """
    task_of_id = dict(zip(reference["unique_id"], reference["task"], strict=True))
    columns = (reference["unique_id"], reference["task"], reference["problem_sha256"])
    by_hash = {(task, digest): uid for uid, task, digest in zip(*columns, strict=True)}
    matches = []
    for record_id, task, problem in zip(rows["id"], rows["task"], rows["problem"], strict=True):
        candidate = f"{record_id}.json"
        if task_of_id.get(candidate) == task:
            matches.append(candidate)
        else:
            matches.append(by_hash.get((task, problem_sha256(problem))))
    return pd.Series(matches, index=rows.index, dtype="object")


def select_math500(test_rows: pd.DataFrame, tasks: Sequence[str], reference: pd.DataFrame | None = None) -> pd.Series:
    """Boolean mask of the MATH-500 rows among ``test_rows``; stops unless every MATH-500 problem of ``tasks`` is there.

    With all seven subjects that is 500 problems; with a subset, MATH-500's count for that subset.
    """
    reference = load_math500() if reference is None else reference
    wanted = reference.loc[reference["task"].isin(tasks)]
    matched = match_math500(test_rows, wanted)
    found = set(matched.dropna())
    missing = sorted(set(wanted["unique_id"]) - found)
    if missing:
        raise ConfigError(
            f"tasks.split.test_subset: math500: only {len(found)} of the {len(wanted)} MATH-500 problems of tasks "
            f"{list(tasks)} are in the data's MATH test split (missing e.g. {missing[:3]}); ingest the full MATH "
            "test split (data.source hub, or the whole archive) or set tasks.split.test_subset: all"
        )
    return matched.notna()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fomaml_math.data.math500",
        description="Rebuild the shipped MATH-500 reference (ids + problem hashes) from PRM800K's test.jsonl.",
    )
    parser.add_argument("--jsonl", required=True, help="prm800k/math_splits/test.jsonl (or HuggingFaceH4/MATH-500)")
    parser.add_argument("--output", default=str(MATH500_PATH), help="the TSV to write")
    args = parser.parse_args(argv)
    with open(args.jsonl, encoding="utf-8") as handle:
        frame = build_reference(json.loads(line) for line in handle if line.strip())
    if len(frame) != MATH500_SIZE:
        raise ConfigError(f"--jsonl: {args.jsonl} holds {len(frame)} problems, expected {MATH500_SIZE}")
    write_reference(frame, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
