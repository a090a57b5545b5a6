"""Helpers shared by the adversarial losses and the regularisers (not public API)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

from torch import Tensor

from addkit._checks import check_finite, check_floating, check_ndim


def as_heads(fn: str, name: str, logits: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """Check discriminator logits and return them as a list of ``[B, K_h]`` heads."""
    heads = [logits] if isinstance(logits, Tensor) else logits
    if not isinstance(heads, Sequence) or len(heads) == 0:
        empty = " (empty)" if isinstance(heads, Sequence) else ""
        raise TypeError(
            f"{fn}: {name} must be a [B, K] tensor or a non-empty sequence of them, "
            f"got {type(logits).__name__}{empty}"
        )
    many = not isinstance(logits, Tensor)
    for i, head in enumerate(heads):
        label = f"{name}[{i}]" if many else name
        check_floating(fn, label, head)
        check_ndim(fn, label, head, 2, layout="[batch, tokens]; pass several heads as a list")
        if head.shape[0] == 0 or head.shape[1] == 0:
            raise ValueError(
                f"{fn}: {label} must hold at least one sample and one token ([B, K] with B, K >= 1), "
                f"got shape {tuple(head.shape)}"
            )
        check_finite(fn, label, head)
        if head.shape[0] != heads[0].shape[0]:
            raise ValueError(
                f"{fn}: every head of {name} must have the same batch size, got "
                f"{heads[0].shape[0]} for head 0 and {head.shape[0]} for head {i}"
            )
    return list(heads)


def sum_all(tensors: list[Tensor]) -> Tensor:
    """Elementwise sum of a non-empty list of tensors (with type promotion)."""
    return functools.reduce(operator.add, tensors)
