"""Inputs that used to give a silently wrong answer (or an error naming no argument) now get a
clear error naming the argument, or documented correct behaviour. Each case is a row of the
fault table in docs/faults.md."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from addkit import (
    ADDObjective,
    DMDObjective,
    FewStepSampler,
    FlowSchedule,
    VPSchedule,
    apply_cfg,
    sample,
    value_checks,
    wrap,
)
from addkit.discriminators import ProjectedDiscriminator, TappedFeatures, TeacherFeatures
from addkit.losses import (
    ApproximateR1,
    R1Features,
    distillation_loss,
    fake_score_loss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    r1_penalty,
    sample_distillation_timesteps,
)
from addkit.testing import count_host_reads, tiny_dinov2

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


# -- round three: tensor timesteps are range-checked on the device, without a host read --------------


@pytest.mark.parametrize("bad", [-1, 1000], ids=["negative", "T"])
def test_a_tensor_timestep_outside_the_schedule_raises_without_value_checks(bad: int) -> None:
    calls: list[torch.Tensor] = []
    d = wrap(lambda x, t: calls.append(t) or x, VP, "x0")
    t = torch.tensor([10, bad])
    # default path: a device-side assertion, a RuntimeError at once on the CPU, naming t
    message = r"WrappedDenoiser.predict: t must lie in \[0, 999\]"
    with count_host_reads() as reads, pytest.raises(RuntimeError, match=message):
        d.x0(torch.randn(2, 3), t)
    assert reads.count == 0 and not calls
    with pytest.raises(RuntimeError, match=r"VPSchedule.alpha: t must lie in \[0, 999\]"):
        VP.alpha(t)  # a negative index used to read the table from its end
    # under value checks: a ValueError with the values found
    found = rf"t must lie in \[0, 999\], got range \[{min(bad, 10)}, {max(bad, 10)}\]"
    with value_checks(), pytest.raises(ValueError, match=found):
        d.x0(torch.randn(2, 3), t)
    with pytest.raises(RuntimeError, match=r"FlowSchedule.sigma: t must lie in \[0, 1\]"):
        FlowSchedule().sigma(torch.tensor([0.5, -0.1 if bad < 0 else 1.5]))


def test_timesteps_given_as_a_count_are_refused_with_a_hint() -> None:
    d = wrap(lambda x, t: x, VP, "x0")
    hint = r"timesteps must be a sequence of timesteps, got the number 4; for 4 steps pass schedule.timesteps"
    with pytest.raises(TypeError, match=rf"sample: {hint}"):
        sample(d, torch.randn(2, 3), schedule=VP, timesteps=4)
    with pytest.raises(TypeError, match=r"FewStepSampler: timesteps must be a sequence"):
        FewStepSampler(d, schedule=VP, timesteps=4)
    with pytest.raises(TypeError, match=r"ADDObjective: student_timesteps must be a sequence"):
        ADDObjective(d, None, VP, adversarial_weight=0, student_timesteps=4)
    with pytest.raises(TypeError, match=r"DMDObjective: student_timesteps must be a sequence"):
        DMDObjective(d, d, VP, student_timesteps=4)
    assert sample(d, torch.ones(2, 3), schedule=VP, timesteps=[4]).shape == (2, 3)  # one step at t = 4


# -- round three: arguments of the wrong type, range, device or kind fail where they are written ------


class EpsNet(nn.Module):
    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x_t)


def _discriminator() -> ProjectedDiscriminator:
    net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4))
    return ProjectedDiscriminator(TappedFeatures(net, ["0"], resolution=16))


class PerSampleR1:
    """A user R1 placement that forgets to reduce over the batch."""

    default_gamma = 1.0

    def __call__(self, discriminator, real, **kwargs):  # noqa: ANN001, ANN003, ANN204
        logits = discriminator(real, per_head=True)
        return logits, torch.ones(real.shape[0])


D_LATENT = wrap(lambda x, t: x, VP, "x0")

WRONG: dict[str, tuple[type[Exception], str, Callable[[], object]]] = {
    "mu: a string": (
        TypeError, r"FlowSchedule.from_diffusers: mu must be a number, got str",
        lambda: FlowSchedule.from_diffusers(SimpleNamespace(config={"use_dynamic_shifting": True}), mu="5"),
    ),
    "mu for a fixed shift": (
        ValueError, r"mu=0.5 was given but the scheduler has a fixed shift=3.0 .* leave mu out",
        lambda: FlowSchedule.from_diffusers(SimpleNamespace(config={"shift": 3.0}), mu=0.5),
    ),
    "from_diffusers without .config": (
        TypeError, r"FlowSchedule.from_diffusers: scheduler must be a diffusers .* got object",
        lambda: FlowSchedule.from_diffusers(object()),
    ),
    "lambda_distill: None": (
        TypeError, r"ADDObjective: lambda_distill must be a finite non-negative number, got NoneType",
        lambda: ADDObjective(D_LATENT, None, VP, adversarial_weight=0, lambda_distill=None),
    ),
    "sigma: a string": (
        TypeError, r"ApproximateR1: sigma must be a finite positive number, got str",
        lambda: ApproximateR1(sigma="0.01"),
    ),
    "guidance_scale: a string": (
        TypeError, r"ADDObjective: guidance_scale must be a number, got str",
        lambda: ADDObjective(D_LATENT, None, VP, adversarial_weight=0, guidance_scale="7.5"),
    ),
    "guidance_scale: None": (
        TypeError, r"WrappedDenoiser.predict: guidance_scale must be a number, got NoneType",
        lambda: D_LATENT.x0(torch.ones(2, 3), 10, guidance_scale=None),
    ),
    "batch size: a string": (
        TypeError, r"sample_distillation_timesteps: batch must be a positive integer, got str",
        lambda: sample_distillation_timesteps("4", VP),
    ),
    "seed: a string": (
        TypeError, r"addkit.testing: seed must be an int, got str",
        lambda: (pytest.importorskip("timm"), tiny_dinov2(seed="0")),
    ),
    "num_train_timesteps: 0": (
        ValueError, r"VPSchedule.scaled_linear: num_train_timesteps must be a positive integer, got 0",
        lambda: VPSchedule.scaled_linear(0),
    ),
    "num_train_timesteps: -1 (flow)": (
        ValueError, r"FlowSchedule: num_train_timesteps must be a positive integer, got -1",
        lambda: FlowSchedule(num_train_timesteps=-1),
    ),
    "resolution: 0": (
        ValueError, r"TappedFeatures: resolution must be a positive integer, got 0",
        lambda: TappedFeatures(nn.Sequential(nn.Conv2d(3, 8, 4)), ["0"], resolution=0),
    ),
    "mixed devices": (
        ValueError, r"VPSchedule.add_noise: x0 and noise must be on the same device, got cpu and meta",
        lambda: VP.add_noise(torch.ones(2, 3), torch.ones(2, 3, device="meta"), 10),
    ),
    "non-callable discriminator": (
        TypeError, r"ADDObjective: discriminator must be callable, got str",
        lambda: ADDObjective(D_LATENT, "dinov2", VP),
    ),
    "R1 placement as a class": (
        TypeError,
        r"ADDObjective: r1_placement must be an instance, got the class R1Features: pass R1Features\(...\)",
        lambda: ADDObjective(D_LATENT, _discriminator(), VP, r1_placement=R1Features),
    ),
    "R1 placement returning a vector": (
        ValueError,
        r"discriminator_loss: the R1 placement .* must return \(logits, a scalar penalty\), .* \(2,\)",
        lambda: ADDObjective(D_LATENT, _discriminator(), VP, r1_placement=PerSampleR1()).discriminator_loss(
            torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
        ),
    ),
    "wrap of a wrapped denoiser, other prediction": (
        ValueError,
        r"wrap: model is a WrappedDenoiser already, bound to .* prediction='x0'; got .* prediction='eps'",
        lambda: wrap(D_LATENT, VP, "eps"),
    ),
    "wrap of a wrapped denoiser, other schedule": (
        ValueError, r"wrap: model is a WrappedDenoiser already, bound to VPSchedule.* got FlowSchedule",
        lambda: wrap(D_LATENT, FlowSchedule(), "x0"),
    ),
    "wrap of a plain nn.Sequential": (
        TypeError,
        r"wrap: model is a plain nn.Sequential, which takes one input, not \(x_t, t, \*\*cond\)",
        lambda: wrap(nn.Sequential(EpsNet()), VP, "eps"),
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrong_arguments_fail_where_they_are_written(case: str) -> None:
    kind, message, call = WRONG[case]
    with pytest.raises(kind, match=message):
        call()


def test_wrap_returns_a_wrapped_denoiser_unchanged_for_its_own_schedule_and_prediction() -> None:
    assert wrap(D_LATENT, VPSchedule.scaled_linear(), "sample") is D_LATENT  # equal schedule, diffusers' name


def test_a_plain_sequential_holding_a_unet_is_named() -> None:
    pytest.importorskip("diffusers")
    from addkit.testing import tiny_sd_unet

    with pytest.raises(TypeError, match=r"plain nn.Sequential holding a diffusers UNet2DConditionModel"):
        wrap(nn.Sequential(tiny_sd_unet()), VP, "eps")


def test_meta_tensors_flow_through_as_shapes() -> None:
    # shape tracing (the memory estimates build models on meta): no data, no check, a meta result
    d = wrap(lambda x, t: x, VP, "eps")
    out = sample(d, torch.empty(2, 3, device="meta"), schedule=VP)
    assert out.is_meta and out.shape == (2, 3)


def test_float16_inputs_into_float32_scores_and_teacher_features_are_cast() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 2, 8, 8, generator=g)
    fake = wrap(EpsNet(), VP, "eps")
    t, noise = torch.tensor([300, 700]), torch.randn(2, 2, 8, 8, generator=g)
    want = fake_score_loss(x0, fake, schedule=VP, t=t, noise=noise)
    got = fake_score_loss(x0.half(), fake, schedule=VP, t=t, noise=noise.half())
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    assert fake.x0(x0.half(), 500).dtype == torch.float16  # cast in, cast back
    net = EpsNet()
    feats = TeacherFeatures(net, VP, ["conv"], channels=[2], t=500)
    want = feats(x0, noise=noise)[0]
    got = feats(x0.half(), noise=noise.half())[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
