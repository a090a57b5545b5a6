"""Few-step sampling of a distilled student: predict $\\hat x_0$, re-noise, repeat.

A student distilled with ADD runs 1–4 steps. Each step asks the denoiser for $\\hat x_0$ at
the current student timestep; between steps $\\hat x_0$ is re-noised to the next timestep,
either with fresh noise (ADD) or along the DDPM posterior (diffusers'
``EulerAncestralDiscreteScheduler``, what SDXL-Turbo ships with). The last $\\hat x_0$ is the
sample. See [`renoise_coefficients`][addkit.sampling.renoise.renoise_coefficients] for the
formula; the guide page "Sampling" explains the conventions.

The denoiser is anything with ``x0(x_t, t, **cond) -> Tensor`` (a
[`WrappedDenoiser`][addkit.denoisers.WrappedDenoiser] from
[`wrap`][addkit.denoisers.wrap]); it receives ``t`` as a ``[B]`` tensor on the sample's
device (int64 for a discrete schedule, float32 for a flow schedule).

Examples:
    >>> import torch
    >>> from addkit.schedules import VPSchedule
    >>> class Oracle:                       # always predicts the same clean sample
    ...     def x0(self, x_t, t):
    ...         return torch.ones_like(x_t)
    >>> x = sample(Oracle(), torch.randn(2, 4, 8, 8), schedule=VPSchedule.scaled_linear())
    >>> bool((x == 1).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from addkit._checks import (
    check_batch,
    check_callable,
    check_choice,
    check_finite_inputs,
    check_floating,
    check_same_shape,
)
from addkit._random import randn
from addkit.sampling._plan import Plan, check_denoiser, check_schedule, check_timesteps, make_plan
from addkit.sampling.renoise import RENOISE, Renoise, apply_renoise, renoise_coefficients
from addkit.typing import Schedule

__all__ = ["DEFAULT_TIMESTEPS", "FewStepSampler", "sample"]

DEFAULT_TIMESTEPS: tuple[int, ...] = (999, 749, 499, 249)
"""ADD's student timesteps on a 1000-step VP schedule: diffusers' ``"trailing"`` spacing of 4
steps (ADD §3.1 states only the largest, 999; the others are our reading, see the guide).
The samplers' default is ``schedule.timesteps(4, "trailing")``, which is this for a VP
schedule and ``(1.0, 0.75, 0.5, 0.25)`` for rectified flow."""

Callback = Callable[[int, Any, Tensor, Tensor], None]
Noises = Tensor | Sequence[Tensor]


def _check_noise(fn: str, noise: Any) -> Tensor:
    """Raise unless ``noise`` is a floating tensor with a batch dimension."""
    check_floating(fn, "noise", noise)
    check_batch(fn, "noise", noise)
    check_finite_inputs(fn, noise=noise)
    return noise


def _check_noises(fn: str, noises: Noises | None, noise: Tensor, count: int) -> Noises | None:
    """Check explicit re-noising noise: ``count`` tensors shaped like ``noise``."""
    if noises is None:
        return None
    if isinstance(noises, Tensor):
        if tuple(noises.shape) != (count, *noise.shape):
            raise ValueError(
                f"{fn}: noises must have shape ({count}, {', '.join(map(str, noise.shape))}) "
                f"(one per re-noising step), got {tuple(noises.shape)}"
            )
        items: Sequence[Tensor] = list(noises.unbind(0))
    elif isinstance(noises, Sequence):
        items = noises
        if len(items) != count:
            raise ValueError(
                f"{fn}: noises must hold {count} tensors (one per re-noising step), got {len(items)}"
            )
    else:
        raise TypeError(
            f"{fn}: noises must be a tensor or a sequence of tensors, got {type(noises).__name__}"
        )
    for i, z in enumerate(items):
        check_floating(fn, f"noises[{i}]", z)
        check_same_shape(fn, "noise", noise, f"noises[{i}]", z)
    check_finite_inputs(fn, noises=list(items))
    return noises


def _fill_noise(buffer: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fill ``buffer`` in place with standard normal noise drawn on the generator's device."""
    draw = randn(tuple(buffer.shape), device=buffer.device, dtype=buffer.dtype, generator=generator)
    return buffer.copy_(draw)


def _draw_noises(count: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``count`` standard normal tensors shaped like ``like``, stacked: ``[count, *like.shape]``.

    Drawn on the generator's device and moved to ``like``'s (a CPU generator with CUDA samples
    works, and gives the same numbers as on a CPU).
    """
    shape = (count, *like.shape)
    if not count:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return randn(shape, device=like.device, dtype=like.dtype, generator=generator)


def _run_loop(
    denoiser: Any,
    noise: Tensor,
    noises: Noises,
    plan: Plan,
    cond: dict[str, Any],
    callback: Callback | None = None,
) -> Tensor:
    """The sampling loop; no checks and no host synchronisation (capturable)."""
    x_t, x0 = noise, noise
    batch, steps = noise.shape[0], len(plan.timesteps)
    for i in range(steps):
        x0 = denoiser.x0(x_t, plan.t[i].expand(batch), **cond)
        if callback is not None:
            callback(i, plan.timesteps[i], x_t, x0)
        if i + 1 < steps:
            x_t = apply_renoise(x_t, x0, noises[i], plan.k[i])
    return x0


def sample(
    denoiser: Any,
    noise: Tensor,
    *,
    schedule: Schedule,
    timesteps: Sequence[int | float] | Tensor | None = None,
    renoise: Renoise = "fresh",
    generator: torch.Generator | None = None,
    noises: Noises | None = None,
    callback: Callback | None = None,
    **cond: Any,
) -> Tensor:
    """Sample with a few-step student: $\\hat x_0$ at each timestep, re-noised in between.

    $$ x_{t_0} = \\text{noise}, \\qquad \\hat x_0^{(i)} = D(x_{t_i}, t_i),
       \\qquad x_{t_{i+1}} = \\alpha_{i+1}\\hat x_0^{(i)} + \\sigma_{i+1}\\,\\tilde\\epsilon_i, $$

    where $\\tilde\\epsilon_i$ is fresh noise (``"fresh"``) or the posterior mix of
    [`renoise_coefficients`][addkit.sampling.renoise.renoise_coefficients] (``"ancestral"``).
    The first input is ``noise`` itself: the student sees pure noise at $t_0$ (ADD trains it
    that way; the sgm Turbo demo samples so). diffusers' Euler-ancestral pipelines instead feed
    $\\sigma_{t_0}\\,\\epsilon$ (their ``init_noise_sigma`` with trailing spacing is
    $\\sigma^{\\mathrm{VE}}_{\\max}$): pass ``noise = schedule.sigma(t_0) * latents`` to reproduce a
    pipeline called with ``latents=latents``.

    Gradients flow through the loop unless you call it under ``torch.no_grad()``. The call
    reads no tensor value back to the host (checks use metadata and the Python timesteps), so
    it never synchronises with the device.

    Args:
        denoiser: anything with ``x0(x_t, t, **cond)``, e.g. ``addkit.wrap(unet, schedule,
            "eps")``; ``t`` arrives as a ``[B]`` tensor on ``noise``'s device.
        noise: the first input $x_{t_0}$, ``[B, ...]``; its dtype is the loop's dtype (the
            re-noising arithmetic runs in at least float32).
        schedule: the student's schedule (any [`Schedule`][addkit.typing.Schedule]).
        timesteps: student timesteps, strictly decreasing (integers for a VP schedule,
            ``(0, 1]`` for a flow schedule); a sequence, not a count (``timesteps=4`` is refused:
            pass ``schedule.timesteps(4)``). ``None``: ``schedule.timesteps(4, "trailing")``,
            ADD's ``(999, 749, 499, 249)`` for VP, ``(1.0, 0.75, 0.5, 0.25)`` for flow; pass
            ``schedule.timesteps(n)`` for ``n`` steps.
        renoise: ``"fresh"`` (ADD) or ``"ancestral"`` (diffusers' Euler ancestral).
        generator: draws the re-noising noise (all steps in one draw of shape
            ``[n - 1, *noise.shape]``, made on the generator's device and moved to
            ``noise``'s); ignored when ``noises`` is given.
        noises: explicit re-noising noise, a ``[n - 1, *noise.shape]`` tensor or ``n - 1``
            tensors shaped like ``noise`` (for reproducibility and parity tests).
        callback: called as ``callback(i, t_i, x_t, x0)`` after each denoiser call.
        **cond: conditioning passed to ``denoiser.x0`` unchanged.

    Returns:
        The last $\\hat x_0$, shape and dtype of ``noise``.

    Raises:
        TypeError: if ``denoiser`` has no ``x0``, inputs have the wrong type, or ``timesteps``
            is a lone number.
        ValueError: for bad timesteps, an unknown ``renoise``, or ``noises`` of the wrong shape.
    """
    fn = "sample"
    check_denoiser(fn, denoiser)
    check_schedule(fn, schedule)
    _check_noise(fn, noise)
    check_choice(fn, "renoise", renoise, RENOISE)
    if callback is not None:
        check_callable(fn, "callback", callback)
    values = check_timesteps(fn, schedule, timesteps)
    noises = _check_noises(fn, noises, noise, len(values) - 1)
    if noises is None:
        noises = _draw_noises(len(values) - 1, noise, generator)
    k = renoise_coefficients(schedule, values, renoise=renoise)
    plan = make_plan(schedule, values, k, device=noise.device, dtype=noise.dtype)
    return _run_loop(denoiser, noise, noises, plan, cond, callback)


def _check_config(
    fn: str, denoiser: Any, schedule: Any, timesteps: Any, renoise: Any, decode: Any
) -> tuple[Any, Any, tuple[int | float, ...], Renoise, Callable[[Tensor], Tensor] | None]:
    """The checked configuration shared by the sampler classes."""
    if decode is not None and not callable(decode):
        raise TypeError(f"{fn}: decode must be callable or None, got {type(decode).__name__}")
    check_choice(fn, "renoise", renoise, RENOISE)
    return (
        check_denoiser(fn, denoiser),
        check_schedule(fn, schedule),
        check_timesteps(fn, schedule, timesteps),
        renoise,
        decode,
    )


class FewStepSampler(nn.Module):
    """A module holding a sampling configuration; ``forward`` is one [`sample`][addkit.sampling.sampler.sample] call.

    Args:
        denoiser: anything with ``x0(x_t, t, **cond)``; registered as a submodule when it
            is an ``nn.Module``.
        schedule: the student's schedule.
        timesteps: student timesteps, noisiest first; ``None`` for
            ``schedule.timesteps(4, "trailing")``.
        renoise: ``"fresh"`` (ADD) or ``"ancestral"`` (diffusers' Euler ancestral).
        decode: optional ``decode(x0) -> images`` applied to the result (e.g. a VAE decode).

    Raises:
        TypeError, ValueError: as [`sample`][addkit.sampling.sampler.sample], at construction.

    Examples:
        >>> from addkit.schedules import FlowSchedule
        >>> class Zero:
        ...     def x0(self, x_t, t):
        ...         return torch.zeros_like(x_t)
        >>> sampler = FewStepSampler(Zero(), schedule=FlowSchedule(), timesteps=(1.0, 0.5))
        >>> sampler(torch.randn(3, 2)).abs().max().item()
        0.0
    """

    def __init__(
        self,
        denoiser: Any,
        *,
        schedule: Schedule,
        timesteps: Sequence[int | float] | Tensor | None = None,
        renoise: Renoise = "fresh",
        decode: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        config = _check_config("FewStepSampler", denoiser, schedule, timesteps, renoise, decode)
        self.denoiser, self.schedule, self.timesteps, self.renoise, self.decode = config

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, renoise={self.renoise!r}"

    def forward(
        self,
        noise: Tensor,
        *,
        generator: torch.Generator | None = None,
        noises: Noises | None = None,
        callback: Callback | None = None,
        **cond: Any,
    ) -> Tensor:
        """Sample from ``noise`` (``[B, ...]``); arguments as [`sample`][addkit.sampling.sampler.sample]."""
        x0 = sample(
            self.denoiser,
            noise,
            schedule=self.schedule,
            timesteps=self.timesteps,
            renoise=self.renoise,
            generator=generator,
            noises=noises,
            callback=callback,
            **cond,
        )
        return x0 if self.decode is None else self.decode(x0)
