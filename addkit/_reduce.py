"""The one reduction helper shared by every loss, and the per-sample broadcast helper."""

from __future__ import annotations

import torch
from torch import Tensor

from addkit._checks import check_batch_vector, check_choice, check_finite_inputs
from addkit.typing import Reduction

__all__ = ["Reduction", "append_dims", "per_sample_mean", "reduce_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions so that ``x`` broadcasts against an ``ndim`` tensor.

    Args:
        x: a per-sample tensor, usually of shape ``[B]``.
        ndim: the rank of the tensor ``x`` must broadcast against.

    Returns:
        ``x`` viewed with shape ``[B, 1, ..., 1]`` of rank ``ndim``.

    Raises:
        ValueError: if ``x`` already has more than ``ndim`` dimensions.

    Examples:
        >>> append_dims(torch.ones(4), 4).shape
        torch.Size([4, 1, 1, 1])
    """
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(
            f"append_dims: x has {x.ndim} dimensions, more than the target {ndim}"
        )
    return x.reshape(*x.shape, *([1] * missing))


def per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``[B, ...] -> [B]``."""
    return x.flatten(1).mean(1) if x.ndim > 1 else x


def reduce_loss(
    per_sample: Tensor,
    reduction: Reduction = "mean",
    *,
    weight: Tensor | None = None,
    fn: str = "reduce_loss",
) -> Tensor:
    """Weight and reduce a per-sample loss.

    Args:
        per_sample: loss per sample, shape ``[B]``.
        reduction: ``"mean"`` over the batch, ``"sum"`` over the batch, or ``"none"``
            (return the weighted ``[B]`` values).
        weight: optional per-sample weight ``[B]`` (e.g. ADD's $c(t)$), multiplied in
            before reducing.
        fn: name of the calling function, used in error messages.

    Returns:
        A scalar tensor, or ``[B]`` for ``reduction="none"``.

    Raises:
        ValueError: for an unknown reduction, an empty batch or a weight of the wrong shape.

    Examples:
        >>> reduce_loss(torch.tensor([1.0, 3.0]))
        tensor(2.)
        >>> reduce_loss(torch.tensor([1.0, 3.0]), "none", weight=torch.tensor([2.0, 0.0]))
        tensor([2., 0.])
    """
    check_choice(fn, "reduction", reduction, _REDUCTIONS)
    check_batch_vector(fn, "per-sample loss", per_sample, per_sample.shape[0] if per_sample.ndim else -1)
    if per_sample.shape[0] == 0:
        raise ValueError(f"{fn}: the batch is empty (0 samples); a mean over it would be NaN")
    if weight is not None:
        check_batch_vector(fn, "weight", weight, per_sample.shape[0])
        check_finite_inputs(fn, weight=weight)
        per_sample = per_sample * weight.to(per_sample.dtype)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


