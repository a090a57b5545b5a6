"""ADD and LADD for diffusers rectified-flow transformers: SD3 / SD3.5 and Flux.

    python examples/add_flow.py --model sd3                  # tiny preset: random SD3-like models, CPU
    python examples/add_flow.py --model flux --lora-rank 4   # tiny Flux (guidance-distilled form)
    accelerate launch examples/add_flow.py --model sd3 \\
        --pretrained stabilityai/stable-diffusion-3.5-medium --data DIR --lora-rank 64 ...

See ``docs/flow.md``. This file is the entry point: the loop, the step, checkpoints and logs are
the training core's (``recipe/``), written once for every model family, and the flow family's
adapter (``recipe/flow/family.py``) loads the transformer, VAE and text encoders, turns a batch
into tensors, builds LADD's or DINOv2's discriminator and writes grids and the export. The maths
is addkit's: ``ADDObjective`` draws the student inputs at the student times
(``FlowSchedule.timesteps(n)`` with the model's shift: pure noise at t = 1) and builds both
losses; ``--method dmd2`` trains with ``DMDObjective``.

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042 (ADD).
    Sauer et al., *Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
    Distillation*, arXiv 2403.12015 (LADD).
"""

from __future__ import annotations

import argparse
from typing import Any

from recipe import loop
from recipe.args import NonFiniteLossError, RecipeError
from recipe.args import parse_args as _parse
from recipe.flow.family import FLOW
from recipe.loop import MODEL_FILE
from recipe.report import RunSummary
from recipe.step import RunState, train_step

__all__ = [
    "FLOW", "MODEL_FILE", "NonFiniteLossError", "RecipeError", "RunState", "RunSummary", "main",
    "parse_args", "setup", "train", "train_step",
]  # fmt: skip

DESCRIPTION = __doc__.split("\n\n")[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This recipe's command line, parsed and checked (`recipe.args.parse_args` for `FLOW`)."""
    return _parse(FLOW, argv, DESCRIPTION)


def setup(args: argparse.Namespace, accelerator: Any = None) -> RunState:
    """The run's state (`recipe.loop.setup` for `FLOW`)."""
    return loop.setup(FLOW, args, accelerator)


def train(args: argparse.Namespace) -> RunSummary:
    """Run the recipe (`recipe.loop.train` for `FLOW`); prints and returns the closing summary."""
    return loop.train(FLOW, args)


def main(argv: list[str] | None = None) -> RunSummary:
    """Parse ``argv``, check the paths and train; the entry point of ``python examples/add_flow.py``."""
    return loop.main(FLOW, argv, DESCRIPTION)


if __name__ == "__main__":
    loop.run_script(FLOW, DESCRIPTION)
