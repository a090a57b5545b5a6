"""Schedules: parity with diffusers, zero-SNR rescale, spacing, properties and errors."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from hypothesis import given
from hypothesis import strategies as st

from addkit.checks import value_checks
from addkit.schedules import FlowSchedule, VPSchedule

SPACINGS = ("trailing", "leading", "linspace")


@pytest.mark.parametrize(
    ("ours", "kwargs"),
    [
        (VPSchedule.scaled_linear(), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        (VPSchedule.linear(), dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
        (VPSchedule.cosine(), dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_alphas_cumprod_match_diffusers(ours: VPSchedule, kwargs: dict) -> None:
    ref = DDPMScheduler(**kwargs).alphas_cumprod.double()  # diffusers computes in float32
    torch.testing.assert_close(ours.alphas_cumprod, ref, rtol=2e-6, atol=1e-6)


def test_scaled_linear_reference_values() -> None:
    # Lin et al. 2023 Table 1: alpha_999 = 0.068265, SNR_999 = 0.004682 for SD's schedule.
    s = VPSchedule.scaled_linear()
    assert float(s.alpha(999)) == pytest.approx(0.068265, abs=1e-6)
    assert float(s.snr(999)) == pytest.approx(0.004682, abs=1e-6)
    assert float(s.alpha(torch.tensor(249))) == pytest.approx(0.82185, abs=1e-5)


def test_zero_snr_rescale_matches_diffusers() -> None:
    s = VPSchedule.scaled_linear()
    z = s.rescale_zero_terminal_snr()
    ref = rescale_zero_terminal_snr(s.betas.clone())  # diffusers' own function, on our betas
    torch.testing.assert_close(z.betas, ref.double(), rtol=1e-12, atol=1e-12)
    assert float(z.alphas_cumprod[-1]) == 0.0
    assert float(z.betas[-1]) == 1.0
    assert float(z.alphas_cumprod[0]) == pytest.approx(float(s.alphas_cumprod[0]), abs=1e-15)
    # alpha-bar of the rescaled SD schedule at t = 249, 499, 749 (Lin et al. 2023, Alg. 1 by hand).
    want = torch.tensor([0.65419, 0.24236, 0.03317], dtype=torch.float64)
    torch.testing.assert_close(z.alphas_cumprod[[249, 499, 749]], want, atol=1e-5, rtol=0)
    # diffusers' DDPM scheduler with the flag gives the same alphas_cumprod.
    d = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    torch.testing.assert_close(z.alphas_cumprod, d.alphas_cumprod.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_match_ddim(spacing: str) -> None:
    s = VPSchedule.scaled_linear()
    for n in range(1, 51):
        ref = DDIMScheduler(timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert s.timesteps(n, spacing) == tuple(ref.timesteps.tolist()), (spacing, n)


def test_timesteps_add_student_set_and_offset() -> None:
    s = VPSchedule.scaled_linear()
    assert s.timesteps(4, "trailing") == (999, 749, 499, 249)
    assert s.timesteps(3) == (999, 666, 332)
    sd = VPSchedule.from_diffusers(DDIMScheduler(steps_offset=1))
    ref = DDIMScheduler(steps_offset=1)
    ref.set_timesteps(4)
    assert sd.timesteps(4, "leading") == tuple(ref.timesteps.tolist()) == (751, 501, 251, 1)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_sigmas_match_diffusers(shift: float) -> None:
    f = FlowSchedule(shift=shift)
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    torch.testing.assert_close(f.sigmas, ref.sigmas.double(), rtol=1e-6, atol=1e-7)
    for n in (1, 2, 4, 7, 28):
        ref.set_timesteps(n)
        ours = f.sigma(torch.tensor(f.timesteps(n, "linspace"), dtype=torch.float64))
        torch.testing.assert_close(ours, ref.sigmas[:-1].double(), rtol=0, atol=1e-7)
        torch.testing.assert_close(1000 * ours, ref.timesteps.double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mu", [-0.3, 0.5, 0.8, 1.15, 1.5])
@pytest.mark.parametrize("n", [1, 2, 4, 7, 28])
def test_flow_dynamic_shift_linspace_matches_diffusers(mu: float, n: int) -> None:
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    f = FlowSchedule.from_diffusers(ref, mu=mu)
    assert f.dynamic and f.shift == pytest.approx(math.exp(mu))
    ref.set_timesteps(n, mu=mu)
    # diffusers spaces the unshifted grid linspace(1, 1/T, n) in dynamic mode, then shifts it once
    ours = f.sigma(torch.tensor(f.timesteps(n, "linspace"), dtype=torch.float64))
    torch.testing.assert_close(ours, ref.sigmas[:-1].double(), rtol=0, atol=1e-7)
    torch.testing.assert_close(1000 * ours, ref.timesteps.double(), rtol=0, atol=1e-4)


def test_flow_dynamic_shift_ends_where_flux_at_1024_ends() -> None:
    # Flux at 1024^2: mu = 1.15, sigma_min = e^mu / (e^mu + 999) = 0.003151
    # (shifting the end point twice, as for a fixed shift, gave 0.00989)
    f = FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), mu=1.15)
    last = float(f.sigma(f.timesteps(4, "linspace")[-1]))
    assert last == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 999), rel=1e-6)
    with pytest.raises(ValueError, match="pass mu"):
        FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


@pytest.mark.parametrize(
    ("option", "value"),
    [("shift_terminal", 0.02), ("invert_sigmas", True), ("use_karras_sigmas", True),
     ("use_exponential_sigmas", True), ("use_beta_sigmas", True)],
)  # fmt: skip
def test_flow_from_diffusers_refuses_options_it_cannot_reproduce(option: str, value: object) -> None:
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, **{option: value})
    ref.set_timesteps(4)  # diffusers' sigmas differ from the plain shift's: ignoring the option is wrong
    plain = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain.set_timesteps(4)
    assert not torch.allclose(ref.sigmas, plain.sigmas)
    message = rf"FlowSchedule.from_diffusers: the scheduler sets {option}={value!r}"
    with pytest.raises(ValueError, match=message):
        FlowSchedule.from_diffusers(ref)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **{option: value})
    with pytest.raises(ValueError, match=rf"sets {option}="):
        FlowSchedule.from_diffusers(dynamic, mu=1.0)


def test_from_diffusers_round_trips() -> None:
    s = VPSchedule.scaled_linear().rescale_zero_terminal_snr()
    for cls in (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler):
        back = VPSchedule.from_diffusers(cls(**s.diffusers_config()))
        torch.testing.assert_close(back.alphas_cumprod, s.alphas_cumprod, rtol=1e-6, atol=1e-7)
    f = FlowSchedule(shift=3.0)
    g = FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert (g.shift, g.num_train_timesteps) == (f.shift, f.num_train_timesteps)
    # from alphas_cumprod only
    a = VPSchedule.from_alphas_cumprod(s.alphas_cumprod)
    torch.testing.assert_close(a.betas, s.betas)


SCHEDULES = [VPSchedule.scaled_linear(), VPSchedule.cosine(), VPSchedule.scaled_linear().rescale_zero_terminal_snr()]


@given(st.integers(0, 999), st.sampled_from(range(len(SCHEDULES))))
def test_vp_alpha_sigma_unit_norm(t: int, k: int) -> None:
    s = SCHEDULES[k]
    assert float(s.alpha(t) ** 2 + s.sigma(t) ** 2) == pytest.approx(1.0, abs=1e-12)


@given(st.integers(0, 998))
def test_sigma_increases_with_t(t: int) -> None:
    for s in SCHEDULES:
        assert float(s.sigma(t + 1)) > float(s.sigma(t))
    f = FlowSchedule(shift=3.0)
    assert float(f.sigma(min((t + 1) / 999, 1.0))) > float(f.sigma(t / 999))


@given(st.floats(0.0, 1.0), st.floats(0.2, 5.0))
def test_flow_alpha_plus_sigma_is_one(t: float, shift: float) -> None:
    f = FlowSchedule(shift=shift)
    assert float(f.alpha(t) + f.sigma(t)) == pytest.approx(1.0, abs=1e-12)


def test_add_noise_zero_noise_and_dtype() -> None:
    s = VPSchedule.scaled_linear()
    x0 = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    out = s.add_noise(x0, torch.zeros_like(x0), t)
    torch.testing.assert_close(out, s.alpha(t).float().view(3, 1, 1, 1) * x0)
    half = s.add_noise(x0.bfloat16(), torch.randn_like(x0).bfloat16(), 10)
    assert half.dtype == torch.bfloat16
    # parity with diffusers' add_noise
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    noise = torch.randn_like(x0)
    torch.testing.assert_close(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    f = FlowSchedule()
    tf = torch.tensor([0.0, 0.3, 1.0])
    torch.testing.assert_close(f.add_noise(x0, noise, tf), (1 - tf.view(3, 1, 1, 1)) * x0 + tf.view(3, 1, 1, 1) * noise)


def test_log_snr() -> None:
    s = VPSchedule.scaled_linear()
    t = torch.tensor([1, 300, 998])
    torch.testing.assert_close(s.log_snr(t), s.snr(t).log())
    assert float(s.rescale_zero_terminal_snr().log_snr(999)) == -math.inf


def test_bad_inputs() -> None:
    s = VPSchedule.scaled_linear()
    with pytest.raises(TypeError, match=r"VPSchedule.alpha: t must be an integer tensor for a discrete schedule"):
        s.alpha(torch.tensor([0.5]))
    with pytest.raises(TypeError, match="t must be integers for a discrete schedule .* got \\(0.5,\\)"):
        s.alpha(0.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\], got \(1000,\)"):
        s.alpha(1000)  # a Python number: checked on the host, always
    with value_checks(), pytest.raises(ValueError, match=r"t must lie in \[0, 999\], got range \[0, 1000\]"):
        s.alpha(torch.tensor([0, 1000]))  # a tensor: its values only under value checks
    with pytest.raises(ValueError, match="spacing must be one of 'trailing', 'leading', 'linspace'; got 'cosine'"):
        s.timesteps(4, "cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 1000\]"):
        s.timesteps(0)
    with pytest.raises(ValueError, match=r"x0 and noise must have the same shape, got \(2, 3\) and \(2, 4\)"):
        s.add_noise(torch.zeros(2, 3), torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\)"):
        s.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"betas must lie in \[0, 1\]"):
        VPSchedule(torch.tensor([0.1, 1.5]))
    f = FlowSchedule()
    with value_checks(), pytest.raises(ValueError, match=r"FlowSchedule.sigma: t must lie in \[0, 1\]"):
        f.sigma(torch.tensor([1.2]))
    with pytest.raises(ValueError, match=r"FlowSchedule.sigma: t must lie in \[0.0, 1.0\], got \(1.2,\)"):
        f.sigma(1.2)
    with pytest.raises(TypeError, match="floating tensor"):
        f.sigma(torch.tensor([1]))
    with pytest.raises(ValueError, match="spacing must be one of 'trailing', 'linspace'"):
        f.timesteps(4, "leading")
    with pytest.raises(ValueError, match="shift must be a finite positive"):
        FlowSchedule(shift=0.0)
