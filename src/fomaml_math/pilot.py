"""``plan --pilot RESULTS``: what a finished run (the pilot, ``config/pilot.yaml``) measured, for sizing the study.

* **Variance components** (``analysis.power.estimate_components``) and, because a pilot has 2-3 seeds per arm, their
  one-sided upper confidence bounds: the study is sized from the bounds (Browne 1995, Stat. Med. 14:1933; Teare et
  al. 2014, Trials 15:264: a pilot's point SD is too often too small, and the study then under-powered). For a
  variance estimated with ``df`` degrees of freedom, the ``level`` bound is ``s² df / χ²_{1-level}(df)``. The seed
  part is bounded on what the pilot's seed means actually estimate, ``σ²_seed + σ²_draw / (R K)`` (df: Σ over
  experiments and arms of S − 1), less the draw part; the draw SD with Σ (R − 1) over (arm, seed, k) cells. The
  problem variance (hundreds of problems' df) keeps its point estimate.
* **Throughput, answer length, memory** from the jobs' summaries (``measured`` entries, ``fomaml_math.measured``):
  decode tokens/s per backend and mean generated tokens per answer (evaluations), training tokens/s per GPU, peak
  GPU memory per job kind. Throughput and memory count as *measured* only where the pilot ran the study's model
  (``model.name_or_path``) on the study's GPU (``compute.gpu``); the answer length where it ran the study's model at
  the study's ``eval.max_new_tokens``. Anything else is *not transferable* (the CPU demo), and plan keeps the
  assumption.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats as scipy_stats

from fomaml_math import hardware
from fomaml_math.analysis.power import VarianceComponents, estimate_components
from fomaml_math.hardware import DEFAULT_GPU, Decode

UCB_LEVEL = 0.80  # one-sided: the study reaches its planned power with probability >= 0.8 (Browne 1995)
ARMS = ("fomaml", "sft")
MEASURED, NOT_TRANSFERABLE, NOT_RECORDED = "measured", "not transferable", "not recorded"


def variance_factor(df: float, level: float = UCB_LEVEL) -> float:
    """Multiplier of a sample variance with ``df`` degrees of freedom giving its one-sided ``level`` upper bound."""
    if df < 1:
        return math.inf
    return df / float(scipy_stats.chi2.ppf(1.0 - level, df))


@dataclass(frozen=True)
class VarianceBound:
    point: VarianceComponents
    upper: VarianceComponents
    level: float
    seed_df: int  # Σ (S − 1) over experiments and arms
    draw_df: int  # Σ (R − 1) over (experiment, arm, seed, k)
    cells: float  # R x K per seed, the draw part a seed mean contains

    def summary(self) -> dict[str, Any]:
        """The estimates and their bounds, in pp (``plan --json``'s ``pilot.variance``)."""
        p, u = self.point, self.upper
        return {
            "level": self.level,
            "bound": "one-sided upper confidence bound (chi-square), used for sizing",
            "seed_sd_pp": {"measured": 100 * p.seed_sd, "upper": 100 * u.seed_sd, "df": self.seed_df},
            "draw_sd_pp": {"measured": 100 * p.draw_sd, "upper": 100 * u.draw_sd, "df": self.draw_df},
            "problem_var": {"measured": p.problem_var, "upper": u.problem_var},
        }


def pilot_degrees(evals: pd.DataFrame) -> tuple[int, int, float]:
    """(seed df, draw df, R x K per seed) of a finished run's k > 0 evaluations of both arms."""
    rows = evals[(evals["shots"] > 0) & evals["init"].isin(ARMS)]
    draws = rows.groupby(["experiment", "init", "train_seed", "shots"])["repeat"].nunique()
    if draws.empty:
        return 0, 0, 1.0
    seeds = draws.reset_index().groupby(["experiment", "init"])["train_seed"].nunique()
    per_seed = draws.groupby(level=["experiment", "init", "train_seed"]).sum()
    return int((seeds - 1).sum()), int((draws - 1).sum()), float(per_seed.mean())


def bound_components(evals: pd.DataFrame, level: float = UCB_LEVEL) -> VarianceBound:
    """Point estimates and one-sided ``level`` upper bounds of the seed and draw SDs (module docstring)."""
    point = estimate_components(evals)
    seed_df, draw_df, cells = pilot_degrees(evals)
    draw_var = point.draw_sd**2
    seed_mean_var = point.seed_sd**2 + draw_var / cells  # what the seed means estimate
    seed_upper = max(0.0, seed_mean_var * variance_factor(seed_df, level) - draw_var / cells)
    draw_upper = draw_var * variance_factor(draw_df, level)
    upper = VarianceComponents(math.sqrt(seed_upper), math.sqrt(draw_upper), point.problem_var)
    return VarianceBound(point, upper, level, seed_df, draw_df, cells)


def _read(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        summary = json.loads(path.read_text())
        if isinstance(summary.get("measured"), dict):
            out.append({**summary["measured"], "path": str(path)})
    return out


def _where(record: Mapping[str, Any]) -> str:
    return f"{record.get('model')} on {record.get('gpu_name') or record.get('gpu') or 'CPU'}"


def measurements(results: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """What the run under ``results`` measured, each figure labelled measured / not transferable / not recorded."""
    model = str(config["model"]["name_or_path"])
    gpu = str(config["compute"].get("gpu", DEFAULT_GPU))
    max_new = int(config["eval"]["max_new_tokens"])
    evals = [r for r in _read(sorted(results.rglob("*.summary.json"))) if "generated_tokens" in r]
    trains = _read(sorted(results.rglob("train_summary.json")))
    study = f"the study: {model} on {gpu}"

    def entry(records: list[dict[str, Any]], ok: list[dict[str, Any]], value: float | None, unit: str) -> dict:
        if not records:
            return {"value": None, "label": NOT_RECORDED, "source": f"no job under {results} recorded it"}
        if not ok or value is None:
            seen = sorted({_where(r) for r in records})
            return {"value": None, "label": NOT_TRANSFERABLE, "source": f"ran {', '.join(seen)} ({study})"}
        return {"value": value, "label": MEASURED, "source": f"{len(ok)} job(s) under {results} ({unit})"}

    on_study_gpu = [r for r in evals if r.get("model") == model and r.get("gpu") == gpu]
    decode = {}
    for backend in sorted({r.get("backend", "hf") for r in evals}):
        mine = [r for r in evals if r.get("backend", "hf") == backend]
        ok = [r for r in on_study_gpu if r.get("backend", "hf") == backend and r["generate_s"] > 0]
        seconds = sum(r["generate_s"] for r in ok)
        decode[backend] = entry(mine, ok, sum(r["generated_tokens"] for r in ok) / seconds if seconds else None,
                                "generated tokens / generation seconds")  # fmt: skip
    same_length = [r for r in evals if r.get("model") == model and r.get("max_new_tokens") == max_new]
    answers = sum(r["answers"] for r in same_length)
    length = entry(evals, same_length, sum(r["generated_tokens"] for r in same_length) / answers if answers else None,
                   f"generated tokens / answers at max_new_tokens {max_new}")  # fmt: skip
    train_ok = [r for r in trains if r.get("model") == model and r.get("gpu") == gpu and r["seconds"] > 0]
    gpu_seconds = sum(r["seconds"] * r["processes"] for r in train_ok)
    train = entry(trains, train_ok, sum(r["tokens"] for r in train_ok) / gpu_seconds if gpu_seconds else None,
                  "tokens / (wall seconds x processes), dev monitoring and saves included")  # fmt: skip
    memory = {}
    for kind, records in (("evaluate", evals), ("train", trains)):
        ok = [r for r in records if r.get("model") == model and r.get("gpu") == gpu and r.get("peak_gpu_reserved_gib")]
        peak = max((r["peak_gpu_reserved_gib"] for r in ok), default=None)
        memory[kind] = entry(records, ok, peak, "peak GiB reserved by the caching allocator, per process")
    return {
        "results": str(results),
        "decode_tokens_per_s": decode,
        "mean_generated_tokens": length,
        "train_tokens_per_s_per_gpu": train,
        "peak_gpu_memory_gib": memory,
    }


def apply_measured(
    config: Mapping[str, Any], assumptions: Any, decode: Mapping[str, Decode], measured: Mapping[str, Any]
) -> tuple[Any, dict[str, Decode]]:
    """``plan``'s assumptions and decode rates with what the pilot measured on the study's model and GPU in place."""
    decode = dict(decode)
    for name, entry in measured["decode_tokens_per_s"].items():
        if entry["label"] == MEASURED and name in decode:
            decode[name] = Decode(name, entry["value"], entry["source"], measured=True)
    length, train = measured["mean_generated_tokens"], measured["train_tokens_per_s_per_gpu"]
    if length["label"] == MEASURED:
        assumptions = replace(assumptions, mean_generated_fraction=length["value"] / config["eval"]["max_new_tokens"])
    if train["label"] == MEASURED:
        assumptions = replace(assumptions, train_tokens_per_s=train["value"])
    return assumptions, decode


def labels(config: Mapping[str, Any], assumptions: Any, decode: Decode, measured: Mapping[str, Any] | None) -> dict:
    """Whether each priced quantity is measured (by a pilot on the study's model and GPU) or assumed, and whence."""
    card = hardware.gpu(str(config["compute"].get("gpu", DEFAULT_GPU)))
    found = measured or {}

    def label(key: str, assumed: str) -> tuple[str, str]:
        entry = found.get(key, {})
        return ("measured", entry["source"]) if entry.get("label") == MEASURED else ("assumed", assumed)

    length = label("mean_generated_tokens", "half of eval.max_new_tokens")
    train = label("train_tokens_per_s_per_gpu", f"MFU {assumptions.mfu:.0%} of the peak")
    given = assumptions.peak_tflops and assumptions.peak_tflops != card.peak_bf16_tflops
    return {
        "peak_tflops_source": "given (--peak-tflops)" if given else f"datasheet: {card.source}",
        "mfu_label": "assumed",
        "mfu_source": f"{assumptions.mfu:.0%} of the peak (adaptation and NLL; training too without a pilot)",
        "decode_label": "measured" if decode.measured else "assumed",
        "decode_source": decode.source,
        "mean_generated_tokens_label": length[0],
        "mean_generated_tokens_source": length[1],
        "train_label": train[0],
        "train_source": train[1],
    }
