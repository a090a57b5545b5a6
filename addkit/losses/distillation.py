r"""ADD's score-distillation loss and the teacher timesteps it is evaluated at.

The student's clean estimate $\hat x_\theta$ is re-noised to a teacher time $t$ with fresh
noise $\epsilon'$, the frozen teacher denoises it once, and the student is pulled towards that
target (ADD §3.3, Eq. 4):

$$ \mathcal L_\text{distill} = \mathbb E_{t,\epsilon'}\Big[c(t)\,
   d\big(\hat x_\theta,\ \mathrm{sg}(\hat x_\psi(\alpha_t \hat x_\theta + \sigma_t\epsilon';\,t))\big)\Big]. $$

The weighting $c(t)$ decides what the loss is: ``"exponential"`` ($c = \alpha_t$, ADD's
ablation default), ``"sds"`` ($c = \alpha_t w(t) / (2\sigma_t)$, which turns the gradient
into DreamFusion's score-distillation gradient) or ``"nfsd"`` (noise-free score
distillation, ADD's final model). With $d$ the squared L2 distance,
$\hat x_\theta - \hat x_\psi = (\sigma_t/\alpha_t)(\hat\epsilon - \epsilon')$, hence

$$ \nabla_{\hat x_\theta}\, c(t)\,\|\hat x_\theta - \mathrm{sg}(\hat x_\psi)\|^2
   = w(t)\,(\hat\epsilon - \epsilon') \quad\text{for}\quad c = \frac{\alpha_t\, w(t)}{2\sigma_t}. $$

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042, §3.3, App. A.
    Poole et al., *DreamFusion*, arXiv 2209.14988 (SDS).
    Katzir et al., *Noise-Free Score Distillation*, arXiv 2310.17590 (NFSD).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from addkit._checks import (
    check_batch,
    check_choice,
    check_finite_inputs,
    check_floating,
    check_guidance_scale,
    check_positive_int,
    check_same_shape,
    checking_values,
)
from addkit._random import rand, randint
from addkit._reduce import per_sample_mean, reduce_loss
from addkit._time import check_schedule, check_time_values
from addkit.typing import Reduction, Schedule, Teacher

__all__ = [
    "Distance",
    "WeightFn",
    "Weighting",
    "distillation_loss",
    "distillation_weight",
    "sample_distillation_timesteps",
]

WeightFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""A user weighting ``c(t, alpha_t, sigma_t) -> [B]`` (all three arguments are ``[B]``)."""

Weighting = Literal["exponential", "sds", "nfsd"] | WeightFn
"""The weighting $c(t)$ of the distillation loss: a name or a callable."""

Distance = Literal["l2", "l2_sum"] | Callable[[Tensor, Tensor], Tensor]
"""Squared L2 averaged (``"l2"``) or summed (``"l2_sum"``) over each sample's elements, or a
callable ``d(student, target) -> [B]``."""

_WEIGHTINGS = ("exponential", "sds", "nfsd")
DISTANCES = ("l2", "l2_sum")
DEFAULT_T_FRACTION = (0.02, 0.98)
"""Teacher times as fractions of the schedule (DreamFusion's range; ADD does not state one)."""


def _sds_w_default(alpha: Tensor, sigma: Tensor) -> Tensor:
    return sigma.square()


def distillation_weight(
    weighting: Weighting,
    t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    *,
    sds_weight: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    r"""The per-sample weight $c(t)$ of the distillation loss.

    * ``"exponential"``: $c = \alpha_t$ (lower weight at higher noise).
    * ``"sds"`` and ``"nfsd"``: $c = \alpha_t\, w(t) / (2\sigma_t)$, with
      $w = \sigma_t^2$ by default (DreamFusion's choice, so $c = \alpha_t\sigma_t/2$;
      ADD does not state its $w$). $w = 1$ explodes as $\sigma_t \to 0$.
    * a callable: ``weighting(t, alpha, sigma)``.

    Args:
        weighting: a name above or a callable returning ``[B]``.
        t: teacher timesteps ``[B]``.
        alpha: $\alpha_t$ ``[B]``.
        sigma: $\sigma_t$ ``[B]``.
        sds_weight: $w(\alpha_t, \sigma_t)$ for ``"sds"`` / ``"nfsd"``.

    Returns:
        ``[B]`` weights in the dtype of ``alpha``.

    Raises:
        ValueError: for an unknown weighting, a callable returning the wrong shape, or
            $\sigma_t = 0$ with an SDS-type weighting.

    Examples:
        >>> a, s = torch.tensor([0.6]), torch.tensor([0.8])
        >>> distillation_weight("exponential", torch.tensor([500]), a, s)
        tensor([0.6000])
        >>> distillation_weight("sds", torch.tensor([500]), a, s)
        tensor([0.2400])
    """
    fn = "distillation_weight"
    check_floating(fn, "alpha", alpha)
    check_finite_inputs(fn, alpha=alpha, sigma=check_floating(fn, "sigma", sigma))
    if callable(weighting):
        c = torch.as_tensor(weighting(t, alpha, sigma))
        if c.shape != alpha.shape:
            raise ValueError(
                f"{fn}: the weighting callable must return shape {tuple(alpha.shape)} (one weight "
                f"per sample), got {tuple(c.shape)}"
            )
        return c.to(alpha)
    check_choice(fn, "weighting", weighting, _WEIGHTINGS)
    if weighting == "exponential":
        return alpha
    if checking_values() and bool((sigma <= 0).any()):
        raise ValueError(
            f"{fn}: weighting={weighting!r} divides by sigma_t, which is 0 at some teacher "
            f"timesteps {t.tolist()}: draw t away from the clean end"
        )
    w = (sds_weight or _sds_w_default)(alpha, sigma)
    return alpha * w / (2.0 * sigma)


def sample_distillation_timesteps(
    batch: int,
    schedule: Schedule,
    *,
    t_range: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw teacher timesteps uniformly from ``t_range`` (inclusive).

    ADD does not state the range; the default trims the ends as DreamFusion does:
    ``[0.02, 0.98]`` of the schedule, i.e. integers ``[20, 980]`` for a discrete
    1000-step schedule and ``[0.02, 0.98]`` for a flow schedule.

    Args:
        batch: number of timesteps.
        schedule: the teacher's schedule (discrete or flow).
        t_range: ``(low, high)`` in the schedule's own units.
        generator: random generator (``None``: the global one).
        device: device of the result.

    Returns:
        ``[batch]`` timesteps: ``long`` for a discrete schedule, ``float32`` for flow.

    Raises:
        ValueError: if ``batch < 1`` or the range is empty or leaves the schedule.
        TypeError: for a float range on a discrete schedule (``t_range`` is in schedule
            units, e.g. ``(20, 980)``, not fractions).

    Examples:
        >>> from addkit.schedules import VPSchedule
        >>> g = torch.Generator().manual_seed(0)
        >>> t = sample_distillation_timesteps(1000, VPSchedule.scaled_linear(), generator=g)
        >>> int(t.min()) >= 20 and int(t.max()) <= 980
        True
    """
    fn = "sample_distillation_timesteps"
    check_positive_int(fn, "batch", batch)
    check_schedule(fn, schedule)
    discrete = schedule.is_discrete
    if t_range is None:
        lo, hi = DEFAULT_T_FRACTION
        T = schedule.num_train_timesteps
        t_range = (round(lo * T), round(hi * T)) if discrete else (lo, hi)
    lo, hi = check_t_range(fn, schedule, t_range)
    if discrete:
        return randint(int(lo), int(hi) + 1, (batch,), device=device, generator=generator)
    return lo + (hi - lo) * rand((batch,), device=device, generator=generator)


def check_t_range(fn: str, schedule: Schedule, t_range: Any, *, name: str = "t_range") -> tuple[Any, Any]:
    """``t_range`` as ``(low, high)`` in schedule units, checked on the host (a pair, in range, ordered)."""
    if isinstance(t_range, str) or not isinstance(t_range, Sequence) or len(t_range) != 2:
        raise TypeError(f"{fn}: {name} must be a pair (low, high) in schedule units, got {t_range!r}")
    low, high = schedule.t_range
    lo, hi = check_time_values(fn, schedule, list(t_range), name=name)
    if not lo <= hi:
        raise ValueError(f"{fn}: {name} must satisfy {low} <= low <= high <= {high}, got {tuple(t_range)}")
    return lo, hi


def _distance(fn: str, distance: Distance, a: Tensor, b: Tensor) -> Tensor:
    if callable(distance):
        d = distance(a, b)
        if d.shape != (a.shape[0],):
            raise ValueError(
                f"{fn}: the distance callable must return shape ({a.shape[0]},), got {tuple(d.shape)}"
            )
        return d
    check_choice(fn, "distance", distance, DISTANCES)
    dtype = torch.promote_types(a.dtype, torch.float32)  # low precision inputs: square in fp32
    sq = (a.to(dtype) - b.to(dtype)).square()
    return per_sample_mean(sq) if distance == "l2" else sq.flatten(1).sum(1)


def _nfsd_target(
    fn: str,
    teacher: Any,
    x_t: Tensor,
    t: Tensor,
    student_x0: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    *,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    negative_cond: Mapping[str, Any] | None,
    guidance_scale: float,
    threshold: float,
) -> Tensor:
    if uncond is None or negative_cond is None:
        raise ValueError(
            f"{fn}: weighting='nfsd' needs uncond=... (the null prompt) and negative_cond=... "
            f"(a negative prompt), got uncond={'set' if uncond else None}, "
            f"negative_cond={'set' if negative_cond else None}"
        )
    eps_c = teacher.predict(x_t, t, target="eps", **cond)
    eps_u = teacher.predict(x_t, t, target="eps", **uncond)
    eps_n = teacher.predict(x_t, t, target="eps", **negative_cond)
    delta_c = eps_c - eps_u
    small_t = (t < threshold).reshape(-1, *([1] * (x_t.ndim - 1)))
    delta_d = torch.where(small_t, eps_u, eps_u - eps_n)
    direction = delta_d + guidance_scale * delta_c
    return student_x0.detach() - (sigma / alpha) * direction


def distillation_loss(
    student_x0: Tensor,
    teacher: Teacher,
    t: Tensor,
    noise: Tensor,
    *,
    schedule: Schedule | None = None,
    weighting: Weighting = "exponential",
    sds_weight: Callable[[Tensor, Tensor], Tensor] | None = None,
    distance: Distance = "l2",
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    negative_cond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    nfsd_threshold: float | None = None,
    space: Literal["latent", "pixel"] = "latent",
    decode: Callable[[Tensor], Tensor] | None = None,
    decoded_student: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""ADD's distillation loss $c(t)\, d(\hat x_\theta, \mathrm{sg}(\hat x_\psi))$.

    The student sample is re-noised, $x_t = \alpha_t \hat x_\theta + \sigma_t \epsilon'$
    (detached: no gradient flows through the teacher or its input), the teacher predicts
    $\hat x_\psi(x_t; t)$ with classifier-free guidance if ``guidance_scale != 1``, and the
    student is regressed onto that target.

    ``weighting="nfsd"`` replaces the guided prediction by the noise-free direction
    $\delta = \delta_D + s\,\delta_C$, $\delta_C = \hat\epsilon(x_t; y) - \hat\epsilon(x_t; \varnothing)$,
    $\delta_D = \hat\epsilon(x_t; \varnothing)$ for $t <$ ``nfsd_threshold`` and
    $\hat\epsilon(x_t; \varnothing) - \hat\epsilon(x_t; y_\text{neg})$ otherwise, through the
    target $\mathrm{sg}(\hat x_\theta) - (\sigma_t/\alpha_t)\,\delta$ with the SDS weight, so
    the gradient is $w(t)\,\delta$. How ADD wires NFSD into its loss is not published; this
    is the construction that reproduces NFSD's gradient exactly.

    For latent models ADD measures $d$ in pixel space: ``space="pixel"`` decodes both
    estimates with ``decode`` (the student's with gradient). The SDS identity then holds
    only to first order in the decoder.

    Args:
        student_x0: the student's clean estimate $\hat x_\theta$ ``[B, ...]`` (with grad).
        teacher: a [`WrappedDenoiser`][addkit.denoisers.WrappedDenoiser] (anything with
            ``predict(x_t, t, target=..., guidance_scale=..., uncond=..., **cond)``).
        t: teacher timesteps ``[B]`` (see
            [`sample_distillation_timesteps`][addkit.losses.distillation.sample_distillation_timesteps]).
        noise: the re-noising noise $\epsilon'$, shape of ``student_x0``.
        schedule: the teacher's schedule (default: ``teacher.schedule``).
        weighting: ``"exponential"``, ``"sds"``, ``"nfsd"`` or ``c(t, alpha, sigma) -> [B]``.
        sds_weight: $w(\alpha_t, \sigma_t)$ for SDS/NFSD weighting (default $\sigma_t^2$).
        distance: ``"l2"`` (squared error, mean over elements), ``"l2_sum"`` (sum over
            elements: the SDS identity's form) or ``d(student, target) -> [B]``.
        cond: teacher conditioning (keyword arguments of the model).
        uncond: unconditional conditioning (CFG and NFSD).
        negative_cond: negative-prompt conditioning (NFSD only).
        guidance_scale: teacher CFG scale (1 = off), NFSD's $s$ for ``"nfsd"``.
        nfsd_threshold: NFSD's switch time (default 200 on a 1000-step schedule, 0.2 for
            flow).
        space: ``"latent"`` (compare as given) or ``"pixel"`` (decode first).
        decode: latents ``->`` images, required for ``space="pixel"``.
        decoded_student: ``decode(student_x0)`` if you already have it (with its graph),
            e.g. from the discriminator's input; saves a decoder pass.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.

    Returns:
        The weighted loss: a scalar, or ``[B]`` for ``reduction="none"``.

    Raises:
        ValueError: for mismatched shapes, an unknown weighting/distance/space, ``t`` out of
            the schedule's range, missing conditioning for CFG/NFSD, or ``space="pixel"``
            without ``decode``.
        TypeError: for non-floating inputs.

    Examples:
        >>> from addkit import VPSchedule, wrap
        >>> s = VPSchedule.scaled_linear()
        >>> teacher = wrap(lambda x, t: torch.zeros_like(x), s, "eps")
        >>> x0 = torch.randn(2, 4, requires_grad=True)
        >>> loss = distillation_loss(x0, teacher, torch.tensor([100, 900]), torch.randn(2, 4))
        >>> loss.backward(); x0.grad.shape
        torch.Size([2, 4])
    """
    fn = "distillation_loss"
    check_floating(fn, "student_x0", student_x0)
    check_batch(fn, "student_x0", student_x0)
    check_floating(fn, "noise", noise)
    check_same_shape(fn, "student_x0", student_x0, "noise", noise)
    check_guidance_scale(fn, "guidance_scale", guidance_scale)
    check_finite_inputs(fn, student_x0=student_x0, noise=noise)
    check_choice(fn, "space", space, ("latent", "pixel"))
    if space == "pixel" and decode is None:
        raise ValueError(f"{fn}: space='pixel' needs decode=<latents -> images>, got None")
    schedule = schedule if schedule is not None else getattr(teacher, "schedule", None)
    if schedule is None:
        raise ValueError(f"{fn}: pass schedule=... (the teacher has no .schedule attribute)")
    check_schedule(fn, schedule)
    if not callable(getattr(teacher, "predict", None)):
        raise TypeError(
            f"{fn}: teacher must satisfy addkit.typing.Teacher (a predict(x_t, t, target=..., "
            f"guidance_scale=..., uncond=..., **cond) method, e.g. addkit.wrap(...)), got {type(teacher).__name__}"
        )
    if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] != student_x0.shape[0]:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{fn}: t must be a tensor of shape ({student_x0.shape[0]},), got {got}")
    cond = dict(cond or {})
    dec = decode if space == "pixel" else None
    alpha, sigma = schedule.coefficients(t, student_x0, fn=fn)  # type: ignore[attr-defined]
    c = distillation_weight(weighting, t, alpha.flatten(), sigma.flatten(), sds_weight=sds_weight)
    with torch.no_grad():
        x_t = (alpha * student_x0.detach() + sigma * noise).to(student_x0.dtype)
        if weighting == "nfsd":
            if checking_values() and bool((alpha <= 0).any()):
                raise ValueError(f"{fn}: weighting='nfsd' divides by alpha_t, which is 0 at some t")
            low, high = schedule.t_range
            span = schedule.num_train_timesteps if schedule.is_discrete else high - low
            threshold = nfsd_threshold if nfsd_threshold is not None else low + 0.2 * span
            target = _nfsd_target(
                fn, teacher, x_t, t, student_x0, alpha, sigma, cond=cond, uncond=uncond,
                negative_cond=negative_cond, guidance_scale=guidance_scale, threshold=threshold,
            )
        else:
            target = teacher.predict(
                x_t, t, target="x0", guidance_scale=guidance_scale, uncond=uncond, **cond
            )
        target = target.to(student_x0.dtype)
        if dec is not None:
            target = dec(target)
    student = student_x0
    if dec is not None:
        student = decoded_student if decoded_student is not None else dec(student_x0)
    check_same_shape(fn, "student (as compared)", student, "teacher target", target)
    per_sample = _distance(fn, distance, student, target.detach())
    return reduce_loss(per_sample, reduction, weight=c.to(per_sample.dtype), fn=fn)
