"""What ``add_sdxl.py`` shows and writes: sample grids, diversity, the export, the closing summary."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import add_sdxl_fsdp as fsdp
import addkit
from add_sdxl_models import Models, TextEncoder, square_time_ids, vae_decode
from add_sdxl_step import RunState
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
def student_weights(state: RunState) -> Iterator[nn.Module | None]:
    """The student as a plain diffusers UNet with the weights to show: the EMA's when it is on.

    On the main process; None on the others. Under ``--fsdp`` every process must enter (the
    full weights are gathered); otherwise the EMA weights are swapped in and back.
    """
    acc = state.accelerator
    if state.fsdp:
        yield fsdp.gather(state.student, state.models.teacher, acc.is_main_process)
        return
    unet = acc.unwrap_model(state.student) if acc.is_main_process else None
    if unet is None or state.ema is None:
        yield unet
        return
    live = state.trainable
    saved = [p.detach().clone() for p in live]
    _copy_into(live, list(state.ema.module.parameters()))
    try:
        yield unet
    finally:
        _copy_into(live, saved)


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
def _copy_into(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    for param, value in zip(params, values, strict=True):
        param.copy_(value)


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
def report(state: RunState, unet: nn.Module, output_dir: Path) -> Path:
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
        output_dir / "samples" / f"step-{state.progress.step:07d}.png", torch.cat(rows), len(args.grid_seeds)
    )
    if args.diversity_seeds:
        state.accelerator.log(diversity(state, unet, prompts(args)[0], timesteps), step=state.progress.step)
    return path


@torch.no_grad()
def diversity(state: RunState, unet: nn.Module, prompt: str, timesteps: list[int]) -> dict[str, float]:
    """Mean pairwise L2 distance of samples across seeds for one prompt, in D's feature space.

    Features: per tap, the mean over tokens; taps concatenated. A collapse of diversity (the
    most reported failure of distilled models) drives it towards 0.
    """
    args, models, disc = state.args, state.models, state.discriminator
    out, was_training = {}, disc.training
    disc.eval()  # no augmentation
    for steps in (timesteps[:1], timesteps):
        seeds = list(range(args.diversity_seeds))
        latents = generate(unet, models, state.text, prompt, seeds, steps, args.resolution)
        on_latents = args.discriminator == "teacher" or args.method == "dmd2"  # LADD's or DMD2's head
        x = latents if on_latents else vae_decode(models.vae, latents).clamp(-1, 1)
        feats = disc.extract(x, generator=torch.Generator(x.device).manual_seed(0))
        vec = torch.cat([f.float().mean(dim=2) for f in feats], dim=1)
        out[f"diversity/feature_distance_{len(steps)}step"] = float(torch.pdist(vec).mean())
    disc.train(was_training)
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


@dataclass
class RunSummary:
    """What a run did and where it wrote it (returned by ``add_sdxl.main``)."""

    step: int
    nonfinite_total: int
    seconds: float
    checkpoint: Path | None
    export: Path | None
    grid: Path | None
    logs: Path
    student: nn.Module | None  # the trained student (main process), for tests and notebooks
    discriminator: nn.Module
    scores: dict | None = None  # --preset tiny: the held-out scores (report.json)

    def text(self, args: argparse.Namespace) -> str:
        """The closing summary printed on stdout."""
        lines = [
            f"add_sdxl: {self.step} steps ({self.nonfinite_total} skipped as non-finite) in {self.seconds:.0f} s"
        ]
        rows = {
            "checkpoint": self.checkpoint or "none (--checkpoint-every 0)",
            "export": self.export or "none",
            "grid": self.grid or "none (--sample-every 0)",
            "logs": f"{self.logs}  (tensorboard --logdir {shlex.quote(str(self.logs))})",
        }
        if self.export is not None:
            model = self.export if args.export_pipeline else self.export / "unet"
            base = "" if args.export_pipeline else f" --base {shlex.quote(str(args.pretrained))}"
            timesteps = args.student_timesteps or [999, 749, 499, 249]
            custom = f" --timesteps {' '.join(map(str, timesteps))}" if args.student_timesteps else ""
            rows["sample"] = (
                f"python examples/sample_sdxl.py {shlex.quote(str(model))} {shlex.quote(prompts(args)[0])}"
                f"{base} --steps {len(timesteps)}{custom} --out sample.png"
            )
        if self.scores is not None:
            import add_sdxl_tiny

            out = Path(args.output_dir)
            rows["report"] = (
                f"{out / 'report.json'}  (teacher and student side by side: {out / 'comparison.png'})"
            )
            lines += [add_sdxl_tiny.table(self.scores)]
        lines += [f"  {key:<10}  {value}" for key, value in rows.items()]
        return "\n".join(lines)
