"""What every recipe shows and writes: the student's weights as shown, PNG grids, diversity, the closing summary.

The families draw their samples and write their exports (``recipe.sdxl.report``,
``recipe.flow.report``); what does not depend on the model lives here.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import recipe.fsdp as fsdp

if TYPE_CHECKING:
    from recipe.step import RunState


@contextlib.contextmanager
def student_weights(state: RunState) -> Iterator[nn.Module | None]:
    """The student as a plain diffusers network with the weights to show: the EMA's when it is on.

    On the main process; None on the others. Under ``--fsdp`` every process must enter (the
    full weights are gathered); otherwise the EMA weights are swapped in and back.
    """
    acc = state.accelerator
    if state.fsdp:
        yield fsdp.gather(state.student, state.models.teacher, acc.is_main_process)
        return
    network = acc.unwrap_model(state.student) if acc.is_main_process else None
    if network is None or state.ema is None:
        yield network
        return
    live = state.trainable
    saved = [p.detach().clone() for p in live]
    _copy_into(live, list(state.ema.module.parameters()))
    try:
        yield network
    finally:
        _copy_into(live, saved)


@torch.no_grad()
def _copy_into(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    for param, value in zip(params, values, strict=True):
        param.copy_(value)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` to ``uint8`` in ``[0, 255]`` on the CPU."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_grid(path: Path, images: torch.Tensor, columns: int) -> Path:
    """A PNG of ``images`` ``[N, 3, H, W]`` in ``[-1, 1]``, ``columns`` per row, no padding."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(to_uint8(images), nrow=columns, padding=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


@torch.no_grad()
def feature_distance(disc: Any, x: torch.Tensor, **kwargs: Any) -> float:
    """Mean pairwise L2 distance of ``x``'s samples in the discriminator's features.

    Features: per tap, the mean over tokens (or grid positions); taps concatenated; no augmentation (eval mode).
    A collapse of diversity (the most reported failure of distilled models) drives it towards 0.
    """
    was_training = disc.training
    disc.eval()
    try:
        feats = disc.extract(x, generator=torch.Generator(x.device).manual_seed(0), **kwargs)
    finally:
        disc.train(was_training)
    vec = torch.cat([f.float().flatten(2).mean(dim=2) for f in feats], dim=1)  # tokens or a grid
    return float(torch.pdist(vec).mean())


@dataclass
class RunSummary:
    """What a run did and where it wrote it (returned by the entry points' ``main``)."""

    name: str  # the recipe: add_sdxl, add_flow
    step: int
    nonfinite_total: int
    seconds: float
    checkpoint: Path | None
    export: Path | None
    grid: Path | None
    logs: Path
    student: nn.Module | None  # the trained student (main process), for tests and notebooks
    discriminator: nn.Module
    scores: dict | None = None  # a built-in preset's held-out scores (report.json)
    sample: str | None = None  # the command that samples the export
    table: str | None = None  # the scores as the closing summary prints them
    ema: Any = None  # the EMA of the trained parameters (None when off)
    models: Any = None  # what the family loaded

    def text(self, args: argparse.Namespace) -> str:
        """The closing summary printed on stdout."""
        lines = [
            f"{self.name}: {self.step} steps ({self.nonfinite_total} skipped as non-finite) "
            f"in {self.seconds:.0f} s"
        ]
        rows = {
            "checkpoint": self.checkpoint or "none (--checkpoint-every 0)",
            "export": self.export or "none",
            "grid": self.grid or "none (--sample-every 0)",
            "logs": f"{self.logs}  (tensorboard --logdir {shlex.quote(str(self.logs))})",
        }
        if self.sample is not None:
            rows["sample"] = self.sample
        if self.scores is not None:
            out = Path(args.output_dir)
            rows["report"] = (
                f"{out / 'report.json'}  (teacher and student side by side: {out / 'comparison.png'})"
            )
            lines += [self.table or ""]
        lines += [f"  {key:<10}  {value}" for key, value in rows.items()]
        return "\n".join(lines)
