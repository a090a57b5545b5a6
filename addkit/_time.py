"""The one place that decides how time is represented and checked.

A [`Schedule`][addkit.typing.Schedule] says whether its time is discrete (``is_discrete``:
integer timesteps ``0 .. T-1`` as in diffusers) or continuous (floats in ``t_range``, e.g.
``[0, 1]`` for rectified flow), and the dtype of the ``[B]`` time tensor a model receives
(``time_dtype``: ``torch.long`` or ``torch.float32``). Every part of addkit turns user input
into time through the functions here:

- Python numbers (and sequences of them) are checked on the host: integers for a discrete
  schedule (``500.7`` is refused, never truncated), numbers inside ``t_range``;
- tensors are checked from metadata (an integer dtype for a discrete schedule, floating for a
  continuous one; one value per sample), and their value range by a device-side assertion
  that reads nothing back (a ``RuntimeError`` naming ``t`` on the CPU, a device-side assert
  on CUDA); under [`addkit.value_checks`][addkit.checks.value_checks] by a host read that
  raises ``ValueError`` with the values found.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from addkit._checks import assert_in_range

__all__ = ["batch_time", "check_schedule", "check_time", "check_time_values", "host_time_tensor"]

_MEMBERS = ("alpha", "sigma", "coefficients", "add_noise", "timesteps")


def check_schedule(fn: str, schedule: Any, name: str = "schedule") -> Any:
    """Raise ``TypeError`` unless ``schedule`` has every member of the ``Schedule`` protocol.

    Checks presence and the consistency of ``is_discrete`` with ``time_dtype``; host only.
    """
    missing = [m for m in _MEMBERS if not callable(getattr(schedule, m, None))]
    missing += [
        m for m in ("is_discrete", "num_train_timesteps", "time_dtype", "t_range") if not hasattr(schedule, m)
    ]
    if missing:
        raise TypeError(
            f"{fn}: {name} must satisfy addkit.typing.Schedule (alpha, sigma, coefficients, add_noise, "
            f"timesteps, is_discrete, num_train_timesteps, time_dtype, t_range), got "
            f"{type(schedule).__name__} without {', '.join(missing)}"
        )
    dtype = schedule.time_dtype
    if not isinstance(dtype, torch.dtype) or dtype.is_floating_point == bool(schedule.is_discrete):
        kind = "an integer" if schedule.is_discrete else "a floating"
        raise TypeError(
            f"{fn}: {name}.time_dtype must be {kind} torch.dtype for is_discrete={schedule.is_discrete}, "
            f"got {dtype!r}"
        )
    return schedule


def _bounds(schedule: Any) -> tuple[float, float]:
    low, high = schedule.t_range
    return low, high


def check_time_values(
    fn: str, schedule: Any, values: Any, *, name: str = "timesteps", sequence: bool = False
) -> tuple[int | float, ...]:
    """Host timesteps as a tuple of Python numbers: right kind, inside ``t_range``.

    Args:
        fn: caller name for messages.
        schedule: the schedule the timesteps belong to.
        values: a number, a sequence of numbers, or a tensor (read to the host here: call
            it once per configuration, not in a loop).
        name: the argument's name for messages.
        sequence: refuse a lone number (``timesteps=4`` reads as a count of steps but would
            be the single timestep 4).

    Returns:
        ``int`` values for a discrete schedule, ``float`` otherwise.

    Raises:
        TypeError: for floats on a discrete schedule, booleans or non-numbers, or a lone
            number where ``sequence`` is set.
        ValueError: for values outside ``t_range``.
    """
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, (numbers.Number, bool)):
        if sequence:
            raise TypeError(
                f"{fn}: {name} must be a sequence of timesteps, got the number {values!r}; for "
                f"{values!r} steps pass schedule.timesteps({values!r}), for the single timestep "
                f"pass [{values!r}]"
            )
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{fn}: {name} must be a sequence of timesteps, got {type(values).__name__}")
    low, high = _bounds(schedule)
    if schedule.is_discrete:
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
            raise TypeError(
                f"{fn}: {name} must be integers for a discrete schedule (timesteps {low}..{high}; "
                f"a float would be truncated), got {tuple(values)}"
            )
        out: tuple[int | float, ...] = tuple(int(v) for v in values)
    else:
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
            raise TypeError(f"{fn}: {name} must be numbers in [{low}, {high}], got {tuple(values)}")
        out = tuple(float(v) for v in values)
    if not all(low <= v <= high for v in out):
        raise ValueError(f"{fn}: {name} must lie in [{low}, {high}], got {out}")
    return out


def check_time(fn: str, schedule: Any, t: Any, *, name: str = "t") -> Tensor:
    """``t`` as a tensor, checked: a Python number on the host, a tensor from its dtype.

    A tensor keeps its dtype and device (schedule maths may use float64 times); its value
    range is checked on the device without a host read (see
    [`assert_in_range`][addkit._checks.assert_in_range]).

    Raises:
        TypeError: for the wrong kind of number or dtype.
        ValueError: for a Python number outside ``t_range`` (or a tensor, under value checks).
        RuntimeError: for a tensor with a value outside ``t_range`` (a negative one included)
            on the CPU, outside value checks; on CUDA a device-side assert.
    """
    if isinstance(t, Tensor):
        if schedule.is_discrete and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise TypeError(
                f"{fn}: {name} must be an integer tensor for a discrete schedule (timesteps "
                f"{_bounds(schedule)[0]}..{_bounds(schedule)[1]}), got dtype {t.dtype}"
            )
        if not schedule.is_discrete and not t.is_floating_point():
            low, high = _bounds(schedule)
            raise TypeError(
                f"{fn}: {name} must be a floating tensor in [{low}, {high}] for a continuous "
                f"schedule, got dtype {t.dtype}"
            )
        low, high = _bounds(schedule)
        return assert_in_range(fn, name, t, low, high)
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        kind = "an integer" if schedule.is_discrete else "a number"
        raise TypeError(f"{fn}: {name} must be {kind} or a tensor of timesteps, got {type(t).__name__}")
    (value,) = check_time_values(fn, schedule, [t], name=name)
    return torch.tensor(value, dtype=schedule.time_dtype if schedule.is_discrete else torch.float64)


def batch_time(fn: str, schedule: Any, t: Any, like: Tensor, *, name: str = "t") -> Tensor:
    """``t`` as the ``[B]`` tensor a model receives: ``schedule.time_dtype`` on ``like``'s device.

    Args:
        fn: caller name for messages.
        schedule: the schedule.
        t: a Python number (applied to the whole batch), a 0-dim tensor or a ``[B]`` tensor.
        like: the batch ``[B, ...]`` the timesteps belong to.
        name: the argument's name for messages.

    Raises:
        TypeError, ValueError: as `check_time`, or for a tensor
            that is neither a scalar nor ``[B]``.
    """
    t = check_time(fn, schedule, t, name=name)
    batch = like.shape[0]
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{fn}: {name} must be a scalar or have shape ({batch},) (one timestep per sample of a batch "
            f"of shape {tuple(like.shape)}), got {tuple(t.shape)}"
        )
    return t.to(device=like.device, dtype=schedule.time_dtype)


def host_time_tensor(schedule: Any, values: Sequence[int | float]) -> Tensor:
    """Checked host values as a CPU tensor for schedule maths: ``long`` or float64."""
    return torch.tensor(list(values), dtype=torch.long if schedule.is_discrete else torch.float64)
