"""What ``add_sdxl.py`` shows and writes: sample grids, diversity and the export."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import addkit
from recipe.sdxl.models import Models, TextEncoder, square_time_ids, vae_decode
from recipe.report import feature_distance, save_grid
from recipe.step import RunState
from addkit.denoisers import AdaptersDisabled, adapters_disabled
from addkit.sampling import sample

TINY_PROMPTS = ("a red circle on a blue background", "a yellow square on a black background")
SDXL_PROMPTS = (
    "a photo of a cat sitting on a windowsill",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse on the moon",
)


def prompts(args: argparse.Namespace) -> list[str]:
    """The grid's prompts: ``--grid-prompts``, else the preset's (tiny: four held-out captions)."""
    if args.grid_prompts:
        return list(args.grid_prompts)
    if args.preset == "tiny":
        import tiny_world

        return list(tiny_world.HELD_OUT_CAPTIONS[::6])
    return list(TINY_PROMPTS if args.preset == "random" else SDXL_PROMPTS)


@contextlib.contextmanager
def teacher_apart(models: Models, unet: nn.Module) -> Iterator[tuple[Models, nn.Module]]:
    """``(models, student)`` whose teacher is a plain UNet, for code that runs both side by side.

    With one copy (LoRA) the student ``unet`` and the teacher's view share a module: the
    student becomes a copy of it (a LoRA's weights as shown, the EMA's when ``unet`` comes from
    `student_weights`) and the teacher the module itself with its adapters off, inside the block.
    """
    if not isinstance(models.teacher, AdaptersDisabled):
        yield models, unet
        return
    student = copy.deepcopy(unet)
    with adapters_disabled(models.unet):
        yield dataclasses.replace(models, teacher=models.unet), student


@torch.no_grad()
def generate(
    unet: nn.Module,
    models: Models,
    text: TextEncoder,
    prompt: str,
    seeds: list[int],
    steps: list[int],
    side: int,
) -> torch.Tensor:
    """Latents ``[len(seeds), C, h, w]`` for one prompt from fixed seeds.

    ADD sampling with addkit's sampler: x0 at each student timestep from pure noise, fresh
    re-noising in between; no classifier-free guidance.
    """
    student = addkit.wrap(unet, models.schedule, models.prediction)
    shape = (unet.config.in_channels, side // models.vae_factor, side // models.vae_factor)
    cond, _ = text([prompt] * len(seeds))
    if models.sdxl:
        cond["time_ids"] = square_time_ids(side, len(seeds), text.device)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    gen = torch.Generator(text.device).manual_seed(10_000 + seeds[0])  # re-noising between steps
    return sample(
        student, noise.to(text.device), schedule=models.schedule, timesteps=steps, renoise="fresh",
        generator=gen, **cond,
    )  # fmt: skip


@torch.no_grad()
def report(state: RunState, unet: nn.Module, step: int) -> Path:
    """Sample grid (rows: 1 step and all steps x prompts; columns: seeds) and diversity scalars."""
    args, models = state.args, state.models
    timesteps = torch.as_tensor(state.objective.student_timesteps).tolist()
    rows = [
        vae_decode(
            models.vae, generate(unet, models, state.text, p, list(args.grid_seeds), steps, args.resolution)
        )
        for steps in (timesteps[:1], timesteps)
        for p in prompts(args)
    ]
    path = save_grid(
        Path(args.output_dir) / "samples" / f"step-{step:07d}.png", torch.cat(rows), len(args.grid_seeds)
    )
    if args.diversity_seeds:
        state.accelerator.log(diversity(state, unet, prompts(args)[0], timesteps), step=step)
    return path


@torch.no_grad()
def diversity(state: RunState, unet: nn.Module, prompt: str, timesteps: list[int]) -> dict[str, float]:
    """Mean pairwise feature distance of samples across seeds for one prompt (`recipe.report.feature_distance`)."""
    args, models, out = state.args, state.models, {}
    for steps in (timesteps[:1], timesteps):
        seeds = list(range(args.diversity_seeds))
        latents = generate(unet, models, state.text, prompt, seeds, steps, args.resolution)
        on_latents = args.discriminator == "teacher" or args.method == "dmd2"  # LADD's or DMD2's head
        x = latents if on_latents else vae_decode(models.vae, latents).clamp(-1, 1)
        out[f"diversity/feature_distance_{len(steps)}step"] = feature_distance(state.discriminator, x)
    return out


def export(args: argparse.Namespace, models: Models, unet: nn.Module) -> Path:
    """Write the student: ``export/unet`` (and ``export/lora``), optionally a whole pipeline."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    out = Path(args.output_dir) / "export"
    unet = copy.deepcopy(unet).eval()
    pipeline_cls = StableDiffusionXLPipeline if models.sdxl else StableDiffusionPipeline
    if args.lora_rank:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        pipeline_cls.save_lora_weights(str(out / "lora"), unet_lora_layers=layers)
        unet.fuse_lora()
        unet.unload_lora()
    unet.save_pretrained(out / "unet")
    if args.export_pipeline:
        # SDXL-Turbo's sampler in diffusers: Euler ancestral, trailing spacing, no CFG.
        scheduler = EulerAncestralDiscreteScheduler.from_config(
            models.scheduler_config, timestep_spacing="trailing"
        )
        parts = {
            "unet": unet, "vae": models.vae, "scheduler": scheduler,
            "text_encoder": models.text_encoders[0], "tokenizer": models.tokenizers[0],
        }  # fmt: skip
        if models.sdxl:
            parts.update(text_encoder_2=models.text_encoders[1], tokenizer_2=models.tokenizers[1])
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipeline_cls(**parts).save_pretrained(out)
    return out
