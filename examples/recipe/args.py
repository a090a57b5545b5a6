"""The recipes' command line: the shared flags, their checks, and the paths checked before any model loads.

`build_parser` declares the flags every family shares; a `recipe.family.Family` adds its own
(``add_flags``), gives unset options their values (``defaults``) and refuses what it cannot run
(``conflicts``).

Every flag is checked when it is parsed (argparse names the flag in one line): counts are
integers with a lower bound, ``0`` means "never" where it says so (``--sample-every``,
``--checkpoint-every``, ``--log-every``, ``--diversity-seeds``), rates and weights are finite
numbers in range, and combinations that cannot work are refused. `check_paths` then finds
I/O problems (a missing ``--data`` folder, an output folder that cannot be written, a
``--resume`` folder that is not there) before anything is built; they raise `RecipeError`.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import addkit.losses

if TYPE_CHECKING:
    from recipe.family import Family

R1_PLACEMENTS = (*get_args(addkit.losses.R1Placement), "none")  # the library's, and no R1
ADVERSARIAL_LOSSES = tuple(addkit.losses.ADVERSARIAL_LOSSES)


class RecipeError(RuntimeError):
    """A run cannot go on; the message says why and what to do."""


class NonFiniteLossError(RecipeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------
# Value types: each refuses what it cannot take, and argparse names the flag
# ---------------------------------------------------------------------------------------------
def count(low: int, zero: str | None = None) -> Callable[[str], int]:
    """An integer ``>= low`` (``zero`` documents what 0 means when ``low == 0``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{f' ({zero})' if zero else ''}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float = -math.inf, high: float = math.inf, *, open_low=False, open_high=False, inf=False):
    """A float in ``[low, high]`` (ends open when asked); infinite only with ``inf=True``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isnan(value) or (math.isinf(value) and not inf):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < low or (open_low and value == low) or value > high or (open_high and value == high):
            lo, hi = "(" if open_low else "[", ")" if open_high else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {high:g}{hi}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def injection(text: str) -> tuple[int, int | None]:
    """``STEP`` or ``STEP:RANK`` for ``--debug-nonfinite-at``."""
    step, _, rank = text.partition(":")
    try:
        return int(step), (int(rank) if rank else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STEP or STEP:RANK, got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# The parser: the flags every family shares, then the family's own
# ---------------------------------------------------------------------------------------------
def build_parser(family: Family, description: str = "") -> argparse.ArgumentParser:
    """The command line of ``family``'s recipe: the shared flags, then ``family.add_flags``."""
    p = argparse.ArgumentParser(
        prog=f"{family.name}.py", description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    # fmt: off
    g = p.add_argument_group("models and data")
    g.add_argument("--preset", choices=family.presets, default=None,
                   help="a built-in world (the default without --pretrained; see the family's presets); "
                        "none: a real run with --pretrained and --data")
    g.add_argument("--pretrained", help="diffusers checkpoint (hub id or folder)")
    g.add_argument("--revision", default=None)
    g.add_argument("--output-dir", default=None, help=f"default outputs/{family.name}")
    g.add_argument("--data", help="image+txt folder, .jsonl/.csv manifest, or a datasets name/path")
    g.add_argument("--split", default="train")
    g.add_argument("--image-column", default=None)
    g.add_argument("--caption-column", default=None)
    g.add_argument("--resolution", type=count(8), default=None, help="training side in pixels")
    g.add_argument("--num-workers", type=count(0), default=0)
    g.add_argument("--method", choices=METHODS, default="add",
                   help="add: ADD / LADD (ADDObjective); dmd2: DMD2 (DMDObjective: a fake score initialised "
                        "from the teacher; real images feed only its GAN head)")

    g = p.add_argument_group("student and precision")
    g.add_argument("--lora-rank", type=count(0, "0 = train the full student"), default=0,
                   help="train a LoRA of this rank instead of the full student")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="fp16 needs a GPU; its GradScaler is stepped once per optimiser step")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the student with FSDP2 (fully_shard) over all processes; no EMA, LoRA or fp16")

    g = p.add_argument_group("objective (addkit.ADDObjective; unset options take the library's defaults)")
    g.add_argument("--lambda-distill", type=number(0), default=None,
                   help="distillation weight (ADD §4: 2.5; LADD: 0 = adversarial only)")
    g.add_argument("--adversarial-weight", type=number(0), default=1.0,
                   help="weight of the student's adversarial loss (0: distillation only; D still trains and logs)")
    g.add_argument("--weighting", choices=("exponential", "sds", "nfsd"), default="exponential")
    g.add_argument("--distill-space", choices=("pixel", "latent"), default=None,
                   help="where the distillation loss compares (ADD: pixel, decoded by the VAE)")
    g.add_argument("--guidance-scale", type=number(0), default=None,
                   help="teacher CFG in the distillation loss (ADD: 1 = off), or the real score's with --method "
                        "dmd2 (DMD2's: 8 for SDXL, 1.75 for SD 1.5)")
    g.add_argument("--negative-prompt", help="NFSD's negative prompt (--weighting nfsd)",
                   default="unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark")
    g.add_argument("--adversarial-loss", choices=ADVERSARIAL_LOSSES, default="hinge")
    g.add_argument("--r1-placement", choices=R1_PLACEMENTS, default="features", help="none: no R1")
    g.add_argument("--r1-gamma", type=number(0), default=None,
                   help="R1 weight (default: the placement's, 1e-5 features/images, 100 approximate)")
    g.add_argument("--r1-interval", type=count(1), default=1)

    g = p.add_argument_group("DMD2 (--method dmd2: addkit.DMDObjective, see docs/dmd.md)")
    g.add_argument("--fake-steps", type=count(1), default=5,
                   help="fake-score updates per generator update (DMD2's two time-scale rule: 5)")
    g.add_argument("--lr-fake", type=number(0, open_low=True), default=None,
                   help="fake-score learning rate (default: --lr)")
    g.add_argument("--gan-weight", type=number(0), default=None,
                   help="GAN head's generator weight (0 = no head: no real images are read at all; DMD2's: "
                        "5e-3 SDXL, 1e-3 SD 1.5)")
    g.add_argument("--gan-d-weight", type=number(0), default=1e-2,
                   help="GAN head's discriminator weight in the fake-score loss")

    g = p.add_argument_group("discriminator")
    g.add_argument("--discriminator", choices=("dinov2", "teacher"), default=None,
                   help="dinov2: ADD's DINOv2 on decoded images; teacher: LADD's teacher features on latents")
    g.add_argument("--dinov2", default="vit_small_patch14_dinov2.lvd142m", help="timm name (ADD: ViT-S/14)")
    g.add_argument("--dinov2-weights", default=None, help="local weights file for --dinov2 (offline)")
    g.add_argument("--dinov2-resolution", type=count(14), default=224)
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="DiffAugment on the discriminator's inputs (default: on; off for tiny)")
    g.add_argument("--teacher-taps", nargs="+", default=None, help="blocks to tap for --discriminator teacher")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=count(1), default=None)
    g.add_argument("--batch-size", type=count(1), default=None, help="per process and micro-batch")
    g.add_argument("--gradient-accumulation", type=count(1), default=1)
    g.add_argument("--lr", type=number(0, open_low=True), default=None, help="student learning rate")
    g.add_argument("--lr-d", type=number(0, open_low=True), default=None, help="discriminator learning rate")
    g.add_argument("--warmup-steps", type=count(0), default=0)
    g.add_argument("--adam-betas-d", type=number(0, 1, open_high=True), nargs=2, default=[0.0, 0.99])
    g.add_argument("--weight-decay", type=number(0), default=1e-2)
    g.add_argument("--max-grad-norm", type=number(0, open_low=True, inf=True), default=None,
                   help="clip the student's (and fake score's) gradient norm (inf = no clipping; ADD 1, DMD2 10)")
    g.add_argument("--ema-decay", type=number(0, 1, open_high=True), default=0.0,
                   help="EMA of the student (0 = off; e.g. 0.999)")
    g.add_argument("--seed", type=count(0), default=0)

    g = p.add_argument_group("checkpoints, logs, samples")
    g.add_argument("--checkpoint-every", type=count(0, "0 = never"), default=None,
                   help="checkpoint every N steps and at the end (0 = never)")
    g.add_argument("--checkpoints-keep", type=count(0, "0 = keep all"), default=3)
    g.add_argument("--resume", default=None, help="'latest' (the newest complete checkpoint) or a folder")
    g.add_argument("--max-nonfinite-in-row", type=count(1), default=10)
    g.add_argument("--sample-every", type=count(0, "0 = never"), default=None,
                   help="grid + diversity every N steps and at the end (0 = never)")
    g.add_argument("--grid-prompts", nargs="+", default=None)
    g.add_argument("--grid-seeds", type=count(0), nargs="+", default=[0, 1])
    g.add_argument("--diversity-seeds", type=count(0, "0 = off"), default=4,
                   help="samples for the diversity scalars (0 = off; at least 2)")
    g.add_argument("--log-every", type=count(0, "0 = never"), default=1)
    g.add_argument("--export-pipeline", action=argparse.BooleanOptionalAction, default=None,
                   help="also write a complete pipeline folder (default: on for the built-in presets)")
    g.add_argument("--debug-nonfinite-at", type=injection, nargs="*", default=[], metavar="STEP[:RANK]",
                   help="(testing) make the student's output NaN at these steps (on one process with :RANK)")
    # fmt: on
    family.add_flags(p)
    return p


METHODS = ("add", "dmd2")
METHOD_DEFAULTS = {  # DMD2's gradient clip is 10 (its public configs); its guidance and GAN weight are per model
    "add": {"max_grad_norm": 1.0, "guidance_scale": 1.0},
    "dmd2": {"max_grad_norm": 10.0},
}
ADD_ONLY = ("lambda_distill", "adversarial_weight", "weighting", "distill_space", "adversarial_loss",
            "r1_placement", "r1_gamma", "r1_interval", "discriminator", "teacher_taps", "augment")  # fmt: skip
DMD2_ONLY = ("fake_steps", "lr_fake", "gan_weight", "gan_d_weight")


def parse_args(family: Family, argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    """Parse and check ``argv`` for ``family``; fill its preset's defaults. Errors exit with argparse's one line.

    Two passes: the first finds the preset (and whatever the family's defaults depend on), then
    ``family.defaults(args)`` gives the unset options their values and the second pass parses
    again, so flags given on the command line always win.
    """
    p = build_parser(family, description)
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "none" if args.pretrained else family.presets[0]
    builtin = args.preset != "none"
    if builtin and args.pretrained:
        p.error(f"--preset {args.preset} brings its own models: drop --pretrained, or use --preset none")
    if not builtin and not args.pretrained:
        p.error("--preset none needs --pretrained")
    if not builtin and not args.data:
        p.error("--data is required with --pretrained")
    defaults = {"output_dir": f"outputs/{family.name}", **METHOD_DEFAULTS[args.method], **family.defaults(args)}
    if args.fsdp:  # --fsdp trains without EMA: a preset's EMA gives way (an --ema-decay given is refused)
        defaults.pop("ema_decay", None)
    p.set_defaults(**defaults)  # the preset's values; flags given still win
    args = p.parse_args(argv)
    args.preset = args.preset or ("none" if args.pretrained else family.presets[0])
    for message in [*_method_conflicts(args, p), *_conflicts(args), *family.conflicts(args)]:
        p.error(message)
    return args


def _method_conflicts(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[str]:
    """The other method's flags given a value, and what DMD2 does not support."""
    owner, theirs = ("add", ADD_ONLY) if args.method == "dmd2" else ("dmd2", DMD2_ONLY)
    out = [
        f"--{dest.replace('_', '-')} is --method {owner}'s: drop it with --method {args.method}"
        for dest in theirs
        if getattr(args, dest) != p.get_default(dest)
    ]
    if args.method == "dmd2":
        for name, on in (("--fsdp", args.fsdp), ("--mixed-precision fp16", args.mixed_precision == "fp16")):
            if on:
                out.append(
                    f"--method dmd2 does not support {name}: its step gates the fake score's fused AdamW on "
                    "the device, which neither FSDP's sharded optimiser nor fp16's GradScaler does "
                    "(full or LoRA student, bf16 or no)"
                )
    return out


def _conflicts(args: argparse.Namespace) -> list[str]:
    """Combinations of flags that cannot work, each as the message argparse prints."""
    out = []
    if args.discriminator == "teacher" and args.distill_space == "pixel":
        out.append("--discriminator teacher works on latents: use --distill-space latent")
    if args.teacher_taps and args.discriminator != "teacher":
        out.append("--teacher-taps needs --discriminator teacher")
    if args.r1_placement == "none" and args.r1_gamma is not None:
        out.append("--r1-gamma has no effect with --r1-placement none: drop one of them")
    if args.diversity_seeds == 1:
        out.append("--diversity-seeds must be 0 (off) or at least 2 (a distance needs two samples)")
    if any(step < 1 or step > args.max_steps for step, _ in args.debug_nonfinite_at):
        out.append(f"--debug-nonfinite-at: steps must lie in 1..{args.max_steps}")
    if args.fsdp:
        for flag, on in (("--ema-decay", args.ema_decay > 0), ("--lora-rank", args.lora_rank > 0),
                         ("--mixed-precision fp16", args.mixed_precision == "fp16")):  # fmt: skip
            if on:
                out.append(f"--fsdp does not support {flag} (supported: full student, no EMA, bf16 or no)")
    return out


# ---------------------------------------------------------------------------------------------
# Paths, checked before any model is built
# ---------------------------------------------------------------------------------------------
def looks_local(text: str) -> bool:
    """A path rather than a hub name (``user/name``): absolute, ``./``, ``~``, a file suffix, or deeper."""
    path = Path(text)
    return (
        path.is_absolute() or text.startswith((".", "~")) or path.suffix.lower() in (".jsonl", ".csv")
        or text.count("/") > 1 or path.exists()
    )  # fmt: skip


def _writable_folder(flag: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RecipeError(f"{flag}: cannot write to the folder {folder} ({err.strerror or err})") from err


def check_paths(args: argparse.Namespace) -> None:
    """Refuse missing inputs and unwritable outputs (one line each) before anything is built.

    Raises:
        RecipeError: naming the flag and the path.
    """
    output = Path(args.output_dir)
    _writable_folder("--output-dir", output)
    for sub in ("checkpoints", "logs"):
        _writable_folder(f"--output-dir (its {sub} folder)", output / sub)
    if args.data and looks_local(args.data) and not Path(args.data).expanduser().exists():
        raise RecipeError(f"--data {args.data}: no such folder or file")
    if args.pretrained and looks_local(args.pretrained) and not Path(args.pretrained).expanduser().is_dir():
        raise RecipeError(
            f"--pretrained {args.pretrained}: no such folder (a diffusers checkpoint folder or hub id)"
        )
    if args.dinov2_weights and not Path(args.dinov2_weights).expanduser().is_file():
        raise RecipeError(f"--dinov2-weights {args.dinov2_weights}: no such file")
    if args.resume and args.resume != "latest" and not Path(args.resume).is_dir():
        raise RecipeError(f"--resume {args.resume}: no such checkpoint folder (or use --resume latest)")
