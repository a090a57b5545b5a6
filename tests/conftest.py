"""Shared pytest configuration: the ``cuda`` marker skips without a GPU; seeded defaults."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

settings.register_profile("addkit", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("addkit")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
