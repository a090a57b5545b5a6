"""A tiny random ``StableDiffusionXLPipeline`` and the UNet conditioning it builds for a prompt."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from addkit.testing._build import optional_import
from addkit.testing.models import tiny_sdxl_unet, tiny_vae
from addkit.testing.text import tiny_clip_text_encoder, tiny_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline


def tiny_sdxl_components(
    *, sample_size: int = 8, model_max_length: int = 16, seed: int = 0
) -> dict[str, Any]:
    """The networks and tokenizers of a tiny SDXL, by ``StableDiffusionXLPipeline`` argument name.

    [`tiny_sdxl_unet`][addkit.testing.models.tiny_sdxl_unet], [`tiny_vae`][addkit.testing.models.tiny_vae],
    and two [`tiny_clip_tokenizer`][addkit.testing.text.tiny_clip_tokenizer]s with SDXL's pad
    tokens (``"<|endoftext|>"``, then ``"!"``) and their
    [`tiny_clip_text_encoder`][addkit.testing.text.tiny_clip_text_encoder]s (the second with a
    projection), each part seeded from ``seed`` plus an offset.

    Args:
        sample_size: latent side ``s``; images are ``2s`` pixels.
        model_max_length: tokenizer length and text positions.
        seed: seed of the random weights.

    Returns:
        ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``.

    Raises:
        ModuleNotFoundError: without diffusers (``pip install 'addkit[diffusers]'``).
    """
    tokenizer = tiny_clip_tokenizer(model_max_length=model_max_length)
    tokenizer_2 = tiny_clip_tokenizer(model_max_length=model_max_length, pad_token="!")
    return {
        "unet": tiny_sdxl_unet(sample_size=sample_size, seed=seed),
        "vae": tiny_vae(sample_size=2 * sample_size, seed=seed + 1),
        "text_encoder": tiny_clip_text_encoder(tokenizer, seed=seed + 2),
        "text_encoder_2": tiny_clip_text_encoder(tokenizer_2, with_projection=True, seed=seed + 3),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
    }


def tiny_sdxl_pipeline(
    *, sample_size: int = 8, model_max_length: int = 16, seed: int = 0
) -> StableDiffusionXLPipeline:
    """A ``StableDiffusionXLPipeline`` of tiny random networks and offline tokenizers.

    The parts are [`tiny_sdxl_components`][addkit.testing.pipelines.tiny_sdxl_components];
    the scheduler is SDXL-Turbo's as diffusers documents it (Euler ancestral, scaled-linear
    betas, trailing spacing); no watermark, no progress bar; every network frozen
    (``requires_grad_(False)``) in eval mode. Generate with ``height=width=2 * sample_size``.

    Args:
        sample_size: latent side ``s``; images are ``2s`` pixels.
        model_max_length: tokenizer length and text positions.
        seed: seed of the random weights.

    Raises:
        ModuleNotFoundError: without diffusers (``pip install 'addkit[diffusers]'``).

    Examples:
        >>> pipe = tiny_sdxl_pipeline()
        >>> pipe("a cat", num_inference_steps=1, guidance_scale=0.0, height=16, width=16,
        ...      output_type="latent").images.shape
        torch.Size([1, 4, 8, 8])
    """
    diffusers = optional_import("diffusers", "tiny_sdxl_pipeline")
    scheduler = diffusers.EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    parts = tiny_sdxl_components(sample_size=sample_size, model_max_length=model_max_length, seed=seed)
    pipe = diffusers.StableDiffusionXLPipeline(**parts, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    return pipe


def sdxl_condition(pipe: Any, prompt: str, *, batch: int = 1) -> dict[str, torch.Tensor]:
    """The UNet conditioning ``pipe`` builds for ``prompt`` (no CFG), as flat tensors.

    Args:
        pipe: a ``StableDiffusionXLPipeline``, e.g.
            [`tiny_sdxl_pipeline`][addkit.testing.pipelines.tiny_sdxl_pipeline].
        prompt: the caption.
        batch: copies of the conditioning.

    Returns:
        ``encoder_hidden_states`` ``[batch, L, D]``, ``text_embeds`` ``[batch, P]`` and
        ``time_ids`` ``[batch, 6]`` (original size, crop ``(0, 0)``, target size, all the UNet's
        ``sample_size`` in pixels): the flat form ``addkit.wrap``'s UNet adapter takes.

    Examples:
        >>> cond = sdxl_condition(tiny_sdxl_pipeline(), "a cat", batch=2)
        >>> {k: tuple(v.shape) for k, v in cond.items()}
        {'encoder_hidden_states': (2, 16, 32), 'text_embeds': (2, 16), 'time_ids': (2, 6)}
    """
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt, num_images_per_prompt=batch, do_classifier_free_guidance=False
    )
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=embeds.dtype).repeat(batch, 1)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
