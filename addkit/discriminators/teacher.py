"""A frozen diffusion teacher as the discriminator's feature network (LADD).

Instead of decoding latents and running DINOv2 on pixels, LADD re-noises real and generated
latents to a discriminator noise level $\\hat t$ and reads the frozen teacher's intermediate
blocks. No VAE decode, any resolution and aspect ratio, any latent channel count:

$$ x_{\\hat t} = \\alpha_{\\hat t}\\, x_0 + \\sigma_{\\hat t}\\, \\epsilon, \\qquad
   \\hat t = \\operatorname{sigmoid}(m + s\\,\\xi),\\ \\xi \\sim N(0, 1) $$

(logit-normal, LADD's $m = 1, s = 1$, biased to high noise), or a fixed $\\hat t$.

References:
    Sauer et al., *Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
    Distillation*, arXiv 2403.12015, §3 (teacher features; logit-normal noise levels).
    The paper describes the method in prose only and released no code; the details here
    follow its text and SD3's logit-normal time sampling (Esser et al., arXiv 2403.03206).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from addkit._checks import (
    check_finite_inputs,
    check_floating,
    check_ndim,
    check_callable,
    check_number,
    check_positive,
    check_positive_int,
)
from addkit._dtype import as_module_dtype
from addkit._random import randn
from addkit._time import check_schedule, check_time_values
from addkit.discriminators.features import (
    FrozenFeatures,
    default_select,
    recording,
    resolve_submodules,
    to_tokens,
)

__all__ = ["TeacherFeatures", "sample_logit_normal"]


def sample_logit_normal(
    batch_size: int,
    *,
    mean: float = 1.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw $t = \\operatorname{sigmoid}(m + s\\,\\xi)$, $\\xi \\sim N(0, 1)$, in $(0, 1)$.

    Args:
        batch_size: number of draws ``B``.
        mean: $m$ (LADD: 1, biased to high noise).
        std: $s$ (LADD: 1).
        generator: source of randomness; the global RNG when ``None``.
        device: device of the result (default the generator's, else CPU).

    Returns:
        ``[B]`` float32 values in ``(0, 1)``.

    Examples:
        >>> t = sample_logit_normal(10_000, generator=torch.Generator().manual_seed(0))
        >>> 0.68 < float(t.mean()) < 0.72
        True
    """
    fn = "sample_logit_normal"
    check_positive_int(fn, "batch_size", batch_size)
    check_number(fn, "mean", mean)
    check_positive(fn, "std", std)
    if device is None and generator is not None:
        device = generator.device
    return torch.sigmoid(mean + std * randn((batch_size,), device=device, generator=generator))


class TeacherFeatures(FrozenFeatures):
    """Features of a frozen denoiser's intermediate blocks on re-noised inputs.

    Each call draws a noise level (or uses a fixed or given one), noises the input with
    ``schedule.add_noise``, runs the teacher with hooks on the ``taps`` (registered and
    removed inside the call, even on error) and returns each tap as tokens ``[B, C, N]``:
    4-D feature maps ``[B, C, H, W]`` are flattened, 3-D token outputs ``[B, N, C]``
    transposed. With ``stop_early`` the teacher stops after the last tap fires (a UNet tapped
    at its mid block skips the decoder).

    Timesteps are in the schedule's units: a drawn $\\hat t \\in (0, 1)$ is mapped linearly
    onto the schedule's ``t_range`` (``round(t * (T - 1))`` for a discrete schedule, ``t``
    itself for rectified flow).

    Args:
        teacher: the module whose submodules are tapped; frozen in place.
        schedule: a [`Schedule`][addkit.typing.Schedule] (e.g.
            [`VPSchedule`][addkit.schedules.VPSchedule], [`FlowSchedule`][addkit.schedules.FlowSchedule]).
        taps: dotted submodule names, e.g. ``["down_blocks.1", "mid_block"]``.
        channels: ``C`` of each tap (e.g. the UNet's ``block_out_channels`` at those blocks).
        call: runs the teacher, ``call(x_t, t, **cond)``; default ``teacher(x_t, t, **cond)``,
            which fits diffusers UNets (``encoder_hidden_states=...`` goes in ``cond``).
        t: a fixed noise level for every sample (schedule units), or ``None`` to sample.
        logit_mean: $m$ of the logit-normal (LADD: 1).
        logit_std: $s$ of the logit-normal (LADD: 1).
        select: maps a tapped submodule's raw output to a tensor (default: the tensor, or a
            tuple's first item).
        stop_early: cut the teacher's forward short once every tap has fired.
        freeze: freeze the network (``requires_grad_(False)``, eval mode), as a LADD teacher
            is. ``False`` leaves its parameters as they are: DMD2's GAN head reads the
            features of the *trainable* fake-score network (see
            [`DMDObjective`][addkit.dmd.DMDObjective]); a
            [`ProjectedDiscriminator`][addkit.discriminators.projected.ProjectedDiscriminator]
            then leaves it unfrozen too.

    Raises:
        TypeError: if ``schedule`` has no ``add_noise``.
        ValueError: for a tap the teacher lacks, or channels of the wrong length.

    Examples:
        >>> from addkit.schedules import FlowSchedule
        >>> net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
        >>> feats = TeacherFeatures(net, FlowSchedule(), ["0"], channels=[8],
        ...                         call=lambda x_t, t: net(x_t), t=0.5)
        >>> [tuple(f.shape) for f in feats(torch.randn(2, 4, 6, 6))]
        [(2, 8, 36)]
    """

    def __init__(
        self,
        teacher: nn.Module,
        schedule: Any,
        taps: Sequence[str],
        *,
        channels: Sequence[int],
        call: Callable[..., Any] | None = None,
        t: float | None = None,
        logit_mean: float = 1.0,
        logit_std: float = 1.0,
        select: Callable[[Any], Tensor] = default_select,
        stop_early: bool = True,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        fn = "TeacherFeatures"
        check_schedule(fn, schedule)
        self.taps = list(taps)
        if not self.taps:
            raise ValueError(f"{fn}: taps must name at least one submodule, got {self.taps}")
        resolve_submodules(fn, teacher, self.taps)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
            raise TypeError(f"{fn}: channels must be a sequence of ints (one per tap), got {channels!r}")
        for i, c in enumerate(channels):
            check_positive_int(fn, f"channels[{i}]", c)
        if len(channels) != len(self.taps):
            raise ValueError(
                f"{fn}: channels must give one count per tap ({len(self.taps)}), got {list(channels)}"
            )
        check_positive(fn, "logit_std", logit_std)
        check_number(fn, "logit_mean", logit_mean)
        for name, f in (("call", call), ("select", select)):
            if f is not None:
                check_callable(fn, name, f)
        if t is not None:
            (t,) = check_time_values(fn, schedule, [t], name="t")
        self.teacher = teacher
        self.schedule = schedule
        self._channels = [int(c) for c in channels]
        self.call = call
        self.t = t
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.select = select
        self.stop_early = stop_early
        self.frozen = bool(freeze)
        if self.frozen:
            self.freeze()

    @property
    def channels(self) -> list[int]:
        """Channel count ``C_i`` of each tap."""
        return list(self._channels)

    def sample_t(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Noise levels ``[B]`` in schedule units: the fixed ``t`` or logit-normal draws.

        Use it to draw $\\hat t$ yourself when the heads are also conditioned on it, then
        pass ``t=`` to the call.
        """
        check_positive_int("TeacherFeatures.sample_t", "batch_size", batch_size)
        dtype = self.schedule.time_dtype
        if self.t is not None:
            return torch.full((batch_size,), self.t, dtype=dtype, device=device)
        u = sample_logit_normal(
            batch_size, mean=self.logit_mean, std=self.logit_std, generator=generator, device=device
        )
        low, high = self.schedule.t_range
        t = low + (high - low) * u.double()
        return t.round().to(dtype) if self.schedule.is_discrete else t.to(dtype)

    def forward(
        self,
        latents: Tensor,
        *,
        t: Tensor | float | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        **cond: Any,
    ) -> list[Tensor]:
        """Token features ``[B, C_i, N_i]`` of the teacher on re-noised ``latents``.

        Args:
            latents: clean samples ``[B, C, ...]`` (any channel count), real or generated.
            t: noise level(s) in schedule units, scalar or ``[B]``; default
                [`sample_t`][addkit.discriminators.teacher.TeacherFeatures.sample_t].
            noise: the noise $\\epsilon$ (same shape as ``latents``); drawn when ``None``.
            generator: source of randomness for ``t`` and ``noise``.
            **cond: passed to the teacher (e.g. ``encoder_hidden_states``).

        Returns:
            One ``[B, C_i, N_i]`` tensor per tap, in ``taps`` order.
        """
        fn = "TeacherFeatures"
        check_floating(fn, "latents", latents)
        check_ndim(fn, "latents", latents, (3, 4, 5), layout="[B, C, ...]")
        check_finite_inputs(fn, latents=latents, noise=noise, t=t)
        latents = as_module_dtype(latents, self.teacher)  # fp16 latents into an fp32 teacher: cast
        if t is None:
            t = self.sample_t(latents.shape[0], generator=generator, device=latents.device)
        if noise is None:
            noise = randn(tuple(latents.shape), device=latents.device, dtype=latents.dtype, generator=generator)
        x_t = self.schedule.add_noise(latents, noise, t)
        with recording(self.teacher, self.taps, select=self.select, stop_early=self.stop_early, fn=fn) as out:
            if self.call is None:
                self.teacher(x_t, t, **cond)
            else:
                self.call(x_t, t, **cond)
        return [to_tokens(out[name], fn=fn, name=f"tap {name!r}") for name in self.taps]
