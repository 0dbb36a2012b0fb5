"""One table of the trained models: final metrics and the settings that differ between runs.

What ``dvc exp show`` gives DVC users: each ``--run NAME=DIR`` reads ``DIR/train_summary.json``
(written by ``training.run``). Shown per run: the run facts :data:`RUN_FACTS` (method, steps,
examples, tokens, wall time), every entry of ``final_metrics`` (column = metric name), and the
``settings`` mapping flattened to dotted keys (``fomaml.inner_lr``), only the keys whose values
are not the same in every run. Bookkeeping entries (versions, hashes, resume keys) are left out.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math.errors import ConfigError
from fomaml_math.io import atomic_path, write_text

SUMMARY_FILE = "train_summary.json"
SETTINGS_KEY = "settings"
METRICS_KEY = "final_metrics"
RUN_FACTS: tuple[str, ...] = ("method", "steps", "selected_step", "examples", "tokens", "wall_time_s")
SETTING_PREFIX = "setting:"  # column prefix, keeps settings and metrics apart in one table


def flatten(mapping: Mapping[str, Any], prefix: str = "", *, drop_lists: bool = False) -> dict[str, Any]:
    """Nested mappings to dotted keys; lists become JSON text (one comparable value) or are dropped."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.", drop_lists=drop_lists)
        elif isinstance(value, list | tuple):
            if not drop_lists:
                flat[name] = json.dumps(value, sort_keys=True)
        else:
            flat[name] = value
    return flat


def parse_run(spec: str) -> tuple[str, Path]:
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise ConfigError(f"--run {spec!r}: expected NAME=DIR (e.g. fomaml=results/models/fomaml)")
    return name, Path(directory)


def load_run(name: str, directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flattened scalar metrics, flattened settings) of one run."""
    path = directory / SUMMARY_FILE
    if not path.is_file():
        raise ConfigError(f"--run {name}={directory}: {SUMMARY_FILE} not found")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(summary, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    settings = summary.get(SETTINGS_KEY) or {}
    final = summary.get(METRICS_KEY) or {}
    for key, value in ((SETTINGS_KEY, settings), (METRICS_KEY, final)):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping")
    metrics = {k: summary[k] for k in RUN_FACTS if k in summary}
    metrics |= flatten(final, drop_lists=True)
    return metrics, flatten(settings)


def _same(values: Iterable[Any]) -> bool:
    def key(value: Any) -> str:
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        return json.dumps(value, sort_keys=True, default=str)

    return len({key(v) for v in values}) <= 1


def experiment_table(runs: Mapping[str, tuple[dict[str, Any], dict[str, Any]]]) -> pd.DataFrame:
    """One row per run: ``run``, its metrics, then ``setting:<key>`` for the settings that differ."""
    metric_keys = list(dict.fromkeys(k for metrics, _ in runs.values() for k in metrics))
    setting_keys = sorted({k for _, settings in runs.values() for k in settings})
    # A key one run lacks differs too (it shows as empty there).
    differing = (
        [k for k in setting_keys if not _same(settings.get(k, "<absent>") for _, settings in runs.values())]
        if len(runs) > 1
        else []
    )
    rows = []
    for name, (metrics, settings) in runs.items():
        row: dict[str, Any] = {"run": name}
        row |= {k: metrics.get(k) for k in metric_keys}
        row |= {f"{SETTING_PREFIX}{k}": settings.get(k) for k in differing}
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", *metric_keys, *(f"{SETTING_PREFIX}{k}" for k in differing)])


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


# The Markdown shows these (when logged); every metric stays in the CSV.
HEADLINE_METRICS = (
    "method",
    "steps",
    "selected_step",  # the step select.criterion kept (best_dev: lowest dev loss after adaptation)
    "examples",
    "tokens",
    "wall_time_s",
    "meta/loss",
    "sft/loss",
    "dev/loss_before",
    "dev/loss_after",
)


def to_markdown(table: pd.DataFrame) -> str:
    """Headline metrics (one row per run), then the differing settings transposed (one row per key)."""
    headline = ["run", *(c for c in HEADLINE_METRICS if c in table.columns and table[c].notna().any())]
    settings = [c for c in table.columns if c.startswith(SETTING_PREFIX)]
    lines = [
        "# Trained models",
        "",
        "Headline final metrics of every run (all metrics: the CSV beside this file).",
        "",
        "| " + " | ".join(headline) + " |",
        "|" + "|".join("---" for _ in headline) + "|",
    ]
    for row in table[headline].itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    lines.append("")
    if settings:
        runs = [str(r) for r in table["run"]]
        lines += [
            "Settings that differ between the runs (empty: the run has no such setting).",
            "",
            "| setting | " + " | ".join(runs) + " |",
            "|---|" + "|".join("---" for _ in runs) + "|",
        ]
        for column in settings:
            values = " | ".join(_cell(v) for v in table[column])
            lines.append(f"| `{column.removeprefix(SETTING_PREFIX)}` | {values} |")
    else:
        lines.append("No setting differs between the runs." if len(table) > 1 else "Only one run: nothing to compare.")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fomaml_math experiments",
        description="Tabulate the trained models' final metrics and differing settings (like `dvc exp show`).",
    )
    parser.add_argument(
        "--run",
        dest="runs",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help=f"a run name and the folder holding its {SUMMARY_FILE}; repeat per run",
    )
    parser.add_argument("--output-csv", required=True, type=Path)
    parser.add_argument("--output-md", required=True, type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    specs = [parse_run(spec) for spec in args.runs]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--run: run names must be unique, got {names}")
    table = experiment_table({name: load_run(name, directory) for name, directory in specs})
    with atomic_path(args.output_csv) as tmp:
        table.to_csv(tmp, index=False)
    write_text(args.output_md, to_markdown(table))
    print(f"experiments: {len(table)} run(s), {table.shape[1] - 1} column(s) -> {args.output_csv}, {args.output_md}")
    return 0
