"""The few-step sampler's plan: checked arguments, timesteps and coefficients on the device.

Everything here runs once per configuration, on the host, in float64; the loop itself only
reads the resulting device tensors (so it can be captured in a CUDA graph).
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Plan", "check_denoiser", "check_schedule", "check_timesteps", "make_plan"]


class Plan(NamedTuple):
    """Device tensors the loop reads: timesteps ``t [n]`` and coefficients ``k [n-1, 3]``."""

    timesteps: tuple[int | float, ...]
    t: Tensor
    k: Tensor


def check_denoiser(fn: str, denoiser: Any) -> Any:
    """Raise ``TypeError`` unless ``denoiser`` has a callable ``x0(x_t, t, **cond)``."""
    if not callable(getattr(denoiser, "x0", None)):
        raise TypeError(
            f"{fn}: denoiser must have a method x0(x_t, t, **cond) returning x0 (e.g. "
            f"addkit.denoisers.wrap(model, schedule, prediction)), got {type(denoiser).__name__}"
        )
    return denoiser


def check_schedule(fn: str, schedule: Any) -> Any:
    """Raise ``TypeError`` unless ``schedule`` has ``alpha(t)`` and ``sigma(t)``."""
    if not (callable(getattr(schedule, "alpha", None)) and callable(getattr(schedule, "sigma", None))):
        raise TypeError(
            f"{fn}: schedule must have alpha(t) and sigma(t) (e.g. addkit.VPSchedule.scaled_linear()), "
            f"got {type(schedule).__name__}"
        )
    return schedule


def check_timesteps(fn: str, schedule: Any, timesteps: Any) -> tuple[int | float, ...]:
    """Checked timesteps as Python numbers: non-empty, strictly decreasing, in range.

    A tensor is read to the host here (once per configuration, not in the loop).
    """
    if isinstance(timesteps, Tensor):
        timesteps = timesteps.tolist()
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence):
        raise TypeError(f"{fn}: timesteps must be a sequence of timesteps, got {type(timesteps).__name__}")
    values = tuple(timesteps)
    if not values:
        raise ValueError(f"{fn}: timesteps must hold at least one timestep, got ()")
    if getattr(schedule, "is_discrete", True):
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise TypeError(f"{fn}: timesteps must be integers for a discrete schedule, got {values}")
        values = tuple(int(v) for v in values)
        lo, hi = 0, getattr(schedule, "num_train_timesteps", 1000) - 1
    else:
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
            raise TypeError(f"{fn}: timesteps must be numbers in [0, 1] for a flow schedule, got {values}")
        values = tuple(float(v) for v in values)
        lo, hi = 0.0, 1.0
    if not all(lo <= v <= hi for v in values):
        raise ValueError(f"{fn}: timesteps must lie in [{lo}, {hi}], got {values}")
    if any(a <= b for a, b in itertools.pairwise(values)):
        raise ValueError(f"{fn}: timesteps must be strictly decreasing (noisiest first), got {values}")
    return values


def make_plan(
    schedule: Any,
    timesteps: tuple[int | float, ...],
    k: Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> Plan:
    """Move timesteps and coefficients to ``device`` (coefficients in at least float32)."""
    discrete = getattr(schedule, "is_discrete", True)
    t = torch.tensor(timesteps, dtype=torch.long if discrete else torch.float32, device=device)
    coef_dtype = torch.promote_types(dtype, torch.float32)
    return Plan(timesteps, t, k.to(device=device, dtype=coef_dtype))
