"""``add_flow.py --method dmd2``: the flow recipe's DMD2 parts (the step itself is ``recipe.dmd``'s).

The fake score is a trainable copy of the teacher transformer (a LoRA fake score, which would
share the teacher's weights, is not offered here: the LoRA student already switches adapters on
the same transformer); the GAN head reads its image tokens at the last block, text-conditioned
like LADD's teacher features, on latents re-noised at the logit-normal level of
``--disc-logit-mean`` / ``--disc-logit-std``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import recipe.flow.models as fm
import recipe.dmd as dmd
import addkit


def build(args: argparse.Namespace, models: fm.FlowModels, device: torch.device) -> dmd.FakeScore:
    """The fake score (a float32 copy of the teacher on ``device``) with its optimiser."""
    fake = dmd.build_fake_score(models.teacher, seed=args.seed)
    fake.network.to(device, dtype=torch.float32)
    lr = args.lr_fake or args.lr
    dmd.attach_optimiser(fake, lr=lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps)
    return fake


def gan_head(
    args: argparse.Namespace, models: fm.FlowModels, fake: dmd.FakeScore
) -> addkit.ProjectedDiscriminator:
    """DMD2's GAN head: projected heads (seeded) on the fake score's last block."""
    inner = models.transformer
    width = inner.config.num_attention_heads * inner.config.attention_head_dim
    features = addkit.TeacherFeatures(
        fake.network,
        models.schedule,
        fm.default_taps(inner, 1),
        channels=[width],
        call=addkit.wrap(fake.network, models.schedule, "flow"),
        select=fm.image_token_select(models.pipe, args.resolution),
        logit_mean=args.disc_logit_mean,
        logit_std=args.disc_logit_std,
        noise_space=args.disc_noise_space,
        layout="tokens",  # DMD2's head as the SDXL recipe's (measured on tokens)
        freeze=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 2)
        return addkit.ProjectedDiscriminator(features, c_text_dim=models.pooled_dim)


def inputs(run: Any, batch: dict[str, Any]) -> dmd.Inputs:
    """Captions to conditioning, fresh noise, and (with a head) the real images' latents."""
    args, models, device = run.args, run.models, run.accelerator.device
    cond, pooled = run.text(batch["caption"])
    real = None
    if run.objective.gan_head is not None:
        with torch.no_grad():
            real = fm.encode_images(models.pipe.vae, batch["pixels"].to(device))
    side = args.resolution // models.pipe.vae_scale_factor
    shape = (len(batch["caption"]), models.pipe.vae.config.latent_channels, side, side)
    uncond = fm.unconditional(run.text, cond) if args.guidance_scale != 1.0 else None
    return dmd.Inputs(
        noise=torch.randn(shape, device=device),
        cond=cond,
        uncond=uncond,
        gan={"c_text": pooled, **cond},
        real=real,
    )
