"""A real 2-process CPU ``accelerate launch`` (gloo) computes the same meta-gradient as one process,
and the FOMAML and SFT stages run under it end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fomaml_math.adapt import WeightSnapshot
from fomaml_math.data.taskfiles import load_task_split
from fomaml_math.modeling import load_model_and_tokenizer
from fomaml_math.training import fomaml, sft
from fomaml_math.training.data import encode_rows
from fomaml_math.training.runtime import Runtime
from tests.fixtures_tiny import TASKS, shared_workspace, train_settings

REPO = Path(__file__).resolve().parents[1]
META_BATCH = 3  # 3 tasks on 2 processes: also exercises the uneven split

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from fomaml_math.training import fomaml, sft
    from fomaml_math.training.runtime import make_runtime
    from tests.test_accelerate_launch import meta_gradient

    work = Path(sys.argv[1])
    settings = json.loads((work / "fomaml.json").read_text())
    runtime = make_runtime(settings["compute"])
    grads = meta_gradient(runtime)
    if runtime.is_main:
        save_file(grads, str(work / "grad-2.safetensors"))
    tasks = Path(sys.argv[2])
    fomaml.train(settings, tasks, work / "fomaml-out", work / "fomaml-ckpt")
    sft.train(json.loads((work / "sft.json").read_text()), tasks, work / "sft-out", work / "sft-ckpt")
    torch.distributed.destroy_process_group()
    """
)


def _run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; on timeout the whole group (its workers too) is killed."""
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"launcher timed out:\n{err[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _episodes(tok: Any, workspace: Path) -> list[fomaml.Episode]:
    fo = train_settings(workspace / "model")["fomaml"]
    episodes = []
    for slot, task in enumerate(TASKS[:META_BATCH]):
        data = fomaml.TaskData(
            encode_rows(tok, load_task_split(workspace / "tasks", task, "support"), 64),
            encode_rows(tok, load_task_split(workspace / "tasks", task, "query"), 64),
        )
        episodes.append(fomaml.sample_episode(11, 1, slot, task, data, fo, tok.pad_token_id))
    return episodes


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu()


def meta_gradient(runtime: Runtime, model: Any = None, tok: Any = None) -> dict[str, torch.Tensor]:
    """The averaged FOMAML meta-gradient of one fixed meta-batch (every process calls this)."""
    workspace = shared_workspace() if runtime.world == 1 else Path(os.environ["TINY_WORKSPACE"])
    if model is None:
        model, tok = load_model_and_tokenizer(workspace / "model")
        model.to(runtime.device)
    fo = train_settings(workspace / "model")["fomaml"]
    episodes = _episodes(tok, workspace)
    params = list(model.parameters())
    fomaml.accumulate_meta_gradient(
        runtime, model, episodes, inner_lr=fo["inner_lr"], num_inner_steps=fo["num_inner_steps"],
        snapshot=WeightSnapshot(model, "cpu"),
    )  # fmt: skip
    runtime.reduce_grads(params)
    grads = {name: _full(p.grad) / len(episodes) for name, p in model.named_parameters()}
    for p in params:
        p.grad = None
    return grads


def one_meta_step(runtime: Runtime, model: Any, tok: Any) -> dict[str, torch.Tensor]:
    """Weights after one full meta-step (AdamW eps 1e-3 keeps the comparison well conditioned)."""
    workspace = shared_workspace() if runtime.world == 1 else Path(os.environ["TINY_WORKSPACE"])
    fo = train_settings(workspace / "model")["fomaml"]
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.01, eps=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    fomaml.meta_step(
        runtime, model, params, optimizer, scheduler, _episodes(tok, workspace), inner_lr=fo["inner_lr"],
        num_inner_steps=fo["num_inner_steps"], max_grad_norm=0.5, snapshot=WeightSnapshot(model, "same"),
    )  # fmt: skip
    return {name: _full(p) for name, p in model.named_parameters()}


FSDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fomaml_math.modeling import load_model_and_tokenizer
    from fomaml_math.training.runtime import Runtime
    from tests.test_accelerate_launch import _full, meta_gradient, one_meta_step

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    runtime = Runtime(None, "fsdp", world, rank, world, torch.device("cpu"))
    model, tok = load_model_and_tokenizer(Path(os.environ["TINY_WORKSPACE"]) / "model")
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    before = {name: _full(p) for name, p in model.named_parameters()}
    grads = meta_gradient(runtime, model, tok)
    restored = all(torch.equal(before[n], _full(p)) for n, p in model.named_parameters())
    weights = one_meta_step(runtime, model, tok)
    if rank == 0:
        save_file(grads, sys.argv[1] + "/grad-fsdp.safetensors")
        save_file(weights, sys.argv[1] + "/weights-fsdp.safetensors")
        Path(sys.argv[1], "restored").write_text(str(restored))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_processes_give_the_same_meta_gradient_and_training(tmp_path: Path) -> None:
    workspace = shared_workspace()
    settings = {m: train_settings(workspace / "model", method=m) for m in ("fomaml", "sft")}
    for method, s in settings.items():
        s["compute"]["num_processes"] = 2
        (tmp_path / f"{method}.json").write_text(json.dumps(s))
    (tmp_path / "launch_script.py").write_text(SCRIPT)
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",  # with --multi_gpu: N gloo processes (--cpu would silently start one)
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "TINY_WORKSPACE": str(workspace),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(tmp_path / "launch_script.py"), str(tmp_path), str(workspace / "tasks"),
    ]  # fmt: skip
    done = _run(command, env, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    two = load_file(tmp_path / "grad-2.safetensors")
    one = meta_gradient(Runtime.local())
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)

    for method, module in (("fomaml", fomaml), ("sft", sft)):
        summary = json.loads((tmp_path / f"{method}-out" / "train_summary.json").read_text())
        assert summary["num_processes"] == 2 and summary["work_split"] == "task"
        single = {**settings[method], "compute": {**settings[method]["compute"], "num_processes": 1}}
        argv = ["--settings", json.dumps(single), "--tasks-dir", str(workspace / "tasks")]
        out = tmp_path / f"{method}-single"
        assert module.main([*argv, "--output-dir", str(out), "--checkpoint-dir", str(tmp_path / f"{method}-c1")]) == 0
        a = load_file(out / "model" / "model.safetensors")
        b = load_file(tmp_path / f"{method}-out" / "model" / "model.safetensors")
        for name in a:
            # Adam amplifies float-summation noise in near-zero gradient entries up to ~lr per step.
            print("DIFF", method, name, float((a[name] - b[name]).abs().max()))
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=5e-3, msg=name)
        one_log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        two_log = [json.loads(x) for x in (tmp_path / f"{method}-out" / "metrics.jsonl").read_text().splitlines()]
        key = "meta/loss" if method == "fomaml" else "sft/loss"
        assert [r[key] for r in one_log[1:]] == pytest.approx([r[key] for r in two_log[1:]], abs=1e-4)


@pytest.mark.slow
def test_fsdp2_mode_on_cpu_gives_the_same_meta_gradient_and_step(tmp_path: Path) -> None:
    """The "fsdp" work split (every process on every task, rows split, inner gradients through FSDP2's
    reduce-scatter with ``.grad`` stashed, sharded snapshot/restore) with real FSDP2 on 2 gloo processes."""
    workspace = shared_workspace()
    (tmp_path / "fsdp_script.py").write_text(FSDP_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "TINY_WORKSPACE": str(workspace),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(tmp_path / "fsdp_script.py"), str(tmp_path)]
    done = _run(command, env, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "restored").read_text() == "True"  # sharded weights restored bitwise after adaptation

    model, tok = load_model_and_tokenizer(workspace / "model")
    one = meta_gradient(Runtime.local(), model, tok)
    two = load_file(tmp_path / "grad-fsdp.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)
    expected = one_meta_step(Runtime.local(), model, tok)
    got = load_file(tmp_path / "weights-fsdp.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
