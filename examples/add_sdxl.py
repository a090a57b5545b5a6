"""Reference recipe: Adversarial Diffusion Distillation of an SDXL (or SD 1.x/2.x) UNet.

Run ``python examples/add_sdxl.py`` (the ``tiny`` preset: the tiny world's pretrained
SDXL-architecture teacher distilled on a CPU in minutes, then scored) or ``accelerate launch
examples/add_sdxl.py --pretrained stabilityai/stable-diffusion-xl-base-1.0 --data DIR ...``.
See ``examples/README.md`` and ``docs/recipe.md``.

This file is the entry point: the loop, the step, checkpoints and logs are the training core's
(``recipe/``), written once for every model family; the SDXL family's adapter
(``recipe/sdxl/family.py``) loads the UNets, VAE and text encoders, turns a batch into tensors,
builds the discriminator and writes grids and the export. The maths is addkit's:
``ADDObjective`` (``--method dmd2``: ``DMDObjective``, see ``docs/dmd.md``).

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042 (ADD).
    Sauer et al., *Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
    Distillation*, arXiv 2403.12015 (the ``--discriminator teacher`` option).
"""

from __future__ import annotations

import argparse
from typing import Any

from recipe import loop
from recipe.args import NonFiniteLossError, RecipeError
from recipe.args import parse_args as _parse
from recipe.checkpoint import checkpoints
from recipe.report import RunSummary
from recipe.sdxl.family import SDXL
from recipe.step import RunState, train_step

__all__ = [
    "SDXL", "NonFiniteLossError", "RecipeError", "RunState", "RunSummary", "checkpoints", "main",
    "make_accelerator", "parse_args", "setup", "train", "train_step",
]  # fmt: skip

DESCRIPTION = __doc__.split("\n\n")[0]
make_accelerator = loop.make_accelerator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This recipe's command line, parsed and checked (`recipe.args.parse_args` for `SDXL`)."""
    return _parse(SDXL, argv, DESCRIPTION)


def setup(args: argparse.Namespace, accelerator: Any = None) -> RunState:
    """The run's state (`recipe.loop.setup` for `SDXL`)."""
    return loop.setup(SDXL, args, accelerator)


def train(args: argparse.Namespace) -> RunSummary:
    """Run the recipe (`recipe.loop.train` for `SDXL`); prints and returns the closing summary."""
    return loop.train(SDXL, args)


def main(argv: list[str] | None = None) -> RunSummary:
    """Parse ``argv``, check the paths and train; the entry point of ``python examples/add_sdxl.py``."""
    return loop.main(SDXL, argv, DESCRIPTION)


if __name__ == "__main__":
    loop.run_script(SDXL, DESCRIPTION)
