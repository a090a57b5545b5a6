"""Inputs that used to give a silently wrong answer (or an error naming no argument) now get a
clear error naming the argument, or documented correct behaviour. Each case is a row of the
fault table in docs/faults.md."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from addkit import ADDObjective, FlowSchedule, VPSchedule, apply_cfg, sample, wrap
from addkit.discriminators import ProjectedDiscriminator, TappedFeatures
from addkit.losses import (
    distillation_loss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    r1_penalty,
    sample_distillation_timesteps,
)

VP = VPSchedule.scaled_linear()


def test_empty_batches_and_zero_tokens_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"hinge_g_loss: fake_logits must hold at least one sample .* got shape \(0, 3\)"
    ):
        hinge_g_loss(torch.zeros(0, 3))
    with pytest.raises(
        ValueError, match=r"hinge_d_loss: real_logits must hold .* one token .* got shape \(2, 0\)"
    ):
        hinge_d_loss(torch.zeros(2, 0), torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"non_saturating_d_loss: real_logits\[1\] must hold"):
        non_saturating_d_loss([torch.zeros(2, 3), torch.zeros(2, 0)], [torch.zeros(2, 3), torch.zeros(2, 0)])
    x = torch.zeros(0, 3, requires_grad=True)
    with pytest.raises(ValueError, match="r1_penalty: real_logits must hold at least one sample"):
        r1_penalty(x.sum(1, keepdim=True), x)
    teacher = wrap(lambda x, t: x, VP, "x0")
    with pytest.raises(ValueError, match=r"distillation_loss: student_x0 must have a non-empty batch"):
        distillation_loss(torch.zeros(0, 4), teacher, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))
    obj = ADDObjective(teacher, None, VP, adversarial_weight=0)
    with pytest.raises(ValueError, match=r"sample_student_inputs: x0 must have a non-empty batch"):
        obj.sample_student_inputs(torch.zeros(0, 4, 8, 8))
    with pytest.raises(ValueError, match=r"sample: noise must have a non-empty batch"):
        sample(teacher, torch.zeros(0, 4), schedule=VP)


def test_float_timesteps_on_a_discrete_schedule_are_refused_not_truncated() -> None:
    calls: list[torch.Tensor] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return x

    d = wrap(net, VP, "x0")
    with pytest.raises(
        TypeError, match=r"WrappedDenoiser.predict: t must be integers for a discrete schedule .*500.7"
    ):
        d.x0(torch.randn(2, 3), 500.7)
    with pytest.raises(TypeError, match=r"ADDObjective: student_timesteps must be integers .*999.5"):
        ADDObjective(d, None, VP, adversarial_weight=0, student_timesteps=[999.5])
    with pytest.raises(TypeError, match=r"t must be an integer tensor for a discrete schedule"):
        d.x0(torch.randn(2, 3), torch.tensor([500.7, 3.0]))
    assert not calls  # checked before the network is called
    with pytest.raises(ValueError, match=r"WrappedDenoiser.predict: t must lie in \[0, 999\], got \(1000,\)"):
        d.x0(torch.randn(2, 3), 1000)
    with pytest.raises(ValueError, match=r"WrappedDenoiser.predict: t must be a scalar or have shape \(2,\)"):
        d.x0(torch.randn(2, 3), torch.tensor([1, 2, 3]))
    assert not calls


def test_distillation_t_range_is_in_schedule_units() -> None:
    with pytest.raises(
        TypeError, match=r"sample_distillation_timesteps: t_range must be integers for a discrete"
    ):
        sample_distillation_timesteps(4, VP, t_range=(0.02, 0.98))
    t = sample_distillation_timesteps(1000, VP, t_range=(20, 980), generator=torch.Generator().manual_seed(0))
    assert int(t.min()) >= 20 and int(t.max()) <= 980
    with pytest.raises(ValueError, match=r"t_range must lie in \[0.0, 1.0\]"):
        sample_distillation_timesteps(4, FlowSchedule(), t_range=(20.0, 980.0))


def test_apply_cfg_refuses_broadcasts_and_bad_rescale_and_is_finite_for_constants() -> None:
    c, u = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(
        ValueError,
        match=r"apply_cfg: cond and uncond must have the same shape, got \(2, 3, 4\) and \(1, 3, 4\)",
    ):
        apply_cfg(c, u[:1], 5.0)
    with pytest.raises(ValueError, match=r"apply_cfg: rescale must be a number in \[0, 1\] .* got 2.0"):
        apply_cfg(c, u, 5.0, rescale=2.0)
    with pytest.raises(ValueError, match=r"apply_cfg: guidance_scale must be a number or have shape \(2,\)"):
        apply_cfg(c, u, torch.tensor([1.0, 2.0, 3.0]))
    const = torch.ones(2, 3, 4)
    out = apply_cfg(const, const, 7.5, rescale=0.7)
    assert torch.equal(out, const)  # nothing to rescale: unchanged, not NaN
    # the rescale itself against the formula of Lin et al. (Alg. 2)
    s, phi = 5.0, 0.7
    g = u + s * (c - u)
    factor = c.std(dim=(1, 2), keepdim=True) / g.std(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(apply_cfg(c, u, s, rescale=phi), phi * g * factor + (1 - phi) * g)


def test_arguments_of_the_wrong_kind_are_named() -> None:
    with pytest.raises(
        TypeError, match=r"WrappedDenoiser: schedule must satisfy addkit.typing.Schedule .* got str"
    ):
        wrap(lambda x, t: x, "vp", "eps")  # type: ignore[arg-type]
    d = wrap(lambda x, t: x, VP, "eps")
    with pytest.raises(
        TypeError,
        match=r"WrappedDenoiser.predict: x_t must be a floating-point tensor, got dtype torch.int64",
    ):
        d.x0(torch.zeros(2, 3, dtype=torch.long), 10)
    with pytest.raises(TypeError, match=r"FlowSchedule: shift must be a number, got str '3'"):
        FlowSchedule(shift="3")  # type: ignore[arg-type]


def test_float16_images_into_a_float32_discriminator_are_cast() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU())
    D = ProjectedDiscriminator(TappedFeatures(net, ["0", "1"], resolution=16), virtual_batch_size=2).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    want = D(images)
    got = D(images.half())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    x = images.half().requires_grad_(True)
    D(x).sum().backward()  # the cast is differentiable: gradients reach the fp16 images
    assert x.grad is not None and x.grad.dtype == torch.float16
