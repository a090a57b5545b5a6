"""Noise schedules: discrete variance-preserving (DDPM) and rectified flow.

Both describe the forward process

$$ x_t = \\alpha_t x_0 + \\sigma_t \\epsilon, \\qquad \\epsilon \\sim \\mathcal{N}(0, I), $$

and share one interface (``alpha``, ``sigma``, ``snr``, ``log_snr``, ``add_noise``,
``timesteps``), so every other part of addkit works with either. Schedule maths runs in
float64; tensors combined with a sample are cast to the sample's dtype.

References:
    Ho et al., *Denoising Diffusion Probabilistic Models*, 2020 (VP process).
    Lin et al., *Common Diffusion Noise Schedules and Sample Steps Are Flawed*, arXiv
    2305.08891, Algorithm 1 (zero terminal SNR) and Table 2 (timestep spacing).
    Esser et al., *Scaling Rectified Flow Transformers*, arXiv 2403.03206 (SD3 shift).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from addkit._checks import (
    check_choice,
    check_finite_inputs,
    check_floating,
    check_number,
    check_positive_int,
    check_same_shape,
)
from addkit._reduce import append_dims
from addkit._time import check_time

__all__ = ["FlowSchedule", "Spacing", "VPSchedule"]

Spacing = Literal["trailing", "leading", "linspace"]
_SPACINGS = ("trailing", "leading", "linspace")


class _Schedule:
    """Shared maths of every schedule; subclasses define ``_alpha_sigma`` and the time attributes."""

    is_discrete: bool
    num_train_timesteps: int
    time_dtype: torch.dtype

    @property
    def t_range(self) -> tuple[float, float]:
        """Valid times ``(low, high)``, inclusive; the largest is the noisiest."""
        raise NotImplementedError

    def _check_t(self, fn: str, t: Any) -> Tensor:
        return check_time(fn, self, t)

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def alpha(self, t: int | float | Tensor) -> Tensor:
        """Signal scale $\\alpha_t$ (float64, same shape and device as ``t``)."""
        return self._alpha_sigma(self._check_t(f"{type(self).__name__}.alpha", t))[0]

    def sigma(self, t: int | float | Tensor) -> Tensor:
        """Noise scale $\\sigma_t$ (float64, same shape and device as ``t``)."""
        return self._alpha_sigma(self._check_t(f"{type(self).__name__}.sigma", t))[1]

    def snr(self, t: int | float | Tensor) -> Tensor:
        """Signal-to-noise ratio $\\alpha_t^2 / \\sigma_t^2$ (float64)."""
        a, s = self._alpha_sigma(self._check_t(f"{type(self).__name__}.snr", t))
        return a.square() / s.square()

    def log_snr(self, t: int | float | Tensor) -> Tensor:
        """Log-SNR $2(\\log\\alpha_t - \\log\\sigma_t)$ (float64; $-\\infty$ at zero SNR)."""
        a, s = self._alpha_sigma(self._check_t(f"{type(self).__name__}.log_snr", t))
        return 2.0 * (a.log() - s.log())

    def add_noise(self, x0: Tensor, noise: Tensor, t: int | float | Tensor) -> Tensor:
        """Forward process $x_t = \\alpha_t x_0 + \\sigma_t \\epsilon$.

        Args:
            x0: clean samples ``[B, ...]``.
            noise: standard normal noise, same shape as ``x0``.
            t: a timestep for the whole batch, or one per sample ``[B]``.

        Returns:
            ``x_t`` with the shape and dtype of ``x0``.

        Raises:
            ValueError: if ``noise`` and ``x0`` differ in shape or ``t`` does not have one
                value per sample.
        """
        fn = f"{type(self).__name__}.add_noise"
        check_floating(fn, "x0", x0)
        check_floating(fn, "noise", noise)
        check_same_shape(fn, "x0", x0, "noise", noise)
        check_finite_inputs(fn, x0=x0, noise=noise)
        a, s = self.coefficients(t, x0, fn=fn)
        return (a * x0 + s * noise).to(x0.dtype)

    def coefficients(
        self, t: int | float | Tensor, like: Tensor, *, fn: str | None = None
    ) -> tuple[Tensor, Tensor]:
        """$(\\alpha_t, \\sigma_t)$ shaped ``[B, 1, ..., 1]`` to broadcast against ``like``.

        The coefficients are computed in float64 and cast to ``like``'s dtype (at least
        float32), on ``like``'s device.

        Args:
            t: a timestep for the whole batch, or one per sample ``[B]``.
            like: the tensor ``[B, ...]`` the coefficients will multiply.
            fn: caller name for error messages.

        Returns:
            ``(alpha, sigma)``, each of rank ``like.ndim``.

        Raises:
            ValueError: if ``t`` is a tensor whose length is not ``like.shape[0]``, or a Python
                timestep outside ``t_range``.
            RuntimeError: for a tensor ``t`` with a value outside ``t_range`` (checked on the
                device without a host read; a ``ValueError`` under value checks).
        """
        fn = fn or f"{type(self).__name__}.coefficients"
        t = self._check_t(fn, t)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        elif t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(
                f"{fn}: t must be a scalar or have shape ({like.shape[0]},) to match the batch "
                f"of a tensor with shape {tuple(like.shape)}, got {tuple(t.shape)}"
            )
        a, s = self._alpha_sigma(t.to(like.device))
        dtype = torch.promote_types(like.dtype, torch.float32)
        return append_dims(a.to(dtype), like.ndim), append_dims(s.to(dtype), like.ndim)


class VPSchedule(_Schedule):
    """Discrete variance-preserving (DDPM) schedule built from betas.

    $$ \\bar\\alpha_t = \\prod_{s \\le t} (1 - \\beta_s), \\quad \\alpha_t = \\sqrt{\\bar\\alpha_t},
    \\quad \\sigma_t = \\sqrt{1 - \\bar\\alpha_t}, \\quad t \\in \\{0, \\dots, T - 1\\}. $$

    Timesteps are integers, as in diffusers. Use a constructor such as
    [`scaled_linear`][addkit.schedules.VPSchedule.scaled_linear] (SD/SDXL) or
    [`from_diffusers`][addkit.schedules.VPSchedule.from_diffusers].

    Args:
        betas: per-step variances ``[T]`` in ``[0, 1]``; stored in float64.
        steps_offset: added to ``"leading"`` timesteps (diffusers' ``steps_offset``).

    Raises:
        ValueError: if ``betas`` is not one-dimensional or leaves ``[0, 1]``.

    Examples:
        >>> s = VPSchedule.scaled_linear()
        >>> round(float(s.alpha(999)), 6)
        0.068265
        >>> s.timesteps(4)
        (999, 749, 499, 249)
    """

    is_discrete = True
    time_dtype = torch.long

    def __init__(self, betas: Tensor, *, steps_offset: int = 0) -> None:
        fn = "VPSchedule"
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise TypeError(f"{fn}: steps_offset must be a non-negative int, got {steps_offset!r}")
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"{fn}: betas must have shape (T,) with T >= 2, got {tuple(betas.shape)}")
        if not bool(((betas >= 0) & (betas <= 1)).all()):
            raise ValueError(
                f"{fn}: betas must lie in [0, 1], got range [{float(betas.min())}, {float(betas.max())}]"
            )
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_train_timesteps = int(betas.numel())
        self.steps_offset = int(steps_offset)
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"VPSchedule(T={self.num_train_timesteps}, alpha[0]={float(self.alphas_cumprod[0].sqrt()):.6f}, "
            f"alpha[T-1]={float(self.alphas_cumprod[-1].sqrt()):.6f})"
        )

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def scaled_linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> VPSchedule:
        """The SD 1.x/2.x/SDXL schedule: $\\beta$ linear in $\\sqrt\\beta$ from 0.00085 to 0.012."""
        fn = "VPSchedule.scaled_linear"
        _check_betas(fn, num_train_timesteps, beta_start=beta_start, beta_end=beta_end)
        b = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
        return cls(b.square())

    @classmethod
    def linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02
    ) -> VPSchedule:
        """The DDPM schedule: $\\beta$ linear from 1e-4 to 0.02 (Ho et al. 2020)."""
        _check_betas("VPSchedule.linear", num_train_timesteps, beta_start=beta_start, beta_end=beta_end)
        return cls(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64))

    @classmethod
    def cosine(
        cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999
    ) -> VPSchedule:
        """The cosine schedule (Nichol & Dhariwal 2021; diffusers ``squaredcos_cap_v2``)."""
        _check_betas("VPSchedule.cosine", num_train_timesteps, s=s, max_beta=max_beta)

        def abar(x: float) -> float:
            return math.cos((x + s) / (1 + s) * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
        return cls(torch.tensor(betas, dtype=torch.float64))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor, *, steps_offset: int = 0) -> VPSchedule:
        """Build from $\\bar\\alpha$ ``[T]`` (inverse of the cumulative product)."""
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return cls(1.0 - ac / prev, steps_offset=steps_offset)

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> VPSchedule:
        """Read the betas (or $\\bar\\alpha$) of any diffusers DDPM-family scheduler.

        Args:
            scheduler: a diffusers scheduler with ``betas`` or ``alphas_cumprod``
                (``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``, ...).
                ``steps_offset`` is read from its config.

        Returns:
            A schedule with the same $\\bar\\alpha$. Euler schedulers clamp a zero terminal
            $\\bar\\alpha$ to $2^{-24}$; addkit keeps the exact betas instead.

        Raises:
            TypeError: if the scheduler has neither attribute.
        """
        config = getattr(scheduler, "config", {})
        offset = int(config.get("steps_offset", 0) or 0) if hasattr(config, "get") else 0
        if getattr(scheduler, "betas", None) is not None:
            return cls(torch.as_tensor(scheduler.betas), steps_offset=offset)
        if getattr(scheduler, "alphas_cumprod", None) is not None:
            return cls.from_alphas_cumprod(scheduler.alphas_cumprod, steps_offset=offset)
        raise TypeError(
            f"VPSchedule.from_diffusers: expected a diffusers scheduler with `betas` or "
            f"`alphas_cumprod`, got {type(scheduler).__name__}"
        )

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments that build an equivalent diffusers scheduler.

        Examples:
            >>> cfg = VPSchedule.linear(10).diffusers_config()
            >>> sorted(cfg)
            ['num_train_timesteps', 'steps_offset', 'trained_betas']
        """
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "trained_betas": self.betas.tolist(),
            "steps_offset": self.steps_offset,
        }

    # -- zero terminal SNR --------------------------------------------------------------
    def rescale_zero_terminal_snr(self) -> VPSchedule:
        """A new schedule whose last $\\bar\\alpha$ is exactly 0 (Lin et al. 2023, Algorithm 1).

        $\\sqrt{\\bar\\alpha}$ is shifted so that its last value is 0 and scaled so that its
        first value is unchanged; betas are recovered from ratios of consecutive
        $\\bar\\alpha$. An eps-predicting model cannot give $x_0$ at zero SNR: use it with
        v or x0 prediction.

        Examples:
            >>> z = VPSchedule.scaled_linear().rescale_zero_terminal_snr()
            >>> float(z.alpha(999)), float(z.betas[-1])
            (0.0, 1.0)
        """
        a = self.alphas_cumprod.sqrt()
        a0, aT = a[0].clone(), a[-1].clone()
        a = (a - aT) * a0 / (a0 - aT)
        abar = a.square()
        alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
        return VPSchedule(1.0 - alphas, steps_offset=self.steps_offset)

    # -- timesteps ----------------------------------------------------------------------
    def timesteps(self, n: int, spacing: Spacing = "trailing") -> tuple[int, ...]:
        """``n`` inference timesteps, from high noise to low, as diffusers spaces them.

        - ``"trailing"``: ``round(arange(T, 0, -T/n)) - 1`` (includes ``T - 1``);
        - ``"leading"``: ``arange(n) * (T // n)`` reversed, plus ``steps_offset``;
        - ``"linspace"``: ``round(linspace(0, T - 1, n))`` reversed.

        Args:
            n: number of steps, ``1 <= n <= T``.
            spacing: one of ``"trailing"``, ``"leading"``, ``"linspace"``.

        Returns:
            Decreasing integer timesteps. ``timesteps(4) == (999, 749, 499, 249)``: ADD's
            student set.

        Raises:
            ValueError: for an unknown spacing or ``n`` outside ``[1, T]``.
        """
        fn = "VPSchedule.timesteps"
        check_choice(fn, "spacing", spacing, _SPACINGS)
        T = self.num_train_timesteps
        if not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"{fn}: n must be an integer in [1, {T}], got {n!r}")
        if spacing == "trailing":
            ts = [v - 1 for v in _round_half_even(_np_arange(T, 0, -T / n))]
        elif spacing == "leading":
            ts = [i * (T // n) + self.steps_offset for i in reversed(range(n))]
        else:
            ts = _round_half_even(_np_linspace(0, T - 1, n))[::-1]
        return tuple(int(v) for v in ts)

    @property
    def t_range(self) -> tuple[int, int]:
        """Valid timesteps ``(0, T - 1)``, inclusive."""
        return 0, self.num_train_timesteps - 1

    # -- maths ----------------------------------------------------------------------------
    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        device = t.device
        if device not in self._tables:
            ac = self.alphas_cumprod
            table_dtype = torch.float32 if device.type == "mps" else torch.float64
            self._tables[device] = (
                ac.sqrt().to(device, table_dtype),
                (1.0 - ac).sqrt().to(device, table_dtype),
            )
        a, s = self._tables[device]
        return a[t.long()], s[t.long()]


class FlowSchedule(_Schedule):
    """Rectified-flow schedule with the SD3/Flux timestep shift.

    $$ \\sigma_t = \\frac{s\\,t}{1 + (s - 1)\\,t}, \\qquad \\alpha_t = 1 - \\sigma_t,
    \\qquad t \\in [0, 1], $$

    so ``t = 1`` is pure noise (zero terminal SNR by construction) and ``shift = 1`` gives
    $x_t = (1 - t) x_0 + t \\epsilon$. ``t`` is the unshifted time; diffusers' flow
    transformers are called with timestep $1000\\,\\sigma_t$ (the adapters in
    [`addkit.denoisers`][addkit.denoisers] do that).

    Args:
        shift: the shift $s > 0$ (SD3 uses 3.0; Flux's dynamic shift is $e^{\\mu}$).
        num_train_timesteps: the discretisation diffusers uses (1000).
        dynamic: the shift is diffusers' resolution-dependent one (``use_dynamic_shifting``,
            $s = e^{\\mu}$). It changes only where ``timesteps(n, "linspace")`` ends: diffusers
            ends a dynamic schedule's grid at the unshifted $1/T$ and a fixed one's at the
            shifted $\\sigma_{1/T}$. [`from_diffusers`][addkit.schedules.FlowSchedule.from_diffusers]
            sets it.

    Examples:
        >>> s = FlowSchedule(shift=3.0)
        >>> float(s.sigma(0.5))
        0.75
        >>> s.timesteps(4)
        (1.0, 0.75, 0.5, 0.25)
    """

    is_discrete = False
    time_dtype = torch.float32

    def __init__(self, shift: float = 1.0, *, num_train_timesteps: int = 1000, dynamic: bool = False) -> None:
        if isinstance(shift, bool) or not isinstance(shift, (int, float)):
            raise TypeError(f"FlowSchedule: shift must be a number, got {type(shift).__name__} {shift!r}")
        if not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"FlowSchedule: shift must be a finite positive number, got {shift!r}")
        if not isinstance(dynamic, bool):
            raise TypeError(f"FlowSchedule: dynamic must be a bool, got {type(dynamic).__name__} {dynamic!r}")
        self.shift = float(shift)
        T = check_positive_int("FlowSchedule", "num_train_timesteps", num_train_timesteps)
        self.num_train_timesteps = T
        self.dynamic = dynamic

    def __repr__(self) -> str:
        dynamic = ", dynamic=True" if self.dynamic else ""
        return f"FlowSchedule(shift={self.shift}, num_train_timesteps={self.num_train_timesteps}{dynamic})"

    @classmethod
    def from_diffusers(cls, scheduler: Any, *, mu: float | None = None) -> FlowSchedule:
        """Read ``shift`` from a diffusers ``FlowMatchEulerDiscreteScheduler``.

        Options that reshape diffusers' inference sigmas beyond the shift (``shift_terminal``,
        ``invert_sigmas``, ``use_karras_sigmas``, ``use_exponential_sigmas``,
        ``use_beta_sigmas``) have no counterpart here and are refused rather than ignored.

        Args:
            scheduler: the scheduler (its ``config`` is read).
            mu: required when the scheduler uses dynamic (resolution-dependent) shifting;
                the exponential time shift equals a fixed shift of $e^{\\mu}$.

        Returns:
            The schedule, ``dynamic`` when the scheduler shifts dynamically.

        Raises:
            ValueError: if dynamic shifting is on and ``mu`` is missing, or it uses a
                shift form other than exponential; if ``mu`` is given for a fixed shift;
                or for an unsupported option (named with its value).
            TypeError: for a scheduler without a ``config`` mapping, or a ``mu`` that is
                not a number.
        """
        fn = "FlowSchedule.from_diffusers"
        cfg = getattr(scheduler, "config", None)
        if not callable(getattr(cfg, "get", None)):
            raise TypeError(
                f"{fn}: scheduler must be a diffusers FlowMatchEulerDiscreteScheduler (with a .config), "
                f"got {type(scheduler).__name__}"
            )
        for option in _UNSUPPORTED_FLOW_OPTIONS:
            if cfg.get(option):
                raise ValueError(
                    f"{fn}: the scheduler sets {option}={cfg.get(option)!r}, which reshapes its inference "
                    "sigmas in a way FlowSchedule does not reproduce (its timesteps would not match the "
                    f"pipeline's): build the scheduler with {option}={_FLOW_OPTION_OFF[option]!r}"
                )
        T = int(cfg.get("num_train_timesteps", 1000))
        if mu is not None:
            check_number(fn, "mu", mu)
        if not cfg.get("use_dynamic_shifting", False) and mu is not None:
            raise ValueError(
                f"{fn}: mu={mu!r} was given but the scheduler has a fixed shift={cfg.get('shift', 1.0)} "
                "(use_dynamic_shifting=False), which mu would not change: leave mu out"
            )
        if cfg.get("use_dynamic_shifting", False):
            if mu is None:
                raise ValueError(f"{fn}: the scheduler uses dynamic shifting; pass mu=...")
            kind = cfg.get("time_shift_type", "exponential")
            if kind != "exponential":
                raise ValueError(f"{fn}: time_shift_type must be 'exponential', got {kind!r}")
            return cls(math.exp(mu), num_train_timesteps=T, dynamic=True)
        return cls(float(cfg.get("shift", 1.0)), num_train_timesteps=T)

    @property
    def sigmas(self) -> Tensor:
        """$\\sigma$ on the training grid $t = T/T, (T-1)/T, \\dots, 1/T$ (float64, decreasing)."""
        T = self.num_train_timesteps
        return self._alpha_sigma(torch.arange(T, 0, -1, dtype=torch.float64) / T)[1]

    def timesteps(self, n: int, spacing: Spacing = "trailing") -> tuple[float, ...]:
        """``n`` inference times in ``(0, 1]``, from high noise to low.

        - ``"trailing"``: $t_i = (n - i)/n$, e.g. ``(1, 0.75, 0.5, 0.25)``;
        - ``"linspace"``: diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)``
          (``set_timesteps(n, mu=...)`` for a ``dynamic`` schedule): ``linspace(1, t_min, n)``
          where ``t_min`` is $1/T$ for a dynamic shift and the *shifted* last training sigma
          $\\sigma_{1/T}$ for a fixed one (diffusers shifts that end point twice; kept for
          parity).

        Examples:
            >>> FlowSchedule(shift=3.0).timesteps(2, "linspace")  # ends at sigma(1/T)
            (1.0, 0.002994)
            >>> FlowSchedule(shift=3.0, dynamic=True).timesteps(2, "linspace")
            (1.0, 0.001)

        Raises:
            ValueError: for ``"leading"`` (undefined for flow) or unknown spacings, or
                ``n < 1``.
        """
        fn = "FlowSchedule.timesteps"
        check_choice(fn, "spacing", spacing, ("trailing", "linspace"))
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{fn}: n must be a positive integer, got {n!r}")
        if spacing == "trailing":
            ts = [(n - i) / n for i in range(n)]
        else:
            t_min = 1.0 / self.num_train_timesteps if self.dynamic else float(self.sigmas[-1])
            ts = _np_linspace(1.0, t_min, n)
        return tuple(float(v) for v in ts)

    @property
    def t_range(self) -> tuple[float, float]:
        """Valid times ``(0.0, 1.0)``, inclusive (``1`` is pure noise)."""
        return 0.0, 1.0

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        t = t.to(dtype)
        s = self.shift
        sigma = s * t / (1 + (s - 1) * t)
        return 1.0 - sigma, sigma


_FLOW_OPTION_OFF = {
    "shift_terminal": None,
    "invert_sigmas": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
_UNSUPPORTED_FLOW_OPTIONS = tuple(_FLOW_OPTION_OFF)


def _check_betas(fn: str, num_train_timesteps: Any, **numbers: Any) -> None:
    """The arguments of the beta constructors: a count >= 2 and finite numbers."""
    check_positive_int(fn, "num_train_timesteps", num_train_timesteps)
    if num_train_timesteps < 2:
        raise ValueError(f"{fn}: num_train_timesteps must be at least 2, got {num_train_timesteps}")
    for name, value in numbers.items():
        check_number(fn, name, value)


# numpy's float arithmetic, reproduced so that timesteps match diffusers (which uses numpy)
# to the last rounding; torch.linspace/arange round differently at .5 boundaries.
def _np_arange(start: float, stop: float, step: float) -> list[float]:
    n = math.ceil((stop - start) / step)
    delta = (start + step) - start
    return [start + i * delta for i in range(max(n, 0))]


def _np_linspace(start: float, stop: float, num: int) -> list[float]:
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    values = [i * step + start for i in range(num)]
    values[-1] = float(stop)
    return values


def _round_half_even(values: list[float]) -> list[int]:
    return [int(round(v)) for v in values]
