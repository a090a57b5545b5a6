"""Run state and checkpoints of ``add_flow.py``: counters, atomic saves, ``--resume``.

Nothing here is specific to flow models (``add_sdxl.py`` keeps its own copy of the same logic;
one shared module is the plan once its restructure has landed).

A checkpoint is ``accelerator.save_state`` written into ``checkpoints/.tmp-step-N`` and renamed
to ``checkpoints/step-N`` when complete: the rename is atomic on POSIX, so a crash leaves either
the previous checkpoints alone or a complete new one, never a torn one that ``--resume latest``
would pick up. ``Progress`` travels with every checkpoint (``register_for_checkpointing``), as do
the discriminator, the EMA and the random states of every process.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

PREFIX = "step-"


class RecipeError(RuntimeError):
    """A run cannot go on; the message says why and what to do."""


class NonFiniteLossError(RecipeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


class Progress:
    """Counters saved with every checkpoint (``accelerator.register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.step = 0  # optimiser steps attempted (skipped ones included)
        self.samples = 0  # global data-stream position
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update(state)


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, then an atomic rename; keep the last ``keep``."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # re-saving a step after a resume: move the old one aside first
            old = root / f".old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        for stale in checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """The checkpoint folder ``--resume`` names: ``latest`` or a path."""
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise RecipeError(f"--resume latest: no checkpoint in {Path(output_dir) / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise RecipeError(f"--resume: {path} is not a checkpoint folder")
    return path
