"""Resumable training checkpoints: ``<checkpoint-dir>/step-XXXXXXXX/``.

Each checkpoint folder holds ``model.safetensors`` (all weights, fp32 as trained), ``optimizer.pt``,
``scheduler.pt``, ``rng.pt`` (python, numpy and torch generator states of every process) and
``state.json`` (step, settings hash, resume key, cumulative counters; the data samplers are
counter-based, so the step is their position).  It is written to a hidden temporary sibling and
renamed, so a visible ``step-*`` folder is always complete; the oldest ones beyond ``keep`` are
deleted after a new one is written.  The live metrics log is ``<checkpoint-dir>/.metrics.jsonl``.

The resume key (``training.data.resume_key``) covers the settings (minus ``wandb``), the task
files and the base model.  A run resumes only from checkpoints with its own key; checkpoints of
another key (a setting, the data or the base model changed) are deleted with a warning and the
run starts fresh, so "change a setting, rerun" never continues a stale run and never needs a
manual clean-up.  Once a run has written its outputs its checkpoints and best slot are deleted
(``remove_resumable``) unless ``compute.keep_finished_checkpoints`` is true: at 4B each is 48 GB.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fomaml_math.errors import ConfigError
from fomaml_math.io import atomic_dir

STEP_PREFIX = "step-"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(STEP_PREFIX) and (path / "state.json").is_file():
            try:
                found.append((int(path.name[len(STEP_PREFIX) :]), path))
            except ValueError:
                continue
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _dedup_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier key (tied embeddings); return the alias map."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous().cpu()
    return unique, aliases


def _model_state(runtime: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """Full model state dict on the main process (collective under FSDP)."""
    if runtime.mode == "fsdp":
        # lazy: ~1.3 s to import, FSDP runs only
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if runtime.is_main else None
    return model.state_dict() if runtime.is_main else None


def _optimizer_state(runtime: Any, model: Any, optimizer: Any) -> dict[str, Any] | None:
    if runtime.mode == "fsdp":
        # lazy: ~1.3 s to import, FSDP runs only
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        state = get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if runtime.is_main else None
    return optimizer.state_dict() if runtime.is_main else None


def rng_state() -> dict[str, Any]:
    """The RNG states in plain types and tensors only, so ``torch.load(weights_only=True)`` reads them."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples; a round trip through ``torch.load`` may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def save_checkpoint(
    root: Path,
    step: int,
    *,
    runtime: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically (every process must call this), then prune to ``keep``."""
    weights = _model_state(runtime, model)
    optim = _optimizer_state(runtime, model, optimizer)
    rngs = runtime.gather_objects(rng_state())
    target = root / f"{STEP_PREFIX}{step:08d}"
    if runtime.is_main:
        assert weights is not None and optim is not None
        unique, aliases = _dedup_state(weights)
        with atomic_dir(target) as tmp:
            save_file(unique, str(tmp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return target


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def remove_partial(root: Path) -> None:
    """Delete temporary folders a killed job left mid-write (``.step-*.tmp``); they are never read."""
    if root.is_dir():
        for path in root.glob(f".{STEP_PREFIX}*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def discard_stale(root: Path, key: str, *, is_main: bool) -> list[Path]:
    """Delete checkpoints under ``root`` written for another resume key (main process); return them."""
    stale = [path for _, path in list_checkpoints(root) if read_state(path).get("resume_key") != key]
    if stale and is_main:
        old = read_state(stale[-1])
        print(
            f"warning: {root} holds checkpoints of other settings/data/model (resume key {old.get('resume_key')}, "
            f"settings hash {old.get('settings_hash')}); starting fresh and deleting {len(stale)} of them",
            file=sys.stderr,
        )
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
    return stale


BEST_DIR = "best"  # the best-so-far weights by the dev criterion: outside the keep_checkpoints rotation


def remove_resumable(root: Path) -> list[Path]:
    """Delete the resumable state of a finished run (``step-*`` checkpoints and the best slot; main process only).

    They exist only to resume: the run's outputs hold its weights.  Candidate folders stay: the outputs'
    ``candidates/`` are hard links to them, so they cost no disk of their own.
    """
    removed = [path for _, path in list_checkpoints(root)]
    if (root / BEST_DIR).is_dir():
        removed.append(root / BEST_DIR)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def save_best(root: Path, step: int, *, runtime: Any, model: Any, state: dict[str, Any]) -> Path:
    """Write the current weights to ``<root>/best`` atomically (every process must call this)."""
    weights = _model_state(runtime, model)
    target = root / BEST_DIR
    if runtime.is_main:
        assert weights is not None
        unique, aliases = _dedup_state(weights)
        with atomic_dir(target) as tmp:
            save_file(unique, str(tmp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
    runtime.barrier()
    return target


def read_best(root: Path, key: str) -> dict[str, Any] | None:
    """The best slot's state if it exists and was written under resume key ``key`` (else None)."""
    path = root / BEST_DIR / "state.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    return state if state.get("resume_key") == key else None


def _load_weights(path: Path, *, runtime: Any, model: Any) -> None:
    """Load ``model.safetensors`` of a checkpoint or best slot into ``model`` (FSDP: broadcast from rank 0)."""
    weights: dict[str, torch.Tensor] = {}
    if runtime.is_main or runtime.mode != "fsdp":
        with safe_open(str(path / "model.safetensors"), framework="pt") as reader:
            aliases = json.loads((reader.metadata() or {}).get("aliases", "{}"))
        weights = load_file(str(path / "model.safetensors"))
        for name, source in aliases.items():
            weights[name] = weights[source]
    if runtime.mode == "fsdp":
        # lazy: ~1.3 s to import, FSDP runs only
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        device = next(model.parameters()).device
        model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=True)


def load_best(root: Path, *, runtime: Any, model: Any) -> None:
    _load_weights(root / BEST_DIR, runtime=runtime, model=model)


def load_checkpoint(
    path: Path, *, runtime: Any, model: Any, optimizer: Any, scheduler: Any, expected_key: str
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from ``path``; return its ``state.json``."""
    state = read_state(path)
    if state.get("resume_key") != expected_key:
        raise ConfigError(
            f"--checkpoint-dir: {path} was written for resume key {state.get('resume_key')!r}, not {expected_key!r} "
            "(different settings, data or base model); delete it or use another --checkpoint-dir"
        )
    # Under FSDP only the main process reads the full state and broadcasts it (host memory).
    reads = runtime.is_main or runtime.mode != "fsdp"
    weights: dict[str, torch.Tensor] = {}
    optim: dict[str, Any] = {}
    if reads:
        with safe_open(str(path / "model.safetensors"), framework="pt") as reader:
            aliases = json.loads((reader.metadata() or {}).get("aliases", "{}"))
        weights = load_file(str(path / "model.safetensors"))
        for name, source in aliases.items():
            weights[name] = weights[source]
        # weights_only: a checkpoint folder from elsewhere cannot run code when it is loaded.
        optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if runtime.mode == "fsdp":
        # lazy: ~1.3 s to import, FSDP runs only
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim, options=options)
    else:
        device = next(model.parameters()).device
        model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=True)
        optimizer.load_state_dict(optim)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rngs = torch.load(path / "rng.pt", weights_only=True)
    if runtime.rank < len(rngs):
        set_rng_state(rngs[runtime.rank])
    return state


# ------------------------------------------------------------------ candidates (select.criterion: tuned)

CANDIDATES_DIR = "candidates"  # <root>/candidates/step-N/ (HF folders) + step-N.json (step, resume key)


def candidate_name(step: int) -> str:
    """``step-N`` (not zero-padded): the folder name in the checkpoint dir and in ``<output-dir>/candidates/``."""
    return f"{STEP_PREFIX}{step}"


def candidate_folder(root: Path, step: int) -> Path:
    return root / CANDIDATES_DIR / candidate_name(step)


def list_candidates(root: Path, key: str) -> list[tuple[int, Path]]:
    """Complete candidates of resume key ``key`` as ``(step, folder)``, by step.

    A candidate is complete when its folder and its ``step-N.json`` exist (the json is written after
    the folder is renamed into place, so a kill in between leaves a folder that does not count).
    """
    base = root / CANDIDATES_DIR
    if not base.is_dir():
        return []
    found = []
    for state_file in base.glob(f"{STEP_PREFIX}*.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        folder = base / state_file.stem
        if state.get("resume_key") == key and folder.is_dir() and state_file.stem == candidate_name(state["step"]):
            found.append((int(state["step"]), folder))
    return sorted(found)


def prune_candidates(root: Path, key: str, *, keep_upto: int) -> list[int]:
    """Delete every candidate that a run of ``key`` resuming at step ``keep_upto`` will not keep (main process).

    Kept: complete candidates of ``key`` at steps <= ``keep_upto`` (their step is not trained again).
    Deleted: later ones (those steps are redone), other keys' (stale settings, data or model),
    incomplete ones and half-written temporaries.  Returns the kept steps.
    """
    base = root / CANDIDATES_DIR
    if not base.is_dir():
        return []
    kept = {step: folder for step, folder in list_candidates(root, key) if step <= keep_upto}
    for path in base.iterdir():
        name = path.name.removesuffix(".json")
        if any(name == folder.name for folder in kept.values()):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return sorted(kept)


def write_candidate_state(root: Path, step: int, state: dict[str, Any]) -> None:
    """Mark candidate ``step`` complete (after its folder is in place)."""
    path = root / CANDIDATES_DIR / f"{candidate_name(step)}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
