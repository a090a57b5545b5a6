"""Reference recipe: Adversarial Diffusion Distillation of an SDXL (or SD 1.x/2.x) UNet.

Run ``python examples/add_sdxl.py`` (the ``tiny`` preset: random SDXL-architecture models, CPU,
seconds) or ``accelerate launch examples/add_sdxl.py --pretrained stabilityai/stable-diffusion-xl-base-1.0
--data DIR ...``. See ``examples/README.md`` and ``docs/recipe.md``.

The loop lives here, the maths in addkit: ``ADDObjective`` builds the student inputs and both
losses; this file owns models, data, optimisers, distribution (accelerate), checkpoints and logs.

Per optimiser step and micro-batch: encode captions and images; draw the student inputs at the
student timesteps (pure noise at 999); generator step (student x0 -> adversarial + distillation
loss, the discriminator frozen); discriminator step on real images and the detached student
sample. A non-finite loss anywhere in the step skips it on every process.

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042 (ADD).
    Sauer et al., *Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
    Distillation*, arXiv 2403.12015 (the ``--discriminator teacher`` option).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import add_sdxl_data as data
import add_sdxl_tiny as tiny
import addkit
from addkit.denoisers import DiffusersUNetAdapter, WrappedDenoiser
from addkit.objective import ADDObjective
from addkit.sampling import sample

CHECKPOINT_PREFIX = "step-"
TINY_PROMPTS = ("a red circle on a blue background", "a yellow square on a black background")
SDXL_PROMPTS = (
    "a photo of a cat sitting on a windowsill",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse on the moon",
)


class RecipeError(RuntimeError):
    """A run cannot go on; the message says why and what to do."""


class NonFiniteLossError(RecipeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    a = p.add_argument
    a(
        "--preset",
        choices=("tiny", "none"),
        default=None,
        help="tiny: random SDXL-architecture models, generated data (default without --pretrained)",
    )
    a("--pretrained", help="diffusers SDXL / SD 1.x / SD 2.x checkpoint (hub id or folder)")
    a("--revision", default=None)
    a("--output-dir", default="outputs/add_sdxl")
    a("--data", help="image+txt folder, .jsonl/.csv manifest, or a datasets name/path (tiny: generated)")
    a("--split", default="train")
    a("--image-column", default=None)
    a("--caption-column", default=None)
    a(
        "--resolution",
        type=int,
        default=None,
        help="training side in pixels (default: 1024 SDXL, 512 SD, 32 tiny)",
    )
    a("--num-workers", type=int, default=0)
    # student
    a("--lora-rank", type=int, default=0, help="train a LoRA of this rank instead of the full student")
    a("--gradient-checkpointing", action="store_true")
    a("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    # objective (ADDObjective)
    a("--lambda-distill", type=float, default=2.5, help="ADD §4: 2.5")
    a("--weighting", choices=("exponential", "sds", "nfsd"), default="exponential")
    a("--distill-space", choices=("pixel", "latent"), default="pixel", help="ADD: pixel (decoded by the VAE)")
    a("--guidance-scale", type=float, default=1.0, help="teacher CFG in the distillation loss (1 = off)")
    a(
        "--negative-prompt",
        default="unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark",
        help="NFSD's negative prompt (--weighting nfsd)",
    )
    a("--adversarial-loss", default="hinge")
    a("--r1-gamma", type=float, default=1e-5)
    a("--r1-placement", choices=("features", "images", "approximate", "none"), default="features")
    a("--r1-interval", type=int, default=1)
    a("--student-timesteps", type=int, nargs="+", default=[999, 749, 499, 249])
    # discriminator
    a(
        "--discriminator",
        choices=("dinov2", "teacher"),
        default="dinov2",
        help="dinov2: ADD's DINOv2 features on decoded images; teacher: LADD's teacher features on latents",
    )
    a("--dinov2", default="vit_small_patch14_dinov2.lvd142m", help="timm name (ADD: ViT-S/14)")
    a("--dinov2-weights", default=None, help="local weights file for --dinov2 (offline)")
    a("--dinov2-resolution", type=int, default=224)
    a(
        "--image-encoder",
        default="vit_large_patch14_dinov2.lvd142m",
        help="timm model for the discriminator's image conditioning (ADD: DINOv2 ViT-L CLS), or 'none'",
    )
    a("--teacher-taps", nargs="+", default=None, help="UNet blocks for --discriminator teacher")
    # optimisation
    a("--max-steps", type=int, default=None)
    a("--batch-size", type=int, default=None, help="per process and micro-batch")
    a("--gradient-accumulation", type=int, default=1)
    a("--lr", type=float, default=None, help="student learning rate (default 1e-5; tiny 1e-4)")
    a("--lr-d", type=float, default=None, help="discriminator learning rate (default 2e-5; tiny 1e-4)")
    a("--warmup-steps", type=int, default=0)
    a("--adam-betas-d", type=float, nargs=2, default=[0.0, 0.99])
    a("--weight-decay", type=float, default=1e-2)
    a("--max-grad-norm", type=float, default=1.0)
    a("--ema-decay", type=float, default=0.0, help="EMA of the student (0 = off; e.g. 0.999)")
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
        help="sample grid + diversity every N steps and at the end (0 = never; default 500, tiny 4)",
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
        help="(testing) replace the generator loss by NaN at these steps",
    )
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "none" if args.pretrained else "tiny"
    if args.preset == "none" and not args.pretrained:
        p.error("--preset none needs --pretrained")
    if args.preset == "none" and not args.data:
        p.error("--data is required with --pretrained")
    tiny_run = args.preset == "tiny"
    defaults = {
        "max_steps": 4 if tiny_run else 10_000,
        "batch_size": 2 if tiny_run else 4,
        "lr": 1e-4 if tiny_run else 1e-5,
        "lr_d": 1e-4 if tiny_run else 2e-5,
        "checkpoint_every": 2 if tiny_run else 500,
        "sample_every": 4 if tiny_run else 500,
        "export_pipeline": tiny_run,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.discriminator == "teacher" and args.distill_space == "pixel":
        p.error("--discriminator teacher works on latents: use --distill-space latent")
    return args


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
@dataclass
class Models:
    teacher: Any  # frozen diffusers UNet
    student: Any  # trainable copy (or LoRA on a copy)
    vae: Any
    text_encoders: list
    tokenizers: list
    schedule: addkit.VPSchedule
    prediction: str
    sdxl: bool
    scheduler_config: dict
    image_encoder: Any = None


def load_models(args: argparse.Namespace) -> Models:
    """Teacher, student, VAE, text encoders, tokenizers and schedule (tiny or from a checkpoint)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if args.preset == "tiny":
        parts = tiny.build_parts(args.seed)
        teacher, vae = parts.unet, parts.vae
        encoders, tokenizers = (
            [parts.text_encoder, parts.text_encoder_2],
            [parts.tokenizer, parts.tokenizer_2],
        )
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        args.resolution = args.resolution or tiny.RESOLUTION
    else:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        src = {"pretrained_model_name_or_path": args.pretrained, "revision": args.revision}
        teacher = UNet2DConditionModel.from_pretrained(**src, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(**src, subfolder="vae")
        scheduler = DDPMScheduler.from_pretrained(**src, subfolder="scheduler")
        encoders = [CLIPTextModel.from_pretrained(**src, subfolder="text_encoder")]
        tokenizers = [AutoTokenizer.from_pretrained(**src, subfolder="tokenizer")]
        if teacher.config.addition_embed_type == "text_time":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(**src, subfolder="text_encoder_2"))
            tokenizers.append(AutoTokenizer.from_pretrained(**src, subfolder="tokenizer_2"))
        args.resolution = args.resolution or (1024 if len(encoders) == 2 else 512)
    sdxl = teacher.config.addition_embed_type == "text_time"
    for module in (teacher, vae, *encoders):
        module.requires_grad_(False).eval()
    student = copy.deepcopy(teacher)
    student.train()
    if args.lora_rank:
        from peft import LoraConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            student.add_adapter(
                LoraConfig(
                    r=args.lora_rank,
                    lora_alpha=args.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                )
            )
    else:
        student.requires_grad_(True)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return Models(
        teacher=teacher,
        student=student,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        schedule=addkit.VPSchedule.from_diffusers(scheduler),
        prediction=scheduler.config.prediction_type,
        sdxl=sdxl,
        scheduler_config=dict(scheduler.config),
        image_encoder=load_image_encoder(args),
    )


def load_image_encoder(args: argparse.Namespace) -> Any:
    """ADD's image conditioning network (DINOv2 ViT-L CLS embedding of the real image), or None."""
    if args.image_encoder == "none" or args.discriminator == "teacher":
        return None
    if args.preset == "tiny":
        return tiny.image_encoder(args.seed).requires_grad_(False).eval()
    import timm

    model = timm.create_model(args.image_encoder, pretrained=True, num_classes=0, img_size=224)
    return model.requires_grad_(False).eval()


def embed_images(encoder: Any, pixels: torch.Tensor) -> torch.Tensor:
    """CLS embedding ``[B, D]`` of images in ``[-1, 1]`` (resized, ImageNet-normalised)."""
    side = encoder.patch_embed.img_size[0]
    x = F.interpolate(pixels.float(), size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    mean = x.new_tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = x.new_tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    dtype = next(encoder.parameters()).dtype
    return encoder((((x + 1) / 2 - mean) / std).to(dtype)).float()


def build_discriminator(args: argparse.Namespace, models: Models) -> addkit.ProjectedDiscriminator:
    """ADD's DINOv2 projected discriminator, or LADD's teacher-feature one (seeded heads)."""
    pooled_dim = (
        models.text_encoders[-1].config.projection_dim
        if models.sdxl
        else (models.text_encoders[-1].config.hidden_size)
    )
    c_image_dim = models.image_encoder.num_features if models.image_encoder is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 2)
        if args.discriminator == "teacher":
            return addkit.ProjectedDiscriminator(
                teacher_features(args, models), c_text_dim=pooled_dim, c_image_dim=None
            )
        augment = addkit.DiffAugment()
        if args.preset == "tiny":
            return addkit.ProjectedDiscriminator.from_dinov2(
                c_text_dim=pooled_dim,
                c_image_dim=c_image_dim,
                augment=augment,
                **tiny.dinov2_kwargs(),
            )
        return addkit.ProjectedDiscriminator.from_dinov2(
            args.dinov2,
            pretrained=args.dinov2_weights or True,
            resolution=args.dinov2_resolution,
            c_text_dim=pooled_dim,
            c_image_dim=c_image_dim,
            augment=augment,
        )


def teacher_features(args: argparse.Namespace, models: Models) -> addkit.TeacherFeatures:
    """LADD: the frozen teacher on re-noised latents, tapped at its down and mid blocks.

    The objective passes no text conditioning to the feature network, so the teacher runs on
    the unconditional (zero) embedding; the heads see the pooled text by projection.
    """
    unet = models.teacher
    taps = args.teacher_taps or [f"down_blocks.{len(unet.down_blocks) - 1}", "mid_block"]
    widths = {f"down_blocks.{i}": c for i, c in enumerate(unet.config.block_out_channels)}
    widths["mid_block"] = unet.config.block_out_channels[-1]
    adapter = DiffusersUNetAdapter(unet)

    def call(x_t: torch.Tensor, t: torch.Tensor) -> Any:
        b = x_t.shape[0]
        cond = {"encoder_hidden_states": x_t.new_zeros(b, 1, unet.config.cross_attention_dim)}
        if models.sdxl:
            side = x_t.shape[-1] * 2 ** (len(models.vae.config.block_out_channels) - 1)
            pooled = (
                unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            )
            cond["text_embeds"] = x_t.new_zeros(b, pooled)
            cond["time_ids"] = x_t.new_tensor([[side, side, 0, 0, side, side]]).expand(b, 6)
        return adapter(x_t, t, **cond)

    return addkit.TeacherFeatures(unet, models.schedule, taps, channels=[widths[t] for t in taps], call=call)


class TextEncoder:
    """Captions -> UNet conditioning (``encoder_hidden_states`` [+ SDXL ``text_embeds``]) and pooled text."""

    def __init__(self, models: Models, device: torch.device) -> None:
        self.models, self.device = models, device

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.models.tokenizers, self.models.text_encoders):
            ids = tokenizer(
                list(captions),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            if self.models.sdxl:  # SDXL: penultimate layer of both encoders, pooled from the second
                hidden.append(out.hidden_states[-2])
                pooled = getattr(out, "text_embeds", None)
            else:
                hidden.append(out.last_hidden_state)
                pooled = out.pooler_output
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1).float()}
        if self.models.sdxl:
            cond["text_embeds"] = pooled.float()
        return cond, pooled.float()


def size_ids(original_size: torch.Tensor, crop: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning ``[B, 6]``: original size, crop top-left, target size."""
    target = original_size.new_tensor([resolution, resolution]).expand_as(original_size)
    return torch.cat([original_size, crop, target], dim=1).float()


def unconditional(
    cond: dict[str, torch.Tensor], models: Models, text: TextEncoder
) -> dict[str, torch.Tensor]:
    """Teacher CFG's unconditional branch: zeros for SDXL (its pipeline default), '' for SD."""
    if models.sdxl:
        return {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()}
    empty, _ = text([""] * cond["encoder_hidden_states"].shape[0])
    return {**cond, "encoder_hidden_states": empty["encoder_hidden_states"]}


# ---------------------------------------------------------------------------------------------
# Run state, checkpoints
# ---------------------------------------------------------------------------------------------
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
    root = output_dir / "checkpoints"
    found = [
        p
        for p in root.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, then an atomic rename.

    A crash before the rename leaves only ``.tmp-*`` folders, which ``--resume latest`` ignores.
    """
    root = output_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # re-saving a step (after a resume): move the old one aside first
            old = root / f".old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)  # atomic on POSIX: the checkpoint appears complete or not at all
        for stale in checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str, output_dir: Path) -> Path:
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise RecipeError(f"--resume latest: no checkpoint in {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise RecipeError(f"--resume: {path} is not a checkpoint folder")
    return path


# ---------------------------------------------------------------------------------------------
# Sampling, grid, diversity, export
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    student: WrappedDenoiser,
    models: Models,
    text: TextEncoder,
    prompts: list[str],
    seeds: list[int],
    steps: list[int],
    resolution: int,
) -> torch.Tensor:
    """Latents ``[len(prompts) * len(seeds), C, h, w]`` (prompt-major) from fixed seeds.

    ADD sampling (SPEC §6) with addkit's sampler: x0 at each student timestep from pure noise,
    fresh re-noising in between; no classifier-free guidance.
    """
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    shape = (models.student.config.in_channels, resolution // factor, resolution // factor)
    device = text.device
    out = []
    for prompt in prompts:
        cond, _ = text([prompt] * len(seeds))
        if models.sdxl:
            cond["time_ids"] = size_ids(
                torch.tensor([[resolution] * 2] * len(seeds)),
                torch.zeros(len(seeds), 2, dtype=torch.long),
                resolution,
            ).to(device)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        gen = torch.Generator(device).manual_seed(10_000 + seeds[0])  # re-noising between steps
        out.append(
            sample(
                student,
                noise.to(device),
                schedule=models.schedule,
                timesteps=steps,
                renoise="fresh",
                generator=gen,
                **cond,
            )
        )
    return torch.cat(out)


def decode(models: Models, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to images in about ``[-1, 1]`` (differentiable)."""
    vae = models.vae
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.to(latents.dtype)


@torch.no_grad()
def sample_grid(
    path: Path,
    student: WrappedDenoiser,
    models: Models,
    text: TextEncoder,
    prompts: list[str],
    seeds: list[int],
    args: argparse.Namespace,
) -> None:
    """PNG grid: one row per (steps, prompt) for 1 and 4 steps, one column per seed."""
    from PIL import Image

    rows = []
    for steps in ([args.student_timesteps[0]], args.student_timesteps):
        rows.append(decode(models, generate(student, models, text, prompts, seeds, steps, args.resolution)))
    images = ((torch.cat(rows).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n_cols, (c, h, w) = len(seeds), images.shape[1:]
    grid = images.reshape(-1, n_cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(-1, n_cols * w, c)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)


@torch.no_grad()
def diversity(
    student: WrappedDenoiser,
    models: Models,
    text: TextEncoder,
    disc: Any,
    prompt: str,
    n: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Mean pairwise L2 distance of samples across ``n`` seeds for one prompt, in D's feature space.

    Features: per tap, the mean over tokens; taps concatenated. A collapse of diversity (the
    most reported failure of distilled models) drives it towards 0.
    """
    out = {}
    was_training = disc.training
    disc.eval()  # no augmentation
    for steps in ([args.student_timesteps[0]], args.student_timesteps):
        latents = generate(student, models, text, [prompt], list(range(n)), steps, args.resolution)
        x = latents if args.discriminator == "teacher" else decode(models, latents).clamp(-1, 1)
        feats = disc.extract(x, generator=torch.Generator(x.device).manual_seed(0))
        vec = torch.cat([f.float().mean(dim=2) for f in feats], dim=1)
        out[f"diversity/feature_distance_{len(steps)}step"] = float(torch.pdist(vec).mean())
    disc.train(was_training)
    return out


def export(args: argparse.Namespace, accelerator: Any, models: Models, student: Any, ema: Any) -> Path:
    """Write the student: ``export/unet`` (or ``export/lora``) and optionally a whole pipeline."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    out = Path(args.output_dir) / "export"
    unet = accelerator.unwrap_model(student)
    params = [p for p in unet.parameters() if p.requires_grad]
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        unet = copy.deepcopy(unet).eval()
    finally:
        if ema is not None:
            ema.restore(params)
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
            "unet": unet,
            "vae": models.vae,
            "scheduler": scheduler,
            "text_encoder": models.text_encoders[0],
            "tokenizer": models.tokenizers[0],
        }
        if models.sdxl:
            parts.update(text_encoder_2=models.text_encoders[1], tokenizer_2=models.tokenizers[1])
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipeline_cls(**parts).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _any_process(accelerator: Any, flag: bool) -> bool:
    return bool(accelerator.gather(torch.tensor([float(flag)], device=accelerator.device)).max() > 0)


def _average_grads(accelerator: Any, params: list[torch.nn.Parameter]) -> None:
    """Average the discriminator's gradients over processes (it is not wrapped by DDP/FSDP:
    the objective calls its ``extract``/``classify`` directly, which bypasses the wrappers)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the recipe; returns a summary (final step, skipped steps, paths)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with="tensorboard",
        step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
    )
    device = accelerator.device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:  # e.g. torchrun on CPU without ACCELERATE_USE_CPU=1
        raise RecipeError(
            f"{world} processes were launched but accelerate sees {accelerator.num_processes}: on CPU, "
            "run `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`"
        )
    if args.ema_decay and accelerator.distributed_type == DistributedType.FSDP:
        raise RecipeError("--ema-decay with FSDP is not supported (the EMA would hold sharded parameters)")
    if args.preset == "tiny" and not args.data:
        with accelerator.main_process_first():
            args.data = (
                str(tiny.make_dataset(output_dir / "tiny_data", seed=args.seed))
                if (accelerator.is_main_process)
                else str(output_dir / "tiny_data")
            )
    records = data.load_records(
        args.data, split=args.split, image_column=args.image_column, caption_column=args.caption_column
    )
    models = load_models(args)  # seeded: identical on every process; sets the default resolution
    dataset = data.ImageCaptionDataset(records, args.resolution)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    for module in (models.teacher, models.vae, *models.text_encoders):
        module.to(device, dtype=weight_dtype)
    if models.image_encoder is not None:
        models.image_encoder.to(device, dtype=weight_dtype)
    if args.lora_rank:  # frozen base in the compute dtype, LoRA weights in float32
        from diffusers.training_utils import cast_training_params

        models.student.to(device, dtype=weight_dtype)
        cast_training_params(models.student, dtype=torch.float32)
    disc = build_discriminator(args, models).to(device)
    set_seed(args.seed, device_specific=True)  # training randomness differs per process

    trainable = [p for p in models.student.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    opt_d = torch.optim.AdamW(
        disc.parameters(), lr=args.lr_d, betas=tuple(args.adam_betas_d), weight_decay=0.0
    )
    warmup = max(1, args.warmup_steps)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: min(1.0, (s + 1) / warmup))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: min(1.0, (s + 1) / warmup))
    student, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(
        models.student, opt_g, opt_d, sched_g, sched_d
    )
    ema = None
    if args.ema_decay:
        ema = EMAModel(trainable, decay=args.ema_decay)
        ema.to(device)
    progress = Progress()
    accelerator.register_for_checkpointing(progress, disc, *([ema] if ema is not None else []))

    if args.resume:
        path = resolve_resume(args.resume, output_dir)
        accelerator.load_state(str(path))
        accelerator.print(f"resumed from {path} at step {progress.step}")

    objective = ADDObjective(
        addkit.wrap(models.teacher, models.schedule, models.prediction),
        disc,
        models.schedule,
        lambda_distill=args.lambda_distill,
        weighting=args.weighting,
        space=args.distill_space,
        decode=(lambda z: decode(models, z)) if args.discriminator == "dinov2" else None,
        guidance_scale=args.guidance_scale,
        adversarial_loss=args.adversarial_loss,
        r1_gamma=args.r1_gamma,
        r1_placement=None if args.r1_placement == "none" else args.r1_placement,
        r1_interval=args.r1_interval,
        student_timesteps=tuple(args.student_timesteps),
    )
    denoiser = WrappedDenoiser(DiffusersUNetAdapter(student), models.schedule, models.prediction)
    sample_denoiser = WrappedDenoiser(
        DiffusersUNetAdapter(accelerator.unwrap_model(student)), models.schedule, models.prediction
    )
    text = TextEncoder(models, device)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        generator=torch.Generator(),
        sampler=data.StreamSampler(
            len(dataset),
            seed=args.seed,
            start=progress.samples,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
        ),
    )
    batches = iter(loader)
    prompts = list(args.grid_prompts or (TINY_PROMPTS if args.preset == "tiny" else SDXL_PROMPTS))
    accelerator.init_trackers(
        "add_sdxl", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    )
    bar = tqdm(
        total=args.max_steps,
        initial=progress.step,
        disable=not accelerator.is_main_process,
        desc="ADD",
        dynamic_ncols=True,
    )
    samples_per_step = args.batch_size * accelerator.num_processes * args.gradient_accumulation
    last_checkpoint = None

    while progress.step < args.max_steps:
        started = time.perf_counter()
        step = progress.step + 1
        bad, logs = False, {}
        for micro in range(args.gradient_accumulation):
            batch = next(batches)
            sync = micro == args.gradient_accumulation - 1
            with accelerator.no_sync(student) if not sync else contextlib.nullcontext():
                loss_g, loss_d, logs = micro_step(
                    args, accelerator, objective, denoiser, disc, models, text, batch, step
                )
            bad |= not (bool(torch.isfinite(loss_g)) and bool(torch.isfinite(loss_d)))
        progress.samples += samples_per_step
        _average_grads(accelerator, list(disc.parameters()))
        norm_g = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
        norm_d = torch.nn.utils.clip_grad_norm_(list(disc.parameters()), float("inf"))
        bad |= not (bool(torch.isfinite(norm_g)) and bool(torch.isfinite(norm_d)))
        if _any_process(accelerator, bad):  # every process skips together
            progress.nonfinite_total += 1
            progress.nonfinite_in_row += 1
        else:
            opt_g.step()
            opt_d.step()
            progress.nonfinite_in_row = 0
            if ema is not None:
                ema.step(trainable)
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        sched_g.step()
        sched_d.step()
        progress.step = step

        logs = {k: float(v) for k, v in logs.items()}
        logs.update(
            {
                "lr/student": sched_g.get_last_lr()[0],
                "lr/discriminator": sched_d.get_last_lr()[0],
                "grad_norm/student": float(norm_g),
                "nonfinite/total": progress.nonfinite_total,
                "images_per_second": samples_per_step / (time.perf_counter() - started),
            }
        )
        if step % args.log_every == 0:
            accelerator.log(logs, step=step)
        bar.update(1)
        bar.set_postfix(
            {k.split("/")[-1]: f"{logs[k]:.3g}" for k in ("g/adv", "g/distill", "d/total") if k in logs},
            refresh=False,
        )
        if progress.nonfinite_in_row >= args.max_nonfinite_in_row:
            bar.close()
            accelerator.end_training()
            where = f"the last checkpoint ({last_checkpoint or 'none yet'}) is intact"
            raise NonFiniteLossError(
                f"stopping: {progress.nonfinite_in_row} steps in a row (up to step {step}) had a non-finite "
                f"loss or gradient and were skipped; {where}. Lower --lr / --lr-d, enable --max-grad-norm, "
                f"or check the data and --mixed-precision"
            )
        if args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):
            if accelerator.is_main_process:
                report(
                    args,
                    output_dir,
                    step,
                    sample_denoiser,
                    models,
                    text,
                    disc,
                    prompts,
                    ema,
                    trainable,
                    accelerator,
                )
            accelerator.wait_for_everyone()
        if step % args.checkpoint_every == 0 or step == args.max_steps:
            last_checkpoint = save_checkpoint(accelerator, output_dir, step, args.checkpoints_keep)
    bar.close()
    accelerator.wait_for_everyone()
    exported = export(args, accelerator, models, student, ema) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {
        "step": progress.step,
        "nonfinite_total": progress.nonfinite_total,
        "export": exported,
        "checkpoint": last_checkpoint,
        "student": accelerator.unwrap_model(student),
        "discriminator": disc,
    }


def micro_step(args, accelerator, objective, denoiser, disc, models, text, batch, step):
    """One micro-batch: generator backward, then discriminator backward. Returns both losses and logs."""
    device = accelerator.device
    pixels = batch["pixels"].to(device)
    cond, pooled = text(batch["caption"])
    if models.sdxl:
        cond["time_ids"] = size_ids(batch["original_size"], batch["crop_top_left"], args.resolution).to(
            device
        )
    with torch.no_grad():
        latent_dist = models.vae.encode(pixels.to(models.vae.dtype)).latent_dist
        x0 = latent_dist.sample().float() * models.vae.config.scaling_factor
        c_image = embed_images(models.image_encoder, pixels) if models.image_encoder is not None else None
    inp = objective.sample_student_inputs(x0)  # the objective zeroes c_image at the pure-noise step
    nfsd = args.weighting == "nfsd"
    uncond = unconditional(cond, models, text) if args.guidance_scale != 1.0 or nfsd else None
    negative = None
    if nfsd:
        negative, _ = text([args.negative_prompt] * len(batch["caption"]))
        negative.update({k: v for k, v in cond.items() if k == "time_ids"})
    scale = 1.0 / args.gradient_accumulation

    disc.requires_grad_(False)  # generator step: gradients reach the student only
    with accelerator.autocast():
        student_x0 = denoiser.x0(inp.x_t, inp.t, **cond)
        loss_g, logs_g = objective.generator_loss(
            student_x0,
            teacher_cond=cond,
            teacher_uncond=uncond,
            negative_cond=negative,
            c_text=pooled,
            c_image=c_image,
            student_t=inp.t,
        )
    if step in args.debug_nonfinite_at:
        loss_g = loss_g * float("nan")
    accelerator.backward(loss_g * scale)

    disc.requires_grad_(True)
    with accelerator.autocast():
        with torch.no_grad():
            fake = objective.discriminator_input(student_x0.detach())
        real = pixels if args.discriminator == "dinov2" else x0
        loss_d, logs_d = objective.discriminator_loss(
            real, fake, c_text=pooled, c_image=c_image, student_t=inp.t, step=step
        )
    accelerator.backward(loss_d * scale)
    return loss_g.detach(), loss_d.detach(), {**logs_g, **logs_d}


def report(args, output_dir, step, denoiser, models, text, disc, prompts, ema, trainable, accelerator):
    """Sample grid PNG and diversity scalars (main process; EMA weights when enabled)."""
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    try:
        path = output_dir / "samples" / f"step-{step:07d}.png"
        sample_grid(path, denoiser, models, text, prompts, list(args.grid_seeds), args)
        accelerator.log(
            diversity(denoiser, models, text, disc, prompts[0], args.diversity_seeds, args), step=step
        )
    finally:
        if ema is not None:
            ema.restore(trainable)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and train; the entry point of ``python examples/add_sdxl.py``."""
    return train(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, data.DataError) as err:
        print(f"add_sdxl: error: {err}", file=sys.stderr)
        sys.exit(1)
