"""Shared fixtures: offline environment, the real MATH sample, configs and a tiny model."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

# Tests never touch the network: the hub code paths are exercised on local copies.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
MATH_SAMPLE = Path(os.environ.get("MATH_SAMPLE_DIR", REPO_ROOT.parent / "shared" / "data" / "math-sample"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def math_sample_dir() -> Path:
    """The real 1,000-problem MATH sample (archive layout); tests using it skip when it is absent."""
    if not (MATH_SAMPLE / "MATH").is_dir():
        pytest.skip(f"MATH sample not found at {MATH_SAMPLE} (set MATH_SAMPLE_DIR)")
    return MATH_SAMPLE


@pytest.fixture(scope="session")
def _demo_config_cached() -> dict:
    from fomaml_math.config import load_config

    return load_config(REPO_ROOT / "config" / "demo.yaml")


@pytest.fixture()
def demo_config(_demo_config_cached: dict) -> dict:
    """A fresh, validated copy of config/demo.yaml that a test may modify."""
    return copy.deepcopy(_demo_config_cached)
