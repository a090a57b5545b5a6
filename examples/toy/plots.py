"""Figures with PIL only: sample grids and loss curves (no matplotlib needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

# fmt: off
PALETTE = [  # ten distinct colours (matplotlib's tab10): every run of the study gets its own
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
    (23, 190, 207), (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34),
]
# fmt: on


def to_pil_grid(images: Tensor, nrow: int, *, scale: int = 4, pad: int = 1) -> Image.Image:
    """Tile ``[N, 3, H, W]`` images in ``[-1, 1]`` into rows of ``nrow``, upscaled (nearest)."""
    n, _, h, w = images.shape
    ncol = (n + nrow - 1) // nrow
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.full((3, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[
            :, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w
        ] = x[i]
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def labelled_grids(panels: Sequence[tuple[str, Image.Image]], path: Path) -> None:
    """Panels side by side, each with its title above; saved as PNG."""
    title_h, gap = 14, 8
    width = sum(p.width for _, p in panels) + gap * (len(panels) + 1)
    height = max(p.height for _, p in panels) + title_h + 2 * gap
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    x = gap
    for title, panel in panels:
        draw.text((x, gap // 2), title, fill="black")
        out.paste(panel, (x, gap + title_h))
        x += panel.width + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, optimize=True)


def _smooth(values: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def loss_curves(panels: Mapping[str, Mapping[str, Sequence[float]]], path: Path, *, smooth: int = 10) -> None:
    """One small line chart per panel (title -> {series name -> values per step}), in a row.

    A series name keeps one colour across panels (by first appearance), so a run missing from
    one panel does not shift the others' colours.
    """
    names = dict.fromkeys(name for series in panels.values() for name in series)
    colour_of = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    pw, ph, m = 300, 200, 36
    out = Image.new("RGB", (pw * len(panels), ph), "white")
    draw = ImageDraw.Draw(out)
    for p, (title, series) in enumerate(panels.items()):
        x0, x1, y0, y1 = p * pw + m, (p + 1) * pw - 8, 16, ph - 20
        curves = {k: _smooth(list(v), smooth) for k, v in series.items() if len(v)}
        if not curves:
            continue
        lo = min(min(v) for v in curves.values())
        hi = max(max(v) for v in curves.values())
        hi = hi if hi > lo else lo + 1.0
        n = max(len(v) for v in curves.values())
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, 2), title, fill="black")
        draw.text((p * pw + 2, y0), f"{hi:.3g}", fill="black")
        draw.text((p * pw + 2, y1 - 10), f"{lo:.3g}", fill="black")
        draw.text((x1 - 40, y1 + 4), f"{n} steps", fill="black")
        if lo < 0 < hi:
            yz = y1 - (0 - lo) / (hi - lo) * (y1 - y0)
            draw.line((x0, yz, x1, yz), fill=(200, 200, 200))
        for j, (name, v) in enumerate(curves.items()):
            colour = colour_of[name]
            pts = [
                (x0 + i / max(n - 1, 1) * (x1 - x0), y1 - (u - lo) / (hi - lo) * (y1 - y0))
                for i, u in enumerate(v)
            ]
            draw.line(pts, fill=colour, width=2)
            draw.text((x0 + 4, y0 + 4 + 11 * j), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, optimize=True)
