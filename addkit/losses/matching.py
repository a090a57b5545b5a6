r"""DMD2's losses: distribution matching, the fake score's denoising loss, regression.

Distribution matching distillation trains a few-step generator $G$ so that its samples'
distribution matches the teacher's. The gradient of the (reverse) KL between the two noisy
distributions at time $t$ is the difference of their scores; written with clean-sample
estimates of the real score (the frozen teacher, with classifier-free guidance) and the fake
score (a second denoiser trained on the generator's own samples) it reads (DMD2,
with the per-sample normaliser of DMD):

$$ \nabla_{\hat x}\,\mathcal L_\text{DM} = \frac{\hat x_0^\text{fake}(x_t, t) -
   \hat x_0^\text{real}(x_t, t)}{\operatorname{mean}\,|\hat x - \hat x_0^\text{real}(x_t, t)|},
   \qquad x_t = \alpha_t\,\mathrm{sg}(\hat x) + \sigma_t\,\epsilon. $$

References:
    Yin et al., *One-step Diffusion with Distribution Matching Distillation* (DMD), arXiv
    2311.18828 (the distribution matching gradient and its normaliser; the regression loss).
    Yin et al., *Improved Distribution Matching Distillation for Fast Image Synthesis*
    (DMD2), arXiv 2405.14867 (two time-scale update, GAN head, backward simulation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from addkit._checks import (
    check_batch,
    check_broadcasts_to,
    check_finite_inputs,
    check_floating,
    check_number,
    check_same_shape,
)
from addkit._random import randn
from addkit._reduce import per_sample_mean, reduce_loss
from addkit._time import check_schedule
from addkit.losses.distillation import sample_distillation_timesteps
from addkit.parameterization import normalize_prediction
from addkit.typing import Reduction, Schedule, Teacher

__all__ = [
    "NORMALISER_FLOOR",
    "distribution_matching_loss",
    "fake_score_loss",
    "prediction_target",
    "regression_loss",
]

NORMALISER_FLOOR = 1e-6
r"""The floor $\varepsilon$ on the matching normaliser $\operatorname{mean}|\hat x - \hat x_0^\text{real}|$.

Far below that mean for any sample the teacher does not reproduce exactly (data-scale inputs
give values of order 0.1-1); at the floor the gradient is large but finite, and a gradient
clip bounds the step."""


def _noised(
    fn: str,
    x: Tensor,
    schedule: Schedule,
    t: Tensor | None,
    noise: Tensor | None,
    generator: torch.Generator | None,
    *,
    whole_schedule: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, t, noise)`` for a detached ``x``: drawn where not given (DMD2's ranges by default).

    ``t`` is drawn over ``[0.02, 0.98]`` of the schedule (matching), or over all of it with
    ``whole_schedule`` (the fake score's denoising loss).
    """
    if t is None:
        t_range = schedule.t_range if whole_schedule else None
        t = sample_distillation_timesteps(
            x.shape[0], schedule, t_range=t_range, generator=generator, device=x.device
        )
    if noise is None:
        noise = randn(tuple(x.shape), device=x.device, dtype=x.dtype, generator=generator)
    check_same_shape(fn, "x", x, "noise", noise)
    return schedule.add_noise(x.detach(), noise, t), t, noise


def distribution_matching_loss(
    student_x0: Tensor,
    teacher: Teacher,
    fake_score: Teacher,
    *,
    schedule: Schedule,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    fake_cond: Mapping[str, Any] | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""DMD's distribution matching loss: a surrogate whose gradient is the normalised score difference.

    $$ \ell_b = \tfrac12\,\operatorname{mean}_i\big(\hat x_b - \mathrm{sg}(\hat x_b - g_b)\big)_i^2,
       \qquad g_b = \frac{\hat x_{0,b}^\text{fake} - \hat x_{0,b}^\text{real}}
       {\max\big(\operatorname{mean}_{i}\,|\hat x_b - \hat x_{0,b}^\text{real}|_i,\ \varepsilon\big)}, $$

    so $\nabla_{\hat x_b}\ell_b = g_b / N$ for $N$ elements per sample (the normaliser,
    computed per sample over all of its elements, is detached; both scores run without
    gradient). Like every addkit loss it is a mean over each sample's elements, reduced over
    the batch by ``reduction``: with ``"mean"`` the gradient w.r.t. the batch is $g / (BN)$
    and the value $\tfrac12\operatorname{mean}(g^2)$ over every element, exactly DMD2's
    ``loss_dm``, so DMD2's weights of the other terms (its GAN weight) mean what they mean
    there. The floor $\varepsilon$ = ``NORMALISER_FLOOR`` keeps a sample with
    $\hat x = \hat x_0^\text{real}$ finite (DMD2 clears the NaN/inf afterwards instead).

    Args:
        student_x0: the generator's sample $\hat x$ ``[B, ...]`` (with grad).
        teacher: the frozen teacher (real score), any [`Teacher`][addkit.typing.Teacher].
        fake_score: the trainable fake-score denoiser, a [`Teacher`][addkit.typing.Teacher]
            (e.g. ``addkit.wrap(copy_of_teacher_unet, schedule, "eps")``); run without gradient here.
        schedule: the schedule both scores use.
        t: timesteps ``[B]``; default uniform over ``[0.02, 0.98]`` of the schedule (DMD2).
        noise: $\epsilon$, shape of ``student_x0``; drawn when ``None``.
        generator: randomness for ``t`` and ``noise``.
        cond: conditioning of both scores (model keyword arguments).
        uncond: unconditional conditioning for the real score's guidance.
        guidance_scale: classifier-free guidance of the real score (DMD2: 8 for SDXL,
            1.75 for SD 1.5); 1 = off.
        fake_cond: the fake score's conditioning, if it differs from ``cond``.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.

    Returns:
        The surrogate loss: a scalar, or ``[B]`` for ``reduction="none"``. Its value is
        $\frac12\operatorname{mean}_i g_i^2$ per sample (DMD2's ``loss_dm``), a diagnostic
        only; its gradient is what matters.

    Raises:
        ValueError: for an empty batch or mismatched shapes; TypeError for non-floating inputs.

    Examples:
        >>> from addkit import VPSchedule, wrap
        >>> s = VPSchedule.scaled_linear()
        >>> real = wrap(lambda x, t: torch.zeros_like(x), s, "x0")
        >>> x = torch.randn(2, 3, requires_grad=True)
        >>> distribution_matching_loss(x, real, real, schedule=s).item()  # equal scores
        0.0

    References:
        DMD, arXiv 2311.18828; DMD2, arXiv 2405.14867.
    """
    fn = "distribution_matching_loss"
    check_floating(fn, "student_x0", student_x0)
    check_batch(fn, "student_x0", student_x0)
    check_finite_inputs(fn, student_x0=student_x0, noise=noise, t=t)
    check_number(fn, "guidance_scale", guidance_scale)
    check_schedule(fn, schedule)
    cond = dict(cond or {})
    with torch.no_grad():
        x_t, t, _ = _noised(fn, student_x0, schedule, t, noise, generator)
        real = teacher.predict(x_t, t, target="x0", guidance_scale=guidance_scale, uncond=uncond, **cond)
        fake = fake_score.predict(x_t, t, target="x0", **dict(fake_cond if fake_cond is not None else cond))
        dtype = torch.promote_types(student_x0.dtype, torch.float32)  # low precision: fp32 maths
        x, real, fake = student_x0.detach().to(dtype), real.to(dtype), fake.to(dtype)
        dims = tuple(range(1, x.ndim))
        normaliser = (x - real).abs().mean(dim=dims, keepdim=True) if dims else (x - real).abs()
        target = x - (fake - real) / normaliser.clamp_min(NORMALISER_FLOOR)
    check_same_shape(fn, "student_x0", student_x0, "the scores' x0", real)
    per_sample = 0.5 * per_sample_mean((student_x0.to(target.dtype) - target).square())
    return reduce_loss(per_sample, reduction, fn=fn)


def prediction_target(prediction: str, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    r"""The regression target of a denoiser trained in ``prediction`` space.

    $\epsilon$ (``"eps"``), $x_0$ (``"x0"``), $v = \alpha_t\epsilon - \sigma_t x_0$ (``"v"``)
    or $u = \epsilon - x_0$ (``"flow"``), for $x_t = \alpha_t x_0 + \sigma_t \epsilon$.

    Args:
        prediction: ``"eps" | "v" | "x0" | "flow"`` (or diffusers' names).
        x0: clean samples ``[B, ...]``.
        noise: $\epsilon$, same shape.
        alpha: $\alpha_t$ broadcastable to ``x0``.
        sigma: $\sigma_t$ broadcastable to ``x0``.

    Examples:
        >>> x0, eps = torch.ones(1, 2), torch.zeros(1, 2)
        >>> prediction_target("v", x0, eps, torch.tensor([[0.6]]), torch.tensor([[0.8]]))
        tensor([[-0.8000, -0.8000]])
    """
    fn = "prediction_target"
    name = normalize_prediction(prediction, fn=fn)
    check_same_shape(fn, "x0", check_floating(fn, "x0", x0), "noise", check_floating(fn, "noise", noise))
    check_broadcasts_to(fn, "alpha", alpha, x0, like_name="x0")
    check_broadcasts_to(fn, "sigma", sigma, x0, like_name="x0")
    check_finite_inputs(fn, x0=x0, noise=noise, alpha=alpha, sigma=sigma)
    if name == "eps":
        return noise
    if name == "x0":
        return x0
    if name == "v":
        return alpha * noise - sigma * x0
    return noise - x0


def fake_score_loss(
    student_x0: Tensor,
    fake_score: Teacher,
    *,
    schedule: Schedule,
    prediction: str = "eps",
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""The fake score's denoising loss on the generator's (detached) samples.

    $$ \ell_b = \operatorname{mean}\big\|f_\phi(x_t, t) - y(\hat x_b, \epsilon, t)\big\|^2,
       \qquad x_t = \alpha_t\,\mathrm{sg}(\hat x_b) + \sigma_t\epsilon, $$

    the ordinary diffusion loss in the fake score's own ``prediction`` space
    ([`prediction_target`][addkit.losses.matching.prediction_target]), so the fake score tracks
    the score of the generator's current distribution (DMD2; updated several times per
    generator update).

    Args:
        student_x0: generator samples ``[B, ...]``; detached here.
        fake_score: the trainable fake-score denoiser (a [`Teacher`][addkit.typing.Teacher];
            called as ``predict(x_t, t, target=prediction, **cond)`` with gradients on).
        schedule: its schedule.
        prediction: the space of the loss, the fake score's own prediction type.
        t: timesteps ``[B]``; default uniform over the whole schedule (DMD2: 0-999, where
            the matching loss uses 20-980).
        noise: $\epsilon$; drawn when ``None``.
        generator: randomness for ``t`` and ``noise``.
        cond: the fake score's conditioning.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"``.

    Returns:
        The loss: a scalar, or ``[B]`` for ``reduction="none"``.

    Examples:
        >>> from addkit import VPSchedule, wrap
        >>> s = VPSchedule.scaled_linear()
        >>> net = torch.nn.Linear(3, 3)
        >>> fake = wrap(lambda x, t: net(x), s, "eps")
        >>> fake_score_loss(torch.randn(4, 3), fake, schedule=s).backward()
        >>> net.weight.grad.shape
        torch.Size([3, 3])
    """
    fn = "fake_score_loss"
    check_floating(fn, "student_x0", student_x0)
    check_batch(fn, "student_x0", student_x0)
    check_finite_inputs(fn, student_x0=student_x0, noise=noise, t=t)
    check_schedule(fn, schedule)
    x = student_x0.detach()
    x_t, t, noise = _noised(fn, x, schedule, t, noise, generator, whole_schedule=True)
    alpha, sigma = schedule.coefficients(t, x, fn=fn)
    target = prediction_target(prediction, x, noise, alpha, sigma)
    pred = fake_score.predict(x_t, t, target=normalize_prediction(prediction, fn=fn), **dict(cond or {}))
    check_same_shape(fn, "fake score prediction", pred, "student_x0", x)
    per_sample = per_sample_mean((pred.float() - target.float()).square())
    return reduce_loss(per_sample, reduction, fn=fn)


def regression_loss(
    student_x0: Tensor,
    teacher_x0: Tensor,
    *,
    distance: Callable[[Tensor, Tensor], Tensor] | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""DMD's regression loss on precomputed teacher pairs: $d(G(z), y)$ for the teacher's $y$ from $z$.

    DMD runs the teacher's ODE sampler once offline on fixed noises $z$ and regresses
    the generator's output for the same $z$ onto the result, which anchors the mode coverage;
    DMD2 drops it. DMD uses LPIPS; the default here is the squared L2 per sample (mean over
    elements). Pass ``distance(a, b) -> [B]`` for LPIPS or another metric.

    Args:
        student_x0: the generator's output for the stored noises ``[B, ...]`` (with grad).
        teacher_x0: the teacher's samples for the same noises, same shape.
        distance: ``d(student, teacher) -> [B]``; default squared L2 (mean over elements).
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"``.

    Examples:
        >>> regression_loss(torch.ones(2, 3), torch.zeros(2, 3))
        tensor(1.)
    """
    fn = "regression_loss"
    check_floating(fn, "student_x0", student_x0)
    check_batch(fn, "student_x0", student_x0)
    check_same_shape(fn, "student_x0", student_x0, "teacher_x0", teacher_x0)
    check_finite_inputs(fn, student_x0=student_x0, teacher_x0=teacher_x0)
    target = teacher_x0.detach()
    if distance is None:
        per_sample = per_sample_mean((student_x0.float() - target.float()).square())
    else:
        per_sample = distance(student_x0, target)
        if per_sample.shape != (student_x0.shape[0],):
            raise ValueError(
                f"{fn}: distance must return shape ({student_x0.shape[0]},), got {tuple(per_sample.shape)}"
            )
    return reduce_loss(per_sample, reduction, fn=fn)
