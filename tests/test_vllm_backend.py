"""eval.backend vllm: token-identical to the HF loop in float32 on CPU, back at the initialisation after each
adaptation, one engine per evaluation job, and a weight guard that stops a stale engine. Runs in the vLLM
environment (`make test-vllm`, which CI runs); skips elsewhere."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the backend needs the engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny models need little
try:
    import vllm
except Exception as exc:  # ImportError, or a broken install ("operator torchvision::nms does not exist")
    pytest.skip(f"vllm is not importable ({type(exc).__name__}): run `make test-vllm`", allow_module_level=True)

import pandas as pd
import torch

from fomaml_math.config import stage_settings
from fomaml_math.errors import ConfigError
from fomaml_math.evaluation import fewshot
from fomaml_math.evaluation.generate import HFBackend, encode_prompts, stop_token_ids
from fomaml_math.evaluation.grade import GradeResult, grade_unlimited
from fomaml_math.evaluation.job import JobModel
from fomaml_math.evaluation.prompts import problem_messages
from fomaml_math.evaluation.repeat import EvalContext, evaluate_task_repeat
from fomaml_math.evaluation.settings import EvalSettings
from fomaml_math.evaluation.tasks import load_task
from fomaml_math.evaluation.vllm_backend import StaleEngineError, VLLMBackend, engine_checksum, pushed_checksum
from fomaml_math.kshot import AdaptSpec
from fomaml_math.modeling import build_tiny_model, load_model_and_tokenizer, save_model
from tests.fixtures_tiny import corpus, make_task_files

# A Qwen3 shape the CPU attention supports (head sizes 32, 64, 80, ...; the demo's 16 is not among them).
TINY_64: dict[str, int] = {
    "vocab_size": 384,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
}
PROMPTS = [f"Compute ${i + 2} + {i * 7 % 11 + 2}$." + " Then double it." * (i % 4) for i in range(12)]


class InlineGrader:
    def grade_many(self, golds: list[str], outputs: list[str]) -> list[GradeResult]:
        return [grade_unlimited(g, o) for g, o in zip(golds, outputs, strict=True)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Task files and a saved tiny model with larger random weights (freshly built it repeats one token)."""
    root = tmp_path_factory.mktemp("vllm")
    make_task_files(root / "tasks")
    model, tokenizer = build_tiny_model(TINY_64, corpus(), seed=0, max_seq_len=128)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    save_model(model, tokenizer, root / "model")
    return {"tasks": root / "tasks", "model": root / "model"}


@pytest.fixture(scope="module")
def loaded(workspace: dict[str, Path]) -> tuple[Any, Any, VLLMBackend]:
    """The HF model (float32, eval mode) and one engine on the same folder, shared by the tests below."""
    model, tokenizer = load_model_and_tokenizer(workspace["model"])
    model.eval()
    backend = VLLMBackend(str(workspace["model"]), tokenizer=tokenizer, model=model, context_limit=2048)
    yield model, tokenizer, backend
    backend.close()


def test_greedy_outputs_equal_hf_token_for_token(loaded: tuple[Any, Any, VLLMBackend]) -> None:
    model, tokenizer, backend = loaded
    prompt_ids = encode_prompts(tokenizer, PROMPTS)
    assert backend.stop == stop_token_ids(tokenizer, model)
    for max_new_tokens in (1, 24):
        hf = HFBackend().generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=5)
        ours = backend.generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=5)
        assert ours.token_ids == hf.token_ids
        assert ours.texts == hf.texts
        assert ours.num_tokens == hf.num_tokens and ours.prompt_tokens == hf.prompt_tokens
        assert ours.truncated == hf.truncated
    # Not a trivial agreement: some answers stop at a stop token, others run into max_new_tokens.
    assert any(hf.truncated) and not all(hf.truncated)
    assert all(ids[-1] in backend.stop for ids, cut in zip(hf.token_ids, hf.truncated, strict=True) if not cut)
    assert len({tuple(ids) for ids in hf.token_ids}) > 3


def _context(model: Any, tokenizer: Any, settings: dict[str, Any], shots: int, backend: Any) -> EvalContext:
    # The demo's own adaptation (Adam, eval.inner_lr 3e-3; 2 steps here): it lowers the support loss and changes
    # every answer of this model (at lr 1e-4 it changes two of four), so the k-shot comparisons below have teeth.
    typed = EvalSettings.from_stage(settings)
    return EvalContext(
        job=JobModel(model, tokenizer, torch.device("cpu"), "no"),
        init="fomaml",
        shots=shots,
        settings=typed,
        spec=AdaptSpec.from_choice(typed.adaptation, typed.inner_batch_size),
        context_limit=2048,
        backend=backend,
    )


def _answer_at_6_shots(model: Any, tokenizer: Any, settings: dict[str, Any], backend: Any, task: Any) -> Any:
    """Repeat 1 of ``task`` at 6 shots through ``backend``: the evaluation's own adapt-then-answer."""
    return evaluate_task_repeat(_context(model, tokenizer, settings, 6, backend), task, 1, InlineGrader())


def _where(task: Any) -> str:
    """Where a guard check at 6 shots, repeat 1, says it ran (its error and its record name it)."""
    return f"job fomaml k=6 (default, train seed -1), task {task.name}, repeat 1"


def _engine_logprobs(backend: VLLMBackend, prompt_ids: list[list[int]]) -> list[list[float]]:
    """The engine's log-probabilities of its greedy tokens: equal floats mean equal weights, not just equal argmaxes."""
    params = vllm.SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, detokenize=False)
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    outputs = backend.engine.generate(prompts, params, use_tqdm=False)
    return [[next(iter(step.values())).logprob for step in out.outputs[0].logprobs] for out in outputs]


@pytest.fixture()
def eval_settings(demo_config: dict, workspace: dict[str, Path]) -> dict[str, Any]:
    demo_config["model"]["name_or_path"] = str(workspace["model"])
    demo_config["eval"].update(
        repeats=2, max_test_problems=4, max_new_tokens=12, gen_batch_size=3, inner_batch_size=2, num_inner_steps=2
    )
    return demo_config


def test_engine_is_back_at_the_initialisation_after_k_shots(
    loaded: tuple[Any, Any, VLLMBackend], workspace: dict[str, Path], eval_settings: dict[str, Any]
) -> None:
    model, tokenizer, backend = loaded
    settings = stage_settings(eval_settings, "evaluate")
    task = load_task(workspace["tasks"], "algebra", 4)
    probe = encode_prompts(tokenizer, [problem_messages(p, []) for p in task.test["problem"]])
    logprobs_before = _engine_logprobs(backend, probe)
    updates = backend.weight_updates

    zero, _ = evaluate_task_repeat(_context(model, tokenizer, settings, 0, backend), task, 0, InlineGrader())
    adapted, info = _answer_at_6_shots(model, tokenizer, settings, backend, task)
    again, _ = evaluate_task_repeat(_context(model, tokenizer, settings, 0, backend), task, 0, InlineGrader())

    pd.testing.assert_frame_equal(again, zero)  # exactly the 0-shot outputs again
    assert _engine_logprobs(backend, probe) == logprobs_before  # bitwise: the same floats, not only the same tokens
    assert backend.weight_updates - updates == 2  # adapted weights in, the initialisation back out; none at 0 shots
    # The k-shot answers came from the adapted weights, and equal the HF loop's answers on them.
    assert info["support_loss_after"] < info["support_losses"][1] < info["support_losses"][0]  # adaptation works
    assert (adapted["generated"] != zero["generated"]).any()
    hf_adapted, _ = _answer_at_6_shots(model, tokenizer, settings, HFBackend(), task)
    pd.testing.assert_frame_equal(adapted, hf_adapted)
    hf_zero, _ = evaluate_task_repeat(_context(model, tokenizer, settings, 0, HFBackend()), task, 0, InlineGrader())
    pd.testing.assert_frame_equal(zero, hf_zero)


def _checks(backend: VLLMBackend, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None, list[int]]]:
    """Record every guard check: (when, the checksum it expects, what the worker computed)."""
    seen: list[tuple[str, int | None, list[int]]] = []
    check = backend.check_weights

    def recorded(when: str) -> None:
        seen.append((when, backend.expected, backend.engine.collective_rpc(engine_checksum)))
        check(when)

    monkeypatch.setattr(backend, "check_weights", recorded)
    return seen


def test_the_guard_passes_on_a_correct_reload_of_the_smallest_adaptation(
    loaded: tuple[Any, Any, VLLMBackend],
    workspace: dict[str, Path],
    eval_settings: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, tokenizer, backend = loaded
    eval_settings["eval"].update(inner_lr=1.0e-5, num_inner_steps=5)  # the smallest (lr, steps) of the tuner's grid
    settings = stage_settings(eval_settings, "evaluate")
    task = load_task(workspace["tasks"], "algebra", 4)
    initial = pushed_checksum(model.state_dict().values(), torch.float32)
    checks = _checks(backend, monkeypatch)
    _answer_at_6_shots(model, tokenizer, settings, backend, task)
    where = _where(task)
    assert [when for when, _, _ in checks] == [
        f"after a weight push ({where})",
        f"after a weight push ({where}, restoring the initialisation)",
    ]
    (_, adapted, served_adapted), (_, restored, served_restored) = checks
    assert served_adapted == [adapted] and adapted != initial  # the engine took the adapted weights, and they differ
    assert served_restored == [restored] and restored == initial


def test_the_guard_stops_a_stale_engine(
    loaded: tuple[Any, Any, VLLMBackend],
    workspace: dict[str, Path],
    eval_settings: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, tokenizer, backend = loaded
    settings = stage_settings(eval_settings, "evaluate")
    task = load_task(workspace["tasks"], "algebra", 4)
    rpc = backend.engine.collective_rpc

    def stale(method: Any, *args: Any, **kwargs: Any) -> Any:  # the reload is a no-op: the engine keeps its weights
        return [None] if method == "reload_weights" else rpc(method, *args, **kwargs)

    monkeypatch.setattr(backend.engine, "collective_rpc", stale)
    generate = backend.generate
    answered: list[int] = []
    monkeypatch.setattr(backend, "generate", lambda *a, **k: answered.append(1) or generate(*a, **k))
    where = re.escape(_where(task))
    with pytest.raises(
        StaleEngineError, match=rf"^eval\.backend vllm: .* pushed weights after a weight push \({where}\)"
    ):
        _answer_at_6_shots(model, tokenizer, settings, backend, task)
    assert not answered  # stopped before a single answer came from the stale weights


def test_the_guard_checks_again_after_every_wake_up(
    loaded: tuple[Any, Any, VLLMBackend],
    workspace: dict[str, Path],
    eval_settings: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sleep mode itself is CUDA-only; vLLM's CPU worker takes sleep()/wake_up() as no-ops, so the calls and the
    checks around them run here, and a wake-up that brings back other weights stands in for a faulty restore."""
    model, tokenizer, backend = loaded
    settings = stage_settings(eval_settings, "evaluate")
    task = load_task(workspace["tasks"], "algebra", 4)
    monkeypatch.setattr(backend, "sleeps", True)  # what eval.vllm.sleep: true sets on a GPU
    checks = _checks(backend, monkeypatch)
    slept: list[bool] = []
    sleep = backend.engine.sleep
    monkeypatch.setattr(backend.engine, "sleep", lambda level: slept.append(level == 1) or sleep(level=level))
    _answer_at_6_shots(model, tokenizer, settings, backend, task)
    where = _where(task)
    assert slept == [True] and not backend.asleep  # slept (level 1) while adapting; awake again
    assert [when for when, _, _ in checks][:2] == [f"after a wake-up ({where})", f"after a weight push ({where})"]

    worker = backend.engine.collective_rpc(lambda worker: worker)[0]

    def wake_to_other_weights(tags: Any = None) -> None:
        other = ((name, tensor.detach() + 1e-3) for name, tensor in model.state_dict().items())
        worker.reload_weights(weights_iterator=other, is_checkpoint_format=True)

    monkeypatch.setattr(worker, "wake_up", wake_to_other_weights)
    with pytest.raises(StaleEngineError, match=re.escape(f"pushed weights after a wake-up ({where})")):
        _answer_at_6_shots(model, tokenizer, settings, backend, task)
    assert checks[-1][0].endswith("restoring the initialisation)")  # and the initialisation went back in, checked
    assert checks[-1][2] == [pushed_checksum(model.state_dict().values(), torch.float32)]


def test_sleep_mode_off_cuda_is_a_one_line_config_error(
    loaded: tuple[Any, Any, VLLMBackend], workspace: dict[str, Path]
) -> None:
    model, tokenizer, _ = loaded
    with pytest.raises(ConfigError, match=r"^eval\.vllm\.sleep: vLLM's sleep mode needs a CUDA .*: false$"):
        VLLMBackend(str(workspace["model"]), tokenizer=tokenizer, model=model, settings={"sleep": True})


def test_one_engine_per_evaluation_job(
    workspace: dict[str, Path], eval_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts: list[str] = []
    reloads: list[str] = []

    class CountingLLM(vllm.LLM):  # the real engine, counted
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            starts.append(kwargs["model"])
            super().__init__(*args, **kwargs)

        def collective_rpc(self, method: Any, *args: Any, **kwargs: Any) -> Any:
            reloads.append(getattr(method, "__name__", method))
            return super().collective_rpc(method, *args, **kwargs)

    monkeypatch.setattr(vllm, "LLM", CountingLLM)
    tasks = ["algebra", "geometry"]
    outputs = {}
    for backend in ("hf", "vllm"):
        eval_settings["eval"]["backend"] = backend
        settings = stage_settings(eval_settings, "evaluate")
        out = tmp_path / backend / "shots-3.parquet"
        code = fewshot.main(
            ["--settings", json.dumps(settings), "--init", "sft", "--model", str(workspace["model"]),
             "--tasks-dir", str(workspace["tasks"]), "--tasks", *tasks, "--shots", "3", "--output", str(out),
             "--no-progress"]
        )  # fmt: skip
        assert code == 0
        outputs[backend] = pd.read_parquet(out)
    summary = json.loads((tmp_path / "vllm" / "shots-3.summary.json").read_text())
    assert starts == [str(workspace["model"])]  # one engine for 2 tasks x 2 repeats
    # per (task, repeat): adapted in, initialisation out, each push checked; and one check at the engine's start
    assert reloads == ["engine_checksum"] + ["reload_weights", "engine_checksum"] * (len(tasks) * 2 * 2)
    assert summary["backend"] == "vllm" and summary["rows"] == len(tasks) * 2 * 4
    pd.testing.assert_frame_equal(outputs["vllm"], outputs["hf"])  # the whole table, graded answers included
