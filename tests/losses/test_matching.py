"""DMD2's losses against hand-written formulas and autograd."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from addkit import VPSchedule, wrap
from addkit.losses import distribution_matching_loss, fake_score_loss, prediction_target, regression_loss
from addkit.losses.matching import NORMALISER_FLOOR
from addkit.parameterization import PREDICTIONS, convert
from addkit.schedules import FlowSchedule

VP = VPSchedule.scaled_linear()


def _scores() -> tuple:
    real = wrap(
        lambda x, t: 0.5 * torch.tanh(x) + 1e-3 * t.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)), VP, "x0"
    )
    fake = wrap(lambda x, t: 0.3 * x + 0.1, VP, "x0")
    return real, fake


def test_gradient_is_the_normalised_score_difference() -> None:
    real, fake = _scores()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t, noise = torch.tensor([20, 500, 980]), torch.randn(3, 5, dtype=torch.float64, generator=g)
    loss = distribution_matching_loss(x, real, fake, schedule=VP, t=t, noise=noise, reduction="sum")
    loss.backward()
    # by hand: x_t = alpha x + sigma eps, g = (x0_fake - x0_real) / mean |x - x0_real| per sample
    a, s = VP.coefficients(t, x)
    x_t = a * x.detach() + s * noise
    x0_real, x0_fake = real.x0(x_t, t), fake.x0(x_t, t)
    want = (x0_fake - x0_real) / (x.detach() - x0_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x.grad, want / 5)  # a mean over each sample's 5 elements
    torch.testing.assert_close(loss, 0.5 * want.square().mean(1).sum())
    x.grad = None
    distribution_matching_loss(x, real, fake, schedule=VP, t=t, noise=noise).backward()
    torch.testing.assert_close(x.grad, want / 15)  # "mean" over the batch too


def test_zero_when_the_scores_agree_and_guidance_uses_uncond() -> None:
    real, _ = _scores()
    x = torch.randn(4, 2, 3, requires_grad=True)
    loss = distribution_matching_loss(x, real, real, schedule=VP, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(x.grad) == 0
    # the real score's guidance: x0 = u + s (c - u), through the teacher's CFG
    teacher = wrap(lambda x, t, c: x * c[:, None, None], VP, "x0")
    fake = wrap(lambda x, t, c: torch.zeros_like(x), VP, "x0")
    t, noise = torch.full((4,), 500), torch.randn(4, 2, 3)
    cond, uncond = {"c": torch.full((4,), 2.0)}, {"c": torch.full((4,), 1.0)}
    x.grad = None
    distribution_matching_loss(
        x,
        teacher,
        fake,
        schedule=VP,
        t=t,
        noise=noise,
        cond=cond,
        uncond=uncond,
        guidance_scale=3.0,
        reduction="sum",
    ).backward()
    a, s = VP.coefficients(t, x)
    x_t = a * x.detach() + s * noise
    x0_real = x_t * (1 + 3.0 * (2 - 1))
    want = (0 - x0_real) / (x.detach() - x0_real).abs().flatten(1).mean(1).reshape(-1, 1, 1)
    torch.testing.assert_close(x.grad, want / 6)


def test_value_and_gradient_are_dmd2s_loss_dm() -> None:
    """DMD2's ``loss_dm``: 0.5 * MSE(x, x - g) averaged over every element of the batch."""
    real, fake = _scores()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t, noise = torch.tensor([100, 700]), torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=g)
    loss = distribution_matching_loss(x, real, fake, schedule=VP, t=t, noise=noise)
    (grad,) = torch.autograd.grad(loss, x)
    a, s = VP.coefficients(t, x)
    x_t = a * x.detach() + s * noise
    x0_real, x0_fake = real.x0(x_t, t), fake.x0(x_t, t)
    step = (x0_fake - x0_real) / (x.detach() - x0_real).abs().mean((1, 2, 3), keepdim=True)
    y = x.detach().clone().requires_grad_(True)
    want = 0.5 * torch.nn.functional.mse_loss(y, y.detach() - step, reduction="mean")
    (want_grad,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)


def test_normaliser_floor_keeps_a_sample_on_the_real_estimate_finite() -> None:
    # the real score's estimate is the sample itself: mean |x - x0_real| = 0
    real = wrap(lambda x, t: torch.full_like(x, 0.25), VP, "x0")
    fake = wrap(lambda x, t: torch.full_like(x, 0.75), VP, "x0")
    x = torch.full((2, 3, 4), 0.25, requires_grad=True)
    loss = distribution_matching_loss(x, real, fake, schedule=VP, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(x.grad).all())
    # g = (0.75 - 0.25) / floor per element; the gradient is g / (B N)
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5 / NORMALISER_FLOOR / 24))


def test_fake_score_loss_draws_t_over_the_whole_schedule() -> None:
    seen: list[Tensor] = []
    fake = wrap(lambda x, t: seen.append(t) or torch.zeros_like(x), VP, "eps")
    fake_score_loss(torch.zeros(4000, 1), fake, schedule=VP, generator=torch.Generator().manual_seed(0))
    t = seen[0]
    assert int(t.min()) == 0 and int(t.max()) == 999  # DMD2: 0-999 (matching: 20-980)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", [VP, FlowSchedule(shift=3.0)], ids=["vp", "flow"])
def test_prediction_target_is_the_exact_prediction(prediction: str, schedule) -> None:
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([10, 500, 900]) if schedule.is_discrete else torch.tensor([0.1, 0.5, 0.9])
    a, s = schedule.coefficients(t, x0)
    x_t = a * x0 + s * eps
    target = prediction_target(prediction, x0, eps, a, s)
    torch.testing.assert_close(convert(target, x_t, a, s, source=prediction, target="x0"), x0)
    torch.testing.assert_close(
        convert(target, x_t, a, s, source=prediction, target="eps"), eps, rtol=1e-4, atol=1e-4
    )


def test_fake_score_loss_is_the_denoising_loss_and_trains_the_fake_only() -> None:
    net = nn.Linear(4, 4)
    fake = wrap(lambda x, t: net(x), VP, "v")
    x = torch.randn(3, 4, requires_grad=True)
    t, noise = torch.tensor([30, 300, 900]), torch.randn(3, 4)
    loss = fake_score_loss(x, fake, schedule=VP, prediction="v", t=t, noise=noise)
    a, s = VP.coefficients(t, x)
    x_t = a * x.detach() + s * noise
    want = (net(x_t) - (a * noise - s * x.detach())).square().mean(1).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert x.grad is None and net.weight.grad is not None


def test_regression_loss() -> None:
    a, b = torch.ones(2, 3, requires_grad=True), torch.zeros(2, 3)
    torch.testing.assert_close(regression_loss(a, b), torch.tensor(1.0))
    torch.testing.assert_close(
        regression_loss(a, b, distance=lambda u, v: (u - v).abs().sum(1)), torch.tensor(3.0)
    )
    with pytest.raises(ValueError, match=r"regression_loss: distance must return shape \(2,\)"):
        regression_loss(a, b, distance=lambda u, v: (u - v).sum())
    with pytest.raises(ValueError, match="student_x0 and teacher_x0 must have the same shape"):
        regression_loss(a, b[:1])


def test_bad_inputs_name_the_argument() -> None:
    real, fake = _scores()
    with pytest.raises(
        ValueError, match="distribution_matching_loss: student_x0 must have a non-empty batch"
    ):
        distribution_matching_loss(torch.zeros(0, 3), real, fake, schedule=VP)
    with pytest.raises(TypeError, match="fake_score_loss: student_x0 must be a floating-point tensor"):
        fake_score_loss(torch.zeros(2, 3, dtype=torch.long), fake, schedule=VP)
    with pytest.raises(ValueError, match="prediction must be one of"):
        fake_score_loss(torch.zeros(2, 3), fake, schedule=VP, prediction="noise")
