"""``bench/gpu_check.py --device cpu --quick`` runs in CI as the lent GPU machine would run it.

The lent machine has no snakemake, math-verify, wandb, datasets or jsonschema: the subprocess hides them
(a ``sitecustomize`` that makes every import finder blind to them), so an import of one of them on the
check's path fails here too instead of only on the GPU.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
ABSENT_ON_DEVICE = ("snakemake", "math_verify", "wandb", "datasets", "jsonschema")
SECTIONS = (
    "1_bf16_adaptation",
    "2_meta_step_vs_sft",
    "3_estimate_4b",
    "4_generation",
    "5_fsdp2_single",
    "6_slot_allocator",
    "7_inner_loop",
    "8_eval_memory",
)

HIDE = textwrap.dedent(
    f"""
    import sys

    HIDDEN = {set(ABSENT_ON_DEVICE)!r}


    class Hide:
        # Wraps a finder: hidden top-level names are not found (find_spec None), as if not installed.
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN or not hasattr(self.inner, "find_spec"):
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)


    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
    """
)


def _env(tmp_path: Path) -> dict[str, str]:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "PYTHONPATH")}
    env.update(PYTHONPATH=f"{hide}{os.pathsep}{ROOT / 'src'}", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_the_hiding_works(tmp_path: Path) -> None:
    """The simulated machine really lacks the packages (else the main test would prove nothing)."""
    code = "import importlib, json\nout = {}\n"
    code += f"for n in {ABSENT_ON_DEVICE!r}:\n"
    code += "    try:\n        importlib.import_module(n); out[n] = 'imported'\n"
    code += "    except ModuleNotFoundError:\n        out[n] = 'missing'\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == dict.fromkeys(ABSENT_ON_DEVICE, "missing")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "out"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), "--threads", "1"]
    done = subprocess.run(command, env=_env(tmp), capture_output=True, text=True, timeout=240, cwd=tmp, check=False)
    assert (out / "gpu_check.json").is_file(), done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    return report, (out / "gpu_check.md").read_text(), done


def test_cpu_quick_mode_writes_every_section_without_errors(quick_run) -> None:
    report, markdown, done = quick_run
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert report["meta"]["absent_packages"] == dict.fromkeys(ABSENT_ON_DEVICE, False)
    assert list(report["sections"]) == list(SECTIONS)
    for index, (key, section) in enumerate(report["sections"].items(), start=1):
        assert section["status"] == "ok", (key, section["errors"], [c for c in section["checks"] if not c["passed"]])
        assert section["errors"] == []
        assert section["seconds"] is not None and section["seconds"] <= section["budget_s"] + 30
        assert f"## {index}. {section['title']}: ok" in markdown
    # The parts that need CUDA say so; everything else ran.
    skipped = {key: s["skipped"] for key, s in report["sections"].items()}
    assert skipped["3_estimate_4b"] == ["Qwen3-4B real shape, random weights, one meta-step: needs CUDA"]
    assert any("needs CUDA" in s for s in skipped["6_slot_allocator"])
    assert not skipped["1_bf16_adaptation"] and not skipped["4_generation"] and not skipped["5_fsdp2_single"]
    assert skipped["7_inner_loop"] == ["Qwen3-4B shape: needs CUDA"]
    assert skipped["8_eval_memory"] == ["Qwen3-4B shape: needs CUDA"]


def test_eval_memory_section_runs_the_configured_evaluation_and_states_the_estimate(quick_run) -> None:
    """Section 8 adapts on k = 50 rows in micro-batches of eval.inner_batch_size with the paper config's levers,
    then generates a batch of eval.gen_batch_size; its estimate is fomaml_math.memory's for that shape."""
    from fomaml_math import memory
    from fomaml_math.config import load_config

    config = load_config(ROOT / "config" / "config.yaml")
    section = quick_run[0]["sections"]["8_eval_memory"]
    results = section["results"]
    cfg = results["config"]
    assert (
        cfg["inner_batch_size"],
        cfg["gen_batch_size"],
        cfg["loss_chunk_tokens"],
        cfg["gradient_checkpointing"],
    ) == (
        config["eval"]["inner_batch_size"],
        config["eval"]["gen_batch_size"],
        config["compute"]["loss_chunk_tokens"],
        config["compute"]["gradient_checkpointing"],
    )
    model = results["model"]
    assert model["shots"] == 50 and model["micro_batches"] == -(-50 // cfg["inner_batch_size"])
    adaptation = results["adaptation"]
    assert adaptation["measured_peak_gib"] is None  # CPU: no allocator peak; the GPU run fills it
    parameters = model["parameters"]
    assert adaptation["estimate_gib"]["weights"] * memory.GiB == pytest.approx(4 * parameters)
    assert adaptation["estimate_gib"]["optimizer state"] * memory.GiB == pytest.approx(8 * parameters)  # adam
    assert math.isfinite(adaptation["support_loss"][0])
    generation = results["generation"]
    assert generation["batch"] == cfg["gen_batch_size"] and generation["generated_tokens"] > 0


def test_inner_loop_section_measures_the_configured_inner_loop(quick_run) -> None:
    """Section 7 reads the paper config's inner loop and reports the weight and NLL change it causes."""
    from fomaml_math.config import load_config

    fo = load_config(ROOT / "config" / "config.yaml")["fomaml"]
    results = quick_run[0]["sections"]["7_inner_loop"]["results"]
    loop = results["config"]
    assert (loop["optimizer"], loop["lr"], loop["num_steps"], loop["batch_size"]) == (
        fo["inner_optimizer"],
        fo["inner_lr"],
        fo["num_inner_steps"],
        fo["inner_batch_size"],
    )
    configured = results["configured"]
    assert configured["optimizer"] == fo["inner_optimizer"] and len(configured["support_losses_per_step"]) == 5
    assert 0 < configured["weight_change_rel"] < 1 and configured["restored_bitwise"]
    change = configured["support_nll_after"] - configured["support_nll_before"]
    assert configured["support_nll_change"] == pytest.approx(change) and change < 0  # it fits its support rows
    assert math.isfinite(configured["held_out_nll_change"])
    contrast = results["contrast (sgd, same lr)"]
    assert contrast["optimizer"] == "sgd" and contrast["weight_change_rel"] < configured["weight_change_rel"]


def test_bf16_section_compares_against_the_float32_reference(quick_run) -> None:
    results = quick_run[0]["sections"]["1_bf16_adaptation"]["results"]
    for loop in ("training", "evaluation"):
        bf16, fp32 = results[loop]["support_losses_bf16"], results[loop]["support_losses_fp32"]
        assert len(bf16) == len(fp32) == results["inner_steps"] == 5
        assert all(b < a for a, b in itertools.pairwise(bf16))  # SGD on a repeated batch: loss falls
        assert max(abs(a - b) for a, b in zip(bf16, fp32, strict=True)) == pytest.approx(results[loop]["max_loss_gap"])
        assert 0 < results[loop]["update_rel_error"] <= 0.05  # bf16 differs from fp32, but only by rounding
    names = [c["name"] for c in quick_run[0]["sections"]["1_bf16_adaptation"]["checks"]]
    assert sum("restore bitwise" in n for n in names) == 3


def test_meta_step_section_reports_the_targets_from_its_own_numbers(quick_run) -> None:
    section = quick_run[0]["sections"]["2_meta_step_vs_sft"]
    phases = section["results"]["phases"]
    expected = {f"{k} (gc {g})" for k in ("ours/cpu", "bare", "sft") for g in ("on", "off")}
    assert expected | {"seed (gc on)", "ours/same (gc on)"} == set(phases)
    model = section["results"]["model"]
    weights = model["weight_bytes_fp32"]
    assert weights == 4 * model["parameters"]
    # 6 N s + 6 L H d s^2 per row of s tokens, for meta_batch x (inner_steps + 1) batches of 2 full rows.
    shape = section["results"]["meta_step_shape"]
    s, rows = shape["tokens_per_row"], shape["rows_per_batch"]
    per_row = 6 * model["matmul_parameters_per_token"] * s
    per_row += 6 * model["num_hidden_layers"] * model["num_attention_heads"] * model["head_dim"] * s * s
    passes = shape["tasks"] * (shape["inner_steps"] + 1)
    assert shape["model_tflop"] * 1e12 == pytest.approx(passes * rows * per_row)
    assert shape["tokens"] == passes * rows * s
    targets = {t["name"]: t for t in section["targets"]}
    assert set(targets) == {"P1", "P2 (cpu)", "P2 (same)", "P3 time", "P3 memory"}
    p1 = phases["ours/cpu (gc on)"]["median_s"] / phases["bare (gc on)"]["median_s"]
    assert targets["P1"]["value"] == pytest.approx(p1)
    p2 = (phases["ours/same (gc on)"]["extra_bytes"] - phases["sft (gc on)"]["extra_bytes"]) / weights
    assert targets["P2 (same)"]["value"] == pytest.approx(p2)
    # "same" keeps a full fp32 copy of the weights resident: at least one parameter-byte more than SFT.
    assert phases["ours/same (gc on)"]["resident_snapshot_bytes"] == weights and p2 >= 1.0
    for t in targets.values():
        assert t["passed"] == (t["value"] <= t["limit"])
        assert f"- {t['name']}: {t['value']:.3f} (target <= {t['limit']})" in quick_run[1]


def test_estimate_fsdp_and_slots_sections(quick_run) -> None:
    sections = quick_run[0]["sections"]
    estimate = sections["3_estimate_4b"]["results"]
    assert estimate["qwen3_4b"]["parameters"] == 4_022_468_096  # Qwen3-4B's published 4.0B, from the shipped shape
    assert estimate["qwen3_4b"]["meta_step_rows"] == 96
    hours = estimate["projection"]["4 x A100 (312 TFLOP/s datasheet), MFU goal 40%, 625 tokens/row"]
    flop = estimate["qwen3_4b"]["meta_step_model_pflop"]["625 tokens/row"] * 1e15
    assert hours["s_per_meta_step"] == pytest.approx(flop / (4 * 312e12 * 0.4))
    assert hours["hours_for_5000"] == pytest.approx(5000 * hours["s_per_meta_step"] / 3600)
    stand_in = estimate["stand_in_run (tiny shape, CPU)"]  # the GPU-only 4B run's code, on the tiny shape
    assert len(stand_in["meta_step_s"]) == 1 and len(stand_in["query_losses"]) == 4
    assert all(math.isfinite(x) for x in stand_in["query_losses"])
    fsdp = sections["5_fsdp2_single"]
    assert fsdp["results"]["sharded_parameter_type"] == "DTensor"
    assert all(c["passed"] for c in fsdp["checks"]) and len(fsdp["checks"]) == 5
    assert math.isfinite(fsdp["results"]["meta_step_grad_norm"])
    generation = sections["4_generation"]["results"]["batches"]
    assert set(generation) == {"1", "8", "32", "64"}
    assert all(0 < b["generated_tokens"] <= int(n) * 8 for n, b in generation.items())
    slots = [c["value"] for c in sections["6_slot_allocator"]["checks"]]
    assert slots[0] == {"cvd": "0"} and slots[1] == {"cvd": "1"}
