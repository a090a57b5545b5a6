"""The recipe in two CPU processes (gloo): DDP with a NaN on one rank, FSDP2 with an exact resume.

``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=1`` starts two
gloo ranks (accelerate 1.x's ``--cpu --num_processes 2`` starts one). ``--fsdp`` shards the
student with ``fully_shard`` over them (accelerate's own FSDP plugin does not run on CPU).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("timm")

import add_sdxl  # examples/ is on pytest's pythonpath
import recipe.sdxl.random

ROOT = Path(__file__).resolve().parents[2]


def launch(out: Path, *argv: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of the recipe in two CPU processes, writing to ``out``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), str(ROOT / "examples" / "add_sdxl.py"),
        "--preset", "random", "--grid-seeds", "0", "--diversity-seeds", "2", "--output-dir", str(out), *argv,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, check=False, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def progress(folder: Path) -> dict:
    return json.loads((folder / "progress.json").read_text())


@pytest.mark.slow
def test_two_processes_skip_a_nan_that_only_one_of_them_sees(tmp_path):
    """Rank 1's student output is NaN at step 1: both ranks skip it, and both step at 2."""
    from safetensors.torch import load_file

    proc = launch(tmp_path, "--max-steps", "2", "--checkpoint-every", "1", "--debug-nonfinite-at", "1:1")
    first, second = (tmp_path / "checkpoints" / f"step-000000{i}" for i in (1, 2))
    assert [p.name for p in add_sdxl.checkpoints(tmp_path)] == [first.name, second.name]
    assert (second / "random_states_1.pkl").is_file() and (
        tmp_path / "export" / "unet" / "config.json"
    ).is_file()
    assert progress(first) == {"step": 1, "samples": 4, "nonfinite_total": 1, "nonfinite_in_row": 1}
    # had rank 1 stepped on its NaN gradients, its NaN weights would have made step 2 non-finite too
    assert progress(second) == {"step": 2, "samples": 8, "nonfinite_total": 1, "nonfinite_in_row": 0}
    initial = recipe.sdxl.random.build_parts(0).unet.state_dict()
    after_1, after_2 = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert all(torch.equal(after_1[k], initial[k]) for k in initial)  # rank 0 skipped too
    assert all(torch.isfinite(v).all() for v in after_2.values())
    assert any(not torch.equal(after_2[k], initial[k]) for k in initial)
    assert "add_sdxl: 2 steps (1 skipped as non-finite)" in proc.stdout


def _dcp(folder: Path, into: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(into))
    return torch.load(into, weights_only=False)


def _assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_fsdp_two_processes_resume_equals_the_uninterrupted_run(tmp_path):
    """2 steps straight vs 1 step, checkpoint, 1 resumed in a new run: equal, optimiser state included."""
    from safetensors.torch import load_file

    common = ("--fsdp", "--max-steps", "2", "--checkpoint-every", "1", "--sample-every", "0",
              "--no-export-pipeline")  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(straight, *common)
    middle = straight / "checkpoints" / "step-0000001"
    proc = launch(resumed, *common, "--resume", str(middle))
    assert f"resumed from {middle} at step 1" in proc.stdout

    a, b = (out / "checkpoints" / "step-0000002" for out in (straight, resumed))
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["layout"] == {
        "processes": 2, "fsdp": True, "ema": False, "lora": False, "scaler": False, "fake_score": False,
    }  # fmt: skip
    assert {"student/__0_0.distcp", "student/__1_0.distcp", "random_states_1.pkl"} <= manifest["files"].keys()
    student_a, student_b = _dcp(a / "student", tmp_path / "a.pt"), _dcp(b / "student", tmp_path / "b.pt")
    assert any(
        key.endswith("exp_avg_sq.") for key in _keys(student_a["optim"])
    )  # the optimiser state is there
    _assert_same(student_a, student_b, "student and its optimiser")
    for name in ("discriminator", "optimizer_discriminator", "scheduler_student", "scheduler_discriminator"):
        _assert_same(torch.load(a / f"{name}.pt"), torch.load(b / f"{name}.pt"), name)
    assert (
        progress(a) == progress(b) == {"step": 2, "samples": 8, "nonfinite_total": 0, "nonfinite_in_row": 0}
    )
    exported = [
        load_file(out / "export" / "unet" / "diffusion_pytorch_model.safetensors")
        for out in (straight, resumed)
    ]
    _assert_same(*exported, "export")
    _assert_same(
        {k: v for k, v in exported[0].items()}, {k: student_a["model"][k] for k in exported[0]}, "gathered"
    )


def _keys(state: object, prefix: str = "") -> list[str]:
    if isinstance(state, dict):
        return [k for key, v in state.items() for k in _keys(v, f"{prefix}{key}.")] or [prefix]
    return [prefix]
