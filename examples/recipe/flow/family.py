"""``add_flow.py``'s adapter to the training core: SD3 / SD3.5 and Flux transformers on rectified flow.

Discriminator: LADD's (default) reads the teacher's image tokens at several transformer blocks
on latents re-noised to a logit-normal noise level, heads conditioned on the pooled text; no
image is decoded. ``--discriminator dinov2`` is ADD's: DINOv2 on VAE-decoded images. The
distillation loss is optional (``--lambda-distill``; LADD trains adversarially only). Data:
real images (``--data-source real``) or latents the teacher draws for each batch of captions
(``--data-source teacher``, LADD's synthetic data). ``--method dmd2``: a fake score copied from
the teacher and a GAN head on its last block (``recipe.flow.dmd``).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import torch
from torch import nn

import addkit
import recipe.dmd as dmd
from recipe.args import count, number
from recipe.family import AddInputs
from recipe.flow import data, report, tiny
from recipe.flow import dmd as flow_dmd
from recipe.flow import models as fm
from recipe.step import RunState
from addkit.sampling import sample


class FlowFamily:
    """The flow family (`recipe.family.Family`): an SD3 or Flux transformer, its VAE, CLIP + T5 text."""

    name = "add_flow"
    presets = ("tiny", "none")

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        # fmt: off
        g = parser.add_argument_group("SD3 / Flux (transformer, rectified flow)")
        g.add_argument("--model", choices=fm.FAMILIES, default="sd3", help="transformer family")
        g.add_argument("--tiny-flux", choices=("dev", "schnell"), default="dev",
                       help="tiny Flux with or without guidance embedding")
        g.add_argument("--data-source", choices=("real", "teacher"), default="real",
                       help="real images, or latents the teacher draws for each batch of captions (LADD)")
        g.add_argument("--synth-steps", type=count(1), default=None,
                       help="teacher sampling steps for teacher data (28; tiny 2)")
        g.add_argument("--synth-guidance-scale", type=number(0), default=None,
                       help="teacher CFG for teacher data (SD3: 7.0; Flux uses its guidance embedding instead)")
        g.add_argument("--max-sequence-length", type=count(1), default=None,
                       help="T5 tokens (SD3 256, Flux 512; tiny 48)")
        g.add_argument("--guidance", type=number(0), default=None,
                       help="Flux guidance-embedding scale for teacher and student (3.5)")
        g.add_argument("--lora-targets", nargs="+", default=list(fm.LORA_TARGETS))
        g.add_argument("--student-steps", type=count(1), default=4,
                       help="student times FlowSchedule.timesteps(n): 1, 0.75, 0.5, 0.25")
        g.add_argument("--num-taps", type=count(1), default=4,
                       help="teacher blocks the LADD discriminator reads (evenly spaced) without --teacher-taps")
        g.add_argument("--disc-logit-mean", type=number(), default=1.0,
                       help="LADD noise level: t = sigmoid(m + s xi) (m = 1)")
        g.add_argument("--disc-logit-std", type=number(0, open_low=True), default=1.0)
        g.add_argument("--disc-noise-space", choices=("sigma", "time"), default="sigma",
                       help="where the logit-normal lives: the noise level sigma the teacher sees (LADD), "
                            "or the unshifted time (shifted after: SD3's shift 3 makes m = 1 an effective 2.1)")
        # fmt: on

    def defaults(self, args: argparse.Namespace) -> dict[str, Any]:
        """The ``tiny`` preset's values (random models, 4 steps on a CPU) or a real run's."""
        small = args.preset == "tiny"
        disc = args.discriminator or "teacher"
        return {
            "output_dir": f"outputs/add_flow_{args.model}",
            "discriminator": "teacher",
            "distill_space": "latent",
            "augment": True,
            "resolution": tiny.RESOLUTION if small else 1024,
            "max_sequence_length": tiny.MAX_TOKENS if small else {"sd3": 256, "flux": 512}[args.model],
            "synth_steps": 2 if small else 28,
            "synth_guidance_scale": 7.0 if args.model == "sd3" else 1.0,
            "lambda_distill": 0.0 if disc == "teacher" else 2.5,
            "max_steps": 4 if small else 10_000,
            "batch_size": 2 if small else 4,
            "lr": 1e-4 if small or args.lora_rank else 1e-5,
            "lr_d": 1e-4 if small else 2e-5,
            "checkpoint_every": 2 if small else 500,
            "sample_every": 4 if small else 500,
            "export_pipeline": small,
            # DMD2 published no SD3 / Flux configuration: its SDXL GAN weight, no real-score CFG (Flux
            # is guidance-distilled; SD3's CFG is a choice to make with --guidance-scale)
            **({"guidance_scale": 1.0, "gan_weight": 5e-3} if args.method == "dmd2" else {}),
        }

    def conflicts(self, args: argparse.Namespace) -> list[str]:
        out = fm.diffusers_conflicts()
        vae_factor = tiny.VAE_FACTOR if args.preset == "tiny" else fm.VAE_FACTOR
        if problem := fm.resolution_problem(args.resolution, args.model, vae_factor):
            out.append(problem)
        if args.mixed_precision == "fp16":
            out.append("--mixed-precision fp16: SD3 and Flux are trained and released in bf16 and their "
                       "activations overflow float16; use bf16")  # fmt: skip
        if args.fsdp:
            out.append("--fsdp is not offered for SD3 / Flux yet (their transformer blocks are not sharded "
                       "here): use DDP, with --lora-rank for large models")  # fmt: skip
        if args.synth_guidance_scale != 1.0 and args.model == "flux":
            out.append("--synth-guidance-scale: Flux teachers are guidance-distilled; set --guidance instead")
        if args.method == "dmd2":
            for flag, on in (("--lora-rank", args.lora_rank > 0), ("--data-source teacher", args.data_source == "teacher"),
                             ("--discriminator dinov2", args.discriminator == "dinov2")):  # fmt: skip
                if on:
                    out.append(f"--method dmd2 does not support {flag} (a full fake score; its GAN head "
                               "reads real latents)")  # fmt: skip
        return out

    def load(self, args: argparse.Namespace, device: Any, dtype: Any) -> tuple[fm.FlowModels, dmd.FakeScore | None]:
        models = fm.load_models(args, dtype)  # seeded: identical on every process
        fm.place_models(models, device, dtype)
        fake = flow_dmd.build(args, models, device) if args.method == "dmd2" else None
        return models, fake

    def placement(self, models: fm.FlowModels, dtype: torch.dtype) -> list:
        return fm.placement(models, dtype)

    def discriminator(
        self, args: argparse.Namespace, models: fm.FlowModels, fake: dmd.FakeScore | None, dinov2: dict | None = None
    ) -> nn.Module:
        if fake is not None:
            return flow_dmd.gan_head(args, models, fake)
        teacher = addkit.wrap(models.teacher, models.schedule, "flow")
        return fm.build_discriminator(args, models, teacher, dinov2=dinov2)

    def student_timesteps(self, args: argparse.Namespace, models: fm.FlowModels) -> Any:
        return models.schedule.timesteps(args.student_steps)

    def add_objective(self, args: argparse.Namespace, models: fm.FlowModels, disc: nn.Module, options: dict) -> Any:
        teacher = addkit.wrap(models.teacher, models.schedule, "flow")
        decode = (lambda z: fm.decode_latents(models.pipe.vae, z)) if args.discriminator == "dinov2" else None
        sees = "latents" if args.discriminator == "teacher" else "decoded"
        return addkit.ADDObjective(
            teacher, disc, models.schedule, decode=decode, discriminator_sees=sees, **options
        )

    def text(self, args: argparse.Namespace, models: fm.FlowModels, device: Any) -> fm.PromptEncoder:
        return fm.PromptEncoder(models.pipe, models.guidance, device, args.max_sequence_length)

    def make_data(self, args: argparse.Namespace, folder: Path) -> Path:
        """The tiny preset's data: the tiny world's captioned shapes (as the SDXL recipe's)."""
        from recipe.sdxl import tiny as sdxl_tiny

        return sdxl_tiny.make_dataset(folder, seed=args.seed)

    def dataset(self, args: argparse.Namespace, output_dir: Path) -> Any:
        return data.load_dataset(args)

    def add_inputs(self, state: RunState, batch: Any) -> AddInputs:
        """Captions to conditioning; clean latents from the images or drawn by the teacher (LADD's data)."""
        args, models, device = state.args, state.models, state.accelerator.device
        cond, pooled = state.text(batch["caption"])
        ladd = args.discriminator == "teacher"
        cfg = args.guidance_scale != 1.0 or args.weighting == "nfsd"
        synth_cfg = args.data_source == "teacher" and args.synth_guidance_scale != 1.0
        uncond = fm.unconditional(state.text, cond) if cfg or synth_cfg else None
        negative = None
        if args.weighting == "nfsd":  # NFSD: the negative prompt's prediction, same guidance embedding
            negative_text, _ = state.text.fixed(args.negative_prompt, len(batch["caption"]))  # encoded once
            negative = {**cond, **negative_text}
        real = None  # teacher data with DINOv2: the teacher's samples, decoded by the objective
        if args.data_source == "real":
            pixels = batch["pixels"].to(device)
            with torch.no_grad():
                x0 = fm.encode_images(models.pipe.vae, pixels)
            real = x0 if ladd else pixels
        else:
            side = args.resolution // models.pipe.vae_scale_factor
            shape = (len(batch["caption"]), models.pipe.vae.config.latent_channels, side, side)
            x0 = teacher_latents(state, cond, uncond if synth_cfg else None, shape)
            real = x0 if ladd else None
        return AddInputs(x0=x0, cond=cond, real=real, uncond=uncond if cfg else None, negative=negative,
                         c_text=pooled, feature_kwargs=cond if ladd else None)  # fmt: skip

    def dmd_inputs(self, state: RunState, batch: Any) -> dmd.Inputs:
        return flow_dmd.inputs(state, batch)

    def report(self, state: RunState, student: nn.Module, step: int) -> Path:
        return report.report(state, student, step)

    def export(self, state: RunState, student: nn.Module) -> Path:
        return report.export(state, student)

    def evaluate(self, state: RunState, student: nn.Module) -> dict | None:
        return None  # the tiny flow models are random: nothing to score

    def scores_table(self, scores: dict) -> str:
        return ""

    def sample_command(self, args: argparse.Namespace, export: Path) -> str | None:
        if args.export_pipeline:
            model, extra = str(export), ""
        elif args.pretrained:  # the base pipeline with the exported transformer or LoRA
            part = "lora" if args.lora_rank else "transformer"
            model, extra = str(args.pretrained), f" --{part} {shlex.quote(str(export / part))}"
        else:
            return None  # a built-in preset without --export-pipeline: no pipeline to load it into
        return (
            f"python examples/sample_flow.py {shlex.quote(model)} {shlex.quote(report.prompts(args)[0])}{extra} "
            f"--steps {args.student_steps} --out sample.png"
        )


@torch.no_grad()
def teacher_latents(
    state: RunState, cond: dict[str, Any], uncond: dict[str, Any] | None, shape: tuple[int, ...]
) -> torch.Tensor:
    """LADD's synthetic data: the teacher's sample for each caption (pipeline timesteps, Euler steps)."""
    args, models = state.args, state.models
    spacing = "linspace" if models.family == "sd3" else "trailing"  # what each pipeline uses
    noise = torch.randn(shape, device=state.accelerator.device)
    guided = {"guidance_scale": args.synth_guidance_scale, "uncond": uncond} if uncond is not None else {}
    return sample(
        addkit.wrap(models.teacher, models.schedule, "flow"),
        noise,
        schedule=models.schedule,
        timesteps=models.schedule.timesteps(args.synth_steps, spacing),
        renoise="deterministic",
        **guided,
        **cond,
    )


FLOW = FlowFamily()
