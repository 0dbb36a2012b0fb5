"""Ingest MATH (hub, local archive or file, or synthetic) into one normalised table.

Output: ``math.parquet`` with the columns of :data:`COLUMNS` (see docs/architecture.md) and a
JSON report that counts, by reason, every record that was skipped, so that nothing vanishes
silently. Sources (``data.source``):

- ``hub``: ``datasets.load_dataset(data.hub.dataset, <subject>, split=..., revision=...)``, one
  config per subject (``EleutherAI/hendrycks_math``). ``data.hub.dataset`` may also be a local
  directory holding one ``DatasetDict.save_to_disk`` folder per subject (``<dir>/<subject>/``
  with ``train``/``test`` splits): an offline copy of the hub dataset, read through the same code.
- ``local``: ``data.local.path`` is the original archive (``MATH/{train,test}/<subject>/<n>.json``;
  the folder containing ``MATH/`` or ``MATH/`` itself), or a ``.jsonl``/``.parquet`` file with
  ``problem``, ``level``, ``type`` (or ``subject``) and ``solution`` columns and optionally
  ``source_split``/``split`` (train|test; records without one count as train).
- ``synthetic``: :func:`fomaml_math.data.synthetic.generate_synthetic`.

Ids are stable and independent of the input order: ``<source_split>/<subject>/<file stem>`` for the
archive, ``<task>/<hash of task and problem text>`` otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import numbers
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.config import add_settings_arguments, settings_from_args
from fomaml_math.data.answers import extract_boxed_answer
from fomaml_math.data.synthetic import generate_synthetic
from fomaml_math.data.taskfiles import COLUMNS, RULE_COLUMN
from fomaml_math.errors import ConfigError
from fomaml_math.io import write_json, write_parquet
from fomaml_math.subjects import MATH_TASKS, task_family

logger = logging.getLogger(__name__)

SOURCE_SPLITS: tuple[str, ...] = ("train", "test")
SKIP_REASONS: tuple[str, ...] = ("bad_json", "missing_field", "bad_level", "unknown_subject", "no_boxed_answer")
_EXAMPLES_PER_REASON = 5


def subject_to_task(subject: Any) -> str | None:
    """``"Counting & Probability"``, ``"counting_and_probability"`` or ``"Number Theory"`` -> task name."""
    if not isinstance(subject, str):
        return None
    name = "_".join(subject.strip().lower().replace("&", " and ").replace("-", " ").split())
    return name if name in MATH_TASKS else None


def parse_level(value: Any) -> int | None:
    """``"Level 3"``, ``3`` or ``"3"`` -> 3; ``"Level ?"`` -> 0 (MATH's unknown level); otherwise None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        level = int(value)
    elif isinstance(value, numbers.Real):
        if math.isnan(value) or not float(value).is_integer():
            return None
        level = int(value)
    elif isinstance(value, str):
        text = value.strip()
        text = text.removeprefix("Level").strip()
        if text == "?":
            return 0
        if not text.isdigit():
            return None
        level = int(text)
    else:
        return None
    return level if 1 <= level <= 5 else None


def problem_id(task: str, problem: str) -> str:
    """Order-independent id of a problem that has no file name: a hash of its task and text."""
    digest = hashlib.sha256(f"{task}\n{problem}".encode()).hexdigest()[:16]
    return f"{task}/{digest}"


@dataclass
class IngestReport:
    """What was kept, what was skipped and why; written next to the table as JSON."""

    source: str
    location: str | None = None
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    excluded_tasks: Counter[str] = field(default_factory=Counter)
    kept_per_task: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, origin: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_examples[reason]) < _EXAMPLES_PER_REASON:
            self.skipped_examples[reason].append(f"{origin}: {detail}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "location": self.location,
            "kept": sum(self.kept_per_task.values()),
            "kept_per_task": dict(sorted(self.kept_per_task.items())),
            "skipped": {reason: self.skipped.get(reason, 0) for reason in SKIP_REASONS},
            "skipped_total": sum(self.skipped.values()),
            "skipped_examples": {reason: list(examples) for reason, examples in sorted(self.skipped_examples.items())},
            "excluded_tasks": dict(sorted(self.excluded_tasks.items())),
        }

    def summary(self) -> str:
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) or "none"
        excluded = sum(self.excluded_tasks.values())
        return (
            f"kept {sum(self.kept_per_task.values())} problems from {self.source}"
            f"{f' ({self.location})' if self.location else ''}; skipped {sum(self.skipped.values())} "
            f"malformed ({skipped}); left out {excluded} of tasks not in tasks.names"
        )


@dataclass(frozen=True)
class RawRecord:
    """One record as read, before checking: where it came from and what we know of it."""

    fields: Mapping[str, Any]
    origin: str  # for the report: a file, file:line, or dataset/config/split#row
    source_split: str
    task: str | None = None  # known from the layout (archive folder, hub config); else from the fields
    record_id: str | None = None  # known from the layout (archive file name); else hashed


def _nonempty_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def normalise_record(raw: RawRecord, tasks: Sequence[str], report: IngestReport) -> dict[str, Any] | None:
    """Check one record and turn it into a row of the table; skipped records are counted in ``report``."""
    fields = raw.fields
    missing = [name for name in ("problem", "solution") if _nonempty_text(fields.get(name)) is None]
    if (
        raw.task is None
        and _nonempty_text(fields.get("type")) is None
        and _nonempty_text(fields.get("subject")) is None
    ):
        missing.append("type")
    if "level" not in fields or fields["level"] is None:
        missing.append("level")
    if missing:
        report.skip("missing_field", raw.origin, f"missing or empty {', '.join(missing)}")
        return None
    task = raw.task or subject_to_task(_nonempty_text(fields.get("type")) or fields.get("subject"))
    if task is None:
        report.skip("unknown_subject", raw.origin, f"subject {fields.get('type') or fields.get('subject')!r}")
        return None
    if task not in tasks:
        report.excluded_tasks[task] += 1
        return None
    level = parse_level(fields["level"])
    if level is None:
        report.skip("bad_level", raw.origin, f"level {fields['level']!r} (expected 'Level 1'..'Level 5' or 'Level ?')")
        return None
    answer = extract_boxed_answer(fields["solution"])
    if answer is None:
        report.skip("no_boxed_answer", raw.origin, "no balanced, non-empty \\boxed{} or \\fbox{} in the solution")
        return None
    row = {
        "id": raw.record_id,
        "task": task,
        "source_split": raw.source_split,
        "level": level,
        "problem": fields["problem"],
        "solution": fields["solution"],
        "answer": answer,
    }
    if fields.get(RULE_COLUMN) is not None:
        row[RULE_COLUMN] = fields[RULE_COLUMN]
    return row


# --- readers: each yields RawRecord and counts what it cannot even parse ------------------------


def _archive_root(path: Path) -> Path | None:
    """The ``MATH`` folder (holding ``train``/``test``) for ``path`` = that folder or its parent."""
    for candidate in (path / "MATH", path):
        if any((candidate / split).is_dir() for split in SOURCE_SPLITS):
            return candidate
    return None


def read_archive(root: Path, tasks: Sequence[str], report: IngestReport) -> Iterator[RawRecord]:
    """Records of the original archive layout ``<root>/{train,test}/<subject>/<n>.json``."""
    for source_split in SOURCE_SPLITS:
        split_dir = root / source_split
        if not split_dir.is_dir():
            continue
        for subject_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files = sorted(subject_dir.glob("*.json"))
            task = subject_to_task(subject_dir.name)
            if task is None:
                for file in files:
                    report.skip("unknown_subject", f"{source_split}/{subject_dir.name}/{file.name}", "unknown folder")
                continue
            if task not in tasks:
                report.excluded_tasks[task] += len(files)  # not read at all: they are not wanted
                continue
            for file in files:
                origin = f"{source_split}/{subject_dir.name}/{file.name}"
                try:
                    fields = json.loads(file.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    report.skip("bad_json", origin, str(exc).splitlines()[0])
                    continue
                if not isinstance(fields, dict):
                    report.skip("bad_json", origin, f"expected a JSON object, got {type(fields).__name__}")
                    continue
                record_id = f"{source_split}/{task}/{file.stem}"
                yield RawRecord(fields, origin, source_split, task=task, record_id=record_id)


def _source_split_of(fields: Mapping[str, Any], default: str) -> str:
    for key in ("source_split", "split"):
        value = fields.get(key)
        if isinstance(value, str) and value.strip().lower() in SOURCE_SPLITS:
            return value.strip().lower()
    return default


def read_jsonl(path: Path, report: IngestReport) -> Iterator[RawRecord]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            origin = f"{path.name}:{line_number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                report.skip("bad_json", origin, str(exc))
                continue
            if not isinstance(fields, dict):
                report.skip("bad_json", origin, f"expected a JSON object, got {type(fields).__name__}")
                continue
            yield RawRecord(fields, origin, _source_split_of(fields, "train"))


def read_parquet_file(path: Path) -> Iterator[RawRecord]:
    frame = pd.read_parquet(path)
    for row_number, fields in enumerate(frame.to_dict("records")):
        # pandas turns missing values into NaN/NA; the checks below expect None
        cleaned = {key: (None if _is_missing(value) else value) for key, value in fields.items()}
        yield RawRecord(cleaned, f"{path.name}#{row_number}", _source_split_of(cleaned, "train"))


def _is_missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and arrays are never "missing" as a whole
        return False


def read_local(path_setting: str | None, tasks: Sequence[str], report: IngestReport) -> Iterator[RawRecord]:
    if not path_setting:
        raise ConfigError(
            "data.local.path: required when data.source is 'local' (MATH archive folder, .jsonl or .parquet)"
        )
    path = Path(path_setting)
    if not path.exists():
        raise ConfigError(
            f"data.local.path: {path} does not exist (expected a MATH archive folder, .jsonl or .parquet)"
        )
    if path.is_dir():
        root = _archive_root(path)
        if root is None:
            raise ConfigError(f"data.local.path: {path} has no MATH/{{train,test}}/<subject>/<n>.json archive layout")
        return read_archive(root, tasks, report)
    if path.suffix == ".jsonl":
        return read_jsonl(path, report)
    if path.suffix == ".parquet":
        return read_parquet_file(path)
    raise ConfigError(f"data.local.path: {path} is neither a folder nor a .jsonl or .parquet file")


def _load_hub_split(dataset: str, revision: str | None, task: str, split: str) -> Iterable[Mapping[str, Any]] | None:
    """Rows of one subject and split; None when a local saved copy lacks that split."""
    local_copy = Path(dataset)
    if local_copy.is_dir():
        # datasets imported lazily: ~3 s (python -X importtime), and only the hub source needs it
        from datasets import load_from_disk

        subject_dir = local_copy / task
        if not subject_dir.is_dir():
            raise ConfigError(
                f"data.hub.dataset: local copy {local_copy} has no {task}/ folder "
                "(expected one DatasetDict.save_to_disk folder per subject)"
            )
        saved = load_from_disk(str(subject_dir))
        return saved.get(split)
    from datasets import load_dataset  # lazily, as above
    from datasets.exceptions import DatasetsError

    try:
        return load_dataset(dataset, task, split=split, revision=revision)
    except (OSError, ValueError, DatasetsError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"data.hub.dataset: cannot load {dataset!r} config {task!r} split {split!r} "
            f"(revision {revision!r}): {first_line}"
        ) from exc


def read_hub(dataset: str, revision: str | None, tasks: Sequence[str], report: IngestReport) -> Iterator[RawRecord]:
    for task in tasks:
        for split in SOURCE_SPLITS:
            rows = _load_hub_split(dataset, revision, task, split)
            if rows is None:
                logger.warning("%s has no %s split for %s", dataset, split, task)
                continue
            for row_number, fields in enumerate(rows):
                yield RawRecord(fields, f"{task}/{split}#{row_number}", split, task=task)


def read_synthetic(problems_per_task: int, seed: int, tasks: Sequence[str]) -> Iterator[RawRecord]:
    for number, record in enumerate(generate_synthetic(tasks, problems_per_task, seed)):
        yield RawRecord(record, f"synthetic#{number}", record["source_split"], task=record["task"])


# --- the table ----------------------------------------------------------------------------------


def _assign_hashed_ids(rows: list[dict[str, Any]]) -> None:
    """Give rows without an id one hashed from task and problem; identical problems get ``-2``, ``-3``...

    Rows that share a hash are numbered in the order of their content, not of the input, so the
    ids stay independent of the input order.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["id"] is None:
            groups[problem_id(row["task"], row["problem"])].append(row)
    for base_id, group in groups.items():
        group.sort(key=lambda row: (row["source_split"], row["level"], row["solution"], row["problem"]))
        for occurrence, row in enumerate(group, start=1):
            row["id"] = base_id if occurrence == 1 else f"{base_id}-{occurrence}"


def _setting(settings: Mapping[str, Any], dotted_key: str) -> Any:
    value: Any = settings
    for part in dotted_key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ConfigError(f"{dotted_key}: missing from the ingest settings")
        value = value[part]
    return value


def build_table(settings: Mapping[str, Any]) -> tuple[pd.DataFrame, IngestReport]:
    """Read the configured source and return the normalised table (sorted by task, id) and the report."""
    tasks = list(_setting(settings, "tasks"))
    source = _setting(settings, "data.source")
    if source == "synthetic":
        for task in tasks:
            task_family(task)  # a family name, optionally with a variant suffix; else a one-line error
    else:
        unknown = [task for task in tasks if task not in MATH_TASKS]
        if unknown:
            raise ConfigError(
                f"tasks.names: unknown task(s) {unknown} for data.source {source}; expected names from "
                f"{list(MATH_TASKS)} (other names, e.g. prealgebra_v1, only with data.source: synthetic)"
            )
    report = IngestReport(source=source)
    if source == "hub":
        dataset = _setting(settings, "data.hub.dataset")
        report.location = dataset
        raw_records = read_hub(dataset, _setting(settings, "data.hub.revision"), tasks, report)
    elif source == "local":
        path = _setting(settings, "data.local.path")
        report.location = path
        raw_records = read_local(path, tasks, report)
    elif source == "synthetic":
        problems_per_task = int(_setting(settings, "data.synthetic.problems_per_task"))
        raw_records = read_synthetic(problems_per_task, int(_setting(settings, "seed")), tasks)
    else:
        raise ConfigError(f"data.source: expected one of hub, local, synthetic, got {source!r}")

    rows = [row for raw in raw_records if (row := normalise_record(raw, tasks, report)) is not None]
    _assign_hashed_ids(rows)
    columns = [*COLUMNS, RULE_COLUMN] if source == "synthetic" else list(COLUMNS)
    frame = pd.DataFrame(rows, columns=columns)
    frame = frame.astype({"level": "int64"}).sort_values(["task", "id"], ignore_index=True)
    report.kept_per_task = {task: int((frame["task"] == task).sum()) for task in tasks}
    return frame, report


def ingest(settings: Mapping[str, Any], output: str | Path, report_path: str | Path) -> pd.DataFrame:
    """Build the table, write it and its report atomically, and log a one-line summary."""
    frame, report = build_table(settings)
    write_json(report_path, report.to_dict())
    logger.info(report.summary())
    if frame.empty:
        raise ConfigError(
            f"data.source: no usable problems from {report.source} {report.location or ''} "
            f"for tasks {list(report.kept_per_task)} (see {report_path})"
        )
    empty_tasks = [task for task, count in report.kept_per_task.items() if count == 0]
    if empty_tasks:
        logger.warning("no problems for task(s) %s", empty_tasks)
    write_parquet(output, frame)
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fomaml_math ingest",
        description="Build the normalised MATH table (results/data/math.parquet) from the configured source.",
    )
    add_settings_arguments(parser)
    parser.add_argument("--output", required=True, help="the table to write, e.g. results/data/math.parquet")
    parser.add_argument("--report", required=True, help="JSON report of kept and skipped records")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ingest(settings_from_args(args, "ingest"), args.output, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
