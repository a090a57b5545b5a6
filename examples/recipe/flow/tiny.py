"""The ``--preset tiny`` parts of ``add_flow.py``: SD3- and Flux-architecture pipelines with random weights.

Built offline from small configs (nothing is downloaded), with the networks of
``addkit.testing`` and a tiny T5 encoder from ``transformers.T5Config``:

- **SD3**: ``SD3Transformer2DModel`` (2 joint blocks, width 16, patches of 2), the three text
  encoders of SD3 (two CLIP encoders with projection standing in for CLIP-L and CLIP-G, and a
  T5 encoder of width 32), a two-level VAE with SD3's latent ``shift_factor``, and
  ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` as SD3/SD3.5 ship it;
- **Flux**: ``FluxTransformer2DModel`` (one double and one single block, width 16) with the
  guidance embedding of FLUX.1-dev (``guidance_embeds=False`` gives FLUX.1-schnell's form), a
  CLIP encoder (pooled text) and a T5 encoder of width 16, the same VAE, and Flux's
  resolution-dependent shift (``use_dynamic_shifting``), with the end points of the shift's
  line scaled down to the tiny token counts.

Tokenizers are character-level (CLIP's from ``addkit.testing``, T5's a Unigram over single
characters built in memory), so any caption tokenizes. The preset checks the plumbing, not
image quality. The image-caption folder is the SDXL preset's (``recipe.sdxl.tiny.make_dataset``).
"""

from __future__ import annotations

import string
from typing import Any

import torch

from addkit.testing import (
    tiny_clip_text_encoder,
    tiny_clip_tokenizer,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_vae,
)

RESOLUTION = 32  # pixels; the VAE downsamples by 2: latents 4 x 16 x 16 (64 SD3 patches, 64 Flux tokens)
VAE_FACTOR = 2  # the tiny VAE's two levels
MAX_TOKENS = 48  # CLIP and T5 sequence length (characters: every tiny caption fits)
T5_WIDTH = {"sd3": 32, "flux": 16}  # SD3 pads the two CLIPs' 2 x 16 channels to T5's width
VAE_SHIFT, VAE_SCALE = 0.1, 1.5  # SD3 / Flux VAEs store a shift_factor as well as a scaling_factor
FLUX_SHIFT_LINE = {"base_image_seq_len": 16, "max_image_seq_len": 256, "base_shift": 0.5, "max_shift": 1.15}
"""Flux's shift line ``mu(seq_len)`` from ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at
``max_image_seq_len``; FLUX.1-dev uses 256 and 4096 tokens, the tiny one 16 and 256."""

PROMPTS = ("a red circle on a blue background", "a yellow square on a black background")


def t5_tokenizer(*, model_max_length: int = MAX_TOKENS) -> Any:
    """A T5 tokenizer over single characters (a Unigram vocabulary built in memory, no files).

    Ids follow T5's layout: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``"▁"`` (word start) and
    the printable ASCII characters; no sentinel tokens.
    """
    from transformers import T5Tokenizer

    symbols = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in symbols]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def t5_encoder(tokenizer: Any, *, width: int, seed: int) -> torch.nn.Module:
    """A one-layer ``T5EncoderModel`` of width ``width`` for ``tokenizer`` (seeded, eval mode)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=MAX_TOKENS,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()


def _vae(seed: int) -> torch.nn.Module:
    return tiny_vae(
        sample_size=RESOLUTION,
        seed=seed,
        shift_factor=VAE_SHIFT,
        scaling_factor=VAE_SCALE,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def sd3_components(seed: int = 0) -> dict[str, Any]:
    """The parts of a tiny ``StableDiffusion3Pipeline``, by argument name."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer, tokenizer_2 = (
        tiny_clip_tokenizer(model_max_length=MAX_TOKENS),
        tiny_clip_tokenizer(model_max_length=MAX_TOKENS, pad_token="!"),
    )
    tokenizer_3 = t5_tokenizer()
    return {
        "transformer": tiny_sd3_transformer(
            sample_size=RESOLUTION // 2,
            seed=seed,
            num_layers=2,
            joint_attention_dim=T5_WIDTH["sd3"],
            pooled_projection_dim=32,
        ),
        "vae": _vae(seed + 1),
        "text_encoder": tiny_clip_text_encoder(tokenizer, with_projection=True, seed=seed + 2),
        "text_encoder_2": tiny_clip_text_encoder(tokenizer_2, with_projection=True, seed=seed + 3),
        "text_encoder_3": t5_encoder(tokenizer_3, width=T5_WIDTH["sd3"], seed=seed + 4),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def flux_components(seed: int = 0, *, guidance_embeds: bool = True) -> dict[str, Any]:
    """The parts of a tiny ``FluxPipeline``, by argument name (FLUX.1-dev's form by default)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(model_max_length=MAX_TOKENS), t5_tokenizer()
    if guidance_embeds:  # FLUX.1-dev: shift e^mu with mu on a line in the token count
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, **FLUX_SHIFT_LINE)
    else:  # FLUX.1-schnell: a fixed shift of 1
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    return {
        "transformer": tiny_flux_transformer(
            seed=seed,
            pooled_projection_dim=16,
            joint_attention_dim=T5_WIDTH["flux"],
            guidance_embeds=guidance_embeds,
        ),
        "vae": _vae(seed + 1),
        "text_encoder": tiny_clip_text_encoder(tokenizer, seed=seed + 2),
        "text_encoder_2": t5_encoder(tokenizer_2, width=T5_WIDTH["flux"], seed=seed + 4),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def pipeline(model: str, seed: int = 0, **kwargs: Any) -> Any:
    """A tiny ``StableDiffusion3Pipeline`` (``model="sd3"``) or ``FluxPipeline`` (``"flux"``).

    Every network frozen in eval mode, no progress bar. ``kwargs`` go to ``flux_components``.
    """
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if model == "sd3":
        pipe = StableDiffusion3Pipeline(**sd3_components(seed))
    elif model == "flux":
        pipe = FluxPipeline(**flux_components(seed, **kwargs))
    else:
        raise ValueError(f"pipeline: model must be 'sd3' or 'flux', got {model!r}")
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe
