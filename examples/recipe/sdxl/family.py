"""``add_sdxl.py``'s adapter to the training core: SDXL / SD 1.x / SD 2.x UNets on VP schedules."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import torch
from torch import nn

import addkit
import recipe.dmd as dmd
from recipe import data
from recipe.args import count
from recipe.family import AddInputs
from recipe.sdxl import models as m
from recipe.sdxl import random as random_preset
from recipe.sdxl import report, tiny
from recipe.step import RunState


class SDXLFamily:
    """The SDXL family (`recipe.family.Family`): UNet student and teacher, VAE, CLIP text encoders."""

    name = "add_sdxl"
    presets = ("tiny", "random", "none")

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("SDXL / SD (UNet, VP schedule)")
        g.add_argument("--image-encoder", default="vit_large_patch14_dinov2.lvd142m",
                       help="timm model for the image conditioning (ADD: DINOv2 ViT-L CLS), or 'none'")  # fmt: skip
        g.add_argument("--student-timesteps", type=count(0), nargs="+", default=None,
                       help="default: the schedule's 4 trailing timesteps (999 749 499 249)")  # fmt: skip

    def defaults(self, args: argparse.Namespace) -> dict[str, Any]:
        """The preset's values: ``tiny`` the tiny world's tuned ADD settings, ``random`` a few plumbing steps."""
        shared = {"lambda_distill": 2.5, "distill_space": "pixel", "discriminator": "dinov2"}
        if args.method == "dmd2" and args.preset != "none":  # the presets' tiny teachers: no CFG, the earlier weight
            shared.update(guidance_scale=1.0, gan_weight=3e-3)
        if args.preset == "tiny":
            import tiny_world

            steps = tiny_world.DEFAULTS["max_steps"]
            return {**shared, **tiny_world.DEFAULTS, "checkpoint_every": steps, "sample_every": steps,
                    "export_pipeline": True}  # fmt: skip
        rand = args.preset == "random"
        return {
            **shared,
            "max_steps": 4 if rand else 10_000,
            "batch_size": 2 if rand else 4,
            "lr": 1e-4 if rand else 1e-5,
            "lr_d": 1e-4 if rand else 2e-5,
            "checkpoint_every": 2 if rand else 500,
            "sample_every": 4 if rand else 500,
            "export_pipeline": rand,
            "augment": True,
        }

    def conflicts(self, args: argparse.Namespace) -> list[str]:
        steps = args.student_timesteps
        if steps is not None and len(set(steps)) != len(steps):
            return [f"--student-timesteps must be distinct, got {steps}"]
        return []

    def load(self, args: argparse.Namespace, device: Any, dtype: Any) -> tuple[m.Models, dmd.FakeScore | None]:
        models = m.load_models(args)  # seeded: identical on every process; sets the default resolution
        if args.method == "dmd2":  # DMD2's published values for the model found (SDXL or SD 1.5)
            args.guidance_scale = (8.0 if models.sdxl else 1.75) if args.guidance_scale is None else args.guidance_scale
            args.gan_weight = (5e-3 if models.sdxl else 1e-3) if args.gan_weight is None else args.gan_weight
        fake = None
        if args.method == "dmd2":  # before placing: a LoRA fake score lives on the teacher
            fake = dmd.build_fake_score(models.teacher, lora_rank=args.lora_rank, seed=args.seed)
        m.place_models(models, device, dtype)
        if fake is not None:
            dmd.place_fake_score(fake, device)
        return models, fake

    def placement(self, models: m.Models, dtype: torch.dtype) -> list:
        return m.placement(models, dtype)

    def discriminator(
        self, args: argparse.Namespace, models: m.Models, fake: dmd.FakeScore | None, dinov2: dict | None = None
    ) -> nn.Module:
        return gan_head(args, models, fake) if fake is not None else m.build_discriminator(args, models, dinov2)

    def student_timesteps(self, args: argparse.Namespace, models: m.Models) -> Any:
        return args.student_timesteps

    def add_objective(self, args: argparse.Namespace, models: m.Models, disc: nn.Module, options: dict) -> Any:
        decode = (lambda z: m.vae_decode(models.vae, z)) if args.discriminator == "dinov2" else None
        teacher = addkit.wrap(models.teacher, models.schedule, models.prediction)
        return addkit.ADDObjective(teacher, disc, models.schedule, decode=decode, **options)

    def text(self, args: argparse.Namespace, models: m.Models, device: Any) -> m.TextEncoder:
        return m.TextEncoder(models, device)

    def dataset(self, args: argparse.Namespace, output_dir: Path) -> Any:
        records = data.load_records(
            args.data, split=args.split, image_column=args.image_column, caption_column=args.caption_column
        )
        return data.ImageCaptionDataset(records, args.resolution)

    def make_data(self, args: argparse.Namespace, folder: Path) -> Path:
        """A preset's built-in data folder (the tiny world's captioned shapes, or random plumbing data)."""
        make = tiny.make_dataset if args.preset == "tiny" else random_preset.make_dataset
        return make(folder, seed=args.seed)

    def add_inputs(self, state: RunState, batch: Any) -> AddInputs:
        """Captions to conditioning (SDXL micro-conditioning from the batch), latents, image embedding."""
        args, models, device = state.args, state.models, state.accelerator.device
        pixels = batch["pixels"].to(device)
        cond, pooled = _conditioning(state, batch)
        with torch.no_grad():
            x0 = m.vae_encode(models.vae, pixels)
            c_image = m.embed_images(models.image_encoder, pixels) if models.image_encoder is not None else None
        nfsd = args.weighting == "nfsd"
        uncond = m.unconditional(cond, models, state.text) if args.guidance_scale != 1.0 or nfsd else None
        negative = None
        if nfsd:
            negative, _ = state.text([args.negative_prompt] * len(batch["caption"]))
            negative.update({k: v for k, v in cond.items() if k == "time_ids"})
        real = pixels if args.discriminator == "dinov2" else x0
        return AddInputs(x0=x0, cond=cond, real=real, uncond=uncond, negative=negative,
                         c_text=pooled, c_image=c_image)  # fmt: skip

    def dmd_inputs(self, state: RunState, batch: Any) -> dmd.Inputs:
        """Captions to conditioning, fresh noise, and (with a head) the real images' latents."""
        args, models, device = state.args, state.models, state.accelerator.device
        cond, pooled = _conditioning(state, batch)
        real = None
        if state.objective.gan_head is not None:
            with torch.no_grad():
                real = m.vae_encode(models.vae, batch["pixels"].to(device))
        side = args.resolution // models.vae_factor
        noise = torch.randn(len(batch["caption"]), models.unet.config.in_channels, side, side, device=device)
        uncond = m.unconditional(cond, models, state.text) if args.guidance_scale != 1.0 else None
        return dmd.Inputs(noise=noise, cond=cond, uncond=uncond, gan={"c_text": pooled, **cond}, real=real)

    def report(self, state: RunState, student: nn.Module, step: int) -> Path:
        return report.report(state, student, step)

    def export(self, state: RunState, student: nn.Module) -> Path:
        return report.export(state.args, state.models, student)

    def evaluate(self, state: RunState, student: nn.Module) -> dict | None:
        """The tiny world's held-out scores of teacher and student (``--preset tiny``)."""
        if state.args.preset != "tiny":
            return None
        print("add_sdxl: scoring teacher and student on the tiny world's held-out captions ...")
        with dmd.teacher_alone(state.fake), report.teacher_apart(state.models, student) as (models, scored):
            return tiny.evaluate(models, scored, Path(state.args.output_dir), seed=state.args.seed)

    def scores_table(self, scores: dict) -> str:
        return tiny.table(scores)

    def sample_command(self, args: argparse.Namespace, export: Path) -> str:
        model = export if args.export_pipeline else export / "unet"
        base = "" if args.export_pipeline else f" --base {shlex.quote(str(args.pretrained))}"
        timesteps = args.student_timesteps or [999, 749, 499, 249]
        custom = f" --timesteps {' '.join(map(str, timesteps))}" if args.student_timesteps else ""
        return (
            f"python examples/sample_sdxl.py {shlex.quote(str(model))} {shlex.quote(report.prompts(args)[0])}"
            f"{base} --steps {len(timesteps)}{custom} --out sample.png"
        )


def _conditioning(state: RunState, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The UNet's conditioning and the pooled text; SDXL's ``time_ids`` from the batch's sizes and crops."""
    cond, pooled = state.text(batch["caption"])
    if state.models.sdxl:
        device = state.accelerator.device
        size, crop = batch["original_size"].to(device), batch["crop_top_left"].to(device)
        cond["time_ids"] = m.sdxl_time_ids(size, crop, state.args.resolution)
    return cond, pooled


def gan_head(args: argparse.Namespace, models: m.Models, fake: dmd.FakeScore) -> addkit.ProjectedDiscriminator:
    """DMD2's GAN head: projected heads (seeded) on the fake score's mid block, on latents."""
    unet = models.unet
    encoder = models.text_encoders[-1].config
    pooled_dim = encoder.projection_dim if models.sdxl else encoder.hidden_size
    features = m.unet_features(  # token heads, as the tiny world's DMD2 row was measured
        fake.network, models, ["mid_block"], channels=[unet.config.block_out_channels[-1]], freeze=False,
        layout="tokens",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 2)
        return addkit.ProjectedDiscriminator(features, c_text_dim=pooled_dim)


SDXL = SDXLFamily()
