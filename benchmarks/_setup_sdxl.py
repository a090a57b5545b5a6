"""The step of ``examples/add_sdxl.py`` at SDXL's sizes, built on ``meta`` (see ``_add_setups.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import _architectures as arches
import addkit
from _add_setups import (
    LORA_TARGETS_UNET,
    StepConfig,
    autocast_for,
    copy_student,
    place_weights,
    train_step,
    trainable_params,
)
from _estimate import Setup
from _materialize import Materializer
from addkit.denoisers import DiffusersUNetAdapter, WrappedDenoiser


def _embed_images(encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """examples/add_sdxl.py ``embed_images``: the CLS embedding of resized, normalised images."""
    side = encoder.patch_embed.img_size[0]
    x = F.interpolate(pixels.float(), size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    mean = x.new_tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = x.new_tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    dtype = next(encoder.parameters()).dtype
    return encoder((((x + 1) / 2 - mean) / std).to(dtype)).float()


def sdxl_setup(cfg: StepConfig) -> Callable[[Materializer], Setup]:
    """The step of ``examples/add_sdxl.py`` for ``cfg`` (an SDXL-architecture ``model``)."""
    arch = arches.ARCHITECTURES[cfg.model]

    def build(make: Materializer) -> Setup:
        with torch.device("meta"):
            teacher = arches.denoiser(arch).requires_grad_(False)
            student = copy_student(cfg, teacher, LORA_TARGETS_UNET)
            if cfg.teacher_checkpointing:
                teacher.enable_gradient_checkpointing()
            vae = arches.vae(arch).requires_grad_(False)
            if cfg.vae_checkpointing:
                vae.enable_gradient_checkpointing()
            encoders = [e.requires_grad_(False) for e in arches.text_encoders(arch)]
            image_encoder = arches.image_encoder(arch) if cfg.discriminator == "dinov2" else None
        low = place_weights(make, cfg, student, [teacher, vae, *encoders])
        schedule = addkit.VPSchedule.scaled_linear()
        if image_encoder is not None:
            make(image_encoder.requires_grad_(False), low)
        with torch.device("meta"):
            disc = _sdxl_discriminator(cfg, arch, teacher, schedule, vae, image_encoder)
        make(disc, torch.float32)  # the recipe keeps the discriminator in float32
        if cfg.discriminator == "dinov2":
            make(disc.features, torch.float32)
        b, side = cfg.batch, cfg.resolution
        g = torch.Generator(make.device).manual_seed(0)  # draws on the step's device
        pixels, text, pooled, time_ids = (
            make.tensor(lambda: torch.rand(b, 3, side, side) * 2 - 1),
            make.tensor(lambda: torch.randn(b, arch.text_len, arch.text_dim)),
            make.tensor(lambda: torch.randn(b, arch.pooled_dim)),
            make.tensor(lambda: torch.tensor([[side, side, 0, 0, side, side]] * b, dtype=torch.float32)),
        )
        sf = vae.config.scaling_factor

        def decode(z: torch.Tensor) -> torch.Tensor:  # examples/add_sdxl.py ``decode``
            return vae.decode((z / sf).to(vae.dtype)).sample.to(z.dtype)

        dinov2 = cfg.discriminator == "dinov2"
        objective = addkit.ADDObjective(
            addkit.wrap(teacher, schedule, "eps"),
            disc,
            schedule,
            space="pixel" if dinov2 else "latent",
            decode=decode if dinov2 else None,
            student_timesteps=(999, 749, 499, 249),
        )

        def prepare() -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], torch.Tensor, Any]:
            with torch.no_grad():
                x0 = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=g).float() * sf
                c_image = _embed_images(image_encoder, pixels) if image_encoder is not None else None
            cond = {"encoder_hidden_states": text, "text_embeds": pooled, "time_ids": time_ids}
            return x0, pixels if dinov2 else x0, cond, pooled, c_image

        trainable = trainable_params(student)
        opts = [  # examples/add_sdxl.py: fused AdamW (no foreach temporaries)
            torch.optim.AdamW(trainable, lr=1e-5, weight_decay=1e-2, fused=True),
            torch.optim.AdamW(disc.parameters(), lr=2e-5, betas=(0.0, 0.99), weight_decay=0.0, fused=True),
        ]
        step = train_step(
            objective=objective,
            student=WrappedDenoiser(DiffusersUNetAdapter(student), schedule, "eps"),
            disc=disc,
            trainable=trainable,
            opts=opts,
            prepare=prepare,
            autocast=autocast_for(cfg, make.device),
            generator=g,
        )
        parts = {
            "student": student,
            "teacher": teacher,
            "vae": vae,
            "discriminator": disc,
            "features": disc.features,
        }
        parts.update({f"text_encoder_{i + 1}": e for i, e in enumerate(encoders)})
        if image_encoder is not None:
            parts["image_encoder"] = image_encoder
        return Setup(parts, opts, [pixels, text, pooled, time_ids], step)

    return build


def _sdxl_discriminator(
    cfg: StepConfig, arch: Any, teacher: nn.Module, schedule: Any, vae: nn.Module, image_encoder: Any
) -> addkit.ProjectedDiscriminator:
    """examples/add_sdxl.py ``build_discriminator`` and ``teacher_features``."""
    if cfg.discriminator == "dinov2":
        c_image_dim = image_encoder.num_features if image_encoder is not None else None
        return addkit.ProjectedDiscriminator.from_dinov2(
            **arches.dinov2_kwargs(arch),
            c_text_dim=arch.pooled_dim,
            c_image_dim=c_image_dim,
            augment=addkit.DiffAugment(),
        )
    adapter = DiffusersUNetAdapter(teacher)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    time_dim = teacher.config.addition_time_embed_dim

    def call(x_t: torch.Tensor, t: torch.Tensor) -> Any:
        b, side = x_t.shape[0], x_t.shape[-1] * factor
        cond = {
            "encoder_hidden_states": x_t.new_zeros(b, 1, teacher.config.cross_attention_dim),
            "text_embeds": x_t.new_zeros(
                b, teacher.config.projection_class_embeddings_input_dim - 6 * time_dim
            ),
            "time_ids": x_t.new_tensor([[side, side, 0, 0, side, side]]).expand(b, 6),
        }
        return adapter(x_t, t, **cond)

    features = addkit.TeacherFeatures(
        teacher, schedule, arch.teacher_taps, channels=arch.tap_channels, call=call
    )
    return addkit.ProjectedDiscriminator(features, c_text_dim=arch.pooled_dim, c_image_dim=None)
