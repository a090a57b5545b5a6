"""The value-checks switch: checks that read tensor values run only when you ask for them.

addkit validates every call at its public boundary from metadata (shapes, dtypes, devices,
options) and from Python-side values (timesteps given as numbers). Those checks are free.
Checks that need the *values* of tensors (are the logits finite? is $\\alpha_t = 0$ where an
eps prediction is converted?) read the device back to the host: on a GPU each such read is a
synchronisation that stalls the training step or the sampler. They are therefore **off by
default**, and a non-finite value flows into the loss (the loss is non-finite) so that your
trainer can skip the step. With them on, every public function and class that takes tensors
checks each floating input, weight and scale and raises a ``ValueError`` naming it.

One value check runs always: the timesteps of a tensor must lie in the schedule's range, or a
table lookup would read the wrong entry. It is a device-side assertion (``torch._assert_async``)
that reads nothing back: on the CPU it raises ``RuntimeError`` naming ``t`` at once, on CUDA
the kernel fails asynchronously (a "device-side assert", after which the CUDA context is lost,
as it would be for the out-of-range index); under value checks it is a ``ValueError`` showing
the range found.

Turn them on while you debug, for a block of code or for the whole process:

```python
with addkit.value_checks():          # raise clear errors on bad tensor values here
    loss, logs = objective.generator_loss(...)
```

or set the environment variable ``ADDKIT_VALUE_CHECKS=1`` before Python starts. Checks
never run while a CUDA graph is being captured or ``torch.compile`` traces.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["ENV_VAR", "value_checks", "value_checks_enabled"]

ENV_VAR = "ADDKIT_VALUE_CHECKS"
"""Environment variable that turns value checks on for the whole process (``1``, ``true``, ``yes``)."""

_ENABLED: ContextVar[bool | None] = ContextVar("addkit_value_checks", default=None)


def _env_default() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def value_checks_enabled() -> bool:
    """Whether checks that read tensor values are on in the current context.

    Returns:
        The innermost [`value_checks`][addkit.checks.value_checks] setting, else whether
        ``ADDKIT_VALUE_CHECKS`` is set to a true value.

    Examples:
        >>> with value_checks():
        ...     value_checks_enabled()
        True
    """
    enabled = _ENABLED.get()
    return _env_default() if enabled is None else enabled


@contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Turn checks that read tensor values on (or off) inside a ``with`` block.

    Each check then synchronises with the device once; use it to find where a NaN or an
    out-of-range timestep enters, not in production steps. Nested blocks restore the
    outer setting on exit; the setting is per thread and per asyncio task.

    Args:
        enabled: ``True`` to check values, ``False`` to switch checks off inside a block
            (e.g. under ``ADDKIT_VALUE_CHECKS=1``).

    Raises:
        TypeError: if ``enabled`` is not a bool.

    Examples:
        >>> import torch
        >>> from addkit.losses import hinge_g_loss
        >>> hinge_g_loss(torch.tensor([[float("nan")]]))   # flows into the loss
        tensor(nan)
        >>> with value_checks():
        ...     hinge_g_loss(torch.tensor([[float("nan")]]))
        Traceback (most recent call last):
        ...
        ValueError: hinge_g_loss: fake_logits must be finite, got 1 NaN and 0 infinite values in a tensor of shape (1, 1)
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"value_checks: enabled must be a bool, got {type(enabled).__name__}")
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)
