"""Models of ``add_sdxl.py``: teacher, student, VAE, text encoders, discriminator, and SDXL conditioning.

The frozen networks run in the compute dtype except the VAE when its config asks for float32
(``force_upcast``, the SDXL VAE overflows in float16): then it stays in float32 and every
encode and decode runs in float32 with autocast off, as the diffusers pipelines do.

With ``--lora-rank r`` the UNet gets a LoRA adapter and *is* the student; the teacher (the
distillation target, LADD's feature network, the tiny preset's scores) is the same module with
its adapters disabled (``addkit.denoisers.AdaptersDisabled``), so the UNet's weights are held
once. A full fine-tune trains a copy. ``--method dmd2`` with LoRA keeps the student a LoRA on a
copy: its fake score is a second adapter on the teacher's UNet (see ``recipe/dmd.py``).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import recipe.sdxl.random as random_preset
import addkit
import tiny_world
from recipe.args import RecipeError
from recipe.lora import UNET_TARGETS, add_lora
from addkit.denoisers import AdaptersDisabled


@dataclass
class Models:
    """Everything loaded from the checkpoint (or the tiny preset), before distribution."""

    teacher: Any  # the frozen UNet; with LoRA (ADD), AdaptersDisabled(student)
    student: Any  # the UNet with LoRA (dmd2: on a copy), or a trainable copy
    vae: Any
    text_encoders: list
    tokenizers: list
    schedule: addkit.VPSchedule
    prediction: str
    sdxl: bool
    scheduler_config: dict
    image_encoder: Any = None

    @property
    def unet(self) -> Any:
        """The teacher's UNet module (with LoRA in an ADD run: the student itself, adapters on)."""
        return bare(self.teacher)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along a side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_models(args: argparse.Namespace) -> Models:
    """Teacher, student, VAE, text encoders, tokenizers and schedule (tiny or from a checkpoint).

    Raises:
        RecipeError: when ``--pretrained`` cannot be loaded.
    """
    from diffusers import DDPMScheduler

    if args.preset == "random":
        parts = random_preset.build_parts(args.seed)
        teacher, vae = parts.unet, parts.vae
        encoders = [parts.text_encoder, parts.text_encoder_2]
        tokenizers = [parts.tokenizer, parts.tokenizer_2]
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        args.resolution = args.resolution or random_preset.RESOLUTION
    else:  # a checkpoint: the tiny world's shipped one, or --pretrained
        try:
            teacher, vae, scheduler, encoders, tokenizers = _from_pretrained(args)
        except OSError as err:
            raise RecipeError(f"--pretrained {args.pretrained}: cannot load it ({err})") from err
        native = tiny_world.RESOLUTION if args.preset == "tiny" else 1024 if len(encoders) == 2 else 512
        args.resolution = args.resolution or native
    return assemble(args, teacher, vae, scheduler, encoders, tokenizers, load_image_encoder(args))


def assemble(
    args: argparse.Namespace, unet: Any, vae: Any, scheduler: Any, encoders: list, tokenizers: list,
    image_encoder: Any = None,
) -> Models:
    """`Models` from loaded networks (frozen here): the student made from ``unet`` by `make_student`.

    What `load_models` does after loading, and what the benchmarks do with networks built at real
    sizes on ``meta`` (``benchmarks/_recipe_step.py``), so both hold the same objects.
    """
    for module in (unet, vae, *encoders, image_encoder):
        if module is not None:
            module.requires_grad_(False).eval()
    student, teacher = make_student(args, unet)
    models = Models(
        teacher=teacher,
        student=student,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        schedule=addkit.VPSchedule.from_diffusers(scheduler),
        prediction=scheduler.config.prediction_type,
        sdxl=bare(teacher).config.addition_embed_type == "text_time",
        scheduler_config=dict(scheduler.config),
        image_encoder=image_encoder,
    )
    _check_resolution(args, models)
    return models


def make_student(args: argparse.Namespace, unet: Any) -> tuple[Any, Any]:
    """``(student, teacher)`` from the frozen ``unet``: one copy with LoRA, two for a full fine-tune.

    With ``--lora-rank`` (ADD) the student is ``unet`` with a LoRA adapter (seeded from
    ``--seed``) and the teacher is ``AdaptersDisabled(unet)``; DMD2 puts the LoRA on a copy
    (``unet`` then carries the fake score's adapter). Without LoRA the student is a trainable copy.
    """
    one_copy = bool(args.lora_rank) and args.method != "dmd2"
    student = unet if one_copy else copy.deepcopy(unet)
    if args.lora_rank:
        add_lora(student, args.lora_rank, UNET_TARGETS, seed=args.seed)
    else:
        student.requires_grad_(True)
    student.train()
    if args.gradient_checkpointing:  # the teacher's view suspends it for its own calls
        student.enable_gradient_checkpointing()
    return student, AdaptersDisabled(unet) if one_copy else unet


def bare(unet: Any) -> Any:
    """The UNet module behind a teacher view (``AdaptersDisabled``), or ``unet`` itself."""
    return unet.model if isinstance(unet, AdaptersDisabled) else unet


def _from_pretrained(args: argparse.Namespace) -> tuple:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path = str(tiny_world.WEIGHTS) if args.preset == "tiny" else args.pretrained
    src = {"pretrained_model_name_or_path": path, "revision": args.revision}
    teacher = UNet2DConditionModel.from_pretrained(**src, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(**src, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(**src, subfolder="scheduler")
    encoders = [CLIPTextModel.from_pretrained(**src, subfolder="text_encoder")]
    tokenizers = [AutoTokenizer.from_pretrained(**src, subfolder="tokenizer")]
    if teacher.config.addition_embed_type == "text_time":
        encoders.append(CLIPTextModelWithProjection.from_pretrained(**src, subfolder="text_encoder_2"))
        tokenizers.append(AutoTokenizer.from_pretrained(**src, subfolder="tokenizer_2"))
    return teacher, vae, scheduler, encoders, tokenizers


def _check_resolution(args: argparse.Namespace, models: Models) -> None:
    """The UNet halves the latent side once per down block but the last: the side must divide evenly."""
    factor = models.vae_factor * 2 ** (len(models.unet.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise RecipeError(f"--resolution {args.resolution}: must be a multiple of {factor} for this model")


def placement(models: Models, dtype: torch.dtype) -> list[tuple[nn.Module, torch.dtype, bool]]:
    """Where each frozen network's weights go: ``(module, dtype, lora_in_float32)``.

    The compute ``dtype`` for the UNet, text and image encoders; the VAE in float32 when it asks
    for it under float16 (``force_upcast``); a LoRA student's frozen base in ``dtype`` with its
    adapter weights in float32. A full student stays float32 (autocast computes). One policy for
    the recipe (`place_models`) and the memory plan (``benchmarks/_recipe_step.py``).
    """
    out = [(mod, dtype, False) for mod in (models.unet, *models.text_encoders, models.image_encoder) if mod is not None]
    upcast = dtype == torch.float16 and getattr(models.vae.config, "force_upcast", False)
    out.append((models.vae, torch.float32 if upcast else dtype, False))
    if models.student is not None and hasattr(models.student, "peft_config"):
        out.append((models.student, dtype, True))
    return out


def place_models(models: Models, device: torch.device, dtype: torch.dtype) -> None:
    """Frozen networks to ``device`` as `placement` says; a LoRA's weights in float32 on its base."""
    for module, want, lora_fp32 in placement(models, dtype):
        module.to(device, **({} if want == torch.float32 else {"dtype": want}))
        if lora_fp32:
            from diffusers.training_utils import cast_training_params

            cast_training_params(module, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# VAE: a precision island in the VAE's own dtype
# ---------------------------------------------------------------------------------------------
def vae_encode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Latents (float32, scaled) of images in ``[-1, 1]``, one sample of the posterior."""
    with torch.autocast(pixels.device.type, enabled=False):
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample()
    return latents.float() * vae.config.scaling_factor


def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in about ``[-1, 1]`` (differentiable), in the dtype of ``latents``."""
    with torch.autocast(latents.device.type, enabled=False):
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return images.to(latents.dtype)


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------
def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: int) -> torch.Tensor:
    """SDXL's micro-conditioning ``[B, 6]``: original (h, w), crop top-left (top, left), target (h, w).

    Args:
        original_size: ``[B, 2]`` size of each image before resizing and cropping.
        crop_top_left: ``[B, 2]`` top-left corner of each crop.
        target_size: the square training (or sampling) side.

    Returns:
        float32 ``[B, 6]`` on the device of ``original_size``.

    References:
        Podell et al., *SDXL*, arXiv 2307.01952, §2.2 (size- and crop-conditioning).
    """
    target = original_size.new_tensor([target_size, target_size]).expand_as(original_size)
    return torch.cat([original_size, crop_top_left.to(original_size), target], dim=1).float()


def square_time_ids(side: int, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``time_ids`` of uncropped ``side x side`` images: rows ``[side, side, 0, 0, side, side]``."""
    size = torch.full((batch, 2), side, dtype=torch.long, device=device)
    return sdxl_time_ids(size, torch.zeros_like(size), side)


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
                pooled = getattr(out, "text_embeds", None)  # the second encoder has the projection
            else:
                hidden.append(out.last_hidden_state)
                pooled = out.pooler_output
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1).float()}
        if self.models.sdxl:
            cond["text_embeds"] = pooled.float()
        return cond, pooled.float()


def unconditional(
    cond: dict[str, torch.Tensor], models: Models, text: TextEncoder
) -> dict[str, torch.Tensor]:
    """Teacher CFG's unconditional branch: zeros for SDXL (its pipeline default), '' for SD."""
    if models.sdxl:
        return {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()}
    empty, _ = text([""] * cond["encoder_hidden_states"].shape[0])
    return {**cond, "encoder_hidden_states": empty["encoder_hidden_states"]}


# ---------------------------------------------------------------------------------------------
# Discriminator and its image conditioning
# ---------------------------------------------------------------------------------------------
def load_image_encoder(args: argparse.Namespace) -> Any:
    """ADD's image conditioning network (DINOv2 ViT-L CLS embedding of the real image), or None."""
    if args.image_encoder == "none" or args.discriminator == "teacher" or args.method == "dmd2":
        return None
    if args.preset == "random":
        return random_preset.image_encoder(args.seed).requires_grad_(False).eval()
    if args.preset == "tiny":
        return tiny_world.image_encoder()
    try:  # from_timm fails at once, with what to do, when the weights cannot be had offline
        features = addkit.DINOv2Features.from_timm(args.image_encoder, pretrained=True, num_classes=0)
    except FileNotFoundError as err:
        raise RecipeError(
            f"--image-encoder {args.image_encoder}: {err} (or pass --image-encoder none)"
        ) from err
    return features.model.requires_grad_(False).eval()


def embed_images(encoder: Any, pixels: torch.Tensor) -> torch.Tensor:
    """CLS embedding ``[B, D]`` of images in ``[-1, 1]`` (resized, ImageNet-normalised)."""
    side = encoder.patch_embed.img_size[0]
    x = F.interpolate(pixels.float(), size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    mean = x.new_tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = x.new_tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    dtype = next(encoder.parameters()).dtype
    return encoder((((x + 1) / 2 - mean) / std).to(dtype)).float()


def build_discriminator(
    args: argparse.Namespace, models: Models, dinov2: dict[str, Any] | None = None
) -> addkit.ProjectedDiscriminator:
    """ADD's DINOv2 projected discriminator, or LADD's teacher-feature one (seeded heads).

    Args:
        args: the run's flags.
        models: the run's models.
        dinov2: ``ProjectedDiscriminator.from_dinov2``'s network arguments (default: the preset's
            tiny network, or ``--dinov2`` with its pretrained weights).
    """
    encoder = models.text_encoders[-1].config
    pooled_dim = encoder.projection_dim if models.sdxl else encoder.hidden_size
    c_image_dim = models.image_encoder.num_features if models.image_encoder is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 2)
        if args.discriminator == "teacher":
            # LADD: 2-D heads on the feature maps, told the noise level and the caption
            features = teacher_features(args, models)
            return addkit.ProjectedDiscriminator(features, c_text_dim=pooled_dim, c_noise_dim=NOISE_DIM)
        augment = addkit.DiffAugment() if args.augment else None
        kwargs = {"c_text_dim": pooled_dim, "c_image_dim": c_image_dim, "augment": augment}
        try:
            return addkit.ProjectedDiscriminator.from_dinov2(**(dinov2 or dinov2_network(args)), **kwargs)
        except FileNotFoundError as err:
            raise RecipeError(f"--dinov2 {args.dinov2}: {err} (or pass --dinov2-weights FILE)") from err


def dinov2_network(args: argparse.Namespace) -> dict[str, Any]:
    """The DINOv2 network the flags name: the preset's tiny one, or ``--dinov2`` with its weights."""
    if args.preset == "random":
        return random_preset.dinov2_kwargs()
    if args.preset == "tiny":
        return tiny_world.dinov2_kwargs()
    return {"model_name": args.dinov2, "pretrained": args.dinov2_weights or True, "resolution": args.dinov2_resolution}


NOISE_DIM = 64
"""Width of the noise-level embedding LADD's heads are conditioned on."""


def teacher_features(args: argparse.Namespace, models: Models) -> addkit.TeacherFeatures:
    """LADD: the frozen teacher on re-noised latents, tapped at its down and mid blocks."""
    unet = models.unet
    widths = {f"down_blocks.{i}": c for i, c in enumerate(unet.config.block_out_channels)}
    widths["mid_block"] = unet.config.block_out_channels[-1]
    taps = args.teacher_taps or [f"down_blocks.{len(unet.down_blocks) - 1}", "mid_block"]
    unknown = [t for t in taps if t not in widths]
    if unknown:
        raise RecipeError(f"--teacher-taps: unknown blocks {unknown}; choose from {sorted(widths)}")
    return unet_features(models.teacher, models, taps, channels=[widths[t] for t in taps])


def unet_features(
    unet: Any, models: Models, taps: list[str], *, channels: list[int], freeze: bool = True, layout: str = "grid"
) -> addkit.TeacherFeatures:
    """A UNet's features at ``taps`` on re-noised latents (LADD's teacher; DMD2's fake score with ``freeze=False``).

    Without conditioning (ADD's objective passes none to LADD's teacher features) the UNet runs
    on the unconditional (zero) embedding and the heads see the pooled text by projection; DMD2's
    GAN head passes the caption's (``encoder_hidden_states``, ``text_embeds``, ``time_ids``), as
    DMD2 conditions its fake UNet's features. ``unet`` may be a teacher view (``AdaptersDisabled``):
    the features are then the base's.
    """
    adapter = addkit.denoisers.DiffusersUNetAdapter(unet)
    config = bare(unet).config
    pooled = config.projection_class_embeddings_input_dim
    pooled = pooled - 6 * config.addition_time_embed_dim if models.sdxl else 0

    def call(x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> Any:
        if not cond:
            b = x_t.shape[0]
            cond = {"encoder_hidden_states": x_t.new_zeros(b, 1, config.cross_attention_dim)}
            if models.sdxl:
                cond["text_embeds"] = x_t.new_zeros(b, pooled)
                side = x_t.shape[-1] * models.vae_factor
                cond["time_ids"] = square_time_ids(side, b, x_t.device).to(x_t.dtype)
        return adapter(x_t, t, **cond)

    return addkit.TeacherFeatures(
        unet, models.schedule, taps, channels=channels, call=call, freeze=freeze, layout=layout  # type: ignore[arg-type]
    )
