"""The training core's promises, checked for every model family (SDXL UNet on VP, SD3 / Flux on flow).

Both recipes run the same loop and step (``examples/recipe/``); these tests hold each family's
adapter to it: a ``0`` flag means never, an optimiser step (ADD and DMD2) reads the device once,
a non-finite step is skipped on every process and leaves the weights alone, and a resumed run
continues bit for bit. The family-specific checks (one copy of the weights under LoRA, exports
loading in the family's diffusers pipeline) live in ``test_add_sdxl*.py`` and ``test_add_flow*.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("timm")

from recipe import loop
from recipe.args import check_paths, parse_args
from recipe.checkpoint import checkpoints
from recipe.flow.family import FLOW
from recipe.sdxl.family import SDXL
from recipe.step import train_step
from addkit.testing import count_host_reads

FAMILIES = {
    "sdxl": (SDXL, ["--preset", "random"]),
    "sd3": (FLOW, ["--preset", "tiny", "--model", "sd3"]),
    "flux": (FLOW, ["--preset", "tiny", "--model", "flux"]),
}
QUIET = ["--sample-every", "0", "--log-every", "0", "--checkpoint-every", "0", "--diversity-seeds", "0",
         "--no-export-pipeline"]  # fmt: skip


def _args(name: str, out: Path, *extra: str) -> tuple[Any, Any]:
    family, preset = FAMILIES[name]
    args = parse_args(family, [*preset, "--output-dir", str(out), *QUIET, *extra])
    check_paths(args)
    return family, args


def _weights(state: Any) -> dict[str, torch.Tensor]:
    trained = {f"student.{i}": p.detach().clone() for i, p in enumerate(state.trainable)}
    return trained | {f"disc.{k}": v.detach().clone() for k, v in state.discriminator.named_parameters()}


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_zero_means_never(name: str, tmp_path: Path) -> None:
    family, args = _args(name, tmp_path, "--max-steps", "2")
    summary = loop.train(family, args)
    assert summary.step == 2 and summary.checkpoint is None and summary.grid is None
    assert checkpoints(tmp_path) == [] and not (tmp_path / "samples").exists()
    assert "none (--checkpoint-every 0)" in summary.text(args)


@pytest.mark.parametrize("method", ["add", "dmd2"])
@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_one_host_read_per_step_and_a_nonfinite_step_is_skipped(name: str, method: str, tmp_path: Path) -> None:
    extra = ["--method", method, *(["--fake-steps", "1"] if method == "dmd2" else [])]
    family, args = _args(name, tmp_path, "--max-steps", "2", "--debug-nonfinite-at", "1", *extra)
    state = loop.setup(family, args)
    n = loop.dmd.micro_batches_per_step(args)
    before = _weights(state)
    batches = [next(state.data) for _ in range(n)]  # the data loader reads its indices: outside the count
    with count_host_reads() as counted:
        first = loop._train_step(state, batches)
    assert counted.count == 1, counted.summary()
    assert first.skipped and state.progress.nonfinite_total == 1 and state.progress.nonfinite_in_row == 1
    after = _weights(state)
    student_moved = [k for k in before if k.startswith("student") and not torch.equal(before[k], after[k])]
    assert not student_moved, f"a skipped step changed the student: {student_moved[:3]}"
    batches = [next(state.data) for _ in range(n)]
    with count_host_reads() as counted:
        second = loop._train_step(state, batches)
    assert counted.count == 1, counted.summary()
    assert not second.skipped and state.progress.nonfinite_in_row == 0
    assert any(not torch.equal(before[k], v) for k, v in _weights(state).items() if k.startswith("student"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_resume_continues_bit_for_bit(name: str, tmp_path: Path) -> None:
    ema = ["--ema-decay", "0.9", "--lora-rank", "4"]
    family, args = _args(name, tmp_path / "straight", "--max-steps", "3", *ema)
    straight = loop.train(family, args)
    family, args = _args(name, tmp_path / "half", "--max-steps", "2", "--checkpoint-every", "2", *ema)
    loop.train(family, args)
    resume = ["--resume", str(checkpoints(tmp_path / "half")[-1])]
    family, args = _args(name, tmp_path / "resumed", "--max-steps", "3", *ema, *resume)
    resumed = loop.train(family, args)
    assert resumed.step == 3
    for part in ("student", "discriminator", "ema"):
        want, got = getattr(straight, part).state_dict(), getattr(resumed, part).state_dict()
        different = [k for k in want if not torch.equal(want[k], got[k])]
        assert not different, f"{part}: {len(different)} tensors differ after the resume, e.g. {different[:3]}"
