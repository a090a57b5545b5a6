"""What every tiny builder shares: optional imports that name their extra, seeded construction."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

TEXT_WIDTH = 16  # hidden size of each tiny CLIP text encoder
POOLED_WIDTH = 16  # projection_dim of the tiny CLIP text encoder with projection
_EXTRA = {"diffusers": "diffusers", "transformers": "diffusers", "tokenizers": "diffusers", "timm": "timm", "open_clip": "clip"}


def optional_import(module: str, fn: str) -> Any:
    """``module``, or a ``ModuleNotFoundError`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        package = module.split(".")[0]
        raise ModuleNotFoundError(
            f"addkit.testing.{fn} needs {package}: pip install 'addkit[{_EXTRA[package]}]'"
        ) from err


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block on the CPU generator seeded with ``seed``; restore the global state after."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"addkit.testing: seed must be an int, got {type(seed).__name__} {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
