"""Moved to ``addkit.testing``; this shim keeps the old names for the tests that still import them.

``tests/sampling/test_sampler.py`` and ``tests/sampling/test_cuda_graph.py`` import from here;
once they import ``addkit.testing`` (``tiny_sdxl_pipeline()``, ``sdxl_condition``,
``tiny_sdxl_unet``, ``tiny_vae``), delete this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from addkit.testing import sdxl_condition, tiny_vae
from addkit.testing import tiny_sdxl_pipeline as _tiny_sdxl_pipeline
from addkit.testing import tiny_sdxl_unet as tiny_unet

__all__ = ["sdxl_condition", "tiny_sdxl_pipeline", "tiny_unet", "tiny_vae"]


def tiny_sdxl_pipeline(folder: Path | None = None, *, seed: int = 0) -> Any:
    """``addkit.testing.tiny_sdxl_pipeline(seed=seed)``; ``folder`` is unused (nothing is written)."""
    return _tiny_sdxl_pipeline(seed=seed)
