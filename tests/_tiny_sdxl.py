"""A tiny random SDXL pipeline built offline from configs (UNet, VAE, two CLIP text encoders, tokenizers).

Nothing is downloaded: the tokenizers read a character-level vocabulary written to a folder,
the networks get random weights from a fixed seed. Latents are ``[B, 4, 8, 8]`` for 16x16 images.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

LATENT = 8  # latent side; the VAE halves, so images are 16x16
TEXT_DIM = 16  # hidden size of each text encoder; the UNet attends to both, concatenated
TIME_EMBED = 8


def tiny_tokenizer(folder: Path, max_length: int = 8) -> Any:
    """A CLIP tokenizer over lowercase letters, from vocab/merges files written to ``folder``."""
    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    tokens = letters + [c + "</w>" for c in letters] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=max_length
    )


def _text_config(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_unet() -> Any:
    """An SDXL-style UNet (text_time added conditioning) with two small blocks."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_DIM,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_DIM,
    )


def tiny_vae() -> Any:
    """A two-level AutoencoderKL (scale factor 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=2 * LATENT,
    )


def turbo_scheduler() -> Any:
    """SDXL-Turbo's scheduler as diffusers documents it: Euler ancestral, trailing spacing."""
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )


def tiny_sdxl_pipeline(folder: Path, *, seed: int = 0) -> Any:
    """``StableDiffusionXLPipeline`` with tiny random networks, in eval mode, float32, on the CPU."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok1, tok2 = tiny_tokenizer(folder / "tokenizer"), tiny_tokenizer(folder / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(tok1)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tok2)),
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=tiny_unet(),
        scheduler=turbo_scheduler(),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    return pipe


def sdxl_condition(pipe: Any, prompt: str, *, batch: int = 1) -> dict[str, torch.Tensor]:
    """The UNet conditioning the pipeline builds for ``prompt`` (no CFG), as flat tensors.

    Keys: ``encoder_hidden_states``, ``text_embeds`` and ``time_ids`` (original size, crop
    (0, 0), target size), the flat form that ``addkit.wrap``'s UNet adapter accepts.
    """
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt, num_images_per_prompt=batch, do_classifier_free_guidance=False
    )
    side = LATENT * pipe.vae_scale_factor
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=embeds.dtype).repeat(batch, 1)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
