"""Tiny networks from configs: random weights, no download, seeded, CPU, float32.

Each builder draws its weights from its own ``seed`` inside ``torch.random.fork_rng``, so
the global random state is left as it was and two calls with one seed return equal weights.
Networks come back in eval mode; ``**config`` overrides any entry of the tiny config (the
benchmarks grow the same builders to full size this way).

The shapes fit together as a tiny SDXL: latents ``[B, 4, s, s]`` for images ``[B, 3, 2s, 2s]``
(one VAE downsampling), two CLIP text encoders of width 16 whose hidden states the UNet
attends to concatenated (``cross_attention_dim=32``), a pooled text embedding of width 16 and
six size numbers (``time_ids``) embedded with width 8 each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from addkit.testing._build import POOLED_WIDTH, TEXT_WIDTH, optional_import, seeded

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

_TIME_EMBED = 8  # width of each of the six embedded size numbers (time_ids)
_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),  # diffusers' name for the number of heads
    "cross_attention_dim": 2 * TEXT_WIDTH,
    "norm_num_groups": 8,
}
_SDXL_UNET: dict[str, Any] = {
    **_UNET,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _TIME_EMBED,
    "projection_class_embeddings_input_dim": POOLED_WIDTH + 6 * _TIME_EMBED,
}
_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "norm_num_groups": 8,
}
_SD3: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 8,
    "pos_embed_max_size": 16,
}
_FLUX: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels in 2 x 2 patches
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 8,
    "axes_dims_rope": (2, 2, 4),  # rotary widths of (index, row, column); they sum to the head width
}
_DINOV2: dict[str, Any] = {"depth": 4, "embed_dim": 32, "num_heads": 2}
_DINOV2_SIDE = 56  # 4 x 4 patches of 14 pixels


def tiny_sd_unet(*, sample_size: int = 8, seed: int = 0, **config: Any) -> UNet2DConditionModel:
    """An SD-style ``UNet2DConditionModel`` (text cross-attention only) with two small blocks.

    Call it as ``unet(x_t, t, encoder_hidden_states).sample`` with ``x_t`` ``[B, 4, s, s]``
    and ``encoder_hidden_states`` ``[B, L, 32]``.

    Args:
        sample_size: latent side ``s`` the config records (any even side runs).
        seed: seed of the random weights.
        **config: overrides of the tiny ``UNet2DConditionModel`` config.

    Raises:
        ModuleNotFoundError: without diffusers (``pip install 'addkit[diffusers]'``).

    Examples:
        >>> unet = tiny_sd_unet()
        >>> unet(torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 3, 32)).sample.shape
        torch.Size([1, 4, 8, 8])
    """
    diffusers = optional_import("diffusers", "tiny_sd_unet")
    with seeded(seed):
        return diffusers.UNet2DConditionModel(**{**_UNET, "sample_size": sample_size, **config}).eval()


def tiny_sdxl_unet(*, sample_size: int = 8, seed: int = 0, **config: Any) -> UNet2DConditionModel:
    """An SDXL-style ``UNet2DConditionModel`` (``addition_embed_type="text_time"``), two small blocks.

    The conditioning of SDXL at tiny widths: ``encoder_hidden_states`` ``[B, L, 32]`` (two
    text encoders of width 16, concatenated), and in ``added_cond_kwargs`` ``text_embeds``
    ``[B, 16]`` (pooled) and ``time_ids`` ``[B, 6]`` (original size, crop, target size).

    Args:
        sample_size: latent side ``s`` the config records (any even side runs).
        seed: seed of the random weights.
        **config: overrides of the tiny ``UNet2DConditionModel`` config.

    Raises:
        ModuleNotFoundError: without diffusers (``pip install 'addkit[diffusers]'``).
    """
    diffusers = optional_import("diffusers", "tiny_sdxl_unet")
    with seeded(seed):
        return diffusers.UNet2DConditionModel(**{**_SDXL_UNET, "sample_size": sample_size, **config}).eval()


def tiny_vae(*, sample_size: int = 16, seed: int = 0, **config: Any) -> AutoencoderKL:
    """A two-level ``AutoencoderKL``: images ``[B, 3, 2s, 2s]`` to latents ``[B, 4, s, s]``.

    Args:
        sample_size: image side the config records (any even side runs).
        seed: seed of the random weights.
        **config: overrides of the tiny ``AutoencoderKL`` config.

    Raises:
        ModuleNotFoundError: without diffusers (``pip install 'addkit[diffusers]'``).
    """
    diffusers = optional_import("diffusers", "tiny_vae")
    with seeded(seed):
        return diffusers.AutoencoderKL(**{**_VAE, "sample_size": sample_size, **config}).eval()


def tiny_sd3_transformer(*, sample_size: int = 8, seed: int = 0, **config: Any) -> SD3Transformer2DModel:
    """An SD3-style ``SD3Transformer2DModel``: one joint block, width 16, patches of 2.

    Call it as ``model(hidden_states=x_t, encoder_hidden_states=text, pooled_projections=pooled,
    timestep=1000 * sigma).sample`` with ``x_t`` ``[B, 4, s, s]``, ``text`` ``[B, L, 16]`` and
    ``pooled`` ``[B, 8]``.

    Args:
        sample_size: latent side ``s`` (at most 32: 16 patch positions a side).
        seed: seed of the random weights.
        **config: overrides of the tiny ``SD3Transformer2DModel`` config.

    Raises:
        ModuleNotFoundError: without diffusers (``pip install 'addkit[diffusers]'``).
    """
    diffusers = optional_import("diffusers", "tiny_sd3_transformer")
    with seeded(seed):
        return diffusers.SD3Transformer2DModel(**{**_SD3, "sample_size": sample_size, **config}).eval()


def tiny_flux_transformer(*, seed: int = 0, **config: Any) -> FluxTransformer2DModel:
    """A Flux-style ``FluxTransformer2DModel``: one double and one single block, width 16.

    Flux works on packed latents: a ``[B, 4, h, w]`` latent becomes ``N = hw / 4`` tokens of
    ``4 * 2 * 2 = 16`` channels. Call it as ``model(hidden_states=tokens,
    encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma, img_ids=img_ids,
    txt_ids=txt_ids).sample`` with ``tokens`` ``[B, N, 16]``, ``text`` ``[B, L, 16]``,
    ``pooled`` ``[B, 8]``, ``sigma`` ``[B]`` in ``[0, 1]``, ``img_ids`` ``[N, 3]`` and
    ``txt_ids`` ``[L, 3]`` (rotary positions; rows ``(0, row, column)`` and zeros).

    Args:
        seed: seed of the random weights.
        **config: overrides of the tiny ``FluxTransformer2DModel`` config.

    Raises:
        ModuleNotFoundError: without diffusers (``pip install 'addkit[diffusers]'``).
    """
    diffusers = optional_import("diffusers", "tiny_flux_transformer")
    with seeded(seed):
        return diffusers.FluxTransformer2DModel(**{**_FLUX, **config}).eval()


def tiny_dinov2(*, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """A DINOv2-architecture ViT (timm ``vit_small_patch14_dinov2``): 4 blocks, width 32, 56 pixels.

    Built with ``pretrained=False`` and ``num_classes=0``, so ``model(images)`` returns the CLS
    embedding ``[B, 32]`` of images ``[B, 3, 56, 56]``.

    Args:
        seed: seed of the random weights.
        **kwargs: overrides of the ``timm.create_model`` arguments (``img_size``, ``depth``, ...).

    Raises:
        ModuleNotFoundError: without timm (``pip install 'addkit[timm]'``).

    Examples:
        >>> tiny_dinov2()(torch.zeros(2, 3, 56, 56)).shape
        torch.Size([2, 32])
    """
    timm = optional_import("timm", "tiny_dinov2")
    with seeded(seed):
        return timm.create_model(
            "vit_small_patch14_dinov2",
            **{"pretrained": False, "img_size": _DINOV2_SIDE, "num_classes": 0, **_DINOV2, **kwargs},
        ).eval()


def tiny_dinov2_kwargs() -> dict[str, Any]:
    """Arguments of ``ProjectedDiscriminator.from_dinov2`` for the ViT of ``tiny_dinov2``.

    Returns:
        ``model_name``, ``pretrained=False``, ``resolution`` and ``model_kwargs``; add the
        conditioning widths and seed the heads yourself.

    Examples:
        >>> from addkit import ProjectedDiscriminator
        >>> D = ProjectedDiscriminator.from_dinov2(**tiny_dinov2_kwargs(), c_text_dim=8)
        >>> D(torch.zeros(2, 3, 32, 32), torch.zeros(2, 8)).shape  # 5 taps x 16 tokens
        torch.Size([2, 80])
    """
    return {
        "model_name": "vit_small_patch14_dinov2",
        "pretrained": False,
        "resolution": _DINOV2_SIDE,
        "model_kwargs": dict(_DINOV2),
    }


def tiny_clip_visual(
    *, seed: int = 0, image_size: int = 32, patch_size: int = 4, **kwargs: Any
) -> torch.nn.Module:
    """An open_clip ``VisionTransformer`` (CLIP's image tower): 4 blocks, width 48, random weights.

    For [`CLIPFeatures`][addkit.discriminators.clip.CLIPFeatures]: at the defaults, 32-pixel
    images give 8 × 8 tokens, the tiny world's grid.

    Args:
        seed: seed of the random weights.
        image_size: input side.
        patch_size: patch side.
        **kwargs: overrides of the ``VisionTransformer`` arguments (``width``, ``layers``, ...).

    Raises:
        ModuleNotFoundError: without open_clip (``pip install 'addkit[clip]'``).

    Examples:
        >>> from addkit.discriminators import CLIPFeatures
        >>> CLIPFeatures(tiny_clip_visual()).channels
        [48, 48, 48, 48, 48]
    """
    transformer = optional_import("open_clip.transformer", "tiny_clip_visual")
    config = {"width": 48, "layers": 4, "heads": 3, "mlp_ratio": 2.0, "output_dim": 16, **kwargs}
    with seeded(seed):
        return transformer.VisionTransformer(image_size=image_size, patch_size=patch_size, **config).eval()
