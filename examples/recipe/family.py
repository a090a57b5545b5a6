"""What a model family gives the training core: `Family`, and the inputs of one ADD micro-step.

The core (`recipe.loop`, `recipe.step`, `recipe.dmd`, `recipe.checkpoint`) never looks inside a
model: it asks the family to load the models, build the discriminator and the objective, turn a
data batch into tensors (`AddInputs`, ``recipe.dmd.Inputs``), and write samples and the export.
`recipe.sdxl.SDXL` (UNets on VP schedules) and `recipe.flow.FLOW` (SD3 / Flux transformers on
rectified flow) implement it; a new family implements these methods and gets the loop, the step,
checkpoints, resume, EMA, DDP, logging and the non-finite guard as they are.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from recipe.dmd import FakeScore, Inputs
    from recipe.step import RunState


@dataclass
class AddInputs:
    """One micro-batch as ADD's losses read it (made by `Family.add_inputs`).

    ``x0`` are the clean latents the student inputs are drawn from; ``real`` is what the
    discriminator sees as real (images for DINOv2, latents for teacher features), or None to
    take ``objective.discriminator_input(x0)``. The other fields are passed to the objective's
    losses under the same names.
    """

    x0: Tensor
    cond: dict[str, Any]  # the denoisers' conditioning (student and teacher)
    real: Tensor | None = None
    uncond: dict[str, Any] | None = None  # the teacher's unconditional branch (CFG, NFSD)
    negative: dict[str, Any] | None = None  # NFSD's negative prompt
    c_text: Tensor | None = None  # the discriminator heads' text conditioning
    c_image: Tensor | None = None  # the discriminator heads' image conditioning
    feature_kwargs: dict[str, Any] | None = None  # the feature network's (LADD: the teacher's conditioning)


class Family(Protocol):
    """A model family's adapter to the training core."""

    name: str  # the entry point's name: ``add_sdxl`` (log prefix, output folder, tracker)
    presets: tuple[str, ...]  # built-in worlds, the default first; "none" = --pretrained

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        """Add the family's own flags to the shared parser."""

    def defaults(self, args: argparse.Namespace) -> dict[str, Any]:
        """Values for the options left unset, given a first parse (preset, model, method)."""

    def conflicts(self, args: argparse.Namespace) -> list[str]:
        """Messages for combinations this family cannot run (argparse prints the first)."""

    def load(self, args: argparse.Namespace, device: Any, dtype: Any) -> tuple[Any, FakeScore | None]:
        """The models, placed on ``device`` (frozen parts in ``dtype``), and DMD2's fake score."""

    def placement(self, models: Any, dtype: Any) -> list[tuple[nn.Module, Any, bool]]:
        """``(module, dtype, trained_in_float32)`` for each network: where ``load`` puts its weights."""

    def discriminator(
        self, args: argparse.Namespace, models: Any, fake: FakeScore | None, dinov2: dict | None = None
    ) -> nn.Module:
        """ADD's / LADD's discriminator, or with ``fake`` DMD2's GAN head (seeded, on the CPU).

        ``dinov2``: the DINOv2 network's ``from_dinov2`` arguments in place of the flags' (benchmarks).
        """

    def student_timesteps(self, args: argparse.Namespace, models: Any) -> Any:
        """The student's timesteps (None: the objective's default)."""

    def add_objective(self, args: argparse.Namespace, models: Any, disc: nn.Module, options: dict) -> Any:
        """``addkit.ADDObjective`` with the shared ``options`` and the family's teacher and decode."""

    def text(self, args: argparse.Namespace, models: Any, device: Any) -> Any:
        """The caption encoder the family's inputs use (``state.text``)."""

    def make_data(self, args: argparse.Namespace, folder: Path) -> Path:
        """A built-in preset's data folder, written into ``folder`` (the path ``--data`` then takes)."""

    def dataset(self, args: argparse.Namespace, output_dir: Path) -> Any:
        """The training data (a map-style dataset of dict batches; ``caption`` always there)."""

    def add_inputs(self, state: RunState, batch: Any) -> AddInputs:
        """One micro-batch's tensors for ADD / LADD."""

    def dmd_inputs(self, state: RunState, batch: Any) -> Inputs:
        """One micro-batch's tensors for DMD2."""

    def report(self, state: RunState, student: nn.Module, step: int) -> Path:
        """Write a sample grid (and log diversity); main process, student weights as shown."""

    def export(self, state: RunState, student: nn.Module) -> Path:
        """Write the student for diffusers; returns the export folder."""

    def evaluate(self, state: RunState, student: nn.Module) -> dict | None:
        """The preset's scores of teacher and student (None where it has none)."""

    def scores_table(self, scores: dict) -> str:
        """``evaluate``'s scores as the closing summary prints them."""

    def sample_command(self, args: argparse.Namespace, export: Path) -> str | None:
        """The command that samples the export (shown in the closing summary)."""
