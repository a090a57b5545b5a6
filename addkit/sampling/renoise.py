"""Re-noising between student steps: fresh noise (ADD), the ancestral posterior, or none.

Every rule puts $\\hat x_0$ back at the next timestep's noise level,
$x_{t_{i+1}} = \\alpha_{i+1}\\hat x_0 + \\sigma_{i+1}\\tilde\\epsilon_i$; they differ in how
much of the noise the denoiser implicitly estimated, $\\hat\\epsilon$, is kept in
$\\tilde\\epsilon_i$: none (``"fresh"``), part (``"ancestral"``) or all (``"deterministic"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from addkit._checks import check_choice, check_finite_inputs, check_floating, check_same_shape
from addkit._time import host_time_tensor
from addkit.sampling._plan import check_schedule, check_timesteps

__all__ = ["Renoise", "renoise_coefficients", "renoise_step"]

Renoise = Literal["fresh", "ancestral", "deterministic"]
"""How the sampler re-noises $\\hat x_0$ between steps: ``"fresh"`` (ADD), ``"ancestral"``
(DDPM posterior; diffusers' ``EulerAncestralDiscreteScheduler``) or ``"deterministic"`` (all of
$\\hat\\epsilon$ kept: DDIM with $\\eta = 0$; for rectified flow diffusers'
``FlowMatchEulerDiscreteScheduler``, the sampler of ``StableDiffusion3Pipeline`` and
``FluxPipeline``)."""

RENOISE: tuple[str, ...] = ("fresh", "ancestral", "deterministic")


def renoise_coefficients(
    schedule: Any, timesteps: Sequence[int | float], *, renoise: Renoise = "fresh"
) -> Tensor:
    """Coefficients of the re-noising steps between consecutive student timesteps.

    After the denoiser returns $\\hat x_0$ at $t_i$, the next input is

    $$ x_{t_{i+1}} = \\alpha_{i+1}\\hat x_0
       + \\sigma_{i+1}\\big(\\rho_i\\,\\hat\\epsilon + \\sqrt{1 - \\rho_i^2}\\;z_i\\big),
       \\qquad \\hat\\epsilon = \\frac{x_{t_i} - \\alpha_i \\hat x_0}{\\sigma_i},
       \\quad z_i \\sim \\mathcal N(0, I), $$

    with $\\rho_i = 0$ for ``"fresh"`` (ADD's rule: new noise) and
    $\\rho_i = \\sqrt{\\mathrm{SNR}(t_i)/\\mathrm{SNR}(t_{i+1})}
    = \\frac{\\alpha_i\\sigma_{i+1}}{\\sigma_i\\alpha_{i+1}}$ for ``"ancestral"``: the DDPM
    posterior $q(x_{t_{i+1}} \\mid x_{t_i}, \\hat x_0)$ (DDIM with $\\eta = 1$), which for a VP
    schedule is exactly diffusers' ``EulerAncestralDiscreteScheduler`` step written in VP
    coordinates ($\\sigma^{\\mathrm{VE}} = \\sigma/\\alpha$, $\\rho_i = \\sigma^{\\mathrm{VE}}_{i+1} /
    \\sigma^{\\mathrm{VE}}_{i}$, $\\sigma_{\\mathrm{up}} = \\sigma^{\\mathrm{VE}}_{i+1}\\sqrt{1-\\rho_i^2}$).
    The same rule holds for any Gaussian schedule, rectified flow included. ``"deterministic"``
    is the same formula at $\\rho_i = 1$, all of $\\hat\\epsilon$ kept and no noise drawn:
    DDIM with $\\eta = 0$ for a VP schedule, and for rectified flow
    $x_{t_{i+1}} = (1 - \\sigma_{i+1})\\hat x_0 + \\sigma_{i+1}\\hat\\epsilon$, which is
    diffusers' ``FlowMatchEulerDiscreteScheduler`` step
    $x_{t_{i+1}} = x_{t_i} + (\\sigma_{i+1} - \\sigma_i)\\,\\hat u$ with
    $\\hat u = \\hat\\epsilon - \\hat x_0$ (the sampler of ``StableDiffusion3Pipeline`` and
    ``FluxPipeline``). Expanded, the step
    is $x_{t_{i+1}} = k_{x_0}\\hat x_0 + k_x x_{t_i} + k_z z_i$ with
    $k_x = \\sigma_{i+1}\\rho_i/\\sigma_i$, $k_{x_0} = \\alpha_{i+1} - k_x\\alpha_i$ and
    $k_z = \\sigma_{i+1}\\sqrt{1-\\rho_i^2}$.

    Args:
        schedule: the schedule of the timesteps (``alpha``, ``sigma``).
        timesteps: the student timesteps, noisiest first.
        renoise: ``"fresh"``, ``"ancestral"`` or ``"deterministic"``.

    Returns:
        float64 ``[n - 1, 3]``: $(k_{x_0}, k_x, k_z)$ per transition (empty for one step).

    Raises:
        ValueError: for an unknown ``renoise``, bad timesteps, or an ancestral or
            deterministic step from a timestep with $\\sigma_i = 0$.

    Examples:
        >>> from addkit.schedules import VPSchedule
        >>> k = renoise_coefficients(VPSchedule.scaled_linear(), (999, 499), renoise="fresh")
        >>> [round(v, 4) for v in k[0].tolist()]  # alpha_499, 0, sigma_499
        [0.5269, 0.0, 0.8499]
        >>> from addkit.schedules import FlowSchedule
        >>> k = renoise_coefficients(FlowSchedule(), (1.0, 0.5), renoise="deterministic")
        >>> k[0].tolist()  # x_0.5 = 0.5 x0 + 0.5 eps_hat with eps_hat = x_1 (sigma_1 = 1, alpha_1 = 0)
        [0.5, 0.5, 0.0]

    References:
        Ho et al. 2020, Eq. 6-7 (posterior); Song et al., DDIM, arXiv 2010.02502, Eq. 12-16;
        Esser et al., SD3, arXiv 2403.03206, §2 (Euler steps of the rectified-flow ODE);
        Sauer et al., ADD, arXiv 2311.17042, §3.1 (re-noising between student steps).
    """
    fn = "renoise_coefficients"
    check_choice(fn, "renoise", renoise, RENOISE)
    check_schedule(fn, schedule)
    values = check_timesteps(fn, schedule, timesteps)
    t = host_time_tensor(schedule, values)
    alpha = torch.as_tensor(schedule.alpha(t), dtype=torch.float64).cpu()
    sigma = torch.as_tensor(schedule.sigma(t), dtype=torch.float64).cpu()
    a, s, a_next, s_next = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
    if renoise == "fresh":
        rho = k_x = torch.zeros_like(a)
    elif renoise == "deterministic":
        if bool((s == 0).any()):
            raise ValueError(
                f"{fn}: renoise='deterministic' needs sigma > 0 at every step but the last, "
                f"got timesteps {values}"
            )
        rho = torch.ones_like(a)
        k_x = s_next / s
    else:
        if bool((s == 0).any()) or bool((a_next == 0).any()):
            raise ValueError(
                f"{fn}: renoise='ancestral' needs sigma > 0 at every step but the last and alpha > 0 "
                f"after the first, got timesteps {values}"
            )
        rho = (a * s_next / (s * a_next)).clamp(0.0, 1.0)  # sqrt(SNR_i / SNR_{i+1})
        k_x = s_next * rho / s
    k_x0 = a_next - k_x * a
    k_z = s_next * (1.0 - rho.square()).clamp_min(0.0).sqrt()
    return torch.stack([k_x0, k_x, k_z], dim=-1)


def renoise_step(x_t: Tensor, x0: Tensor, z: Tensor, k: Tensor) -> Tensor:
    """One re-noising step $k_{x_0}\\hat x_0 + k_x x_t + k_z z$.

    The arithmetic runs in the coefficients' dtype (at least float32, so that bf16 samples
    do not lose $\\alpha_t \\approx 0.07$ at $t = 999$) and is cast back to ``x_t``'s dtype.

    Args:
        x_t: the denoiser's input at $t_i$, ``[B, ...]``.
        x0: its $\\hat x_0$, same shape.
        z: standard normal noise, same shape.
        k: one row of [`renoise_coefficients`][addkit.sampling.renoise.renoise_coefficients],
            ``[3]``, on the samples' device.

    Returns:
        $x_{t_{i+1}}$ with ``x_t``'s shape and dtype.

    Examples:
        >>> k = torch.tensor([0.6, 0.0, 0.8])
        >>> renoise_step(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), k)
        tensor([[1.4000, 1.4000]])
    """
    fn = "renoise_step"
    for name, x in (("x_t", x_t), ("x0", x0), ("z", z)):
        check_floating(fn, name, x)
        check_same_shape(fn, "x_t", x_t, name, x)
    if check_floating(fn, "k", k).shape != (3,):
        raise ValueError(f"{fn}: k must have shape (3,) (renoise_coefficients row), got {tuple(k.shape)}")
    check_finite_inputs(fn, x_t=x_t, x0=x0, z=z, k=k)
    return apply_renoise(x_t, x0, z, k)


def apply_renoise(x_t: Tensor, x0: Tensor, z: Tensor, k: Tensor) -> Tensor:
    """`renoise_step` without checks: the sampling loop's (capturable) form."""
    dtype = k.dtype
    out = k[0] * x0.to(dtype) + k[1] * x_t.to(dtype) + k[2] * z.to(dtype)
    return out.to(x_t.dtype)
