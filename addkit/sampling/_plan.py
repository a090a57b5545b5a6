"""The few-step sampler's plan: checked arguments, timesteps and coefficients on the device.

Everything here runs once per configuration, on the host, in float64; the loop itself only
reads the resulting device tensors (so it can be captured in a CUDA graph).
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import torch
from torch import Tensor

from addkit._time import check_schedule as _check_schedule
from addkit._time import check_time_values

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
    """Raise ``TypeError`` unless ``schedule`` satisfies the ``Schedule`` protocol."""
    return _check_schedule(fn, schedule)


def check_timesteps(fn: str, schedule: Any, timesteps: Any) -> tuple[int | float, ...]:
    """Checked timesteps as Python numbers: non-empty, strictly decreasing, in range.

    ``None`` means the schedule's default, ``schedule.timesteps(4, "trailing")``. A tensor
    is read to the host here (once per configuration, not in the loop).
    """
    if timesteps is None:
        timesteps = schedule.timesteps(4, "trailing")
    values = check_time_values(fn, schedule, timesteps, sequence=True)
    if not values:
        raise ValueError(f"{fn}: timesteps must hold at least one timestep, got ()")
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
    t = torch.tensor(timesteps, dtype=schedule.time_dtype, device=device)
    coef_dtype = torch.promote_types(dtype, torch.float32)
    return Plan(timesteps, t, k.to(device=device, dtype=coef_dtype))
