"""The ``--preset tiny`` parts of ``add_sdxl.py``: SDXL-architecture models with random weights.

Everything is built offline from small configs (nothing is downloaded): a two-block SDXL UNet
(``addition_embed_type="text_time"``), a two-block VAE, the two CLIP text encoders SDXL uses
(the second with a projection for the pooled embedding), CLIP tokenizers with a written
character-level vocabulary, a DINOv2-architecture ViT with random weights for the
discriminator, and a procedurally drawn image-caption folder (coloured shapes on coloured
backgrounds). The tiny run checks the plumbing, not image quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

RESOLUTION = 32  # pixels; the tiny VAE downsamples by 2, so latents are 4 x 16 x 16
MAX_TOKENS = 16  # tokenizer model_max_length == text encoder max_position_embeddings
TEXT_WIDTH = 16  # hidden size of each text encoder; the UNet's cross-attention sees both (32)
POOLED_WIDTH = 16  # projection_dim of the second text encoder (pooled text embedding)
TIME_EMBED = 8  # addition_time_embed_dim: 6 micro-conditioning numbers x 8 = 48

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


@dataclass
class TinyParts:
    """The components ``StableDiffusionXLPipeline`` needs, with random weights."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_tokenizer(pad_token: str):
    """A CLIP tokenizer whose vocabulary is every byte, alone and word-final, and no merges.

    Each word is split into characters: enough to turn captions into ids offline.
    """
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token)
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def _text_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_parts(seed: int) -> TinyParts:
    """Build the tiny SDXL components, with weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(pad_token="<|endoftext|>")
        tokenizer_2 = build_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=POOLED_WIDTH))
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 1),
            use_linear_projection=True,
            cross_attention_dim=2 * TEXT_WIDTH,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_EMBED,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=RESOLUTION,
        )
    return TinyParts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2)


def dinov2_kwargs() -> dict:
    """Arguments of ``ProjectedDiscriminator.from_dinov2`` for a 4-block, width-32 DINOv2 ViT."""
    return {
        "pretrained": False,
        "resolution": 56,
        "model_kwargs": {"depth": 4, "embed_dim": 32, "num_heads": 2},
    }


def image_encoder(seed: int) -> torch.nn.Module:
    """A tiny DINOv2-architecture ViT standing in for ADD's ViT-L image embedding (random weights)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return timm.create_model(
            "vit_small_patch14_dinov2",
            pretrained=False,
            img_size=56,
            depth=2,
            embed_dim=32,
            num_heads=2,
            num_classes=0,
        )


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
