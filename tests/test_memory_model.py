"""The memory model (fomaml_math.memory) against torch's allocations on the CPU, part by part, within 15%.

Measured here, for scaled Qwen3 shapes in float32: weights, gradients (accumulated in place over micro-batches),
Adam's moments, the decoder's saved activations with and without checkpointing (the tensors autograd keeps, by
storage), and the logits-and-loss peak of the backward's start (torch.profiler's allocation timeline).
Not measurable on a CPU (docs/gpu.md): autocast's weight casts and half-precision activations (autocast is off on
the CPU in the evaluation), GPU attention kernels' workspaces, the recomputed layer under checkpointing, the KV
cache's bf16 layout, the vLLM engine and its sleep mode; bench/gpu_check.py's evaluation section measures the peak.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from fomaml_math import memory
from fomaml_math.adapt import MicroBatches, _Adam, adapted, trainable_parameters
from fomaml_math.architecture import parameter_count
from fomaml_math.batching import SFTBatch, sft_loss
from fomaml_math.training.optim import enable_gradient_checkpointing

SHAPES = [  # scaled Qwen3 shapes: (hidden, intermediate, layers, heads, kv heads, head_dim, vocab)
    (128, 352, 2, 8, 2, 32, 1000),
    (256, 704, 3, 8, 4, 32, 3000),
    (192, 512, 2, 6, 2, 64, 5000),
]


def _model(shape: tuple[int, ...], tied: bool = True) -> tuple[torch.nn.Module, memory.Shape]:
    h, i, layers, heads, kv, d, vocab = shape
    arch = {"hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": d, "vocab_size": vocab, "tie_word_embeddings": tied}  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**arch, attn_implementation="sdpa")).eval()
    return model, memory.Shape.of(arch, parameter_count(arch))


def _batch(rows: int, tokens: int, vocab: int, prompt: int = 4) -> SFTBatch:
    ids = torch.randint(0, vocab, (rows, tokens))
    labels = ids.clone()
    labels[:, :prompt] = -100
    return SFTBatch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``fn`` (parameters excluded)."""
    params: set[int] = set()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    def run(model: torch.nn.Module) -> None:
        params.update(p.untyped_storage().data_ptr() for p in model.parameters())
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()

    return run, seen  # type: ignore[return-value]


def _peak_above_start(fn) -> int:
    """Peak of the CPU allocations during ``fn`` above its start, from the profiler's per-op self memory."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def _close(measured: float, estimated: float) -> None:
    assert estimated == pytest.approx(measured, rel=0.15), (measured, estimated)


@pytest.mark.parametrize("shape", SHAPES)
def test_static_parts_weights_gradients_adam(shape: tuple[int, ...]) -> None:
    model, s = _model(shape)
    params = trainable_parameters(model)
    _close(sum(p.numel() * p.element_size() for p in params), 4 * s.params)
    batch = _batch(2, 24, s.vocab)
    micro = MicroBatches([batch, _batch(2, 24, s.vocab)])
    adam = _Adam(params, 1e-3)
    _close(sum(t.numel() * t.element_size() for t in adam.m + adam.v), 8 * s.params)
    # in place: one weight-sized gradient buffer, measured as the .grad bytes alive during a 2-micro-batch step
    loss_fn_calls: list[int] = []

    def loss_fn(m: torch.nn.Module, b: SFTBatch):
        loss_fn_calls.append(sum(p.grad.numel() * 4 for p in params if p.grad is not None))
        return sft_loss(m, b)

    with adapted(model, [micro], inner_lr=1e-3, num_steps=1, loss_fn=loss_fn):
        pass
    measured = loss_fn_calls[1]  # before the second micro-batch: the first one's gradients, in .grad
    _close(measured, 4 * s.params)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("rows", "tokens"), [(1, 32), (2, 48), (4, 20)])
def test_saved_activations_with_and_without_checkpointing(shape: tuple[int, ...], rows: int, tokens: int) -> None:
    model, s = _model(shape)
    batch = _batch(rows, tokens, s.vocab)
    run, seen = _saved_bytes(lambda: model.model(input_ids=batch.input_ids, use_cache=False))
    run(model)
    _close(sum(seen.values()), memory.activation_bytes(s, rows, tokens, checkpointing=False, half=False))
    enable_gradient_checkpointing(model)
    model.train()  # checkpointing acts (no dropout in these configs)
    run, seen = _saved_bytes(lambda: model.model(input_ids=batch.input_ids, use_cache=False))
    run(model)
    # what checkpointing keeps: each layer's input (the recomputed layer is a GPU-check measurement)
    _close(sum(seen.values()), rows * tokens * (s.layers * s.hidden * 4 + 2 * s.hidden * 4))


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_and_loss_peak(shape: tuple[int, ...]) -> None:
    """The whole loss's part alone (decoder frozen): log-softmax and its gradient at the backward's start.  The
    chunked loss's part is not validated here: at these shapes the output layer's weight-gradient transient
    dominates it (docs/gpu.md)."""
    model, s = _model(shape, tied=False)  # untied: only the output layer trains, the decoder is frozen
    for p in model.model.parameters():
        p.requires_grad_(False)
    rows, tokens = 4, 64
    batch = _batch(rows, tokens, s.vocab)
    targets = rows * (tokens - 1 - 3)

    def step() -> None:
        loss, _ = sft_loss(model, batch)
        loss.backward()

    step()  # allocates the output layer's .grad outside the measurement
    measured = _peak_above_start(step)
    _close(measured, memory.logits_bytes(s, targets, None, half=False))


def test_config_check_refuses_a_card_too_small_for_the_paper_config() -> None:
    """The paper config fits a 79 GiB card within 90% on its backend; on a 40 GiB card the check refuses it in one
    line naming a job kind, its estimate and the setting."""
    import copy

    import yaml

    from fomaml_math.config import REPO_ROOT, ConfigError, validate_config

    paper = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    checked = validate_config(copy.deepcopy(paper))
    from fomaml_math.plan import architecture

    arch = architecture(checked)
    section = memory.summary(checked, memory.Shape.of(arch, parameter_count(arch)))
    hf = [r for r in section["memory_parts_gib"] if r["backend"] == "hf"]
    assert max(r["total"] for r in hf) <= memory.MARGIN * 79
    small = copy.deepcopy(paper)
    small["compute"]["gpu_memory_gib"] = 40
    with pytest.raises(
        ConfigError, match=r"^config error at compute\.gpu_memory_gib: \w.* needs about [\d.]+ GiB"
    ) as e:
        validate_config(small)
    assert "\n" not in str(e.value) and "change " in str(e.value)


def test_the_card_follows_compute_gpu_unless_gpu_memory_gib_is_set() -> None:
    """compute.gpu_memory_gib null: the catalog card's memory as torch reports it, rounded down to a whole GiB (an
    80 GB card's 79.2 -> 79, the old default); a number overrides it; an unknown card is a one-line error."""
    from fomaml_math import hardware
    from fomaml_math.config import ConfigError

    assert hardware.usable_memory_gib({"gpu": "a100-80gb", "gpu_memory_gib": None}) == 79.0
    assert hardware.usable_memory_gib({"gpu": "a100-40gb"}) == 39.0  # torch reports 39.4
    assert hardware.usable_memory_gib({"gpu": "h200", "gpu_memory_gib": None}) == 139.0  # 139.8
    assert hardware.usable_memory_gib({}) == 79.0  # compute.gpu's default, the A100 80 GB
    assert hardware.usable_memory_gib({"gpu": "a100-40gb", "gpu_memory_gib": 60}) == 60.0
    with pytest.raises(ConfigError, match=r"^compute\.gpu: unknown GPU 'v100'; expected one of a100-40gb, "):
        hardware.usable_memory_gib({"gpu": "v100"})


def test_the_paper_config_on_a_40_gb_card_is_refused_naming_compute_gpu(tmp_path) -> None:
    """The paper config with compute.gpu a100-40gb and no gpu_memory_gib: its evaluation (67.8 GiB) does not fit
    the 39 GiB card, refused in one line naming compute.gpu; an explicit gpu_memory_gib 79 overrides the card; an
    h200 gives plan a 139 GiB card."""
    import copy

    import yaml

    from fomaml_math.config import REPO_ROOT, ConfigError, validate_config
    from fomaml_math.plan import Assumptions, build_plan

    paper = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    small = copy.deepcopy(paper)
    small["compute"]["gpu"] = "a100-40gb"
    small["compute"].pop("gpu_memory_gib", None)
    with pytest.raises(ConfigError) as e:
        validate_config(copy.deepcopy(small))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("config error at compute.gpu: evaluate (hf, adaptation) needs about 67.8 GiB per GPU")
    assert "more than the card's 39;" in message
    small["compute"]["gpu_memory_gib"] = 79
    assert validate_config(small)["compute"]["gpu_memory_gib"] == 79
    large = copy.deepcopy(paper)
    large["compute"]["gpu"] = "h200"
    large["compute"]["gpu_memory_gib"] = None
    assert build_plan(validate_config(large), Assumptions(), tmp_path / "no-split-data")["gpu_memory_gib"] == 139.0


def test_plan_json_carries_the_memory_section(tmp_path) -> None:
    """``plan --json``'s memory numbers: memory_gib per job kind (the worst over backends), the card, host RAM and the
    per-part rows, each row's total the sum of its parts."""
    from fomaml_math.config import REPO_ROOT, load_config
    from fomaml_math.plan import Assumptions, build_plan

    config = load_config(REPO_ROOT / "config" / "config.yaml")
    plan = build_plan(config, Assumptions(), tmp_path / "no-split-data")
    assert plan["gpu_memory_gib"] == 79.0
    kinds = {"evaluate", "negative control", "meta-training inner loop row", "calibrate", "train fomaml", "train sft"}
    assert set(plan["memory_gib"]) == kinds
    parts = ("weights", "gradients", "optimizer state", "snapshot", "weight casts", "activations", "logits and loss",
             "kv cache", "vllm engine")  # fmt: skip
    for row in plan["memory_parts_gib"]:
        assert row["total"] == pytest.approx(sum(row.get(p, 0.0) for p in parts), abs=0.05)
        assert plan["memory_gib"][row["job"]] >= row["total"] - 1e-9
    assert 0 < plan["host_ram_gib_per_node"] < 1024


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_decoder_backward_peak(shape: tuple[int, ...], checkpointing: bool) -> None:
    """The decoder's forward + backward peak above its start (torch.profiler's timeline): the saved activations
    without checkpointing; each layer's input plus one recomputed layer with it."""
    model, s = _model(shape)
    if checkpointing:
        enable_gradient_checkpointing(model)
        model.train()
    model.model.embed_tokens.weight.requires_grad_(False)  # no V x h embedding gradient in this measurement
    rows, tokens = 4, 64
    batch = _batch(rows, tokens, s.vocab)

    def step() -> None:
        model.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state.sum().backward()

    step()  # the layers' .grad exist before the measurement, as from an adaptation's second micro-batch on
    _close(_peak_above_start(step), memory.activation_bytes(s, rows, tokens, checkpointing=checkpointing, half=False))


@pytest.mark.parametrize(
    ("key", "value", "job", "setting"),
    [
        ("compute.loss_chunk_tokens", None, "evaluate (hf, adaptation)", "compute.loss_chunk_tokens"),
        ("calibration.gen_batch_size", None, "calibrate (hf, generation)", "calibration.gen_batch_size"),
        ("eval.backend", "vllm", "evaluate (vllm, adaptation)", "eval.vllm.sleep"),
    ],
)
def test_each_paper_lever_is_needed_and_named_when_removed(key: str, value: object, job: str, setting: str) -> None:
    """Without one of the paper config's levers a job no longer fits the 79 GiB card (the vLLM engine awake beside
    the adaptation: eval.vllm.sleep), and the refusal names the setting that governs the largest part."""
    import copy

    import yaml

    from fomaml_math.config import REPO_ROOT, ConfigError, validate_config

    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    changed = copy.deepcopy(config)
    section, name = key.split(".")
    changed[section][name] = value
    changed["eval"]["vllm"]["sleep"] = False  # the engine awake (the default)
    with pytest.raises(ConfigError, match=rf"{re.escape(job)} needs about [\d.]+ GiB .* change {re.escape(setting)}"):
        validate_config(changed)


def test_a_config_the_model_cannot_judge_gets_a_warning_not_a_refusal(capsys) -> None:
    """In-context prompts have no length setting (k worked examples of assumed length): over the card is a warning.
    A model with no architecture offline is not estimated at all, with a warning."""
    import copy

    import yaml

    from fomaml_math.config import REPO_ROOT, validate_config

    paper = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    in_context = copy.deepcopy(paper)
    in_context["eval"]["mode"] = "in_context"
    in_context["calibration"]["enabled"] = False
    for experiment in in_context["experiments"]:
        experiment.pop("meta_val", None)
    validate_config(in_context)
    assert "(in_context prompts of assumed length)" in capsys.readouterr().err
    unknown = copy.deepcopy(paper)
    unknown["model"]["name_or_path"] = "someone/unknown-model"
    unknown["model"]["revision"] = None
    validate_config(unknown)
    assert "warning: memory: cannot estimate GPU memory for this model" in capsys.readouterr().err
