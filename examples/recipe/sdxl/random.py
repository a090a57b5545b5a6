"""The ``--preset tiny`` parts of ``add_sdxl.py``: SDXL-architecture models with random weights.

The models come from ``addkit.testing``, built offline from small configs (nothing is
downloaded): a two-block SDXL UNet (``addition_embed_type="text_time"``), a two-block VAE, the
two CLIP text encoders SDXL uses (the second with a projection for the pooled embedding) with
character-level CLIP tokenizers, and a DINOv2-architecture ViT with random weights for the
image conditioning and the discriminator. This file holds the preset's sizes and seeds, and
draws the image-caption folder (coloured shapes on coloured backgrounds). The tiny run checks
the plumbing, not image quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from addkit.testing import tiny_dinov2, tiny_dinov2_kwargs, tiny_sdxl_components
from tiny_world import world

RESOLUTION = 32  # pixels; the tiny VAE downsamples by 2, so latents are 4 x 16 x 16
MAX_TOKENS = 77  # as CLIP: captions and the README prompts (character tokens) fit untruncated

COLOURS, SHAPES = world.COLOURS, world.SHAPES  # the tiny world's palette and shapes


@dataclass
class TinyParts:
    """The components ``StableDiffusionXLPipeline`` needs, with random weights."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object


def build_parts(seed: int) -> TinyParts:
    """The tiny SDXL components (text width 16, pooled width 16), with weights drawn from ``seed``."""
    return TinyParts(
        **tiny_sdxl_components(sample_size=RESOLUTION // 2, model_max_length=MAX_TOKENS, seed=seed)
    )


def dinov2_kwargs() -> dict[str, Any]:
    """Arguments of ``ProjectedDiscriminator.from_dinov2`` for a 4-block, width-32 DINOv2 ViT."""
    return tiny_dinov2_kwargs()


def image_encoder(seed: int) -> torch.nn.Module:
    """A tiny DINOv2-architecture ViT standing in for ADD's ViT-L image embedding (random weights)."""
    return tiny_dinov2(seed=seed + 1)


def make_dataset(folder: Path, n: int = 32, *, seed: int = 0) -> Path:
    """Draw ``n`` coloured-shape images with captions into ``folder`` (``k.png`` + ``k.txt``).

    Existing complete folders are reused. Returns ``folder``.
    """
    folder = Path(folder)
    if folder.is_dir() and len(list(folder.glob("*.png"))) >= n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    names = list(COLOURS)
    for k in range(n):
        fg, bg = (names[int(i)] for i in torch.randperm(len(names), generator=g)[:2])
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
        size = int(torch.randint(10, 24, (1,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(0, RESOLUTION * 2 - size * 2, (2,), generator=g))
        image = Image.new("RGB", (RESOLUTION * 2, RESOLUTION * 2), COLOURS[bg])
        draw = ImageDraw.Draw(image)
        box = (x0, y0, x0 + size * 2, y0 + size * 2)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[fg])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[fg])
        else:
            draw.polygon([(x0 + size, y0), (box[2], box[3]), (x0, box[3])], fill=COLOURS[fg])
        image.save(folder / f"{k:04d}.png")
        (folder / f"{k:04d}.txt").write_text(f"a {fg} {shape} on a {bg} background\n")
    return folder
