"""Input checks that raise clear errors.

Every check names the calling function, the argument, what was expected and what was
received, so that a user can fix the call without reading addkit's source. Nothing here
falls back silently and nothing uses ``assert``.

Checks read metadata (shape, dtype, device) and Python values only, except those that run
under `checking_values`: they read tensor values (a device
synchronisation) and run only when [`addkit.value_checks`][addkit.checks.value_checks] is on.
The one exception on the default path is `assert_in_range`, a device-side assertion
(``torch._assert_async``) that reads nothing back to the host.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from addkit.checks import value_checks_enabled

__all__ = [
    "assert_in_range",
    "check_batch",
    "check_batch_vector",
    "check_broadcasts_to",
    "check_callable",
    "check_choice",
    "check_finite",
    "check_finite_inputs",
    "check_floating",
    "check_guidance_scale",
    "check_ndim",
    "check_number",
    "check_positive",
    "check_positive_int",
    "check_same_device",
    "check_same_shape",
    "check_tensor",
    "check_value_range",
    "checking_values",
]


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def check_tensor(fn: str, name: str, x: Any) -> Tensor:
    """Raise ``TypeError`` unless ``x`` is a tensor; return it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(fn: str, name: str, x: Any) -> Tensor:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor."""
    check_tensor(fn, name, x)
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_batch(fn: str, name: str, x: Tensor) -> Tensor:
    """Raise ``ValueError`` unless ``x`` has a batch dimension holding at least one sample."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(
            f"{fn}: {name} must have a non-empty batch dimension [B, ...] with B >= 1, got shape {_shape(x)}"
        )
    return x


def check_ndim(
    fn: str, name: str, x: Tensor, ndim: int | Sequence[int], *, layout: str | None = None
) -> Tensor:
    """Raise ``ValueError`` unless ``x.ndim`` is ``ndim`` (or one of several)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
        want = " or ".join(str(n) for n in allowed)
        hint = f" ({layout})" if layout else ""
        raise ValueError(
            f"{fn}: {name} must have {want} dimensions{hint}, got shape {_shape(x)}"
        )
    return x


def check_same_shape(fn: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same shape (no broadcasting) and device."""
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: {name_a} and {name_b} must have the same shape, "
            f"got {_shape(a)} and {_shape(b)}"
        )
    check_same_device(fn, name_a, a, name_b, b)


def check_same_device(fn: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` are on the same device."""
    if a.device != b.device:
        raise ValueError(
            f"{fn}: {name_a} and {name_b} must be on the same device, got {a.device} and {b.device}"
        )


def checking_values() -> bool:
    """Whether checks that read tensor values run now.

    True only when [`addkit.value_checks`][addkit.checks.value_checks] is on, and never while
    a CUDA graph is being captured or ``torch.compile`` traces (a host read is not allowed there).
    """
    return value_checks_enabled() and not _in_capture_or_trace()


def check_finite(fn: str, name: str, x: Tensor) -> Tensor:
    """Raise ``ValueError`` if ``x`` holds NaN or infinity (only while value checks are on).

    Reads the tensor's values (a device synchronisation), so it runs only when
    `checking_values` is true; otherwise non-finite values
    flow on into the loss, where a trainer can skip the step.
    """
    if not checking_values():
        return x
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{fn}: {name} must be finite, got {n_nan} NaN and {n_inf} infinite values "
            f"in a tensor of shape {_shape(x)}"
        )
    return x


def check_finite_inputs(fn: str, **inputs: Any) -> None:
    """`check_finite` on every floating tensor among ``inputs`` (``None`` and non-tensors skipped).

    Free when value checks are off (one context-variable read); lists and tuples of tensors
    are checked item by item as ``name[i]``.
    """
    if not checking_values():
        return
    for name, x in inputs.items():
        items = list(enumerate(x)) if isinstance(x, (list, tuple)) else [(None, x)]
        for i, item in items:
            if isinstance(item, Tensor) and (item.is_floating_point() or item.is_complex()):
                check_finite(fn, name if i is None else f"{name}[{i}]", item)


def assert_in_range(fn: str, name: str, x: Tensor, low: float, high: float) -> Tensor:
    """Fail unless every value of ``x`` lies in ``[low, high]``, without a host read.

    Under value checks this is [`check_value_range`][addkit._checks.check_value_range]
    (a ``ValueError``). Otherwise it is a device-side assertion (``torch._assert_async``): on
    the CPU it raises ``RuntimeError`` with the message at once; on a CUDA device the kernel
    fails asynchronously ("device-side assert triggered", reported at a later call, and the
    CUDA context is lost, as it would be for the out-of-range index it prevents). Skipped
    while a CUDA graph is captured or ``torch.compile`` traces, and on devices without the
    operator (MPS) or data (meta).
    """
    if checking_values():
        return check_value_range(fn, name, x, low, high)
    if x.numel() == 0 or x.device.type not in ("cpu", "cuda") or _in_capture_or_trace():
        return x
    torch._assert_async(
        (x.clamp(low, high) == x).all(),  # NaN fails too; three small kernels, no synchronisation
        f"{fn}: {name} must lie in [{low:g}, {high:g}]; a value outside it (negative, too large or NaN) "
        f"was found on the device: run under addkit.value_checks() to see the values",
    )
    return x


def check_choice(fn: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``; list the valid ones."""
    options = tuple(choices)
    if value not in options:
        valid = ", ".join(repr(c) for c in options)
        raise ValueError(f"{fn}: {name} must be one of {valid}; got {value!r}")
    return value


def check_number(
    fn: str, name: str, value: Any, *, low: float | None = None, high: float | None = None
) -> float:
    """A real Python number (not a bool, string or ``None``), finite and in ``[low, high]``.

    Raises:
        TypeError: for anything that is not a real number (a 0-dim tensor is refused: pass
            ``float(t)`` once, outside the hot path).
        ValueError: for NaN, infinity or a value outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        lo, hi = ("-inf" if low is None else f"{low:g}"), ("inf" if high is None else f"{high:g}")
        bounds = "" if low is None and high is None else f" in [{lo}, {hi}]"
        raise ValueError(f"{fn}: {name} must be a finite number{bounds}, got {value!r}")
    return v


def check_guidance_scale(fn: str, name: str, scale: Any) -> Any:
    """A scale given as a finite Python number or a floating tensor (its values under value checks)."""
    if isinstance(scale, Tensor):
        check_floating(fn, name, scale)
        check_finite_inputs(fn, **{name: scale})
        return scale
    return check_number(fn, name, scale)


def check_callable(fn: str, name: str, obj: Any, *, hint: str = "") -> Any:
    """Raise ``TypeError`` unless ``obj`` is callable and not a class (an instance is wanted)."""
    if isinstance(obj, type):
        raise TypeError(
            f"{fn}: {name} must be an instance, got the class {obj.__name__}: pass {obj.__name__}(...){hint}"
        )
    if not callable(obj):
        raise TypeError(f"{fn}: {name} must be callable, got {type(obj).__name__}{hint}")
    return obj


def check_positive(fn: str, name: str, value: float, *, allow_zero: bool = False) -> float:
    """Raise ``ValueError`` unless ``value`` is a positive (or non-negative) finite number.

    Raises ``TypeError`` for a value that is not a real number (a string, ``None``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        want = "non-negative" if allow_zero else "positive"
        raise TypeError(f"{fn}: {name} must be a finite {want} number, got {type(value).__name__} {value!r}")
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and value == value and value != float("inf")):
        want = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{fn}: {name} must be a finite {want} number, got {value!r}")
    return value


def check_positive_int(fn: str, name: str, value: Any) -> int:
    """Raise ``TypeError`` unless ``value`` is an integer (not a ``bool``), ``ValueError`` if it is < 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_batch_vector(fn: str, name: str, x: Tensor, batch: int) -> Tensor:
    """Raise ``ValueError`` unless ``x`` has shape ``[batch]``."""
    if x.ndim != 1 or x.shape[0] != batch:
        raise ValueError(
            f"{fn}: {name} must have shape ({batch},) (one value per sample), "
            f"got {_shape(x)}"
        )
    return x


def check_broadcasts_to(fn: str, name: str, x: Any, like: Tensor, *, like_name: str = "x_t") -> Tensor:
    """Raise unless ``x`` is a floating tensor that broadcasts to ``like`` without growing it.

    ``x`` must be 0-dim or have ``like``'s rank (a ``[B]`` vector against ``[B, C]`` would
    broadcast over the channels, not the batch) and sit on ``like``'s device.
    """
    check_floating(fn, name, x)
    if x.ndim not in (0, like.ndim) or torch.broadcast_shapes(x.shape, like.shape) != like.shape:
        raise ValueError(
            f"{fn}: {name} must be a scalar or broadcast to {_shape(like)} with the same rank "
            f"([B, 1, ..., 1]), got shape {_shape(x)}"
        )
    if x.ndim:
        check_same_device(fn, name, x, like_name, like)
    return x


def check_value_range(fn: str, name: str, x: Tensor, low: float, high: float) -> Tensor:
    """Raise ``ValueError`` unless every value of ``x`` lies in ``[low, high]`` (only while value checks are on)."""
    if not checking_values() or x.numel() == 0:
        return x
    lo, hi = x.min().item(), x.max().item()
    if not (low <= lo and hi <= high):
        raise ValueError(f"{fn}: {name} must lie in [{low:g}, {high:g}], got range [{lo:g}, {hi:g}]")
    return x


def _in_capture_or_trace() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
