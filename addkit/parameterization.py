"""Conversions between what a network predicts: ``"eps"``, ``"v"``, ``"x0"`` and ``"flow"``.

With $x_t = \\alpha_t x_0 + \\sigma_t \\epsilon$, the four targets are

$$ \\epsilon, \\qquad v = \\alpha_t \\epsilon - \\sigma_t x_0, \\qquad x_0, \\qquad
u = \\epsilon - x_0. $$

The formulas below hold for any $(\\alpha_t, \\sigma_t)$, so VP and rectified-flow schedules
go through one path (for VP, $\\alpha^2 + \\sigma^2 = 1$; for rectified flow,
$\\alpha + \\sigma = 1$):

$$ x_0 = \\frac{x_t - \\sigma\\epsilon}{\\alpha}
   = \\frac{\\alpha x_t - \\sigma v}{\\alpha^2 + \\sigma^2}
   = \\frac{x_t - \\sigma u}{\\alpha + \\sigma}, \\qquad
   \\epsilon = \\frac{x_t - \\alpha x_0}{\\sigma}
   = \\frac{\\sigma x_t + \\alpha v}{\\alpha^2 + \\sigma^2} = u + x_0. $$

At zero SNR ($\\alpha_t = 0$) an eps prediction carries no information about $x_0$: the
conversion divides by zero and returns non-finite values (under
[`addkit.value_checks`][addkit.checks.value_checks] it raises instead; finding the zero reads
the device). v, x0 and flow predictions convert safely there. Likewise an x0 prediction
gives no $\\epsilon$ where $\\sigma_t = 0$.

The maths runs in at least float32 and returns the dtype of ``x_t``.

References:
    Salimans & Ho, *Progressive Distillation*, arXiv 2202.00512, App. D (v).
    Lin et al., arXiv 2305.08891, §3.2 (v at zero terminal SNR).
    Liu et al. / Esser et al. (rectified flow velocity $u = \\epsilon - x_0$).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from addkit._checks import (
    check_broadcasts_to,
    check_choice,
    check_finite_inputs,
    check_floating,
    check_same_shape,
    checking_values,
)
from addkit._time import check_schedule
from addkit.typing import Prediction, Schedule

__all__ = ["PREDICTIONS", "convert", "normalize_prediction", "to_eps", "to_flow", "to_v", "to_x0"]

PREDICTIONS: tuple[str, ...] = ("eps", "v", "x0", "flow")
_DIFFUSERS_NAMES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def normalize_prediction(prediction: str, *, fn: str = "normalize_prediction") -> Prediction:
    """Map a prediction name (addkit's or diffusers') to addkit's vocabulary.

    Examples:
        >>> normalize_prediction("v_prediction")
        'v'
    """
    name = _DIFFUSERS_NAMES.get(prediction, prediction)
    check_choice(fn, "prediction", name, PREDICTIONS + tuple(_DIFFUSERS_NAMES))
    return name  # type: ignore[return-value]


def _require_nonzero(fn: str, coef: Tensor, name: str, why: str) -> None:
    """Raise where ``coef`` is 0 (reads the device: only under value checks; else inf/NaN flow on)."""
    if not checking_values():
        return
    if bool((coef == 0).any()):
        raise ValueError(f"{fn}: {why} where {name} = 0 (zero {'SNR' if name == 'alpha_t' else 'noise'})")


def convert(
    pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, *, source: str, target: str
) -> Tensor:
    """Convert a prediction from ``source`` to ``target`` given broadcastable $(\\alpha_t, \\sigma_t)$.

    This is the core every other conversion calls; use it when the coefficients are
    already at hand (e.g. precomputed on the device for a captured sampler).

    Args:
        pred: the network's prediction, same shape as ``x_t``.
        x_t: the noisy input ``[B, ...]``.
        alpha: $\\alpha_t$ broadcastable to ``x_t`` (e.g. ``[B, 1, 1, 1]``).
        sigma: $\\sigma_t$ broadcastable to ``x_t``.
        source: what ``pred`` is: ``"eps" | "v" | "x0" | "flow"`` (or a diffusers name).
        target: what to return, same vocabulary.

    Returns:
        The ``target`` prediction, in ``x_t``'s dtype.

    Raises:
        ValueError: for unknown names, mismatched shapes, and (under
            [`addkit.value_checks`][addkit.checks.value_checks]) $x_0$ from eps where
            $\\alpha_t = 0$ or $\\epsilon$ from x0 where $\\sigma_t = 0$.

    Examples:
        >>> x0, eps = torch.ones(1, 2), torch.zeros(1, 2)
        >>> a, s = torch.tensor([[0.6]]), torch.tensor([[0.8]])
        >>> x_t = a * x0 + s * eps
        >>> convert(a * eps - s * x0, x_t, a, s, source="v", target="x0")
        tensor([[1., 1.]])
    """
    fn = "convert"
    source = normalize_prediction(source, fn=fn)
    target = normalize_prediction(target, fn=fn)
    check_floating(fn, "pred", pred)
    check_floating(fn, "x_t", x_t)
    check_same_shape(fn, "pred", pred, "x_t", x_t)
    check_broadcasts_to(fn, "alpha", alpha, x_t)
    check_broadcasts_to(fn, "sigma", sigma, x_t)
    check_finite_inputs(fn, pred=pred, x_t=x_t, alpha=alpha, sigma=sigma)
    out_dtype = x_t.dtype
    if source == target:
        return pred
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    p, x = pred.to(dtype), x_t.to(dtype)
    a, s = alpha.to(dtype), sigma.to(dtype)

    x0: Tensor | None = None
    eps: Tensor | None = None
    if source == "eps":
        eps = p
        if target != "eps":
            _require_nonzero(fn, a, "alpha_t", "an eps prediction cannot give x0")
            x0 = (x - s * eps) / a
    elif source == "x0":
        x0 = p
        if target in ("eps", "v", "flow"):
            _require_nonzero(fn, s, "sigma_t", "an x0 prediction cannot give eps")
            eps = (x - a * x0) / s
    elif source == "v":
        norm = a.square() + s.square()
        x0 = (a * x - s * p) / norm
        eps = (s * x + a * p) / norm
    else:  # flow: u = eps - x0
        x0 = (x - s * p) / (a + s)
        eps = p + x0

    if target == "x0":
        out = x0
    elif target == "eps":
        out = eps
    elif target == "v":
        out = a * eps - s * x0  # type: ignore[operator]
    else:
        out = eps - x0  # type: ignore[operator]
    return out.to(out_dtype)  # type: ignore[union-attr]


def _via_schedule(
    target: str, pred: Tensor, x_t: Tensor, t: Any, schedule: Schedule, prediction: str
) -> Tensor:
    fn = f"to_{target}"
    check_floating(fn, "x_t", x_t)
    alpha, sigma = _coefficients(schedule, t, x_t, fn)
    return convert(pred, x_t, alpha, sigma, source=normalize_prediction(prediction, fn=fn), target=target)


def _coefficients(schedule: Schedule, t: Any, like: Tensor, fn: str) -> tuple[Tensor, Tensor]:
    check_schedule(fn, schedule)
    return schedule.coefficients(t, like, fn=fn)


def to_x0(pred: Tensor, x_t: Tensor, t: Any, *, schedule: Schedule, prediction: str) -> Tensor:
    """Clean-sample estimate $\\hat x_0$ from a ``prediction`` at time ``t``.

    Args:
        pred: the network output ``[B, ...]``.
        x_t: the noisy input it was given ``[B, ...]``.
        t: timestep(s) of ``schedule``: a scalar or ``[B]``.
        schedule: the noise schedule ($\\alpha_t$, $\\sigma_t$).
        prediction: ``"eps" | "v" | "x0" | "flow"`` (or diffusers' names).

    Returns:
        $\\hat x_0$ with ``x_t``'s shape and dtype.

    Raises:
        ValueError: for shape mismatches or unknown names; under
            [`addkit.value_checks`][addkit.checks.value_checks] also for an eps prediction
            where $\\alpha_t = 0$ (zero terminal SNR).

    Examples:
        >>> from addkit.schedules import FlowSchedule
        >>> x_t, u = torch.zeros(1, 2), torch.ones(1, 2)
        >>> to_x0(u, x_t, torch.tensor([0.5]), schedule=FlowSchedule(), prediction="flow")
        tensor([[-0.5000, -0.5000]])
    """
    return _via_schedule("x0", pred, x_t, t, schedule, prediction)


def to_eps(pred: Tensor, x_t: Tensor, t: Any, *, schedule: Schedule, prediction: str) -> Tensor:
    """Noise estimate $\\hat\\epsilon$; arguments as [`to_x0`][addkit.parameterization.to_x0]."""
    return _via_schedule("eps", pred, x_t, t, schedule, prediction)


def to_v(pred: Tensor, x_t: Tensor, t: Any, *, schedule: Schedule, prediction: str) -> Tensor:
    """Velocity $\\hat v = \\alpha_t\\hat\\epsilon - \\sigma_t\\hat x_0$; arguments as [`to_x0`][addkit.parameterization.to_x0]."""
    return _via_schedule("v", pred, x_t, t, schedule, prediction)


def to_flow(pred: Tensor, x_t: Tensor, t: Any, *, schedule: Schedule, prediction: str) -> Tensor:
    """Flow velocity $\\hat u = \\hat\\epsilon - \\hat x_0$; arguments as [`to_x0`][addkit.parameterization.to_x0]."""
    return _via_schedule("flow", pred, x_t, t, schedule, prediction)
