"""``plan``'s sizing sections: GPU-hours per generation backend, the primary MDE's sensitivity to the variance
components, what a pilot measured, and which design to run (docs/plan.md).

The power arithmetic is ``analysis.power``'s (through ``plan.power_section``); this module only varies its inputs
and lays the results out. ``plan`` hands in the two functions it owns (``section``: components -> power section;
``hours``: assumptions -> plan), so the numbers here are the same numbers ``plan`` prints above them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from fomaml_math.analysis.power import VarianceComponents
from fomaml_math.analysis.tables import PRIMARY_FAMILY
from fomaml_math.hardware import BACKENDS, Decode

SD_FACTORS = (0.5, 1.0, 2.0, 3.0)  # the grid around the used seed and draw SDs
MIN_SEEDS_CONFIRMATORY = 5  # stats.primary.min_seeds_confirmatory's default (the verdicts' minimum)


def min_seeds_confirmatory(config: Mapping[str, Any]) -> int:
    """Seeds per arm below which a design's verdict is exploratory (``<section>.primary.min_seeds_confirmatory``,
    the verdicts' setting, under ``stats`` or ``analysis``; default 5)."""
    for section in ("stats", "analysis"):
        value = (config.get(section) or {}).get("primary", {}).get("min_seeds_confirmatory")
        if value is not None:
            return int(value)
    return MIN_SEEDS_CONFIRMATORY


def hours_by_backend(
    hours: Callable[[Any], Mapping[str, Any]], assumptions: Any, decode: Mapping[str, Decode]
) -> dict[str, dict[str, Any]]:
    """GPU-hours of the whole plan with each backend's decode throughput (everything else the same)."""
    out = {}
    for backend in BACKENDS:
        d = decode[backend]
        plan = hours(replace(assumptions, decode_tokens_per_s=d.tokens_per_s))
        out[backend] = {
            "gpu_hours": plan["gpu_hours"],
            "gpu_hours_total": plan["gpu_hours_total"],
            "decode_tokens_per_s_per_gpu": d.tokens_per_s,
            "label": "measured" if d.measured else "assumed",
            "source": d.source,
        }
    return out


def sensitivity(
    section: Callable[[VarianceComponents], Mapping[str, Any]], components: VarianceComponents
) -> dict[str, Any]:
    """Primary MDE (80%) and power at the target over seed SD x draw SD = the used values x ``SD_FACTORS``."""
    seeds = [components.seed_sd * f for f in SD_FACTORS]
    draws = [components.draw_sd * f for f in SD_FACTORS]
    cells: dict[str, list[list[dict[str, float]]]] = {}
    for seed_sd in seeds:
        row: dict[str, list[dict[str, float]]] = {}
        for draw_sd in draws:
            planned = section(VarianceComponents(seed_sd, draw_sd, components.problem_var))
            for r in planned["experiments"]:
                if r["family"] == PRIMARY_FAMILY:
                    row.setdefault(r["experiment"], []).append(
                        {"mde_pp": 100 * r["mde"], "power_at_target": r["power_at_target"], "df": r["df"]}
                    )
        for name, values in row.items():
            cells.setdefault(name, []).append(values)
    return {
        "seed_sd_pp": [100 * s for s in seeds],
        "draw_sd_pp": [100 * d for d in draws],
        "problem_var": components.problem_var,
        "experiments": cells,
    }


def recommend(designs: list[Mapping[str, Any]], target_pp: float, min_seeds: int) -> dict[str, Any] | None:
    """The cheapest confirmatory design (seeds >= ``min_seeds``) whose every primary MDE is at most the target; else
    the confirmatory design with the smallest worst MDE. None when no design is confirmatory."""
    confirmatory = [d for d in designs if d["seeds"] >= min_seeds and d["mde_pp"]]
    if not confirmatory:
        return None
    reaching = [d for d in confirmatory if max(d["mde_pp"].values()) <= target_pp]
    if reaching:
        best = min(reaching, key=lambda d: d["gpu_hours"])
        return {**best, "reaches_target": True}
    best = min(confirmatory, key=lambda d: (max(d["mde_pp"].values()), d["gpu_hours"]))
    return {**best, "reaches_target": False}


def _mde(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return "> 100" if value > 100 else f"{value:.1f}"


def render_backends(by_backend: Mapping[str, Mapping[str, Any]], configured: str, gpu: str) -> str:
    lines = [f"GPU-hours by generation backend on {gpu} (gpu_hours above: eval.backend {configured}):"]
    for name, b in by_backend.items():
        mark = " (configured)" if name == configured else ""
        lines.append(
            f"  {name:<5} {b['gpu_hours_total']:10.1f}   decoding {b['decode_tokens_per_s_per_gpu']:g} tokens/s per GPU"
            f"{mark}, {b['label']}: {b['source']}"
        )
    return "\n".join(lines) + "\n"


def render_sensitivity(section: Mapping[str, Any], target_pp: float) -> str:
    seeds, draws = section["seed_sd_pp"], section["draw_sd_pp"]
    lines = [
        f"sensitivity: primary MDE (pp, 80% power) / power at {target_pp:g} pp, seed SD (rows) x draw SD (columns), "
        f"per-problem difference variance {section['problem_var']:.4f}:"
    ]
    for name, grid in section["experiments"].items():
        lines.append(f"  {name}: seed SD \\ draw SD " + " ".join(f"{d:>12.2f}" for d in draws))
        for seed_sd, row in zip(seeds, grid, strict=True):
            cells = " ".join(f"{_mde(c['mde_pp']):>5} / {c['power_at_target']:>4.0%}" for c in row)
            lines.append(f"  {'':<{len(name)}}  {seed_sd:>16.2f} {cells}")
    return "\n".join(lines) + "\n"


def render_pilot(measured: Mapping[str, Any], bound: Any | None) -> str:
    """What ``--pilot`` read: each figure with its label (measured / not transferable / not recorded)."""
    lines = [f"pilot ({measured['results']}):"]
    if bound is not None:
        p, u = bound.point, bound.upper
        lines += [
            f"  seed SD {100 * p.seed_sd:.2f} pp measured; {100 * u.seed_sd:.2f} pp its one-sided "
            f"{bound.level:.0%} upper bound ({bound.seed_df} df), used for sizing",
            f"  draw SD {100 * p.draw_sd:.2f} pp measured; {100 * u.draw_sd:.2f} pp its one-sided "
            f"{bound.level:.0%} upper bound ({bound.draw_df} df), used for sizing",
            f"  per-problem difference variance {p.problem_var:.4f} measured (point estimate)",
        ]

    def line(name: str, entry: Mapping[str, Any], unit: str) -> str:
        value = "" if entry["value"] is None else f"{entry['value']:.4g} {unit} "
        return f"  {name}: {value}{entry['label']} ({entry['source']})"

    for backend, entry in measured["decode_tokens_per_s"].items():
        lines.append(line(f"decoding ({backend})", entry, "tokens/s per GPU"))
    lines.append(line("generated tokens per answer", measured["mean_generated_tokens"], "tokens"))
    lines.append(line("training", measured["train_tokens_per_s_per_gpu"], "tokens/s per GPU"))
    for kind, entry in measured["peak_gpu_memory_gib"].items():
        lines.append(line(f"peak GPU memory ({kind})", entry, "GiB"))
    return "\n".join(lines) + "\n"


def render_recommendation(best: Mapping[str, Any] | None, target_pp: float, min_seeds: int) -> str:
    if best is None:
        return f"recommended design: none of the designs above has the confirmatory minimum of {min_seeds} seeds\n"
    worst = max(best["mde_pp"].values())
    why = (
        f"the cheapest with MDE <= {target_pp:g} pp in every confirmatory test"
        if best["reaches_target"]
        else f"no design above reaches MDE <= {target_pp:g} pp in every confirmatory test; the smallest worst MDE"
    )
    return (
        f"recommended design ({why}, at >= {min_seeds} seeds): "
        f"replicates.seeds {best['seeds']} seeds, eval.repeats {best['draws']}, test_subset {best['test_subset']} "
        f"(worst MDE {_mde(worst)} pp, {best['gpu_hours']:.1f} GPU-h)\n"
    )
