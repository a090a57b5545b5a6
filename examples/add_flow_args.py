"""Command line of ``add_flow.py``: every flag, and the defaults that depend on the preset and model.

``--preset tiny`` (the default without ``--pretrained``) builds random SD3- or Flux-architecture
models (``add_flow_tiny.py``) and runs 4 steps on CPU; the defaults in brackets in ``--help``
are those of a real run.
"""

from __future__ import annotations

import argparse

import add_flow_models as fm
import add_flow_tiny as tiny
from addkit.losses import ADVERSARIAL_LOSSES

DESCRIPTION = "ADD and LADD for diffusers rectified-flow transformers: SD3 / SD3.5 and Flux."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    a = p.add_argument
    a("--model", choices=fm.FAMILIES, default="sd3", help="transformer family")
    a(
        "--preset",
        choices=("tiny", "none"),
        default=None,
        help="tiny: random models (default without --pretrained)",
    )
    a(
        "--tiny-flux",
        choices=("dev", "schnell"),
        default="dev",
        help="tiny Flux with or without guidance embedding",
    )
    a("--pretrained", help="diffusers SD3/SD3.5 or Flux pipeline (hub id or folder)")
    a("--revision", default=None)
    a("--output-dir", default=None, help="default outputs/add_flow_<model>")
    a("--data", help="image folder with .txt captions, .jsonl manifest, or (teacher data) a .txt of prompts")
    a(
        "--data-source",
        choices=("real", "teacher"),
        default="real",
        help="real images, or latents the teacher draws for each batch of captions (LADD)",
    )
    a("--synth-steps", type=int, default=None, help="teacher sampling steps for teacher data (28; tiny 2)")
    a(
        "--synth-guidance-scale",
        type=float,
        default=None,
        help="teacher CFG for teacher data (SD3: 7.0; Flux uses its guidance embedding instead)",
    )
    a("--resolution", type=int, default=None, help="training side in pixels (default 1024; tiny 32)")
    a("--max-sequence-length", type=int, default=None, help="T5 tokens (SD3 256, Flux 512; tiny 48)")
    a(
        "--guidance",
        type=float,
        default=None,
        help="Flux guidance-embedding scale for teacher and student (3.5)",
    )
    a("--split", default="train", help="split of a Hugging Face dataset")
    a("--image-column", default=None)
    a("--caption-column", default=None)
    a("--num-workers", type=int, default=0)
    a(
        "--method",
        choices=("add", "dmd2"),
        default="add",
        help="add: ADD / LADD; dmd2: DMD2 (a fake score copied from the teacher; real images feed only its GAN head)",
    )
    a("--fake-steps", type=int, default=5, help="dmd2: fake-score updates per generator update (DMD2: 5)")
    a("--lr-fake", type=float, default=None, help="dmd2: fake-score learning rate (default --lr)")
    a("--gan-weight", type=float, default=3e-3, help="dmd2: GAN head's generator weight (0 = no head)")
    a("--gan-d-weight", type=float, default=1e-2, help="dmd2: GAN head's discriminator weight")
    # student
    a("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (one copy of the weights)")
    a("--lora-targets", nargs="+", default=list(fm.LORA_TARGETS))
    a("--gradient-checkpointing", action="store_true")
    a(
        "--mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="bf16, the precision SD3 and Flux are trained and released in (no fp16 loss scaling here)",
    )
    a(
        "--student-steps",
        type=int,
        default=4,
        help="student times FlowSchedule.timesteps(n): 1, 0.75, 0.5, 0.25",
    )
    # objective
    a("--lambda-distill", type=float, default=None, help="distillation weight (LADD: 0; ADD: 2.5)")
    a("--weighting", choices=("exponential", "sds", "nfsd"), default="exponential")
    a("--distill-space", choices=("latent", "pixel"), default="latent")
    a("--guidance-scale", type=float, default=1.0, help="teacher CFG in the distillation loss (1 = off)")
    a(
        "--negative-prompt",
        default="unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark",
        help="NFSD's negative prompt (--weighting nfsd)",
    )
    a("--adversarial-loss", choices=tuple(ADVERSARIAL_LOSSES), default="hinge")
    a("--r1-gamma", type=float, default=1e-5)
    a("--r1-placement", choices=("features", "images", "approximate", "none"), default="features")
    a("--r1-interval", type=int, default=1)
    # discriminator
    a(
        "--discriminator",
        choices=("teacher", "dinov2"),
        default="teacher",
        help="teacher: LADD's teacher features on latents; dinov2: ADD's DINOv2 on decoded images",
    )
    a("--teacher-taps", nargs="+", default=None, help="blocks to tap (default --num-taps evenly spaced)")
    a("--num-taps", type=int, default=4)
    a("--disc-logit-mean", type=float, default=1.0, help="LADD noise level: t = sigmoid(m + s xi) (m = 1)")
    a("--disc-logit-std", type=float, default=1.0)
    a("--dinov2", default="vit_small_patch14_dinov2.lvd142m")
    a("--dinov2-weights", default=None)
    a("--dinov2-resolution", type=int, default=224)
    # optimisation
    a("--max-steps", type=int, default=None)
    a("--batch-size", type=int, default=None, help="per process and micro-batch")
    a("--gradient-accumulation", type=int, default=1)
    a("--lr", type=float, default=None, help="student learning rate (1e-5; LoRA 1e-4; tiny 1e-4)")
    a("--lr-d", type=float, default=None, help="discriminator learning rate (2e-5; tiny 1e-4)")
    a("--warmup-steps", type=int, default=0)
    a("--adam-betas-d", type=float, nargs=2, default=[0.0, 0.99])
    a("--weight-decay", type=float, default=1e-2)
    a("--max-grad-norm", type=float, default=1.0)
    a("--ema-decay", type=float, default=0.0, help="EMA of the trained weights (0 = off)")
    a("--seed", type=int, default=0)
    # reliability and output
    a("--checkpoint-every", type=int, default=None)
    a("--checkpoints-keep", type=int, default=3)
    a("--resume", default=None, help="'latest' or a checkpoint folder")
    a("--max-nonfinite-in-row", type=int, default=10)
    a(
        "--sample-every",
        type=int,
        default=None,
        help="grid + diversity every N steps and at the end (0 = never)",
    )
    a("--grid-prompts", nargs="+", default=None)
    a("--grid-seeds", type=int, nargs="+", default=[0, 1])
    a("--diversity-seeds", type=int, default=4)
    a("--log-every", type=int, default=1)
    a(
        "--export-pipeline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write a complete pipeline folder (default: on for tiny)",
    )
    a(
        "--debug-nonfinite-at",
        type=int,
        nargs="*",
        default=[],
        help="(testing) NaN generator loss at these steps",
    )
    args = p.parse_args(argv)
    return _defaults(p, args)


def _defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.preset is None:
        args.preset = "none" if args.pretrained else "tiny"
    if args.preset == "none" and not (args.pretrained and args.data):
        p.error("--preset none needs --pretrained and --data")
    small = args.preset == "tiny"
    defaults = {
        "output_dir": f"outputs/add_flow_{args.model}",
        "resolution": tiny.RESOLUTION if small else 1024,
        "max_sequence_length": tiny.MAX_TOKENS if small else {"sd3": 256, "flux": 512}[args.model],
        "synth_steps": 2 if small else 28,
        "synth_guidance_scale": 7.0 if args.model == "sd3" else 1.0,
        "lambda_distill": 0.0 if args.discriminator == "teacher" else 2.5,
        "max_steps": 4 if small else 10_000,
        "batch_size": 2 if small else 4,
        "lr": 1e-4 if small or args.lora_rank else 1e-5,
        "lr_d": 1e-4 if small else 2e-5,
        "checkpoint_every": 2 if small else 500,
        "sample_every": 4 if small else 500,
        "export_pipeline": small,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.discriminator == "teacher" and args.distill_space == "pixel":
        p.error("--discriminator teacher works on latents: use --distill-space latent")
    if args.method == "dmd2":
        for flag, on in (
            ("--lora-rank", args.lora_rank > 0),
            ("--data-source teacher", args.data_source == "teacher"),
            ("--discriminator dinov2", args.discriminator == "dinov2"),
        ):
            if on:
                p.error(
                    f"--method dmd2 does not support {flag} (a full fake score; its GAN head reads real latents)"
                )
        if args.fake_steps < 1:
            p.error(f"--fake-steps must be >= 1, got {args.fake_steps}")
    if args.synth_guidance_scale != 1.0 and args.model == "flux":
        p.error("--synth-guidance-scale: Flux teachers are guidance-distilled; set --guidance instead")
    return args
