"""The architectures the memory estimate builds, written down from their public configs.

Each full-size entry overrides every entry of the matching ``addkit.testing`` tiny builder, so
the same builder makes the tiny model (tests) and the real architecture (estimates), with
random weights: nothing is downloaded. ``params`` is the published parameter count that
``tests/benchmarks/test_memory_estimate.py`` checks the built model against.

Sources (``config.json`` of each model on the Hugging Face Hub):

- SDXL UNet: ``stabilityai/stable-diffusion-xl-base-1.0/unet/config.json`` (2,567,463,684
  parameters, the count diffusers reports for it);
- SDXL VAE: ``stabilityai/stable-diffusion-xl-base-1.0/vae/config.json`` (83,653,863);
- SDXL text encoders: ``text_encoder`` (CLIP ViT-L/14 text tower, 123,060,480) and
  ``text_encoder_2`` (OpenCLIP ViT-bigG/14 text tower with projection, 694,659,840);
- SD3.5 medium: ``stabilityai/stable-diffusion-3.5-medium/transformer/config.json`` (MMDiT-X,
  24 blocks, the first 13 with a second self-attention; the model card's "2.5B" counts the
  384 x 384 position table too, which diffusers keeps as a buffer), ``vae/config.json`` (16
  latent channels) and the text encoders CLIP-L and CLIP-bigG with projection and the T5 v1.1
  XXL encoder (``text_encoder_3``, 4,762,310,656);
- Flux.1 [dev]: ``black-forest-labs/FLUX.1-dev/transformer/config.json`` (19 double-stream and
  38 single-stream blocks of width 3072; the model card's "12B", 11,901,408,320), ``vae`` (as
  SD3's with Flux's scale and shift) and ``text_encoder`` (CLIP-L) + ``text_encoder_2`` (T5-XXL);
- DINOv2 ViT-S/14 and ViT-L/14: timm ``vit_small_patch14_dinov2`` / ``vit_large_patch14_dinov2``
  (Oquab et al. 2023: 21M and 304M parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' name for the number of heads
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 x 256
    "norm_num_groups": 32,
}
SDXL_VAE: dict[str, Any] = {
    "sample_size": 1024,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "scaling_factor": 0.13025,
}
CLIP_L_TEXT: dict[str, Any] = {  # text_encoder: CLIPTextModel
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
CLIP_BIGG_TEXT: dict[str, Any] = {  # text_encoder_2: CLIPTextModelWithProjection
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
SD35_MEDIUM: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels in 2 x 2 patches
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
CLIP_L_PROJ: dict[str, Any] = {**CLIP_L_TEXT}  # SD3's text_encoder: CLIPTextModelWithProjection
T5_XXL: dict[str, Any] = {  # google/t5-v1_1-xxl encoder (SD3 text_encoder_3, Flux text_encoder_2)
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}
SD3_VAE: dict[str, Any] = {
    **SDXL_VAE,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
}
FLUX_VAE: dict[str, Any] = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
DINOV2_S = {
    "model_name": "vit_small_patch14_dinov2",
    "pretrained": False,
    "resolution": 224,
    "model_kwargs": {},
}
DINOV2_L = {"model_name": "vit_large_patch14_dinov2", "img_size": 224}


@dataclass(frozen=True)
class Architecture:
    """A family's networks at one size.

    ``kind`` is ``"unet"`` (SDXL's recipe) or ``"sd3"`` / ``"flux"`` (the flow recipe); the
    latent shape follows from the VAE. ``params`` holds the published counts (none: tiny).
    """

    kind: str
    denoiser: dict[str, Any]
    vae: dict[str, Any] | None = None
    text_encoders: tuple[tuple[str, dict[str, Any]], ...] = ()  # ("clip" | "clip_projection" | "t5", config)
    dinov2: dict[str, Any] = field(default_factory=dict)
    image_encoder: dict[str, Any] | None = None
    text_len: int = 77
    text_dim: int = 2048
    pooled_dim: int = 1280
    teacher_taps: tuple[str, ...] = ()  # UNets (examples/add_sdxl.py); transformers: 4 evenly spaced blocks
    tap_channels: tuple[int, ...] = ()
    params: dict[str, int] = field(default_factory=dict)

    @property
    def tiny(self) -> bool:
        return not self.params


ARCHITECTURES: dict[str, Architecture] = {
    "sdxl": Architecture(
        "unet",
        SDXL_UNET,
        vae=SDXL_VAE,
        text_encoders=(("clip", CLIP_L_TEXT), ("clip_projection", CLIP_BIGG_TEXT)),
        dinov2=DINOV2_S,
        image_encoder=DINOV2_L,
        teacher_taps=("down_blocks.2", "mid_block"),  # examples/add_sdxl.py's default taps
        tap_channels=(1280, 1280),
        params={"unet": 2_567_463_684, "vae": 83_653_863, "text_encoders": 817_720_320},
    ),
    "sd35_medium": Architecture(
        "sd3",
        SD35_MEDIUM,
        vae=SD3_VAE,
        text_encoders=(("clip_projection", CLIP_L_PROJ), ("clip_projection", CLIP_BIGG_TEXT), ("t5", T5_XXL)),
        text_len=333,  # 77 CLIP + 256 T5 tokens
        text_dim=4096,
        pooled_dim=2048,
        params={"transformer": 2_500_000_000, "text_encoders": 123_650_304 + 694_659_840 + 4_762_310_656},
    ),
    "flux_dev": Architecture(
        "flux",
        FLUX_DEV,
        vae=FLUX_VAE,
        text_encoders=(("clip", CLIP_L_TEXT), ("t5", T5_XXL)),
        text_len=512,  # T5 tokens of Flux.1 [dev]
        text_dim=4096,
        pooled_dim=768,
        params={"transformer": 11_901_408_320, "text_encoders": 123_060_480 + 4_762_310_656},
    ),
    "tiny_sdxl": Architecture(
        "unet",
        {},
        vae={},
        dinov2={},
        image_encoder={},
        text_len=8,
        text_dim=32,
        pooled_dim=16,
        teacher_taps=("down_blocks.1", "mid_block"),
        tap_channels=(64, 64),
    ),
    "tiny_sd3": Architecture(
        "sd3",
        {},
        vae={},
        text_len=8,
        text_dim=16,
        pooled_dim=8,
    ),
    "tiny_flux": Architecture(
        "flux",
        {"num_layers": 2, "num_single_layers": 2, "guidance_embeds": True},
        vae={},
        text_len=8,
        text_dim=16,
        pooled_dim=8,
    ),
}


def denoiser(arch: Architecture) -> nn.Module:
    """The UNet or transformer, built where the caller's device context says (``meta``)."""
    from addkit.testing import tiny_flux_transformer, tiny_sd3_transformer, tiny_sdxl_unet

    if arch.kind == "unet":
        return tiny_sdxl_unet(**arch.denoiser)
    if arch.kind == "sd3":
        return tiny_sd3_transformer(**arch.denoiser)
    return tiny_flux_transformer(**arch.denoiser)


def vae(arch: Architecture) -> nn.Module:
    from addkit.testing import tiny_vae

    return tiny_vae(**(arch.vae or {}))


def text_encoders(arch: Architecture) -> list[nn.Module]:
    """The text encoders the recipes keep resident (CLIP towers, T5-XXL); none for the tiny setups."""
    if not arch.text_encoders:
        return []
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    classes = {
        "clip": (CLIPTextModel, CLIPTextConfig),
        "clip_projection": (CLIPTextModelWithProjection, CLIPTextConfig),
        "t5": (T5EncoderModel, T5Config),
    }
    return [classes[kind][0](classes[kind][1](**config)) for kind, config in arch.text_encoders]


def image_encoder(arch: Architecture) -> nn.Module | None:
    """ADD's image conditioning: the DINOv2 ViT-L/14 CLS embedding (tiny: the tiny ViT)."""
    if arch.image_encoder is None:
        return None
    from addkit.testing import tiny_dinov2

    if arch.tiny:
        return tiny_dinov2()
    import timm

    return timm.create_model(
        arch.image_encoder["model_name"],
        pretrained=False,
        num_classes=0,
        img_size=arch.image_encoder["img_size"],
    )


def dinov2_kwargs(arch: Architecture) -> dict[str, Any]:
    from addkit.testing import tiny_dinov2_kwargs

    return dict(arch.dinov2) if not arch.tiny else tiny_dinov2_kwargs()
