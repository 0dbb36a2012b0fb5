"""Candidate checkpoints for the tuner (``select.criterion: tuned``) and the one kept step of ``last``/``best_dev``.

``<output-dir>/candidates/step-N/`` are Hugging Face folders (model + tokenizer, saved like ``model/``), one per
dev-monitoring step; they are written into the checkpoint dir during training (which Snakemake never deletes) and
hard-linked into the output at the end, so a resumed run keeps the candidates of the steps it does not redo.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fomaml_math.modeling import load_model_and_tokenizer
from fomaml_math.training import fomaml, sft
from fomaml_math.training.run import TrainingRun
from tests.fixtures_tiny import shared_workspace, train_settings

MODULES = {"fomaml": fomaml, "sft": sft}


class Stop(BaseException):
    """Stands in for a kill (not an Exception: nothing on the way catches it)."""


def _run(method: str, settings: dict, out: Path, ckpt: Path) -> int:
    argv = ["--settings", json.dumps(settings), "--tasks-dir", str(shared_workspace() / "tasks")]
    return MODULES[method].main([*argv, "--output-dir", str(out), "--checkpoint-dir", str(ckpt)])


def _settings(method: str, criterion: str, **section: int) -> dict:
    settings = train_settings(shared_workspace() / "model", method=method)
    settings["select"]["criterion"] = criterion
    settings[method].update(section)
    return settings


def _summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def _folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights |= load_file(file)
    return weights


def _checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as reader:
        aliases = json.loads((reader.metadata() or {}).get("aliases", "{}"))
    weights = load_file(path / "model.safetensors")
    return weights | {name: weights[source] for name, source in aliases.items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    shared = a.keys() & b.keys()
    return bool(shared) and all(torch.equal(a[k], b[k]) for k in shared)


def test_tuned_writes_a_loadable_candidate_at_every_monitoring_step(tmp_path: Path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    settings = _settings("fomaml", "tuned")
    settings["compute"]["keep_finished_checkpoints"] = True  # to compare each candidate with its step's checkpoint
    assert _run("fomaml", settings, out, ckpt) == 0  # 6 steps, test_freq 3, save_freq 3
    summary = _summary(out)
    assert summary["candidates"] == [{"step": 3, "path": "candidates/step-3"}, {"step": 6, "path": "candidates/step-6"}]
    assert summary["selection"] == {"criterion": "tuned", "selected_step": None, "dev_loss": None, "metric": None}
    assert summary["selected_step"] is None and summary["model_step"] == 6
    assert sorted(p.name for p in (out / "candidates").iterdir()) == ["step-3", "step-6"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "dev/loss_after" in r] == [0, 3, 6]  # monitored, selects nothing
    # Each candidate is a full HF folder, saved like model/: the same files, loadable the same way.
    names = sorted(p.name for p in (out / "model").iterdir())
    for entry in summary["candidates"]:
        folder = out / entry["path"]
        assert sorted(p.name for p in folder.iterdir()) == names
        model, tokenizer = load_model_and_tokenizer(str(folder))
        assert tokenizer.pad_token_id is not None and model.config.use_cache
        loaded = {k: v.detach() for k, v in model.state_dict().items()}
        # ... holding the weights of its step: the checkpoint written at the same step
        assert _equal(loaded, _checkpoint_weights(ckpt / f"step-{entry['step']:08d}")), entry
    final = _folder_weights(out / "candidates" / "step-6")
    assert _equal(final, _folder_weights(out / "model"))
    assert not _equal(final, _folder_weights(out / "candidates" / "step-3"))
    # Hard links, not copies: the output costs no disk beyond the checkpoint dir's candidates.
    for file in (out / "model").glob("*.safetensors"):
        assert file.samefile(out / "candidates" / "step-6" / file.name)
        assert file.samefile(ckpt / "candidates" / "step-6" / file.name)


@pytest.mark.parametrize("method", ["fomaml", "sft"])
def test_a_resumed_run_ends_with_the_same_candidates(method: str, tmp_path: Path, monkeypatch) -> None:
    """Stopped at step 5 (checkpoint 3; candidates 2 and 4), outputs deleted as Snakemake does, rerun: candidate 2
    is kept, 4 is redone, 6 is new, and all three equal the uninterrupted run's bitwise."""
    settings = _settings(method, "tuned", test_freq=2, save_freq=3)
    assert _run(method, settings, tmp_path / "ref", tmp_path / "ref-ckpt") == 0
    original = TrainingRun.log

    def log_then_stop(self: TrainingRun, record: dict, **kwargs) -> None:
        original(self, record, **kwargs)
        if record["step"] == 5:
            raise Stop

    monkeypatch.setattr(TrainingRun, "log", log_then_stop)
    with pytest.raises(Stop):
        _run(method, settings, tmp_path / "out", tmp_path / "ckpt")
    monkeypatch.setattr(TrainingRun, "log", original)
    kept = tmp_path / "ckpt" / "candidates"
    assert sorted(p.name for p in kept.iterdir() if p.is_dir()) == ["step-2", "step-4"]
    inode_2 = next(kept.joinpath("step-2").glob("*.safetensors")).stat().st_ino
    inode_4 = next(kept.joinpath("step-4").glob("*.safetensors")).stat().st_ino
    shutil.rmtree(tmp_path / "out", ignore_errors=True)  # Snakemake deletes an incomplete job's outputs

    assert _run(method, settings, tmp_path / "out", tmp_path / "ckpt") == 0
    summary, reference = _summary(tmp_path / "out"), _summary(tmp_path / "ref")
    assert summary["resumed_from"] == [3]
    assert (
        summary["candidates"]
        == reference["candidates"]
        == [{"step": s, "path": f"candidates/step-{s}"} for s in (2, 4, 6)]
    )
    for entry in reference["candidates"]:
        want, got = _folder_weights(tmp_path / "ref" / entry["path"]), _folder_weights(tmp_path / "out" / entry["path"])
        assert want.keys() == got.keys() and _equal(want, got), entry
    assert next(kept.joinpath("step-2").glob("*.safetensors")).stat().st_ino == inode_2  # kept, not rewritten
    assert next(kept.joinpath("step-4").glob("*.safetensors")).stat().st_ino != inode_4  # after step 3: redone


def test_changed_settings_drop_the_old_candidates(tmp_path: Path) -> None:
    settings = _settings("fomaml", "tuned", total_steps=4, test_freq=2, save_freq=2)
    assert _run("fomaml", settings, tmp_path / "out", tmp_path / "ckpt") == 0
    settings["fomaml"]["test_freq"] = 4  # a new resume key: start fresh, the step-2 candidate is stale
    assert _run("fomaml", settings, tmp_path / "out", tmp_path / "ckpt") == 0
    assert _summary(tmp_path / "out")["candidates"] == [{"step": 4, "path": "candidates/step-4"}]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "candidates").iterdir()) == ["step-4", "step-4.json"]
    assert sorted(p.name for p in (tmp_path / "out" / "candidates").iterdir()) == ["step-4"]


@pytest.mark.parametrize("criterion", ["last", "best_dev"])
def test_last_and_best_dev_keep_one_candidate_the_selected_weights(criterion: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run("sft", _settings("sft", criterion, test_freq=2), out, tmp_path / "ckpt") == 0
    summary = _summary(out)
    step = summary["selected_step"]
    assert summary["selection"]["criterion"] == criterion and summary["model_step"] == step
    assert step == 6 if criterion == "last" else 1 <= step <= 6
    assert summary["candidates"] == [{"step": step, "path": f"candidates/step-{step}"}]
    assert [p.name for p in (out / "candidates").iterdir()] == [f"step-{step}"]
    assert _equal(_folder_weights(out / "candidates" / f"step-{step}"), _folder_weights(out / "model"))
    assert sorted(p.name for p in (out / "candidates" / f"step-{step}").iterdir()) == sorted(
        p.name for p in (out / "model").iterdir()
    )
    assert not (tmp_path / "ckpt" / "candidates").exists()  # nothing extra kept during training


def test_candidate_freq_keeps_fewer_candidates_than_monitoring_steps(tmp_path: Path) -> None:
    """candidate_freq 4 over 6 steps monitored every 2: candidates at 4 and the last step only; monitoring unchanged."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    assert _run("fomaml", _settings("fomaml", "tuned", test_freq=2, candidate_freq=4), out, ckpt) == 0
    assert _summary(out)["candidates"] == [
        {"step": 4, "path": "candidates/step-4"},
        {"step": 6, "path": "candidates/step-6"},
    ]
    assert sorted(p.name for p in (out / "candidates").iterdir()) == ["step-4", "step-6"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "dev/loss_after" in r] == [0, 2, 4, 6]


def test_a_finished_run_removes_its_resumable_checkpoints_but_not_its_outputs(tmp_path: Path) -> None:
    """compute.keep_finished_checkpoints false (the default): step-* checkpoints are gone once the outputs exist;
    the candidates stay whole (hard links), and a rerun retrains from scratch to the same weights."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    settings = _settings("fomaml", "tuned")
    assert _run("fomaml", settings, out, ckpt) == 0
    assert not [p for p in ckpt.iterdir() if p.name.startswith("step-")]
    weights = _folder_weights(out / "model")
    for entry in _summary(out)["candidates"]:
        loaded = _folder_weights(out / entry["path"])
        assert loaded.keys() == weights.keys()
    assert _equal(_folder_weights(out / "candidates" / "step-6"), weights)
    assert _run("fomaml", settings, tmp_path / "again", ckpt) == 0
    assert _summary(tmp_path / "again")["resumed_from"] == []
    assert _equal(_folder_weights(tmp_path / "again" / "model"), weights)
