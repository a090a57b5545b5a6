"""Distillation loss: weightings against hand computations, the SDS identity by autograd."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from addkit.checks import value_checks
from addkit.denoisers import WrappedDenoiser, wrap
from addkit.losses import distillation_loss, distillation_weight, sample_distillation_timesteps
from addkit.schedules import FlowSchedule, VPSchedule

VP = VPSchedule.scaled_linear()


class EpsNet(nn.Module):
    """A small conditional eps-predictor: ``tanh(W x + b(t) + c)``."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim).double()
        self.emb = nn.Embedding(1000, dim).double()

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        h = self.lin(x) + self.emb(t.long())
        return torch.tanh(h + (c if c is not None else 0.0))


def _alpha_sigma(schedule: VPSchedule | FlowSchedule, t: Tensor) -> tuple[Tensor, Tensor]:
    return schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]


@pytest.fixture
def setup() -> tuple[WrappedDenoiser, Tensor, Tensor, Tensor]:
    net = EpsNet()
    teacher = wrap(net, VP, "eps")
    x0 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([20, 150, 400, 700, 980])
    noise = torch.randn(5, 6, dtype=torch.float64)
    return teacher, x0, t, noise


def test_sds_weighting_gives_the_sds_gradient(setup) -> None:
    teacher, x0, t, noise = setup
    loss = distillation_loss(x0, teacher, t, noise, weighting="sds", distance="l2_sum", reduction="sum")
    (grad,) = torch.autograd.grad(loss, x0)
    a, s = _alpha_sigma(VP, t)
    with torch.no_grad():
        eps_hat = teacher.model(a * x0 + s * noise, t)
    w = s.square()  # the default w(t)
    torch.testing.assert_close(grad, w * (eps_hat - noise), rtol=1e-10, atol=1e-12)


def test_sds_identity_holds_for_any_user_w(setup) -> None:
    teacher, x0, t, noise = setup
    loss = distillation_loss(
        x0, teacher, t, noise, weighting="sds", sds_weight=lambda a, s: torch.ones_like(a),
        distance="l2_sum", reduction="sum",
    )
    (grad,) = torch.autograd.grad(loss, x0)
    a, s = _alpha_sigma(VP, t)
    with torch.no_grad():
        eps_hat = teacher.model(a * x0 + s * noise, t)
    torch.testing.assert_close(grad, eps_hat - noise, rtol=1e-9, atol=1e-12)


def test_exponential_weighting_is_alpha_times_mse(setup) -> None:
    teacher, x0, t, noise = setup
    got = distillation_loss(x0, teacher, t, noise, reduction="none")
    a, s = _alpha_sigma(VP, t)
    x_t = a * x0.detach() + s * noise
    target = (x_t - s * teacher.model(x_t, t)) / a
    want = a.squeeze(1) * (x0.detach() - target.detach()).square().mean(1)
    torch.testing.assert_close(got, want)
    assert torch.allclose(distillation_weight("exponential", t, a[:, 0], s[:, 0]), VP.alpha(t))


def test_exponential_weight_table_values() -> None:
    t = torch.tensor([0, 499, 999])
    c = distillation_weight("exponential", t, VP.alpha(t), VP.sigma(t))
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    torch.testing.assert_close(c, abar[t].sqrt())
    assert round(float(c[2]), 6) == 0.068265


def test_nfsd_equals_its_definition(setup) -> None:
    teacher, x0, t, noise = setup
    c, u, n = (torch.randn(5, 6, dtype=torch.float64) for _ in range(3))
    s_cfg = 7.5
    loss = distillation_loss(
        x0, teacher, t, noise, weighting="nfsd", distance="l2_sum", reduction="sum",
        cond={"c": c}, uncond={"c": u}, negative_cond={"c": n}, guidance_scale=s_cfg,
    )
    (grad,) = torch.autograd.grad(loss, x0)
    a, s = _alpha_sigma(VP, t)
    x_t = a * x0.detach() + s * noise
    e_c, e_u, e_n = (teacher.model(x_t, t, k) for k in (c, u, n))
    expected = []
    for i, ti in enumerate(t.tolist()):  # brute force, one sample at a time
        delta_d = e_u[i] if ti < 200 else e_u[i] - e_n[i]
        expected.append(s[i] ** 2 * (delta_d + s_cfg * (e_c[i] - e_u[i])))
    torch.testing.assert_close(grad, torch.stack(expected).detach(), rtol=1e-9, atol=1e-12)


def test_cfg_equals_two_pass_formula(setup) -> None:
    teacher, x0, t, noise = setup
    c, u = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    got = distillation_loss(
        x0, teacher, t, noise, cond={"c": c}, uncond={"c": u}, guidance_scale=4.0, reduction="none"
    )
    a, s = _alpha_sigma(VP, t)
    x_t = a * x0.detach() + s * noise
    e_c, e_u = teacher.model(x_t, t, c), teacher.model(x_t, t, u)
    eps = e_u + 4.0 * (e_c - e_u)
    target = (x_t - s * eps) / a
    want = a[:, 0] * (x0.detach() - target).square().mean(1)
    torch.testing.assert_close(got, want.detach())


def test_teacher_gets_no_gradient_and_does_not_change(setup) -> None:
    teacher, _, t, noise = setup
    student = nn.Linear(6, 6).double()
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    opt = torch.optim.SGD(list(student.parameters()) + list(teacher.model.parameters()), lr=0.1)
    x0 = student(torch.randn(5, 6, dtype=torch.float64))
    distillation_loss(x0, teacher, t, noise, weighting="sds").backward()
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(p.grad is not None for p in student.parameters())
    opt.step()
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _teacher_of(x0_fn, schedule, prediction: str) -> WrappedDenoiser:
    """A network of the given prediction type whose implied x0 is ``x0_fn``."""

    def model(x: Tensor, t: Tensor) -> Tensor:
        a, s = schedule.coefficients(t, x)
        x0 = x0_fn(x, t)
        eps = (x - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0, "flow": eps - x0}[prediction]

    return wrap(model, schedule, prediction)


@pytest.mark.parametrize("schedule", [VP, FlowSchedule(shift=3.0)], ids=["vp", "flow"])
def test_prediction_types_give_the_same_loss(schedule) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=g)
    noise = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=g)
    t = sample_distillation_timesteps(4, schedule, generator=g)

    def oracle(x: Tensor, tt: Tensor) -> Tensor:  # some smooth x0 estimate
        return torch.sin(x) * 0.5

    losses = [
        distillation_loss(x0, _teacher_of(oracle, schedule, p), t, noise, weighting=w, reduction="none")
        for p in ("eps", "v", "x0", "flow")
        for w in ("exponential",)
    ]
    for other in losses[1:]:
        torch.testing.assert_close(other, losses[0], rtol=1e-9, atol=1e-12)


@given(st.integers(20, 980), st.floats(-3, 3))
def test_oracle_teacher_gives_zero_loss(t: int, shift: float) -> None:
    x0 = torch.full((2, 4), shift, dtype=torch.float64)
    teacher = _teacher_of(lambda x, tt: torch.full_like(x, shift), VP, "eps")
    loss = distillation_loss(x0, teacher, torch.tensor([t, t]), torch.randn(2, 4, dtype=torch.float64))
    assert float(loss) == pytest.approx(0.0, abs=1e-18)


def test_pixel_space_decodes_both(setup) -> None:
    teacher, x0, t, noise = setup
    dec = nn.Linear(6, 3).double()
    got = distillation_loss(x0, teacher, t, noise, space="pixel", decode=dec, reduction="none")
    a, s = _alpha_sigma(VP, t)
    x_t = a * x0.detach() + s * noise
    target = (x_t - s * teacher.model(x_t, t)) / a
    want = a[:, 0] * (dec(x0) - dec(target)).square().mean(1)
    torch.testing.assert_close(got, want.detach())
    got.sum().backward()
    assert dec.weight.grad is not None and x0.grad is not None


def test_sample_distillation_timesteps_ranges() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_distillation_timesteps(4000, VP, generator=g)
    assert t.dtype == torch.long and int(t.min()) == 20 and int(t.max()) == 980
    f = sample_distillation_timesteps(4000, FlowSchedule(), generator=g)
    assert f.dtype == torch.float32 and 0.02 <= float(f.min()) and float(f.max()) <= 0.98
    custom = sample_distillation_timesteps(100, VP, t_range=(5, 5), generator=g)
    assert torch.equal(custom, torch.full((100,), 5))
    with pytest.raises(ValueError, match="t_range"):
        sample_distillation_timesteps(4, VP, t_range=(0, 1000))
    with pytest.raises(ValueError, match="batch"):
        sample_distillation_timesteps(0, VP)


def test_callable_weighting_and_distance(setup) -> None:
    teacher, x0, t, noise = setup
    base = distillation_loss(x0, teacher, t, noise, reduction="none", weighting=lambda t, a, s: torch.ones_like(a))
    custom = distillation_loss(
        x0, teacher, t, noise, reduction="none", weighting=lambda t, a, s: 2 * torch.ones_like(a),
        distance=lambda a, b: (a - b).square().mean(1),
    )
    torch.testing.assert_close(custom, 2 * base)


def test_bad_inputs_raise_clear_errors(setup) -> None:
    teacher, x0, t, noise = setup
    with pytest.raises(ValueError, match="student_x0 and noise must have the same shape"):
        distillation_loss(x0, teacher, t, noise[:, :3])
    with pytest.raises(ValueError, match="weighting must be one of"):
        distillation_loss(x0, teacher, t, noise, weighting="sdss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t must be a tensor of shape"):
        distillation_loss(x0, teacher, t[:2], noise)
    with value_checks(), pytest.raises(ValueError, match=r"t must lie in \[0, 999\], got range \[20, 1000\]"):
        distillation_loss(x0, teacher, torch.tensor([20, 150, 400, 700, 1000]), noise)
    with pytest.raises(TypeError, match=r"t must be an integer tensor for a discrete schedule"):
        distillation_loss(x0, teacher, torch.tensor([20.0, 150, 400, 700, 900]), noise)
    with pytest.raises(ValueError, match="needs uncond"):
        distillation_loss(x0, teacher, t, noise, weighting="nfsd")
    with pytest.raises(ValueError, match="needs decode"):
        distillation_loss(x0, teacher, t, noise, space="pixel")
    with pytest.raises(ValueError, match="guidance_scale"):
        distillation_loss(x0, teacher, t, noise, guidance_scale=3.0)
    with pytest.raises(ValueError, match="one weight per sample"):
        distillation_loss(x0, teacher, t, noise, weighting=lambda t, a, s: a[:1])
    sin_teacher = _teacher_of(lambda x, t: torch.sin(x), FlowSchedule(), "x0")
    assert not torch.isfinite(distillation_loss(x0, sin_teacher, torch.zeros(5), noise, weighting="sds"))
    with value_checks(), pytest.raises(ValueError, match="divides by sigma"):
        distillation_loss(x0, sin_teacher, torch.zeros(5), noise, weighting="sds")
    with pytest.raises(TypeError, match="floating-point"):
        distillation_loss(x0.long(), teacher, t, noise)
