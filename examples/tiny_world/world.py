"""The tiny world: one coloured shape on a coloured background, and a caption that names it.

An image is 32×32 pixels: a ``circle``, ``square`` or ``triangle`` in one of six colours, on a
background of another colour, ``small`` or ``large``, at a random position. Its caption names
every attribute but the position: ``"a small red circle on a blue background"``. That gives
3 shapes × 6 colours × 5 backgrounds × 2 sizes = 180 captions.

Twelve (shape, colour, background) triples, with both sizes (24 captions), never appear in
training: [`HELD_OUT_CAPTIONS`][]. Each held-out triple's pairs of attributes do appear in
training (red on green as a square and a triangle, a red circle on other backgrounds, ...),
so a model that follows held-out captions composes what it has seen.

Images are drawn with torch at 4× the resolution and averaged down (anti-aliased edges), from
an explicit ``torch.Generator``: the same seed gives the same images everywhere.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
RADIUS = {"small": (5.5, 7.0), "large": (9.0, 11.5)}  # half-side in pixels, drawn uniformly
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Attributes:
    """What a caption names: indices into ``SHAPES``, ``COLOUR_NAMES`` (twice) and ``SIZES``."""

    shape: int
    colour: int
    background: int
    size: int

    @property
    def caption(self) -> str:
        return (
            f"a {SIZES[self.size]} {COLOUR_NAMES[self.colour]} {SHAPES[self.shape]} "
            f"on a {COLOUR_NAMES[self.background]} background"
        )


def _held_out_triples() -> tuple[tuple[int, int, int], ...]:
    """Twelve (shape, colour, background) triples: each shape 4 times, each colour twice as the
    shape's and twice as the background's (colour i on colour i+1 and on colour i+3, mod 6)."""
    n = len(COLOUR_NAMES)
    pairs = [(i, (i + 1) % n) for i in range(n)] + [(i, (i + 3) % n) for i in range(n)]
    return tuple((k % len(SHAPES), fg, bg) for k, (fg, bg) in enumerate(pairs))


HELD_OUT_TRIPLES = _held_out_triples()
ALL_ATTRIBUTES = tuple(
    Attributes(s, c, b, z)
    for s, c, b, z in itertools.product(range(len(SHAPES)), range(6), range(6), range(len(SIZES)))
    if c != b
)
HELD_OUT = tuple(a for a in ALL_ATTRIBUTES if (a.shape, a.colour, a.background) in HELD_OUT_TRIPLES)
TRAIN = tuple(a for a in ALL_ATTRIBUTES if (a.shape, a.colour, a.background) not in HELD_OUT_TRIPLES)
HELD_OUT_CAPTIONS = tuple(a.caption for a in HELD_OUT)
TRAIN_CAPTIONS = tuple(a.caption for a in TRAIN)
_BY_CAPTION = {a.caption: a for a in ALL_ATTRIBUTES}


def parse_caption(caption: str) -> Attributes:
    """The attributes a caption of this world names.

    Raises:
        ValueError: for a caption outside the world.
    """
    try:
        return _BY_CAPTION[caption.strip()]
    except KeyError:
        raise ValueError(
            f"parse_caption: {caption!r} is not a caption of the tiny world "
            f"(expected e.g. {ALL_ATTRIBUTES[0].caption!r})"
        ) from None


@dataclass
class Batch:
    """Images ``[B, 3, 32, 32]`` in ``[-1, 1]``, their captions and attribute labels ``[B]`` each,
    and the shape centres ``[B, 2]`` (x, y in ``[0, 1]``)."""

    images: Tensor
    captions: list[str]
    shape: Tensor
    colour: Tensor
    background: Tensor
    size: Tensor
    centre: Tensor


def _palette() -> Tensor:
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1.0


def render(attributes: list[Attributes], generator: torch.Generator) -> Batch:
    """Draw one image per entry of ``attributes`` (size within its range, position at random).

    $$ \\text{image} = m\\,c_\\text{shape} + (1 - m)\\,c_\\text{background} $$
    with $m$ the shape's coverage of each pixel, from a 4×4 supersampled mask.
    """
    n = len(attributes)
    lab = {k: torch.tensor([getattr(a, k) for a in attributes], dtype=torch.long) for k in
           ("shape", "colour", "background", "size")}  # fmt: skip
    low = torch.tensor([RADIUS[SIZES[z]][0] for z in lab["size"].tolist()])
    high = torch.tensor([RADIUS[SIZES[z]][1] for z in lab["size"].tolist()])
    r = low + (high - low) * torch.rand(n, generator=generator)
    margin = r + 1.0
    centre = margin[:, None] + (RESOLUTION - 2 * margin[:, None]) * torch.rand(n, 2, generator=generator)
    side = RESOLUTION * _SUPERSAMPLE
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / _SUPERSAMPLE
    x = (coords[None, None, :] - centre[:, 0, None, None]) / r[:, None, None]
    y = (coords[None, :, None] - centre[:, 1, None, None]) / r[:, None, None]
    circle = x.square() + y.square() <= 1.0
    square = (x.abs() <= 0.9) & (y.abs() <= 0.9)  # about the circle's area
    triangle = (y <= 1.0) & (x.abs() <= (y + 1.0) * 0.6)  # apex up, base 2.4 r wide
    masks = torch.stack([circle, square, triangle], 1).float()
    mask = masks[torch.arange(n), lab["shape"]][:, None]
    mask = F.avg_pool2d(mask, _SUPERSAMPLE)
    palette = _palette()
    fg = palette[lab["colour"]][:, :, None, None]
    bg = palette[lab["background"]][:, :, None, None]
    images = mask * fg + (1 - mask) * bg
    return Batch(images, [a.caption for a in attributes], centre=centre / RESOLUTION, **lab)


def sample_batch(n: int, generator: torch.Generator, *, held_out: bool = False) -> Batch:
    """``n`` images with captions drawn uniformly from the training (or held-out) captions."""
    pool = HELD_OUT if held_out else TRAIN
    index = torch.randint(len(pool), (n,), generator=generator)
    return render([pool[i] for i in index.tolist()], generator)


def captions_batch(captions: list[str], generator: torch.Generator) -> Batch:
    """Real images for the given captions (one each)."""
    return render([parse_caption(c) for c in captions], generator)


def to_uint8(images: Tensor) -> Tensor:
    """``[-1, 1]`` floats to ``[0, 255]`` uint8, rounded."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_dataset(folder: Path | str, n: int = 2048, *, seed: int = 0, held_out: bool = False) -> Path:
    """Write ``n`` training images and captions into ``folder`` as ``k.png`` + ``k.txt``.

    The folder layout ``add_sdxl.py --data`` reads. A folder that already holds ``n`` images is
    reused. Returns ``folder``.
    """
    from PIL import Image

    folder = Path(folder)
    if folder.is_dir() and len(list(folder.glob("*.png"))) >= n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < n:
        batch = sample_batch(min(256, n - done), g, held_out=held_out)
        pixels = to_uint8(batch.images).permute(0, 2, 3, 1).numpy()
        for k, (array, caption) in enumerate(zip(pixels, batch.captions), start=done):
            Image.fromarray(array).save(folder / f"{k:05d}.png")
            (folder / f"{k:05d}.txt").write_text(caption + "\n")
        done += len(batch.captions)
    return folder
