"""The tiny Qwen3 model: built offline, saved as a Hugging Face folder, loaded like a hub model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fomaml_math.errors import ConfigError
from fomaml_math.modeling import IM_END, build_tiny_model, load_model_and_tokenizer
from fomaml_math.tiny_model import main
from tests.fixtures_tiny import TINY, corpus, make_task_files, shared_workspace, tiny_model_and_tokenizer


def test_saved_tiny_model_loads_like_a_hub_model() -> None:
    model_dir = shared_workspace() / "model"
    model, tokenizer = load_model_and_tokenizer(model_dir)
    reference, _ = tiny_model_and_tokenizer(seed=0)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.dtype == torch.float32
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None and tokenizer.eos_token == IM_END
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute $2 + 3$."}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nCompute $2 + 3$.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.tokenize("123") == ["1", "2", "3"]  # digits are single tokens, as in Qwen


def test_build_is_deterministic_and_seeded() -> None:
    a, tok_a = build_tiny_model(TINY, corpus(), seed=3)
    b, tok_b = build_tiny_model(TINY, corpus(), seed=3)
    c, _ = build_tiny_model(TINY, corpus(), seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert tok_a.backend_tokenizer.to_str() == tok_b.backend_tokenizer.to_str()
    assert a.config.vocab_size == TINY["vocab_size"] >= len(tok_a)


def test_too_small_vocabulary_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.tiny\.vocab_size"):
        build_tiny_model({**TINY, "vocab_size": 10}, corpus(), seed=0)


def test_small_vocabulary_falls_back_to_characters_and_round_trips(tmp_path: Path) -> None:
    from fomaml_math.batching import make_sft_batch
    from fomaml_math.modeling import save_model

    model, tokenizer = build_tiny_model({**TINY, "vocab_size": 128}, corpus(), seed=0)
    assert model.config.vocab_size == 128 >= len(tokenizer) and tokenizer.unk_token == "<unk>"
    save_model(model, tokenizer, tmp_path / "m")
    _, loaded = load_model_and_tokenizer(tmp_path / "m")
    example = {"problem": "Compute $12 + 3$.", "solution": "We have $12 + 3 = 15$, so $\\boxed{15}$."}
    batch = make_sft_batch(loaded, [example], 128)
    targets = batch.labels[0][batch.labels[0] != -100]
    assert loaded.decode(targets) == example["solution"] + IM_END
    assert loaded.decode(batch.input_ids[0]).startswith("<|im_start|>user\nCompute $12 + 3$.<|im_end|>")
    assert loaded.tokenize("x = 12") == tokenizer.tokenize("x = 12")


def test_missing_local_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.name_or_path"):
        load_model_and_tokenizer(tmp_path / "nowhere" / "model")


def test_main_builds_a_loadable_folder(tmp_path: Path) -> None:
    tasks = make_task_files(tmp_path / "tasks")
    settings = {"seed": 1, "tiny": TINY, "max_seq_len": 64, "instruction": ""}
    out = tmp_path / "tiny-base"
    assert main(["--settings", json.dumps(settings), "--tasks-dir", str(tasks), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    info = json.loads((out / "build_info.json").read_text())
    assert info["settings"] == settings and info["num_texts"] > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == TINY["num_hidden_layers"]


def test_main_without_tiny_settings_fails_clearly(tmp_path: Path) -> None:
    settings = {"seed": 1, "tiny": None, "max_seq_len": 64, "instruction": ""}
    with pytest.raises(ConfigError, match=r"model\.tiny"):
        main(["--settings", json.dumps(settings), "--tasks-dir", str(tmp_path), "--output", str(tmp_path / "m")])


def test_unreachable_hub_model_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model\.name_or_path: cannot load 'nobody/no-such-model-x1'"):
        load_model_and_tokenizer("nobody/no-such-model-x1")
