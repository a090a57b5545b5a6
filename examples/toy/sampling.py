"""Sampling: DDIM for the teacher, ADD's few-step loop for the student.

Both start from pure noise at $t = 999$ (trailing spacing) and ask the denoiser only for
$\\hat x_0$ (addkit's one currency). DDIM re-noises deterministically with the predicted
noise; the student re-noises with fresh noise (ADD §3) through addkit's sampler.
"""

from __future__ import annotations

import torch
from torch import Tensor

from addkit import WrappedDenoiser
from addkit.sampling import sample

from .data import NULL_LABEL, SIZE


def _noise(n: int, generator: torch.Generator) -> Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=generator)


def _x0(denoiser: WrappedDenoiser, x: Tensor, t: int, labels: Tensor, guidance_scale: float) -> Tensor:
    if guidance_scale == 1.0:
        return denoiser.x0(x, t, class_labels=labels)
    uncond = {"class_labels": torch.full_like(labels, NULL_LABEL)}
    return denoiser.x0(x, t, class_labels=labels, guidance_scale=guidance_scale, uncond=uncond)


@torch.no_grad()
def ddim_sample(
    denoiser: WrappedDenoiser,
    labels: Tensor,
    steps: int,
    generator: torch.Generator,
    *,
    guidance_scale: float = 1.0,
) -> Tensor:
    """DDIM ($\\eta = 0$) on ``steps`` trailing timesteps; one step is $\\hat x_0(\\epsilon, 999)$.

    $$ x_{t'} = \\alpha_{t'}\\,\\hat x_0 + \\sigma_{t'}\\,\\hat\\epsilon, \\qquad
       \\hat\\epsilon = (x_t - \\alpha_t \\hat x_0) / \\sigma_t $$

    Returns:
        Samples ``[B, 3, 8, 8]`` clamped to ``[-1, 1]``.
    """
    schedule = denoiser.schedule
    ts = schedule.timesteps(steps, "trailing")
    x = _noise(labels.shape[0], generator)
    for i, t in enumerate(ts):
        x0 = _x0(denoiser, x, t, labels, guidance_scale)
        if i + 1 == len(ts):
            return x0.clamp(-1, 1)
        a, s = schedule.coefficients(t, x)
        a_next, s_next = schedule.coefficients(ts[i + 1], x)
        eps = (x - a * x0) / s
        x = a_next * x0 + s_next * eps
    raise AssertionError("unreachable")


@torch.no_grad()
def student_sample(
    denoiser: WrappedDenoiser,
    labels: Tensor,
    timesteps: tuple[int, ...],
    generator: torch.Generator,
) -> Tensor:
    """ADD sampling with [`addkit.sampling.sample`][addkit.sampling.sampler.sample]: $\\hat x_0$
    at each student timestep, fresh noise in between (drawn here, one batch per step).

    Returns:
        Samples ``[B, 3, 8, 8]`` clamped to ``[-1, 1]``.
    """
    noise = _noise(labels.shape[0], generator)
    noises = [_noise(labels.shape[0], generator) for _ in timesteps[1:]]
    x0 = sample(
        denoiser, noise, schedule=denoiser.schedule, timesteps=timesteps, renoise="fresh",
        noises=noises or None, class_labels=labels,
    )  # fmt: skip
    return x0.clamp(-1, 1)
