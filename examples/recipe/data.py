"""Image-caption data for ``add_sdxl.py``: folders, JSONL/CSV manifests, Hugging Face datasets.

- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``), each with a caption in
  a ``.txt`` file of the same stem (``cat.png`` + ``cat.txt``), searched recursively;
- a ``.jsonl`` or ``.csv`` manifest with an image column (a path, relative to the manifest's
  folder unless absolute) and a caption column;
- a Hugging Face ``datasets`` name or local path (``load_dataset``, or ``load_from_disk`` for a
  saved dataset) with an image column (PIL images or paths) and a caption column.

Images are resized (shorter side) and centre-cropped to the training resolution. Every problem
the loader can see raises `DataError` naming the file (and the row for a manifest).

`StreamSampler` fixes the order of the whole run: position ``p`` of the global stream is item
``perm_e[p mod n]`` of epoch ``e = p div n``, with ``perm_e`` drawn from ``(seed, e)``. Process
``r`` of ``w`` reads positions ``start + r, start + r + w, ...``, so a resumed run (any number of
processes) continues from the exact global position.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_KEYS = ("image", "file_name", "image_path", "path", "img")
CAPTION_KEYS = ("text", "caption", "prompt")


class DataError(ValueError):
    """The data cannot be used as given; the message names the file (and row)."""


@dataclass
class Record:
    """One example: the image (a path or a PIL image) and its caption."""

    image: Any
    caption: str
    where: str  # file (and row) named in error messages


def _check_caption(caption: Any, where: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"empty or missing caption for {where}: every image needs a non-empty caption")
    return caption.strip()


def folder_records(folder: Path) -> list[Record]:
    """Images under ``folder`` (recursively), each with the caption in ``<stem>.txt``."""
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in the folder {folder}")
    records = []
    for path in images:
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(f"missing caption file {txt} for the image {path}")
        records.append(Record(path, _check_caption(txt.read_text(encoding="utf-8"), str(txt)), str(path)))
    return records


def _pick(row: dict, keys: tuple[str, ...], wanted: str | None, where: str, what: str) -> str:
    if wanted is not None:
        if wanted not in row:
            raise DataError(f"{where}: no column {wanted!r} for the {what} (columns: {sorted(row)})")
        return wanted
    for key in keys:
        if key in row:
            return key
    raise DataError(f"{where}: no {what} column; expected one of {list(keys)}, got {sorted(row)}")


def manifest_records(path: Path, image_column: str | None, caption_column: str | None) -> list[Record]:
    """Rows of a ``.jsonl`` or ``.csv`` manifest."""
    rows: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".jsonl":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{i}: not valid JSON ({err.msg})") from err
    else:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [(f"{path}:{i}", row) for i, row in enumerate(csv.DictReader(f), start=2)]
    if not rows:
        raise DataError(f"the manifest {path} has no rows")
    records = []
    for where, row in rows:
        image_key = _pick(row, IMAGE_KEYS, image_column, where, "image")
        caption_key = _pick(row, CAPTION_KEYS, caption_column, where, "caption")
        image = Path(row[image_key])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DataError(f"{where}: the image file {image} does not exist")
        records.append(Record(image, _check_caption(row[caption_key], where), f"{image} ({where})"))
    return records


def hf_records(name: str, split: str, image_column: str | None, caption_column: str | None) -> list[Record]:
    """Rows of a Hugging Face dataset (a hub name, a local script/data folder or a saved dataset)."""
    import datasets

    local = Path(name)
    if (local / "dataset_info.json").is_file() or (local / "state.json").is_file():
        ds = datasets.load_from_disk(str(local))
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name, split=split)
    if len(ds) == 0:
        raise DataError(f"the dataset {name} (split {split!r}) is empty")
    columns = {c: None for c in ds.column_names}
    image_key = _pick(columns, IMAGE_KEYS, image_column, f"dataset {name}", "image")
    caption_key = _pick(columns, CAPTION_KEYS, caption_column, f"dataset {name}", "caption")
    records = []
    for i, caption in enumerate(ds[caption_key]):
        where = f"dataset {name} row {i}"
        records.append(Record(_LazyRow(ds, i, image_key), _check_caption(caption, where), where))
    return records


@dataclass
class _LazyRow:
    """An image cell of a Hugging Face dataset, decoded when the example is read."""

    ds: Any
    index: int
    column: str

    def get(self) -> Any:
        return self.ds[self.index][self.column]


def load_records(
    data: str, *, split: str = "train", image_column: str | None = None, caption_column: str | None = None
) -> list[Record]:
    """Records from a folder, a ``.jsonl``/``.csv`` manifest, or a ``datasets`` name or path."""
    path = Path(data)
    if path.is_dir() and not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        return folder_records(path)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
        return manifest_records(path, image_column, caption_column)
    if path.is_file():
        raise DataError(f"{path}: a manifest must be a .jsonl or .csv file")
    return hf_records(data, split, image_column, caption_column)


class ImageCaptionDataset(Dataset):
    """Resize (shorter side), centre-crop, scale to ``[-1, 1]``; keeps SDXL's size conditioning.

    Items: ``pixels [3, R, R]``, ``caption``, ``original_size (h, w)`` and ``crop_top_left``.
    """

    def __init__(self, records: list[Record], resolution: int) -> None:
        if not records:
            raise DataError("the dataset is empty")
        self.records = records
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, record: Record) -> Image.Image:
        image = record.image.get() if isinstance(record.image, _LazyRow) else record.image
        try:
            if isinstance(image, (str, Path)):
                with Image.open(image) as im:
                    return im.convert("RGB")
            if isinstance(image, Image.Image):
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"cannot read the image {record.where}: {err}") from err
        raise DataError(f"{record.where}: expected an image or a path, got {type(image).__name__}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = self._open(record)
        w, h = image.size
        r = self.resolution
        scale = r / min(w, h)
        nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        top, left = (nh - r) // 2, (nw - r) // 2
        image = image.crop((left, top, left + r, top + r))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(r, r, 3)
        pixels = pixels.permute(2, 0, 1).float() / 127.5 - 1.0
        return {
            "pixels": pixels,
            "caption": record.caption,
            "original_size": torch.tensor([h, w]),
            "crop_top_left": torch.tensor([top, left]),
        }


class StreamSampler(Sampler[int]):
    """An endless, resumable index stream shared by all processes (see the module docs).

    Args:
        n: dataset size.
        seed: seed of the per-epoch permutations.
        start: first global position (samples already consumed by all processes together).
        rank: this process's index.
        world: number of processes.
    """

    def __init__(self, n: int, *, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[int]:
        position = self.start + self.rank
        epoch, perm = -1, None
        while True:
            if position // self.n != epoch:
                epoch = position // self.n
                perm = self._perm(epoch)
            yield int(perm[position % self.n])
            position += self.world
