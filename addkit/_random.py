"""The one way addkit draws random numbers: on the generator's device, then moved.

A ``torch.Generator`` only draws on its own device, so a CPU generator with CUDA data (or the
reverse) fails when the draw is made on the data's device. Every draw in addkit goes through
these helpers: drawn where the generator lives (the data's device without one), moved to
``device``. The same generator therefore gives the same numbers on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rand", "randint", "randn"]


def _where(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str | None:
    return generator.device if generator is not None else device


def randn(
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Standard normal draws of ``shape``, drawn on the generator's device, returned on ``device``."""
    return torch.randn(shape, generator=generator, device=_where(generator, device), dtype=dtype).to(device)


def rand(
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Uniform ``[0, 1)`` float32 draws of ``shape``, drawn on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=generator, device=_where(generator, device)).to(device)


def randint(
    low: int,
    high: int,
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integers in ``[low, high)`` (int64) of ``shape``, drawn on the generator's device, returned on ``device``."""
    return torch.randint(low, high, shape, generator=generator, device=_where(generator, device)).to(device)
