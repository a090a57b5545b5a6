"""Training data of ``add_flow.py``: image-caption pairs (real data) or captions alone (teacher data).

Real data is read by the SDXL recipe's data module, ``recipe.data`` (an image folder with
``.txt`` captions, a ``.jsonl``/``.csv`` manifest, or a Hugging Face dataset; resized and
centre-cropped; its resumable ``StreamSampler``). With ``--data-source teacher`` (LADD's
synthetic data) only the captions are read, from the same sources or from a ``.txt`` file with
one prompt per line, and the recipe draws the "real" latents from the teacher for each batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

import recipe.data as sdxl_data
from recipe.data import DataError, StreamSampler

__all__ = ["DataError", "PromptDataset", "StreamSampler", "load_dataset"]


class PromptDataset(Dataset):
    """Items ``{"caption": str}``: captions without images (teacher data)."""

    def __init__(self, captions: list[str]) -> None:
        if not captions:
            raise DataError("no captions to train on")
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"caption": self.captions[index]}


def load_dataset(args: Any) -> Dataset:
    """The dataset ``--data`` and ``--data-source`` describe (see the module docs)."""
    path = Path(args.data)
    if path.suffix.lower() == ".txt" and path.is_file():
        if args.data_source == "real":
            raise DataError(f"--data {path}: a prompt file has no images; use --data-source teacher")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"--data {path}: the prompt file is empty")
        return PromptDataset(prompts)
    records = sdxl_data.load_records(
        args.data, split=args.split, image_column=args.image_column, caption_column=args.caption_column
    )
    if args.data_source == "teacher":
        return PromptDataset([r.caption for r in records])
    return sdxl_data.ImageCaptionDataset(records, args.resolution)
