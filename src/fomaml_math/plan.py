"""``python -m fomaml_math plan --configfile ...``: the configured study's jobs and cost, before it runs.

Seeds x experiments x methods multiply the GPU bill; this prints, for a config, the jobs per rule
and an estimate of GPU-hours and disk, with every assumption beside the number it drives.

* **Training** FLOPs = 6 x N x tokens (forward + backward; FOMAML's inner steps, query step and
  SFT's steps all cost that per token) plus the attention term 12 x layers x hidden x seq per token.
  Tokens per FOMAML meta-step = meta_batch_size x (num_inner_steps x inner_batch_size +
  query_batch_size) x mean tokens per example; SFT gets the same example budget (``sft.budget:
  matched``).  GPU-hours = FLOPs / (peak x MFU) / 3600.
* **Dev monitoring** every ``test_freq`` steps: forward passes over the monitoring slice before and
  after a k-shot adaptation per task (small next to training; counted).
* **Tuning** (stage ``calibrate``; docs/evaluation.md, "Tuning" and "Cost"): per tuner job (the base: one
  per experiment, one candidate; a trained run: its candidates, one per dev-monitoring step with
  ``select.criterion: tuned``), on the experiment's tuning tasks x draws x tuned k > 0, priced at the cap
  (``calibration.max_extensions`` rounds, each past the highest rate and step count): the adaptation steps
  (6 x N x k x tokens each), one dev forward per measured grid point and the greedy answers of every
  generated point (exhaustive: all; ``calibration.screen`` N: N + neighbours + continuations) and of
  every candidate unadapted (decode throughput, as the evaluation); :func:`tuner_hours`.
* **Evaluation**: per (initialisation, task, shots, repeat) the adaptation (as above) and the
  generation: test problems x generated tokens / decode throughput (a per-GPU tokens/s assumption),
  plus the gold-NLL forward.  The secondary row (``eval.metaloop_row``, ``evaluate_metaloop``): every FOMAML
  run at each k > 0 once more, its adaptation ``fomaml.num_inner_steps`` steps of min(k, ``inner_batch_size``)
  shots, the same generation and NLL.
* **Disk** (``disk_parts``): the peak on one node, reached while the last training runs: every
  finished run's kept weights at 4 bytes per parameter (float32 safetensors: with ``select.criterion:
  tuned`` one candidate folder per ``candidate_freq`` steps and the last, ``model/`` and the output's
  ``candidates/`` hard links to them; else the final model), the runs in training with
  ``keep_checkpoints + 1`` resumable checkpoints each (fp32 weights + AdamW's two moments: 12 bytes per
  parameter; the new one is written before the oldest is pruned), finished runs' checkpoints only with
  ``compute.keep_finished_checkpoints``, the base model once, and the generated text.

Peak FLOP/s and decode tokens/s come from ``compute.gpu`` (``hardware.py``; decode per backend, both priced in
``gpu_hours_by_backend``); ``--pilot`` replaces them and the variance components by what a finished pilot measured
(``pilot.py``), and ``sizing.py`` adds the sensitivity table and the recommended design (docs/plan.md).

N comes from the model's architecture: a local folder's ``config.json``, a tiny config, or the
shipped ``resources/qwen3_4b_instruct_2507.json`` for the paper model (no hub access).  Mean tokens
per example come from the split data when ``results/data/tasks`` exists (characters / chars-per-token),
else from an assumption that is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from fomaml_math import hardware, memory, pilot, sizing
from fomaml_math.analysis.evaldata import load_eval
from fomaml_math.analysis.power import Design, VarianceComponents, plan_contrast
from fomaml_math.analysis.primary import planned_family_size
from fomaml_math.analysis.tables import FOLD_FAMILY, PRIMARY_FAMILY
from fomaml_math.architecture import PAPER_MODELS, architecture, parameter_count  # noqa: F401 (plan's API)
from fomaml_math.config import (
    control_shot_counts,
    control_tasks,
    evaluated_tasks,
    experiment_names,
    load_config,
    loso_group,
    meta_test_tasks,
    meta_val_tasks,
    metaloop_row,
    sft_budget_steps,
    training_tasks,
    tuning_tasks,
)
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.grid import Grid, tuner_work

ASSUMED_SOURCE = "assumed: stats.assumed, placeholders until a pilot (docs/plan.md)"
# MATH: problem + worked solution is ~1,200 characters on average; ~3.5 characters per Qwen token.
DEFAULT_CHARS_PER_TOKEN = 3.5
DEFAULT_EXAMPLE_TOKENS = 350
DEFAULT_TEST_PROBLEMS_PER_TASK = 5000 / 7  # MATH test split, per subject on average


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.40  # of peak, for training and adaptation
    peak_tflops: float | None = None  # None: compute.gpu's dense bf16 datasheet figure (hardware.py)
    decode_tokens_per_s: float | None = None  # per GPU; None: eval.backend's on compute.gpu (hardware.py)
    mean_generated_fraction: float = 0.5  # of eval.max_new_tokens, per answer
    example_tokens: float | None = None  # None: measured from the split data, or DEFAULT_EXAMPLE_TOKENS
    train_tokens_per_s: float | None = None  # per GPU, measured by a pilot; None: FLOPs / (peak x MFU)


def resolved(config: Mapping[str, Any], assumptions: Assumptions) -> tuple[float, float]:
    """(peak TFLOP/s, decode tokens/s) per GPU: as given, else compute.gpu's and eval.backend's (hardware.py)."""
    name = str(config["compute"].get("gpu", hardware.DEFAULT_GPU))
    peak = assumptions.peak_tflops or hardware.gpu(name).peak_bf16_tflops
    backend = str(config["eval"].get("backend", "hf"))
    return peak, assumptions.decode_tokens_per_s or hardware.decode_assumption(name, backend).tokens_per_s


def train_flops_per_token(arch: Mapping[str, Any], params: int, seq_len: float) -> float:
    """6 N (forward + backward) plus causal attention's 6 x 2 x layers x hidden x seq / 2 per token."""
    return 6.0 * params + 6.0 * int(arch["num_hidden_layers"]) * int(arch["hidden_size"]) * seq_len


def mean_example_tokens(tasks_dir: Path, tasks: list[str], assumed: float | None) -> tuple[float, str]:
    if assumed is not None:
        return assumed, "given"
    files = [tasks_dir / t / f"{s}.parquet" for t in tasks for s in ("support", "query")]
    if all(f.is_file() for f in files):
        frame = pd.concat([pd.read_parquet(f, columns=["problem", "solution"]) for f in files])
        chars = (frame["problem"].str.len() + frame["solution"].str.len()).mean()
        return float(
            chars
        ) / DEFAULT_CHARS_PER_TOKEN, f"measured on {tasks_dir} ({DEFAULT_CHARS_PER_TOKEN} chars/token)"
    return float(DEFAULT_EXAMPLE_TOKENS), "assumed (no split data yet)"


def test_problems_per_task(config: Mapping[str, Any], tasks_dir: Path) -> tuple[dict[str, float], str]:
    """Test problems each task is evaluated on: counted from the split data, else assumed (and said so)."""
    tasks = config["tasks"]["names"]
    cap = config["eval"]["max_test_problems"]
    files = {t: tasks_dir / t / "test.parquet" for t in tasks}
    if all(f.is_file() for f in files.values()):
        counts = {t: len(pd.read_parquet(f, columns=["id"])) for t, f in files.items()}
        return {t: float(min(c, cap) if cap else c) for t, c in counts.items()}, "counted"
    per_task = (
        DEFAULT_TEST_PROBLEMS_PER_TASK
        if config["data"]["source"] != "synthetic"
        else 0.3 * float(config["data"]["synthetic"]["problems_per_task"])
    )
    if config["tasks"]["split"]["test_subset"] == "math500":
        per_task = 500 / 7
    if cap:
        per_task = min(per_task, float(cap))
    return dict.fromkeys(tasks, per_task), "assumed (no split data yet)"


def monitoring_steps(config: Mapping[str, Any], method: str) -> int:
    """Dev-monitoring steps of one training run: every ``test_freq`` steps from 1, and always the last."""
    steps = config["fomaml"]["total_steps"] if method == "fomaml" else sft_budget_steps(dict(config))
    return math.ceil(steps / config[method]["test_freq"])


def candidate_count(config: Mapping[str, Any], method: str) -> int:
    """Candidate folders per run: with ``select.criterion: tuned`` one every ``candidate_freq`` steps (null:
    ``test_freq``) and the last, as ``TrainingRun.candidate_steps`` keeps them; else the one kept step."""
    if config["select"]["criterion"] != "tuned":
        return 1
    steps = config["fomaml"]["total_steps"] if method == "fomaml" else sft_budget_steps(dict(config))
    return math.ceil(steps / (config[method].get("candidate_freq") or config[method]["test_freq"]))


def kept_weight_copies(config: Mapping[str, Any], method: str) -> int:
    """Full fp32 weight copies a finished run keeps as outputs (module docstring, "Disk")."""
    if config["select"]["criterion"] == "tuned":
        return candidate_count(config, method)  # model/ and the output's candidates/ link to them
    return 1  # model/ (its one candidate is a link); best_dev's best slot is resumable state, removed with it


GENERATED_BYTES_PER_TOKEN = 4.0  # assumed: ~4 characters of UTF-8 per token, stored uncompressed (an upper bound)


def concurrent_trainings(config: Mapping[str, Any]) -> int:
    """Training jobs that run at once under ``--resources gpu=<compute.gpus>`` (at least one)."""
    compute = config["compute"]
    return max(1, int(compute["gpus"]) // max(1, int(compute["num_processes"]))) if compute["gpus"] else 1


def disk_parts(config: Mapping[str, Any], params: int, runs: int, generated_tokens: float) -> dict[str, float]:
    """Peak disk in bytes, part by part, under ``--resources gpu=<compute.gpus>`` on one node.

    The peak is reached while the last training runs: every other run's outputs exist, and the runs in training
    (``concurrent_trainings``) each hold ``keep_checkpoints + 1`` resumable checkpoints for a moment (the new one
    is written before the oldest is pruned) plus, with ``best_dev``, the best slot.  A finished run's checkpoints
    are removed unless ``compute.keep_finished_checkpoints``.  ``runs`` counts one method's runs.
    """
    fp32, resumable = 4 * params, 12 * params  # weights; weights + AdamW's two moments
    methods = ("fomaml", "sft")
    training = min(concurrent_trainings(config), 2 * runs)
    per_training = max(
        (int(config[m]["keep_checkpoints"]) + 1) * resumable
        + (fp32 if config["select"]["criterion"] == "best_dev" else 0)
        for m in methods
    )
    parts = {
        "kept weights (candidates, final models)": runs * sum(kept_weight_copies(config, m) for m in methods) * fp32,
        "checkpoints of the runs in training": training * per_training,
    }
    if config["compute"]["keep_finished_checkpoints"]:
        kept = runs * sum(int(config[m]["keep_checkpoints"]) for m in methods) * resumable
        parts["checkpoints of finished runs (compute.keep_finished_checkpoints)"] = kept
    parts["base model"] = fp32
    parts["generated text (evaluation outputs)"] = generated_tokens * GENERATED_BYTES_PER_TOKEN
    return parts


def build_plan(config: Mapping[str, Any], assumptions: Assumptions, tasks_dir: Path) -> dict[str, Any]:
    arch = architecture(config)
    params = parameter_count(arch)
    experiments = experiment_names(dict(config))
    seeds = list(config["replicates"]["seeds"])
    shots = [int(k) for k in config["eval"]["shots"]]
    repeats = int(config["eval"]["repeats"])
    tasks = list(config["tasks"]["names"])
    example_tokens, token_source = mean_example_tokens(tasks_dir, tasks, assumptions.example_tokens)
    seq = min(float(config["model"]["max_seq_len"]), example_tokens)
    per_token = train_flops_per_token(arch, params, seq)
    peak_tflops, decode_tokens_per_s = resolved(config, assumptions)
    throughput = peak_tflops * 1e12 * assumptions.mfu  # FLOP/s per GPU

    fo = config["fomaml"]
    examples_per_meta_step = fo["meta_batch_size"] * (
        fo["num_inner_steps"] * fo["inner_batch_size"] + fo["query_batch_size"]
    )
    fomaml_tokens = fo["total_steps"] * examples_per_meta_step * example_tokens
    sft_tokens = sft_budget_steps(dict(config)) * config["sft"]["batch_size"] * example_tokens
    runs = len(experiments) * len(seeds)
    calibrated = config["calibration"]["enabled"] and config["eval"]["mode"] == "finetune"
    instances = (len(experiments) if calibrated else 1) + 2 * runs  # the base (per experiment when tuned), runs

    ev = config["eval"]
    adapt_steps = int(ev["num_inner_steps"])
    tuning_task_count = {e: len(tuning_tasks(dict(config), e)) for e in experiments}  # meta_val, else training

    candidates = {m: candidate_count(config, m) for m in ("fomaml", "sft")}
    tuning = sum(  # per experiment: the base's tuner job (one candidate) and every trained run's; priced at the
        # same resolved peak and decode rate as the rest (tuner_hours resolves them as build_plan does)
        tuner_hours(config, assumptions, params=params, example_tokens=example_tokens, task_count=count, candidates=c)
        * jobs
        for count in (tuning_task_count[e] for e in experiments)
        for c, jobs in [(1, 1)] + [(candidates[m], len(seeds)) for m in ("fomaml", "sft")]
    )  # fmt: skip
    sel = config["select"]
    checks = monitoring_steps(config, "fomaml") + monitoring_steps(config, "sft")
    monitor_flops_per_run_pair = checks * len(tasks) * (
        2.0 * params * sel["max_monitor_examples"] * example_tokens * 2
        + 6.0 * params * sel["shots"] * example_tokens * adapt_steps
    )  # fmt: skip

    per_task, problem_source = test_problems_per_task(config, tasks_dir)
    # What the evaluations read, summed over initialisation instances: an experiment's instances evaluate its tasks
    # but the meta_val ones (config.evaluated_tasks); the untuned base, shared by every experiment, every task.
    problems = sum(per_task.values())
    evaluated_by_experiment = {e: evaluated_tasks(dict(config), e) for e in experiments}
    experiment_tasks = sum(len(names) for names in evaluated_by_experiment.values())
    experiment_problems = sum(per_task[t] for names in evaluated_by_experiment.values() for t in names)
    run_tasks, run_problems = len(seeds) * experiment_tasks, len(seeds) * experiment_problems  # one method's runs
    base_tasks, base_problems = (experiment_tasks, experiment_problems) if calibrated else (len(tasks), problems)
    instance_tasks, instance_problems = base_tasks + 2 * run_tasks, base_problems + 2 * run_problems
    conditions = sum(1 if k == 0 else repeats for k in shots)  # (shots, repeat) pairs per task
    generated = instance_problems * conditions * ev["max_new_tokens"] * assumptions.mean_generated_fraction
    adapt_flops = (
        instance_tasks * repeats * sum(6.0 * params * k * example_tokens * adapt_steps for k in shots if k > 0)
    )
    nll_flops = instance_problems * conditions * 2.0 * params * example_tokens
    # The negative control: one model, replicates.control_draws draws at each control k, on its experiment's primary
    # pool only (config.control_tasks), as the rules run it.
    control = bool(config["replicates"]["negative_control"])
    control_shots = control_shot_counts(dict(config)) if control else []
    control_pool = control_tasks(dict(config), experiments[0])
    control_conditions = len(control_shots) * int(config["replicates"]["control_draws"])
    control_problems = sum(per_task[t] for t in control_pool) * control_conditions
    generated += control_problems * ev["max_new_tokens"] * assumptions.mean_generated_fraction
    nll_flops += control_problems * 2.0 * params * example_tokens
    adapt_flops += int(config["replicates"]["control_draws"]) * len(control_pool) * sum(
        6.0 * params * k * example_tokens * adapt_steps for k in control_shots
    )  # fmt: skip
    # The secondary row (eval.metaloop_row): every FOMAML run at each k > 0 again, adapted with its meta-training
    # inner loop (num_inner_steps steps of min(k, inner_batch_size) shots), then answered and scored as the others.
    metaloop = metaloop_row(dict(config))
    metaloop_runs = runs if metaloop else 0
    metaloop_tasks, metaloop_problems = (run_tasks, run_problems) if metaloop else (0, 0)
    metaloop_conditions = len([k for k in shots if k > 0]) * repeats
    metaloop_adapt = (metaloop_tasks * repeats) * sum(
        6.0 * params * min(k, fo["inner_batch_size"]) * example_tokens * fo["num_inner_steps"] for k in shots if k > 0
    )  # fmt: skip
    metaloop_nll = metaloop_problems * metaloop_conditions * 2.0 * params * example_tokens
    metaloop_generated = (
        metaloop_problems * metaloop_conditions * ev["max_new_tokens"] * assumptions.mean_generated_fraction
    )

    hours = {
        "train_fomaml": runs * train_seconds(fomaml_tokens * per_token, fomaml_tokens, throughput, assumptions) / 3600,
        "train_sft": runs * train_seconds(sft_tokens * per_token, sft_tokens, throughput, assumptions) / 3600,
        "dev_monitoring": runs * monitor_flops_per_run_pair / throughput / 3600,
        "calibrate": tuning if calibrated else 0.0,
        "evaluate_adaptation": (adapt_flops + nll_flops) / throughput / 3600,
        "evaluate_generation": generated / decode_tokens_per_s / 3600,
        "evaluate_metaloop": (metaloop_adapt + metaloop_nll) / throughput / 3600
        + metaloop_generated / decode_tokens_per_s / 3600,
    }
    disk = disk_parts(config, params, runs, generated + metaloop_generated)
    disk_bytes = sum(disk.values())
    jobs = {
        "train": 2 * runs,
        "calibrate": instances if calibrated else 0,
        "evaluate": instances * len(shots) + len(control_shots),
        "evaluate_metaloop": metaloop_runs * len([k for k in shots if k > 0]),
        "stats/figures/summary/experiments/manifest": 5,
        "data + env (ingest, split_tasks, check_env)": 3,
    }  # fmt: skip
    return {
        **memory.summary(config, memory.Shape.of(arch, params)),
        "model": config["model"]["name_or_path"],
        "parameters": params,
        "experiments": {e: meta_test_tasks(dict(config), e) for e in experiments},
        "training_tasks": {e: training_tasks(dict(config), e) for e in experiments},
        "meta_val": {e: meta_val_tasks(dict(config), e) for e in experiments},
        "seeds": seeds,
        "jobs": jobs,
        "gpu_hours": hours,
        "gpu_hours_total": sum(hours.values()),
        "disk_gb": disk_bytes / 1e9,
        "disk_parts_gb": {k: v / 1e9 for k, v in disk.items()},
        "candidates_per_run": {m: candidate_count(config, m) for m in ("fomaml", "sft")},
        "assumptions": {
            "mfu": assumptions.mfu,
            "gpu": str(config["compute"].get("gpu", hardware.DEFAULT_GPU)),
            "peak_tflops_per_gpu": peak_tflops,
            "decode_tokens_per_s_per_gpu": decode_tokens_per_s,
            "train_tokens_per_s_per_gpu": assumptions.train_tokens_per_s,
            "mean_generated_tokens": ev["max_new_tokens"] * assumptions.mean_generated_fraction,
            "mean_example_tokens": round(example_tokens, 1),
            "example_tokens_source": token_source,
            "test_problems": problems,
            "test_problems_source": problem_source,
            "train_flops_per_token": per_token,
            "fomaml_tokens_per_run": fomaml_tokens,
            "sft_tokens_per_run": sft_tokens,
        },
    }


def train_seconds(flops: float, tokens: float, throughput: float, assumptions: Assumptions) -> float:
    """GPU-seconds of one training run: at a pilot's measured tokens/s per GPU, else its FLOPs at peak x MFU."""
    return tokens / assumptions.train_tokens_per_s if assumptions.train_tokens_per_s else flops / throughput


def tuner_hours(
    config: Mapping[str, Any],
    assumptions: Assumptions,
    *,
    params: int,
    example_tokens: float,
    task_count: int,
    candidates: int,
) -> float:
    """GPU-hours of one tuner job (``candidates`` checkpoints), every tuned k > 0 extended to the cap
    (:func:`fomaml_math.evaluation.grid.tuner_work`): adaptation steps on k shots, one dev forward per measured
    grid point (both NLLs; measured at the grid's step counts only), and greedy answers to the tuning examples
    for every generated point and once per candidate unadapted."""
    cal, fo, ev = config["calibration"], config["fomaml"], config["eval"]
    grid = Grid.of(set(cal["lr_grid"]) | {fo["inner_lr"]}, cal["steps_grid"] or [ev["num_inner_steps"]])
    tuned = sorted({int(k) for k in (cal["shots"] or ev["shots"]) if int(k) > 0})
    work = tuner_work(grid, candidates=candidates, max_extensions=int(cal["max_extensions"]), screen=cal["screen"])
    monitor, per_task = cal["max_monitor_examples"], task_count * cal["draws"]
    flops = per_task * sum(
        6.0 * params * k * example_tokens * work.adapt_steps
        + 2.0 * params * monitor * example_tokens * (work.nll_passes + work.generation_passes)
        for k in tuned
    )  # fmt: skip
    answers = task_count * monitor * (candidates + len(tuned) * cal["draws"] * work.generation_passes)
    decoded = answers * ev["max_new_tokens"] * assumptions.mean_generated_fraction
    peak, decode = resolved(config, assumptions)
    return flops / (peak * 1e12 * assumptions.mfu) / 3600 + decoded / decode / 3600


def fold_cost(config: Mapping[str, Any], assumptions: Assumptions, tasks_dir: Path) -> dict[str, Any] | None:
    """What the generated leave-one-subject-out folds cost: the GPU-hours they add to the explicit experiments
    (every GPU-hour when there are none); None without folds."""
    loso = loso_group(dict(config))
    if loso is None:
        return None
    pooled, folds = loso
    total = build_plan(config, assumptions, tasks_dir)["gpu_hours_total"]
    others = [e for e in config["experiments"] if e["name"] not in folds]
    without = 0.0
    if others:
        variant = copy.deepcopy(dict(config))
        variant["experiments"] = others
        without = build_plan(variant, assumptions, tasks_dir)["gpu_hours_total"]
    runs = 2 * len(folds) * len(config["replicates"]["seeds"])
    return {"pooled": pooled, "folds": len(folds), "training_runs": runs, "gpu_hours": total - without}


def primary_design(config: Mapping[str, Any], tasks_dir: Path, experiment: str) -> Design:
    """The primary contrast's design in one experiment: its seeds, draws, k > 0 and primary-pool problems."""
    per_task, _ = test_problems_per_task(config, tasks_dir)
    held_out = meta_test_tasks(dict(config), experiment)
    pool = held_out or list(config["tasks"]["names"])  # the held-out tasks if any, else every task
    return Design(
        seeds=len(config["replicates"]["seeds"]),
        draws=int(config["eval"]["repeats"]),
        shot_counts=len([k for k in config["eval"]["shots"] if int(k) > 0]),
        problems=max(1, round(sum(per_task[t] for t in pool))),
    )


def power_section(
    config: Mapping[str, Any], tasks_dir: Path, components: VarianceComponents, source: str
) -> dict[str, Any]:
    """The primary contrast's se, df, MDE (80%) and power at the target effect, per experiment.

    Generated leave-one-subject-out folds (``config.loso_group``) are planned as the stats stage tests them: their
    pooled row in the primary family, each fold's own row secondary at alpha / F (Holm over the folds).
    """
    stats = config["stats"]
    experiments = experiment_names(dict(config))
    pooled, folds = loso_group(dict(config)) or (None, [])
    designs = {name: primary_design(config, tasks_dir, name) for name in experiments}

    def row(name: str, design: Design | list[Design]) -> dict[str, Any]:
        size = planned_family_size(name, experiments, folds)
        alpha, target = float(stats["alpha"]), float(stats["target_effect_pp"]) / 100.0
        planned = plan_contrast(components, design, alpha=alpha, family_size=size, target=target)
        if not isinstance(design, Design):  # the pooled row: the folds' problems together
            design = Design(design[0].seeds, design[0].draws, design[0].shot_counts, sum(d.problems for d in design))
        family = FOLD_FAMILY if name in folds else PRIMARY_FAMILY
        return {"experiment": name, "family": family, **asdict(design), **asdict(planned)}

    rows = [row(name, designs[name]) for name in experiments]
    if folds:
        rows.append(row(str(pooled), [designs[name] for name in folds]))
    family_size = planned_family_size(pooled or "", experiments, folds)  # the confirmatory family's
    return {
        "contrast": "fomaml - sft, mean over k > 0",
        "alpha": float(stats["alpha"]),
        "family_size": family_size,
        "folds": len(folds),
        "pooled": pooled,
        "target_effect_pp": float(stats["target_effect_pp"]),
        "components": {
            "seed_sd_pp": 100 * components.seed_sd,
            "draw_sd_pp": 100 * components.draw_sd,
            "problem_var": components.problem_var,
            "source": source,
        },
        "experiments": rows,
    }


def alternative_designs(
    config: Mapping[str, Any], assumptions: Assumptions, tasks_dir: Path, components: VarianceComponents
) -> list[dict[str, Any]]:
    """Seeds x draws x test sets beside the configured one: each design's primary MDE per confirmatory test (a
    leave-one-subject-out study's pooled row, not its folds) and GPU-hours."""
    test_sets = [config["tasks"]["split"]["test_subset"]]
    if config["data"]["source"] != "synthetic" and config["tasks"]["split"]["scheme"] == "source_test":
        test_sets = ["all", "math500"]
    seeds_now = len(config["replicates"]["seeds"])
    rows = []
    for seeds in sorted({seeds_now, 3, 5, 8}):
        for draws in sorted({int(config["eval"]["repeats"]), 3, 5}):
            for test_set in test_sets:
                variant = copy.deepcopy(dict(config))
                variant["replicates"]["seeds"] = list(range(seeds))
                variant["eval"]["repeats"] = draws
                variant["tasks"]["split"]["test_subset"] = test_set
                planned = power_section(variant, tasks_dir, components, "")
                rows.append(
                    {
                        "seeds": seeds,
                        "draws": draws,
                        "test_subset": test_set,
                        "mde_pp": {
                            r["experiment"]: 100 * r["mde"]
                            for r in planned["experiments"]
                            if r["family"] == PRIMARY_FAMILY
                        },
                        "gpu_hours": build_plan(variant, assumptions, tasks_dir)["gpu_hours_total"],
                        "exploratory": seeds < sizing.min_seeds_confirmatory(config),
                    }
                )
    return rows


def render_power(section: Mapping[str, Any], designs: list[Mapping[str, Any]]) -> str:
    c = section["components"]
    folds = section["folds"]
    tests = "confirmatory test(s): the experiments and the folds' pooled row" if folds else "experiment(s)"
    width = max(24, *(len(r["experiment"]) for r in section["experiments"]))
    lines = [
        f"primary contrast ({section['contrast']}), two-sided t-test at alpha {section['alpha']:g} / "
        f"{section['family_size']} {tests} (Holm's first step), 80% power:",
        f"  {'experiment':<{width}} {'problems':>8} {'seeds':>5} {'draws':>5} {'k':>3} {'se (pp)':>8} {'df':>6} "
        f"{'MDE (pp)':>9} {'power at ' + format(section['target_effect_pp'], 'g') + ' pp':>16}",
    ]
    for r in section["experiments"]:
        mde = "n/a" if not math.isfinite(r["mde"]) else f"{100 * r['mde']:.1f}"
        power_text = "n/a" if not math.isfinite(r["power_at_target"]) else f"{r['power_at_target']:.0%}"
        family = f"  (fold: alpha / {folds})" if r["family"] == FOLD_FAMILY else ""
        lines.append(
            f"  {r['experiment']:<{width}} {r['problems']:>8} {r['seeds']:>5} {r['draws']:>5} {r['shot_counts']:>3} "
            f"{100 * r['se']:>8.2f} {r['df']:>6.1f} {mde:>9} {power_text:>16}{family}"
        )
    if folds:
        lines.append(
            f"  {section['pooled']}: the mean over the {folds} leave-one-subject-out folds (seeds nested in folds), "
            f"the held-out test of the primary family; each fold alone is secondary (Holm over the {folds} folds)"
        )
    lines.append(
        f"  variance components ({c['source']}): seed SD {c['seed_sd_pp']:.2f} pp, draw SD {c['draw_sd_pp']:.2f} pp, "
        f"per-problem difference variance {c['problem_var']:.4f}"
    )
    if designs:
        names = list(designs[0]["mde_pp"])
        lines += [
            "",
            "alternative designs (primary MDE in pp per confirmatory test; GPU-hours as above):",
            f"  {'seeds':>5} {'draws':>5} {'test':>8} " + " ".join(f"{n[:16]:>16}" for n in names) + f" {'GPU-h':>8}",
        ]
        for d in designs:
            mdes = " ".join(f"{d['mde_pp'][n]:>16.1f}" for n in names)
            mark = "  exploratory (seeds below stats.primary.min_seeds_confirmatory)" if d.get("exploratory") else ""
            lines.append(f"  {d['seeds']:>5} {d['draws']:>5} {d['test_subset']:>8} {mdes} {d['gpu_hours']:>8.1f}{mark}")
    return "\n".join(lines) + "\n"


def render(plan: Mapping[str, Any], gpus: int) -> str:
    a = plan["assumptions"]
    fold_lines = []
    if folds := plan.get("loso"):
        fold_lines.append(
            f"  {'of which the ' + str(folds['folds']) + ' leave-one-subject-out folds':<52} {folds['gpu_hours']:10.1f}"
            f"   ({folds['training_runs']} of {plan['jobs']['train']} training runs; pooled as {folds['pooled']})"
        )
    lines = [
        f"Study plan for {plan['model']} ({plan['parameters'] / 1e9:.2f} B parameters)",
        "experiments: "
        + ", ".join(
            f"{e} (meta_test: {m or []}" + (f", meta_val: {plan['meta_val'][e]})" if plan["meta_val"][e] else ")")
            for e, m in plan["experiments"].items()
        )
        + "; "
        f"training seeds: {plan['seeds']}",
        "",
        "jobs per rule:",
        *(f"  {rule:<52} {count}" for rule, count in plan["jobs"].items()),
        "",
        "GPU-hours (estimate):",
        *(f"  {part:<52} {value:10.1f}" for part, value in plan["gpu_hours"].items()),
        f"  {'total':<52} {plan['gpu_hours_total']:10.1f}"
        f"   (= {plan['gpu_hours_total'] / max(gpus, 1):.1f} h wall on {gpus} GPU(s), perfect packing)",
        *fold_lines,
        f"disk: {plan['disk_gb']:.0f} GB ("
        + ", ".join(f"{part} {value:.0f}" for part, value in plan["disk_parts_gb"].items())
        + f"; candidates per run: {', '.join(f'{m} {n}' for m, n in plan['candidates_per_run'].items())})",
        "",
        "assumptions:",
        f"  {a['gpu']}: MFU {a['mfu']:.0%} of {a['peak_tflops_per_gpu']:g} TFLOP/s per GPU (training, adaptation, "
        f"NLL; MFU assumed; peak: {a.get('peak_tflops_source', 'given')})",
        *([f"  training {a['train_tokens_per_s_per_gpu']:.4g} tokens/s per GPU (measured: {a['train_source']})"]
          if a.get("train_tokens_per_s_per_gpu") else []),
        f"  decoding {a['decode_tokens_per_s_per_gpu']:g} tokens/s per GPU ({a.get('decode_label', 'assumed')}), "
        f"{a['mean_generated_tokens']:g} tokens per answer ({a.get('mean_generated_tokens_label', 'assumed')})",
        f"  {a['mean_example_tokens']:g} tokens per example ({a['example_tokens_source']}); "
        f"{a['test_problems']:g} test problems ({a['test_problems_source']})",
        f"  training FLOPs per token {a['train_flops_per_token']:.3g} (6N + attention)",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def split_data_for(config: Mapping[str, Any], tasks_dir: Path) -> Path:
    """``tasks_dir`` when its split data came from this config's ``data.source`` (its ingest report beside it
    says so), else a folder that does not exist, so counts are assumed: after ``make demo``, results/data/tasks
    holds the synthetic tasks, which say nothing about the paper's MATH."""
    report = tasks_dir.parent / "ingest_report.json"
    if tasks_dir.is_dir() and report.is_file():
        built_from = json.loads(report.read_text()).get("source")
        if built_from != config["data"]["source"]:
            print(f"plan: {tasks_dir} was built from data.source {built_from!r}, not {config['data']['source']!r}: "
                  "not used", file=sys.stderr)  # fmt: skip
            return tasks_dir / "not-this-config"
    return tasks_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fomaml_math plan", description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", required=True, help="a config YAML (e.g. config/config.yaml)")
    parser.add_argument("--tasks-dir", default="results/data/tasks", type=Path, help="split data, if already built")
    parser.add_argument("--mfu", type=float, default=Assumptions.mfu)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override compute.gpu's peak (TFLOP/s)")
    parser.add_argument(
        "--decode-tokens-per-s", type=float, default=None, help="override eval.backend's decode tokens/s per GPU"
    )
    parser.add_argument("--example-tokens", type=float, default=None, help="override the mean tokens per example")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--pilot",
        type=Path,
        default=None,
        help="a finished run's results/ folder (the pilot, config/pilot.yaml): size from the upper bounds of its "
        "variance components and price with what its jobs measured on the study's model and GPU",
    )
    args = parser.parse_args(argv)
    config = load_config(args.configfile)
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu: expected a fraction in (0, 1], got {args.mfu}")
    assumptions = Assumptions(args.mfu, args.peak_tflops, example_tokens=args.example_tokens)
    tasks_dir = split_data_for(config, args.tasks_dir)
    gpu, backend = str(config["compute"]["gpu"]), str(config["eval"].get("backend", "hf"))
    decode = {b: hardware.decode_assumption(gpu, b) for b in hardware.BACKENDS}
    if args.decode_tokens_per_s is not None:
        decode[backend] = hardware.Decode(backend, args.decode_tokens_per_s, "given (--decode-tokens-per-s)")
    components, source = assumed_components(config)
    bound, measured = None, None
    if args.pilot is not None:
        paths = sorted(args.pilot.glob("*/*/seed-*/eval/shots-*.parquet"))
        if not paths:
            raise ConfigError(f"--pilot: no <experiment>/<method>/seed-<s>/eval/shots-<k>.parquet under {args.pilot}")
        bound = pilot.bound_components(load_eval(paths))
        components = bound.upper
        source = f"measured: {bound.level:.0%} upper bounds of the estimates from {len(paths)} files in {args.pilot}"
        measured = pilot.measurements(args.pilot, config)
        assumptions, decode = pilot.apply_measured(config, assumptions, decode, measured)
    assumptions = replace(assumptions, decode_tokens_per_s=decode[backend].tokens_per_s)
    plan = build_plan(config, assumptions, tasks_dir)
    plan["gpu_hours_by_backend"] = sizing.hours_by_backend(
        lambda a: build_plan(config, a, tasks_dir), assumptions, decode
    )
    plan["assumptions"].update(pilot.labels(config, assumptions, decode[backend], measured))
    plan["loso"] = fold_cost(config, assumptions, tasks_dir)
    plan["power"] = power_section(config, tasks_dir, components, source)
    plan["power"]["components"]["label"] = "assumed" if bound is None else "measured (upper bounds)"
    plan["sensitivity"] = sizing.sensitivity(lambda c: power_section(config, tasks_dir, c, source), components)
    plan["designs"] = alternative_designs(config, assumptions, tasks_dir, components)
    target, min_seeds = float(config["stats"]["target_effect_pp"]), sizing.min_seeds_confirmatory(config)
    plan["recommended_design"] = sizing.recommend(plan["designs"], target, min_seeds)
    if measured is not None:
        plan["pilot"] = {"variance": bound.summary(), **measured}
    gpus = int(config["compute"]["gpus"])
    text = "\n".join(
        [
            render(plan, gpus),
            memory.render(plan),
            sizing.render_backends(plan["gpu_hours_by_backend"], backend, gpu),
            *([sizing.render_pilot(measured, bound)] if measured is not None else []),
            render_power(plan["power"], plan["designs"]),
            sizing.render_recommendation(plan["recommended_design"], target, min_seeds),
            sizing.render_sensitivity(plan["sensitivity"], target),
        ]
    )
    print(json.dumps(plan, indent=2) if args.json else text, end="")
    return 0


def assumed_components(config: Mapping[str, Any]) -> tuple[VarianceComponents, str]:
    assumed = config["stats"]["assumed"]
    components = VarianceComponents.from_pp(assumed["seed_sd_pp"], assumed["draw_sd_pp"], assumed["problem_var"])
    return components, ASSUMED_SOURCE
