"""A frozen diffusion teacher as the discriminator's feature network (LADD).

Instead of decoding latents and running DINOv2 on pixels, LADD re-noises real and generated
latents to a discriminator noise level $\\hat t$ and reads the frozen teacher's intermediate
blocks. No VAE decode, any resolution and aspect ratio, any latent channel count:

$$ x_{\\hat t} = \\alpha_{\\hat t}\\, x_0 + \\sigma_{\\hat t}\\, \\epsilon, \\qquad
   \\hat t = \\operatorname{sigmoid}(m + s\\,\\xi),\\ \\xi \\sim N(0, 1) $$

(logit-normal, LADD's $m = 1, s = 1$, biased to high noise), or a fixed $\\hat t$.

**Where the logit-normal lives** (``noise_space``). LADD writes $\\pi(\\hat t; m, s)$ in the
rectified-flow notation of SD3, where $\\hat t$ is the noise level the discriminator's input
carries, $x_{\\hat t} = (1 - \\hat t)\\,x_0 + \\hat t\\,\\epsilon$ (our reading: the paper does
not discuss a shifted schedule). addkit's default ``noise_space="sigma"`` draws exactly that quantity for any schedule:
the *noise fraction* $r = \\sigma_t / (\\alpha_t + \\sigma_t)$ (the flow's $\\sigma$; for a VP
schedule the flow noise level of equal signal-to-noise ratio, $\\log \\mathrm{SNR} =
-2\\operatorname{logit} r$) is logit-normal, and $t$ is the time where the schedule reaches it.
``noise_space="time"`` draws the logit-normal in the schedule's own (unshifted) time and maps
it linearly onto ``t_range``; with a shifted flow schedule the shift then moves the draws to
higher noise: $\\operatorname{logit}\\sigma = \\operatorname{logit} t + \\ln(\\text{shift})$, so
SD3's shift 3 turns $m = 1$ into an effective $m = 2.1$.

**Layout** (``layout``). ``"grid"`` (default) keeps each tap on its spatial grid,
``[B, C, h, w]``: a UNet's feature maps as they are, a diffusion transformer's image tokens
``[B, N, C]`` put back on their patch grid (row-major, as SD3 and Flux patchify; $h, w$ follow
from $N$ and the latents' aspect ratio). LADD's heads are 2-D convolutions on that grid;
``"tokens"`` flattens to ``[B, C, N]`` for StyleGAN-T's 1-D heads.

References:
    Sauer et al., *Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
    Distillation*, arXiv 2403.12015, §3 (teacher features; logit-normal noise levels).
    The paper describes the method in prose only and released no code; the details here
    follow its text and SD3's logit-normal time sampling (Esser et al., arXiv 2403.03206).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from addkit._checks import (
    check_choice,
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

__all__ = ["FeatureLayout", "NoiseSpace", "TeacherFeatures", "noise_fraction", "noise_fraction_table", "sample_logit_normal", "to_grid",
           "time_at_noise_fraction"]

NoiseSpace = Literal["sigma", "time"]
"""Where ``TeacherFeatures`` draws its logit-normal noise levels: the noise fraction
$\\sigma_t / (\\alpha_t + \\sigma_t)$ (``"sigma"``) or the schedule's unshifted time (``"time"``)."""

FeatureLayout = Literal["grid", "tokens"]
"""How ``TeacherFeatures`` returns a tap: on its spatial grid ``[B, C, h, w]`` or as tokens ``[B, C, N]``."""

_GRID_POINTS = 4097  # a continuous schedule's noise fraction is tabulated on this many times


def noise_fraction(schedule: Any, t: Tensor) -> Tensor:
    """$r_t = \\sigma_t / (\\alpha_t + \\sigma_t)$ of ``t`` ``[B]``: rectified flow's $\\sigma$.

    For a VP schedule it is the flow noise level with the same signal-to-noise ratio. Float32 or
    wider, on ``t``'s device; no host read.

    Examples:
        >>> from addkit.schedules import FlowSchedule
        >>> noise_fraction(FlowSchedule(shift=3.0), torch.tensor([0.5]))
        tensor([0.7500])
    """
    a, s = schedule.coefficients(t, t.new_empty(t.shape[0], dtype=torch.float32), fn="noise_fraction")
    return s / (a + s)


def _fraction_grid(schedule: Any, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Times and their noise fractions on ``device`` (float64), unchecked: no host read."""
    low, high = schedule.t_range
    if schedule.is_discrete:
        grid = torch.arange(int(low), int(high) + 1, dtype=torch.float64, device=device)
    else:
        grid = torch.linspace(float(low), float(high), _GRID_POINTS, dtype=torch.float64, device=device)
    return grid, noise_fraction(schedule, grid.to(schedule.time_dtype)).double()


def noise_fraction_table(schedule: Any) -> tuple[Tensor, Tensor]:
    """Times and their noise fractions ``(grid, table)`` (CPU float64), checked to rise with ``t``.

    Every integer timestep of a discrete schedule; 4,097 evenly spaced times of a continuous one.
    Built on the CPU even inside a ``torch.device("meta")`` context (a model built on meta).

    Raises:
        ValueError: if the noise fraction falls anywhere (it cannot be inverted).
    """
    grid, table = _fraction_grid(schedule, "cpu")
    if not bool((table[1:] >= table[:-1]).all()):
        raise ValueError(
            "noise_fraction_table: the schedule's noise fraction sigma / (alpha + sigma) must rise with t "
            f"to be inverted, got values from {float(table[0]):.4g} to {float(table[-1]):.4g} that fall "
            "somewhere; use noise_space='time'"
        )
    return grid, table


def time_at_noise_fraction(
    schedule: Any, r: Tensor, *, table: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """The time ``t`` ``[B]`` (schedule units and dtype) at which ``schedule`` reaches noise fraction ``r``.

    Inverts [`noise_fraction`][addkit.discriminators.teacher.noise_fraction]: the nearest
    integer timestep of a discrete schedule, linear interpolation between 4,097 times of a
    continuous one (``r`` outside the schedule's range is clamped to it). No host read.

    Args:
        schedule: the schedule.
        r: noise fractions ``[B]`` in ``[0, 1]``.
        table: [`noise_fraction_table`][addkit.discriminators.teacher.noise_fraction_table]'s
            result, on ``r``'s device, when the caller keeps one; built here otherwise.

    Examples:
        >>> from addkit.schedules import FlowSchedule
        >>> time_at_noise_fraction(FlowSchedule(shift=3.0), torch.tensor([0.75]))
        tensor([0.5000])
    """
    grid, frac = table if table is not None else noise_fraction_table(schedule)
    grid, frac = grid.to(r.device), frac.to(r.device)
    r = torch.minimum(torch.maximum(r.double(), frac[0]), frac[-1])
    i = torch.searchsorted(frac, r).clamp(1, len(grid) - 1)
    lo, hi = frac[i - 1], frac[i]
    w = ((r - lo) / (hi - lo).clamp_min(1e-300)).clamp(0, 1)
    if schedule.is_discrete:
        return torch.where(w < 0.5, grid[i - 1], grid[i]).to(schedule.time_dtype)
    return (grid[i - 1] + w * (grid[i] - grid[i - 1])).to(schedule.time_dtype)


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
    removed inside the call, even on error) and returns each tap on its grid ``[B, C, h, w]``
    (``layout="grid"``: feature maps as they are, transformer tokens ``[B, N, C]`` put back
    on the latents' patch grid) or as tokens ``[B, C, N]`` (``layout="tokens"``). With
    ``stop_early`` the teacher stops after the last tap fires (a UNet tapped at its mid block
    skips the decoder).

    Timesteps are in the schedule's units. A logit-normal draw $u \\in (0, 1)$ is the noise
    fraction $\\sigma_t / (\\alpha_t + \\sigma_t)$ reached at the returned time
    (``noise_space="sigma"``, default) or is mapped linearly onto ``t_range``
    (``noise_space="time"``: ``round(u * (T - 1))`` for a discrete schedule, ``u`` itself for
    rectified flow); see the module notes.

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
        noise_space: ``"sigma"`` (default: the logit-normal is the noise level the
            discriminator sees, as we read LADD) or ``"time"`` (the schedule's unshifted
            time, addkit < 0.4's behaviour).
        layout: ``"grid"`` (default: ``[B, C, h, w]`` per tap, for 2-D heads) or ``"tokens"``
            (``[B, C, N]``, for StyleGAN-T's 1-D heads).
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
        ValueError: for a tap the teacher lacks, channels of the wrong length, or
            ``noise_space="sigma"`` on a schedule whose noise fraction does not rise with ``t``.

    Examples:
        >>> from addkit.schedules import FlowSchedule
        >>> net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
        >>> feats = TeacherFeatures(net, FlowSchedule(), ["0"], channels=[8],
        ...                         call=lambda x_t, t: net(x_t), t=0.5)
        >>> [tuple(f.shape) for f in feats(torch.randn(2, 4, 6, 6))]
        [(2, 8, 6, 6)]
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
        noise_space: NoiseSpace = "sigma",
        layout: FeatureLayout = "grid",
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
        check_choice(fn, "noise_space", noise_space, ("sigma", "time"))
        check_choice(fn, "layout", layout, ("grid", "tokens"))
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
        self.noise_space: NoiseSpace = noise_space
        self.layout: FeatureLayout = layout
        if noise_space == "sigma" and t is None:
            noise_fraction_table(schedule)  # checked here, once; built on the draws' device when first used
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}
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
        pass ``t=`` to the call (a noise-conditioned
        [`ProjectedDiscriminator`][addkit.discriminators.projected.ProjectedDiscriminator] does).
        """
        check_positive_int("TeacherFeatures.sample_t", "batch_size", batch_size)
        dtype = self.schedule.time_dtype
        if self.t is not None:
            return torch.full((batch_size,), self.t, dtype=dtype, device=device)
        u = sample_logit_normal(
            batch_size, mean=self.logit_mean, std=self.logit_std, generator=generator, device=device
        )
        if self.noise_space == "sigma":
            if u.device not in self._tables:
                self._tables[u.device] = _fraction_grid(self.schedule, u.device)
            return time_at_noise_fraction(self.schedule, u, table=self._tables[u.device])
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
        """Features of the teacher's taps on re-noised ``latents``, one per tap.

        Args:
            latents: clean samples ``[B, C, ...]`` (any channel count), real or generated.
            t: noise level(s) in schedule units, scalar or ``[B]``; default
                [`sample_t`][addkit.discriminators.teacher.TeacherFeatures.sample_t].
            noise: the noise $\\epsilon$ (same shape as ``latents``); drawn when ``None``.
            generator: source of randomness for ``t`` and ``noise``.
            **cond: passed to the teacher (e.g. ``encoder_hidden_states``).

        Returns:
            One tensor per tap, in ``taps`` order: ``[B, C_i, h_i, w_i]`` (``layout="grid"``)
            or ``[B, C_i, N_i]`` (``"tokens"``).

        Raises:
            ValueError: with ``layout="grid"``, for a token tap whose count does not tile the
                latents' grid (``N = (H / p) (W / p)`` for an integer patch size ``p``).
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
        if self.layout == "tokens":
            return [to_tokens(out[name], fn=fn, name=f"tap {name!r}") for name in self.taps]
        return [to_grid(out[name], latents.shape, fn=fn, name=f"tap {name!r}") for name in self.taps]


def to_grid(x: Tensor, latent_shape: Sequence[int], *, fn: str = "to_grid", name: str = "feature") -> Tensor:
    """A tap's output on its spatial grid ``[B, C, h, w]``.

    A feature map ``[B, C, h, w]`` is returned as it is. Tokens ``[B, N, C]`` of latents
    ``[B, c, H, W]`` are put back on the patch grid, row-major (SD3's and Flux's patch order):
    ``p = sqrt(H W / N)`` must be an integer dividing ``H`` and ``W``.

    Examples:
        >>> tokens = torch.arange(12.0).view(1, 6, 2)        # 6 tokens of 2 channels
        >>> to_grid(tokens, (1, 4, 4, 6))[0, 0]             # 4x6 latents, patch 2: a 2x3 grid
        tensor([[ 0.,  2.,  4.],
                [ 6.,  8., 10.]])
    """
    if x.ndim == 4:
        return x
    if x.ndim != 3:
        raise ValueError(
            f"{fn}: {name} must be tokens [B, N, C] or a feature map [B, C, h, w] for layout='grid', "
            f"got shape {tuple(x.shape)}; use layout='tokens'"
        )
    if len(latent_shape) != 4:
        raise ValueError(
            f"{fn}: layout='grid' puts tokens on the latents' [H, W] grid, so latents must be [B, C, H, W], "
            f"got shape {tuple(latent_shape)}; use layout='tokens'"
        )
    H, W, N = int(latent_shape[2]), int(latent_shape[3]), int(x.shape[1])
    p = round(math.sqrt(H * W / N)) if N else 0
    if p < 1 or H % p or W % p or (H // p) * (W // p) != N:
        raise ValueError(
            f"{fn}: {name} has {N} tokens, which is not a patch grid of latents {H}x{W} "
            f"(N = (H / p) (W / p) for an integer patch size p); select the image tokens only, or use layout='tokens'"
        )
    return rearrange(x, "b (h w) c -> b c h w", h=H // p, w=W // p)
