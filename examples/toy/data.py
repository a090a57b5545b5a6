"""Coloured digits: scikit-learn's 8×8 digits, painted one colour.

Each image is a digit stroke $g \\in [0, 1]$ (the 8×8 original, 17 grey levels) times
an RGB colour $c$ drawn per sample from the hue circle, on black, mapped to $[-1, 1]$:
$x = 2\\,g\\,c - 1$. The class is the digit. Nothing is downloaded: the 1,797 digits ship
with scikit-learn. Colours are drawn on the fly, so every epoch sees new images, and a
model that loses diversity shows it in colour as well as in handwriting.

Label 10 is the null label (classifier-free guidance). Label 11 is a "negative prompt"
for NFSD: heavily blurred, desaturated digits, which the teacher also learns to draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = 10
NULL_LABEL = 10
NEGATIVE_LABEL = 11
NUM_LABELS = 12
SIZE = 8


@dataclass
class Digits:
    """Stroke maps ``[N, 1, 8, 8]`` in ``[0, 1]`` and their labels ``[N]``."""

    strokes: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_digits_split(split: str = "train", *, test_fraction: float = 0.2) -> Digits:
    """The train or test split (fixed permutation) of scikit-learn's digits, ``[N, 1, 8, 8]``."""
    if split not in ("train", "test"):
        raise ValueError(f"load_digits_split: split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(raw.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_test = round(test_fraction * len(y))
    idx = order[:n_test] if split == "test" else order[n_test:]
    return Digits(x[idx], y[idx])


def random_colours(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``[n, 3]`` fully saturated colours, hue uniform on the circle (HSV with s = v = 1)."""
    h = torch.rand(n, generator=generator) * 6.0
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + h[:, None]) % 6.0
    return 1.0 - torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def paint(strokes: Tensor, colours: Tensor) -> Tensor:
    """Images ``[N, 3, 8, 8]`` in ``[-1, 1]``: $2\\,g\\,c - 1$."""
    return 2.0 * strokes * colours[:, :, None, None] - 1.0


def blur_negative(images: Tensor) -> Tensor:
    """The NFSD negative class: images blurred (3×3 box, twice) and half desaturated."""
    k = torch.ones(3, 1, 3, 3, dtype=images.dtype) / 9.0
    x = (images + 1) / 2
    for _ in range(2):
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    x = 0.5 * x + 0.5 * x.mean(dim=1, keepdim=True)
    return 2 * x - 1


def sample_batch(
    data: Digits, batch_size: int, generator: torch.Generator, *, negative_fraction: float = 0.0
) -> tuple[Tensor, Tensor]:
    """A random batch ``(images [B, 3, 8, 8], labels [B])`` with fresh colours.

    A ``negative_fraction`` of the batch is replaced by blurred images labelled
    ``NEGATIVE_LABEL`` (teacher training only).
    """
    idx = torch.randint(len(data), (batch_size,), generator=generator)
    images = paint(data.strokes[idx], random_colours(batch_size, generator))
    labels = data.labels[idx].clone()
    if negative_fraction > 0:
        neg = torch.rand(batch_size, generator=generator) < negative_fraction
        if bool(neg.any()):
            images[neg] = blur_negative(images[neg])
            labels[neg] = NEGATIVE_LABEL
    return images, labels


def reference_set(data: Digits, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed set of ``n`` coloured real images (cycling through the digits) and labels."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) % len(data)
    return paint(data.strokes[idx], random_colours(n, g)), data.labels[idx].clone()
