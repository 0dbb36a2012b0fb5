"""Training records: the metrics log (JSONL/CSV), optional wandb, progress bars."""

from __future__ import annotations

import csv
import json
import os
import sys
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fomaml_math.io import atomic_path


class MetricsLog:
    """Append-only JSONL of per-step records; survives resume (entries after the resumed step are dropped)."""

    def __init__(self, path: Path, *, active: bool, resume_step: int | None) -> None:
        self.path = path
        self.active = active
        self.records: list[dict[str, Any]] = []
        if not active:
            return
        if path.is_file():
            with open(path) as handle:
                lines = [json.loads(line) for line in handle if line.strip()]
            keep = [r for r in lines if resume_step is not None and int(r["step"]) <= resume_step]
            self.records = keep
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a")  # noqa: SIM115  (kept open for the whole run)

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.records.append(record)
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self.active:
            self._handle.close()


def write_metrics_outputs(records: Sequence[dict[str, Any]], output_dir: Path) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` (one row per record, columns: step then the sorted union)."""
    write_text_lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    with atomic_path(output_dir / "metrics.jsonl") as tmp:
        tmp.write_text(write_text_lines)
    columns = ["step", *sorted({k for r in records for k in r} - {"step"})]
    with atomic_path(output_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(records)


def wandb_mode(requested: str) -> str:
    """``online`` only with WANDB_API_KEY in the environment (else ``offline``); the key is never written."""
    if requested == "online" and not os.environ.get("WANDB_API_KEY"):
        warnings.warn("wandb.mode is online but WANDB_API_KEY is not set: logging offline", stacklevel=2)
        return "offline"
    return requested


class WandbLogger:
    """Optional wandb run (main process only); its id is kept in the checkpoint folder so resumes continue it."""

    def __init__(
        self, settings: Mapping[str, Any], *, name: str, config: dict[str, Any], run_dir: Path, active: bool
    ) -> None:
        self.run = None
        mode = wandb_mode(settings["mode"])
        if not active or mode == "disabled":
            return
        import wandb  # lazy: ~0.9 s to import, and only a run that logs to wandb needs it

        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / f"run_id-{name}.txt"  # a resumed run continues the same wandb run
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]  # wandb: [a-z0-9]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=settings["project"],
            entity=settings["entity"],
            mode=mode,
            dir=str(run_dir),
            name=name,
            id=run_id,
            resume="allow",
            config=config,
        )

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is not None:
            if summary:
                self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
            self.run.finish()


def progress_bar(*, total: int, initial: int, desc: str, active: bool) -> Any:
    # In a log file (Snakemake) every refresh is a new line: refresh every 30 s there, not 10 times a second.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not active,
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=interval,
        maxinterval=max(interval, 10.0),
    )
