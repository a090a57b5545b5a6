"""Training data of ``add_flow.py``: image-caption pairs (real data) or captions alone (teacher data).

- **real** (``--data-source real``): a folder of images, each with a caption in a ``.txt`` file
  of the same stem, or a ``.jsonl`` manifest with ``image`` and ``text`` (or ``caption``)
  fields; images are resized (shorter side) and centre-cropped to the training resolution.
- **teacher** (``--data-source teacher``, LADD's synthetic data): captions only, from the same
  folder or manifest or from a ``.txt`` file with one prompt per line; the recipe draws the
  "real" latents from the teacher for each batch.

``StreamSampler`` fixes the order of the whole run: position ``p`` of the global stream is item
``perm_e[p mod n]`` of epoch ``e = p div n`` with ``perm_e`` drawn from ``(seed, e)``; process
``r`` of ``w`` reads positions ``start + r, start + r + w, ...``, so a resumed run continues
from the exact global position.

(``add_sdxl_data.py`` reads more formats, Hugging Face datasets included; this module is the
subset the flow recipe needs, until the two recipes share one data module.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """The data cannot be used as given; the message names the file (and line)."""


def _caption(text: Any, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty or missing caption; every example needs one")
    return text.strip()


def load_pairs(data: str | Path) -> list[tuple[Path | None, str]]:
    """``(image path, caption)`` pairs from a folder, a ``.jsonl`` manifest, or prompts from a ``.txt``.

    A ``.txt`` file gives captions only (image ``None``): usable with ``--data-source teacher``.
    """
    path = Path(data)
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {path}")
        missing = [p.with_suffix(".txt") for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise DataError(f"missing caption file {missing[0]} (and {len(missing) - 1} more)")
        return [(p, _caption(p.with_suffix(".txt").read_text(encoding="utf-8"), str(p))) for p in images]
    if path.suffix == ".txt" and path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [(None, line) for line in lines if line]
        if not prompts:
            raise DataError(f"the prompt file {path} has no prompts")
        return prompts
    if path.suffix == ".jsonl" and path.is_file():
        pairs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from err
            image = row.get("image")
            image = (
                None
                if image is None
                else (path.parent / image if not Path(image).is_absolute() else Path(image))
            )
            pairs.append((image, _caption(row.get("text", row.get("caption")), where)))
        return pairs
    raise DataError(
        f"--data {path}: expected a folder of images + .txt captions, a .jsonl manifest or a .txt prompt file"
    )


class PairDataset(Dataset):
    """Items ``{"caption", "pixels" [3, R, R] in [-1, 1]}`` (pixels only when ``images`` is true)."""

    def __init__(self, pairs: list[tuple[Path | None, str]], resolution: int, *, images: bool) -> None:
        if not pairs:
            raise DataError("the dataset is empty")
        if images and any(p is None for p, _ in pairs):
            raise DataError("--data-source real needs an image for every caption (a prompt file has none)")
        self.pairs, self.resolution, self.images = pairs, resolution, images

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, caption = self.pairs[index]
        if not self.images:
            return {"caption": caption}
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read the image {path}: {err}") from err
        r, (w, h) = self.resolution, image.size
        scale = r / min(w, h)
        image = image.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = (image.size[0] - r) // 2, (image.size[1] - r) // 2
        image = image.crop((left, top, left + r, top + r))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(r, r, 3)
        return {"caption": caption, "pixels": pixels.permute(2, 0, 1).float() / 127.5 - 1.0}


class StreamSampler(Sampler[int]):
    """An endless, resumable index stream shared by all processes (see the module docs)."""

    def __init__(self, n: int, *, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world

    def __iter__(self) -> Iterator[int]:
        position, epoch, perm = self.start + self.rank, -1, torch.arange(0)
        while True:
            if position // self.n != epoch:
                epoch = position // self.n
                perm = torch.randperm(
                    self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                )
            yield int(perm[position % self.n])
            position += self.world
