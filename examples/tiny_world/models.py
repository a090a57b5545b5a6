"""The tiny world's networks: configs, builders, and loading the shipped weights (offline).

An SDXL in miniature, built with the same classes and conditioning as SDXL:

- ``vae``: ``AutoencoderKL``, 32×32 images to ``4 × 8 × 8`` latents (three levels, factor 4);
- ``text_encoder`` / ``text_encoder_2``: ``CLIPTextModel`` / ``CLIPTextModelWithProjection``
  (width 32, two layers) over character-level CLIP tokenizers of 48 positions; the UNet reads
  the penultimate hidden states of both, concatenated (``[B, 48, 64]``), and the second one's
  projected pooled embedding (``text_embeds`` ``[B, 32]``), as SDXL does;
- ``unet``: ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (pooled text and
  the six size numbers), cross-attention at both levels (8×8, 4×4), eps-prediction on SDXL's
  schedule (scaled-linear betas 0.00085 → 0.012, 1000 steps);
- ``image_encoder``: a DINOv2-architecture timm ViT (``vit_small_patch14_dinov2`` with 4×4
  patches at 32 pixels, depth 4, width 48) for the discriminator's features and the image
  conditioning;
- ``classifier``: the evaluation network (a small CNN, another architecture and seed) that
  reads shape, colour, background and size.

``weights/`` is a ``StableDiffusionXLPipeline`` folder (``model_index.json``, one subfolder per
part, safetensors) plus ``image_encoder/`` and ``classifier/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from addkit.testing import tiny_clip_text_encoder, tiny_clip_tokenizer

from .world import COLOUR_NAMES, RESOLUTION, SHAPES, SIZES

WEIGHTS = Path(__file__).resolve().parent / "weights"
MAX_TOKENS = 48  # the longest caption is 40 character tokens with its start and end tokens
TEXT_WIDTH = 32
SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
TEXT_CONFIG = {
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 2 * TEXT_WIDTH,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": TEXT_WIDTH,
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (16, 32, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "norm_num_groups": 4,  # 4 channels a group: GroupNorm over single channels would erase flat colours
    "sample_size": RESOLUTION,
}
LATENT_SIDE = RESOLUTION // 4
UNET_CONFIG = {
    "sample_size": LATENT_SIDE,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": (2, 4),  # diffusers' name for the number of heads
    "cross_attention_dim": 2 * TEXT_WIDTH,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": TEXT_WIDTH + 6 * 8,
}
VIT_KWARGS = {"img_size": RESOLUTION, "patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 3}
VIT_NAME = "vit_small_patch14_dinov2"
HEADS = {
    "shape": len(SHAPES),
    "colour": len(COLOUR_NAMES),
    "background": len(COLOUR_NAMES),
    "size": len(SIZES),
}


@dataclass
class TinyParts:
    """The components ``StableDiffusionXLPipeline`` needs (same fields as ``recipe.sdxl.tiny.TinyParts``)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: Any
    tokenizer_2: Any


def tokenizers() -> tuple[Any, Any]:
    """SDXL's two tokenizers at tiny size: character-level, padded with ``<|endoftext|>`` and ``!``."""
    return (
        tiny_clip_tokenizer(model_max_length=MAX_TOKENS),
        tiny_clip_tokenizer(model_max_length=MAX_TOKENS, pad_token="!"),
    )


def build_parts(seed: int = 0) -> TinyParts:
    """Untrained parts with weights drawn from ``seed`` (what ``train.py`` starts from)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tok, tok_2 = tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
    return TinyParts(
        unet=unet,
        vae=vae,
        text_encoder=tiny_clip_text_encoder(tok, seed=seed + 2, **TEXT_CONFIG),
        text_encoder_2=tiny_clip_text_encoder(tok_2, with_projection=True, seed=seed + 3, **TEXT_CONFIG),
        tokenizer=tok,
        tokenizer_2=tok_2,
    )


def load_parts(weights: Path | str = WEIGHTS) -> TinyParts:
    """The shipped, trained parts (frozen, eval mode), read offline from ``weights``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(weights)
    parts = TinyParts(
        unet=UNet2DConditionModel.from_pretrained(root / "unet"),
        vae=AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
    )
    for module in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        module.requires_grad_(False).eval()
    return parts


def scheduler_config() -> dict[str, Any]:
    """The teacher's training schedule as a diffusers scheduler config (eps-prediction)."""
    return {**SCHEDULE, "prediction_type": "epsilon"}


# -- text conditioning -------------------------------------------------------------------------
def encode_text(parts: TinyParts, captions: list[str]) -> dict[str, Tensor]:
    """SDXL's UNet conditioning for ``captions``: what ``StableDiffusionXLPipeline`` builds.

    Penultimate hidden states of both encoders concatenated (``encoder_hidden_states``
    ``[B, 48, 64]``), the second encoder's projected pooled output (``text_embeds`` ``[B, 32]``)
    and ``time_ids`` ``[B, 6]`` (original size, crop (0, 0), target size: 32 pixels). Gradients
    flow into the encoders when they require grad (teacher training).
    """
    hidden, pooled = [], None
    for tokenizer, encoder in (
        (parts.tokenizer, parts.text_encoder),
        (parts.tokenizer_2, parts.text_encoder_2),
    ):
        ids = tokenizer(
            list(captions), padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(encoder.device)  # fmt: skip
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else None
    time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)
    return {
        "encoder_hidden_states": torch.cat(hidden, dim=-1),
        "text_embeds": pooled,
        "time_ids": time_ids.expand(len(captions), 6).to(pooled.device),
    }


# -- image encoder (discriminator features) ---------------------------------------------------
def vit(*, seed: int = 0, **kwargs: Any) -> nn.Module:
    """The DINOv2-architecture ViT with random weights (``num_classes=0``: ``forward`` gives CLS ``[B, 48]``)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(VIT_NAME, pretrained=False, num_classes=0, **{**VIT_KWARGS, **kwargs})


def image_encoder(weights: Path | str = WEIGHTS) -> nn.Module:
    """The trained ViT (frozen, eval): CLS embedding ``[B, 48]`` of images ``[B, 3, 32, 32]``
    normalised with ImageNet's mean and std (what ``add_sdxl.embed_images`` feeds)."""
    import timm

    path = Path(weights) / "image_encoder" / "model.safetensors"
    model = timm.create_model(
        VIT_NAME, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}, **VIT_KWARGS
    )
    return model.requires_grad_(False).eval()


def dinov2_kwargs(weights: Path | str = WEIGHTS) -> dict[str, Any]:
    """Arguments of ``addkit.ProjectedDiscriminator.from_dinov2`` for the trained ViT (offline)."""
    model_kwargs = {k: v for k, v in VIT_KWARGS.items() if k != "img_size"}
    return {
        "model_name": VIT_NAME,
        "pretrained": str(Path(weights) / "image_encoder" / "model.safetensors"),
        "resolution": RESOLUTION,
        "model_kwargs": {**model_kwargs, "num_classes": 0},
    }


# -- evaluation classifier --------------------------------------------------------------------
class Classifier(nn.Module):
    """A small CNN reading a world image: logits for shape, colour, background and size.

    Three stages (32, 16, 8 pixels) of two 3×3 convolutions with GroupNorm and SiLU, global
    average pooling to ``features`` ``[B, 4w]`` (the Fréchet distance's feature space), one
    linear head per attribute.

    Args:
        width: channels of the first stage (doubled at each stage).
    """

    def __init__(self, width: int = 24) -> None:
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
            )  # fmt: skip

        self.width = width
        self.body = nn.Sequential(
            stage(3, width, 1), stage(width, 2 * width, 2), stage(2 * width, 4 * width, 2)
        )
        self.heads = nn.ModuleDict({k: nn.Linear(4 * width, n) for k, n in HEADS.items()})

    def features(self, images: Tensor) -> Tensor:
        """Pooled features ``[B, 4w]`` of images ``[B, 3, 32, 32]`` in ``[-1, 1]``."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits per attribute (``shape``, ``colour``, ``background``, ``size``)."""
        f = self.features(images)
        return {k: head(f) for k, head in self.heads.items()}


def load_classifier(weights: Path | str = WEIGHTS) -> Classifier:
    """The trained evaluation classifier (frozen, eval)."""
    from safetensors.torch import load_file

    folder = Path(weights) / "classifier"
    config = json.loads((folder / "config.json").read_text())
    model = Classifier(config["width"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.requires_grad_(False).eval()
