"""The configured model's layer shape and parameter count, offline (no hub access, no torch).

Light on purpose: the config check (GPU memory) and ``plan`` both read it, and every Snakemake start runs the
config check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fomaml_math.errors import ConfigError

RESOURCES = Path(__file__).resolve().parent / "resources"
PAPER_MODELS = {"Qwen/Qwen3-4B-Instruct-2507": RESOURCES / "qwen3_4b_instruct_2507.json"}


def architecture(config: Mapping[str, Any]) -> dict[str, int]:
    """Layer shape of the configured model (tiny mapping, local folder, or a shipped paper model)."""
    model = config["model"]
    if model["tiny"]:
        return {**model["tiny"], "tie_word_embeddings": True}
    name = str(model["name_or_path"])
    local = Path(name) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if name in PAPER_MODELS:
        return json.loads(PAPER_MODELS[name].read_text())
    raise ConfigError(f"model.name_or_path: no architecture known offline for {name!r} (give a local folder)")


def parameter_count(arch: Mapping[str, Any]) -> int:
    """Parameters of a Qwen3-style decoder (GQA attention with q/k norms, SwiGLU MLP, RMSNorms)."""
    hidden, layers = int(arch["hidden_size"]), int(arch["num_hidden_layers"])
    heads, kv_heads = int(arch["num_attention_heads"]), int(arch["num_key_value_heads"])
    head_dim = int(arch.get("head_dim") or hidden // heads)
    inter, vocab = int(arch["intermediate_size"]), int(arch["vocab_size"])
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 2 * head_dim
    mlp = 3 * hidden * inter
    per_layer = attention + mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if arch.get("tie_word_embeddings", True) else 2)
    return layers * per_layer + embeddings + hidden
