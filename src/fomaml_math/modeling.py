"""Model loading (hub id or local folder), saving, and the offline tiny Qwen3 model and its tokenizer.

The same :func:`load_model_and_tokenizer` serves Qwen3-4B-Instruct from the hub and the tiny model
built here, because the tiny model is saved as an ordinary Hugging Face folder (``save_pretrained``):
a Qwen3 config, safetensors weights, and a byte-level BPE tokenizer with a Qwen-style chat template.
The stage that builds it from the task files is :mod:`fomaml_math.tiny_model`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from fomaml_math.errors import ConfigError
from fomaml_math.io import atomic_dir

# Qwen's control tokens; <|im_end|> ends every turn and is the eos token of the instruct models.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "<unk>"  # only in the character-level variant (vocabularies below 259)
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END)
BYTE_ALPHABET_SIZE = 256

# The Qwen chat format without system prompt, tools or thinking blocks; add_generation_prompt opens
# the assistant turn for generation.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY_KEYS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def load_model_and_tokenizer(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer with the Auto classes (hub id or local folder).

    The tokenizer pads on the left (for batched generation) and always has a pad token; training
    batches are padded by :mod:`fomaml_math.batching` itself and do not depend on ``padding_side``.
    """
    name = str(name_or_path)
    if _looks_like_path(name) and not Path(name).is_dir():
        raise ConfigError(f"model.name_or_path: {name} is not a model folder (build or download it first)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype
        )
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.name_or_path: cannot load {name!r} ({first})") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Instruct models without a pad token: padding positions are masked out, so eos is a safe filler.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ConfigError(f"model.name_or_path: the tokenizer of {name!r} has neither a pad, eos nor unk token")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"model.name_or_path: the tokenizer of {name!r} has no chat template")
    return model, tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, model_max_length: int) -> Any:
    """A BPE tokenizer trained on ``texts``, with Qwen's special tokens and chat template; digits are split.

    With ``vocab_size`` >= 259 it is byte-level (every string encodes, as Qwen's); a smaller vocabulary
    cannot hold the 256 bytes, so it becomes character-level BPE over the corpus's most frequent
    characters, with ``<unk>`` for the rest and ``▁`` standing for spaces.
    """
    # The chat scaffolding's words must be in the vocabulary too.
    corpus = [*texts, "user\n", "assistant\n", "system\n"]
    byte_level = vocab_size >= BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    specials = list(SPECIAL_TOKENS) if byte_level else [*SPECIAL_TOKENS, UNK_TOKEN]
    if vocab_size < len(specials) + 16:
        raise ConfigError(f"model.tiny.vocab_size: {vocab_size} is too small (>= {len(specials) + 16})")
    # Single digits, as in Qwen: numbers are spelled digit by digit, which arithmetic needs.
    digits = pre_tokenizers.Digits(individual_digits=True)
    if byte_level:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
        backend.decoder = decoders.ByteLevel()
        alphabet = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
    else:
        backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.Metaspace(prepend_scheme="never")])
        backend.decoder = decoders.Metaspace(prepend_scheme="never")
        alphabet = {"limit_alphabet": vocab_size - len(specials)}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False, **alphabet)
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None if byte_level else UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",
    )


def build_tiny_model(
    tiny: dict[str, int], texts: Iterable[str], *, seed: int, max_seq_len: int = 128
) -> tuple[Any, Any]:
    """A randomly initialised (seeded) tiny Qwen3 causal LM and a BPE tokenizer trained on ``texts``.

    ``tiny`` holds the keys of ``model.tiny`` in the config (:data:`TINY_KEYS`).
    """
    missing = [k for k in TINY_KEYS if k not in tiny]
    if missing:
        raise ConfigError(f"model.tiny: missing {missing}")
    positions = max(2048, max_seq_len)
    tokenizer = train_tokenizer(texts, int(tiny["vocab_size"]), model_max_length=positions)
    config = Qwen3Config(
        vocab_size=max(int(tiny["vocab_size"]), len(tokenizer)),
        hidden_size=int(tiny["hidden_size"]),
        intermediate_size=int(tiny["intermediate_size"]),
        num_hidden_layers=int(tiny["num_hidden_layers"]),
        num_attention_heads=int(tiny["num_attention_heads"]),
        num_key_value_heads=int(tiny["num_key_value_heads"]),
        head_dim=int(tiny["head_dim"]),
        max_position_embeddings=positions,
        tie_word_embeddings=True,  # as in Qwen3-4B, so the tied-weight code paths are exercised offline
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=True,
        dtype="float32",
    )
    # A private RNG: the build is reproducible and leaves the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model, tokenizer


def save_model(model: Any, tokenizer: Any, output: str | Path, *, extra: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` model and tokenizer into ``output`` atomically (safetensors weights)."""
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            (tmp / "build_info.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
