"""DMDObjective: composition, user-written scores, backward simulation, the GAN head on the fake score."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from addkit import DMDObjective, ProjectedDiscriminator, TeacherFeatures, VPSchedule, sample, wrap
from addkit.losses import (
    AdversarialLoss,
    distribution_matching_loss,
    fake_score_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)

VP = VPSchedule.scaled_linear()


class UserTeacher:
    """A real score written from the Teacher protocol alone (subclasses nothing of addkit)."""

    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        target: str = "x0",
        guidance_scale: float = 1.0,
        uncond: dict | None = None,
        **cond: Tensor,
    ) -> Tensor:
        assert target == "x0"
        return 0.5 * torch.tanh(x_t)


class UserFakeScore(nn.Module):
    """A trainable fake score predicting eps, from the protocol alone."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(2, 2, 3, padding=1)

    def predict(self, x_t: Tensor, t: Tensor, *, target: str = "x0", **cond: Tensor) -> Tensor:
        eps = self.net(x_t)
        a, s = VP.coefficients(t, x_t)
        return eps if target == "eps" else (x_t - s * eps) / a


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(2, 2, 3, padding=1)

    def x0(self, x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return self.net(x_t)


def test_one_step_with_user_written_teacher_and_fake_score() -> None:
    teacher, fake, student = UserTeacher(), UserFakeScore(), Student()
    obj = DMDObjective(teacher, fake, VP)
    assert obj.student_timesteps == (999, 749, 499, 249)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 2, 8, 8, generator=g)
    inp = obj.sample_student_inputs(noise, student=student, step=2, generator=g)
    x0 = student.x0(inp.x_t, inp.t)
    loss_g, logs_g = obj.generator_loss(x0, generator=g)
    loss_g.backward()
    assert student.net.weight.grad is not None and fake.net.weight.grad is None
    loss_f, logs_f = obj.fake_score_loss(x0, generator=g)
    loss_f.backward()
    assert fake.net.weight.grad is not None
    assert set(logs_g) == {"g/dm", "g/total"} and set(logs_f) == {"f/denoise", "f/total"}


def test_losses_equal_the_functions() -> None:
    teacher, fake = UserTeacher(), UserFakeScore()
    obj = DMDObjective(teacher, fake, VP, guidance_scale=1.0)
    x0 = torch.randn(3, 2, 4, 4, requires_grad=True)
    loss, _ = obj.generator_loss(x0, generator=torch.Generator().manual_seed(3))
    want = distribution_matching_loss(
        x0, teacher, fake, schedule=VP, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(loss, want)
    loss, _ = obj.fake_score_loss(x0, generator=torch.Generator().manual_seed(4))
    want = fake_score_loss(
        x0, fake, schedule=VP, prediction="eps", generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(loss, want)


def test_backward_simulation_runs_the_students_own_earlier_steps() -> None:
    student = Student()
    obj = DMDObjective(UserTeacher(), UserFakeScore(), VP)
    noise = torch.randn(2, 2, 4, 4)
    first = obj.sample_student_inputs(noise, student=student, step=0)
    assert torch.equal(first.x_t, noise) and bool(first.is_pure_noise.all())
    inp = obj.sample_student_inputs(
        noise, student=student, step=2, generator=torch.Generator().manual_seed(5)
    )
    # by hand: the fresh noise first, then two student steps (999, 749) from noise, re-noised to 499
    g = torch.Generator().manual_seed(5)
    fresh = torch.randn(noise.shape, generator=g)
    with torch.no_grad():
        x0 = sample(student, noise, schedule=VP, timesteps=(999, 749), generator=g)
    torch.testing.assert_close(inp.x_t, VP.add_noise(x0, fresh, 499))
    assert inp.t.tolist() == [499, 499] and not bool(inp.is_pure_noise.any())
    assert not inp.x_t.requires_grad
    # without backward simulation, real samples are noised instead (as in ADD)
    plain = DMDObjective(UserTeacher(), UserFakeScore(), VP, backward_simulation=False)
    real = torch.randn_like(noise)
    inp = plain.sample_student_inputs(noise, real=real, step=1, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)
    torch.testing.assert_close(inp.x_t, VP.add_noise(real, torch.randn(noise.shape, generator=g), 749))
    with pytest.raises(ValueError, match="backward simulation at step 1 needs student"):
        obj.sample_student_inputs(noise, step=1)
    with pytest.raises(ValueError, match=r"step must be an integer in \[0, 3\], got 4"):
        obj.sample_student_inputs(noise, student=student, step=4)


def test_gan_head_on_the_fake_scores_features() -> None:
    pytest.importorskip("diffusers")
    from addkit.testing import tiny_sd_unet

    unet = tiny_sd_unet(cross_attention_dim=8)
    fake = wrap(unet, VP, "eps")
    feats = TeacherFeatures(
        unet,
        VP,
        ["mid_block"],
        channels=[64],
        freeze=False,
        call=lambda x_t, t: unet(x_t, t, torch.zeros(x_t.shape[0], 1, 8)),
    )
    head = ProjectedDiscriminator(feats, virtual_batch_size=2)
    assert all(p.requires_grad for p in unet.parameters())  # the fake score stays trainable
    assert {n.split(".")[0] for n, _ in head.named_parameters()} == {"heads"}
    teacher = wrap(lambda x, t, **c: 0.5 * torch.tanh(x), VP, "x0")
    obj = DMDObjective(teacher, fake, VP, gan_head=head, gan_weight=0.1, gan_d_weight=0.5)
    cond = {"encoder_hidden_states": torch.zeros(2, 1, 8)}
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss_g, logs = obj.generator_loss(x0, cond=cond, generator=torch.Generator().manual_seed(0))
    loss_g.backward()
    assert "g/gan" in logs and x0.grad is not None and torch.isfinite(x0.grad).all()
    unet.zero_grad(set_to_none=True)
    loss_f, logs = obj.fake_score_loss(
        x0, real=torch.randn(2, 4, 8, 8), cond=cond, generator=torch.Generator().manual_seed(1)
    )
    loss_f.backward()
    assert "f/gan" in logs
    assert all(p.grad is not None for p in head.heads.parameters())
    assert unet.conv_in.weight.grad is not None  # from the denoising loss


class Head(nn.Module):
    """A GAN head with one weight: per-head logits from the flattened sample."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.5, -0.5]))

    def forward(self, x: Tensor, *, per_head: bool = False, generator=None) -> list[Tensor]:
        return [x.flatten(1)[:, :2] * self.w]


def _w_d(real: list[Tensor], fake: list[Tensor]) -> Tensor:  # Wasserstein critic, as a user would write it
    return sum(f.mean() - r.mean() for r, f in zip(real, fake, strict=True))


def _w_g(fake: list[Tensor]) -> Tensor:
    return -sum(f.mean() for f in fake)


def test_a_user_written_gan_loss_is_used() -> None:
    teacher, fake, head = UserTeacher(), UserFakeScore(), Head()
    obj = DMDObjective(teacher, fake, VP, gan_head=head, gan_t_range="head", gan_weight=0.2,
                       gan_d_weight=0.7,
                       gan_loss=AdversarialLoss(_w_d, _w_g, name="wasserstein"))
    x0 = torch.randn(3, 2, 4, 4, requires_grad=True)
    loss, logs = obj.generator_loss(x0, generator=torch.Generator().manual_seed(3))
    gan = _w_g(head(x0))
    torch.testing.assert_close(logs["g/gan"], gan.detach())
    g = torch.Generator().manual_seed(3)
    dm = distribution_matching_loss(x0, teacher, fake, schedule=VP, generator=g)
    torch.testing.assert_close(loss, dm + 0.2 * gan)
    got = torch.autograd.grad(loss, x0)[0]
    torch.testing.assert_close(got, torch.autograd.grad(dm + 0.2 * gan, x0)[0])
    real = torch.randn(3, 2, 4, 4)
    loss, logs = obj.fake_score_loss(x0, real=real, generator=torch.Generator().manual_seed(4))
    gan = _w_d(head(real), head(x0.detach()))
    torch.testing.assert_close(logs["f/gan"], gan.detach())
    want = torch.autograd.grad(0.7 * gan, head.w)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, head.w)[0], want)
    assert not torch.allclose(gan, non_saturating_d_loss(head(real), head(x0.detach())))  # the choice matters


def test_gan_loss_names_pick_the_library_functions() -> None:
    obj = DMDObjective(UserTeacher(), UserFakeScore(), VP)
    assert (obj.d_loss_fn, obj.g_loss_fn) == (non_saturating_d_loss, non_saturating_g_loss)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="DMDObjective: fake_score must satisfy addkit.typing.Teacher"):
        DMDObjective(UserTeacher(), object(), VP)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gan_loss must be one of"):
        DMDObjective(UserTeacher(), UserFakeScore(), VP, gan_loss="wgan")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"wrap the pair as AdversarialLoss\(d_loss, g_loss\)"):
        DMDObjective(UserTeacher(), UserFakeScore(), VP, gan_loss=(_w_d, _w_g))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gan_weight must be a finite non-negative number"):
        DMDObjective(UserTeacher(), UserFakeScore(), VP, gan_weight=-1.0)


class EpsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.conv(x_t)


def test_a_dmd2_step_reads_nothing_back_from_the_device() -> None:
    # wrapped scores see tensor timesteps (range-checked on the device), the GAN head reads the
    # fake score's features at logit-normal noise levels; the student step is given (the recipe draws it)
    from addkit.testing import count_host_reads

    fake_net = EpsNet()
    fake = wrap(fake_net, VP, "eps")
    feats = TeacherFeatures(fake_net, VP, ["conv"], channels=[2], freeze=False)
    obj = DMDObjective(wrap(EpsNet(), VP, "eps"), fake, VP, gan_head=ProjectedDiscriminator(feats))
    student = wrap(EpsNet(), VP, "x0")
    g = torch.Generator().manual_seed(0)

    def step() -> tuple[Tensor, Tensor]:
        noise = torch.randn(2, 2, 8, 8, generator=g)
        inp = obj.sample_student_inputs(noise, student=student, step=2, generator=g)
        x0 = student.x0(inp.x_t, inp.t)
        loss_g, _ = obj.generator_loss(x0, generator=g)
        loss_g.backward()
        loss_f, _ = obj.fake_score_loss(x0, real=torch.randn(2, 2, 8, 8, generator=g), generator=g)
        loss_f.backward()
        return loss_g.detach(), loss_f.detach()

    step()  # lazy initialisation outside the count
    with count_host_reads() as reads:
        loss_g, loss_f = step()
    assert reads.count == 0, reads.summary()
    assert torch.isfinite(loss_g) and torch.isfinite(loss_f)


class RecordingScore:
    """A score whose x0 estimate is ``0.5 tanh(x_t)``; records the timesteps it is called at."""

    def __init__(self) -> None:
        self.seen: list[Tensor] = []

    def predict(self, x_t: Tensor, t: Tensor, *, target: str = "x0", **kw: object) -> Tensor:
        self.seen.append(t)
        a, s = VP.coefficients(t, x_t)
        x0 = 0.5 * torch.tanh(x_t)
        return x0 if target == "x0" else (x_t - a * x0) / s


class RecordingHead(nn.Module):
    """A one-head GAN head ``[B, 1]`` (DMD2's shape); records the keyword arguments it gets."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, 1, 1)
        self.calls: list[dict] = []

    def forward(self, x: Tensor, *, per_head: bool = False, generator=None, **kw: object) -> list[Tensor]:
        self.calls.append(kw)
        return [self.proj(torch.tanh(x)).mean((2, 3))]


def test_each_loss_draws_its_own_timesteps() -> None:
    fake, head = RecordingScore(), RecordingHead(2)
    obj = DMDObjective(UserTeacher(), fake, VP, gan_head=head)
    x0 = torch.randn(3000, 2, 1, 1, requires_grad=True)
    obj.generator_loss(x0, generator=torch.Generator().manual_seed(0))
    dm_t, gan_t = fake.seen[-1], head.calls[-1]["t"]
    assert (int(dm_t.min()), int(dm_t.max())) == (20, 980)  # DMD2's matching range
    assert (int(gan_t.min()), int(gan_t.max())) == (0, 999)  # DMD2's GAN noise levels
    obj.fake_score_loss(x0, generator=torch.Generator().manual_seed(1))
    assert (int(fake.seen[-1].min()), int(fake.seen[-1].max())) == (0, 999)  # DMD2's denoising range
    narrow = DMDObjective(
        UserTeacher(), fake, VP, gan_head=head, fake_t_range=(100, 200), gan_t_range=(300, 400)
    )
    narrow.fake_score_loss(x0, real=x0.detach(), generator=torch.Generator().manual_seed(2))
    assert 100 <= int(fake.seen[-1].min()) and int(fake.seen[-1].max()) <= 200
    real_t, fake_t = head.calls[-2]["t"], head.calls[-1]["t"]
    assert 300 <= int(torch.cat([real_t, fake_t]).min()) and int(torch.cat([real_t, fake_t]).max()) <= 400
    assert not torch.equal(real_t, fake_t)  # drawn per call, per sample
    own = DMDObjective(UserTeacher(), fake, VP, gan_head=head, gan_t_range="head")
    own.generator_loss(x0, generator=torch.Generator().manual_seed(3), gan_kwargs={"c": 1})
    assert head.calls[-1] == {"c": 1}  # the head draws its own noise levels
    with pytest.raises(ValueError, match="gan_t_range must be one of"):
        DMDObjective(UserTeacher(), fake, VP, gan_t_range="logit_normal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fake_t_range must satisfy 0 <= low <= high <= 999, got \(900,"):
        DMDObjective(UserTeacher(), fake, VP, fake_t_range=(900, 100))
    with pytest.raises(ValueError, match="gan_t_range"):
        DMDObjective(UserTeacher(), fake, VP, gan_t_range=(0, 1000))


def test_the_gan_features_get_the_text_conditioning() -> None:
    pytest.importorskip("diffusers")
    from addkit.testing import tiny_sd_unet

    unet = tiny_sd_unet(cross_attention_dim=8)
    seen: list[Tensor] = []

    def call(x_t: Tensor, t: Tensor, encoder_hidden_states: Tensor) -> object:
        seen.append(encoder_hidden_states)
        return unet(x_t, t, encoder_hidden_states)

    feats = TeacherFeatures(unet, VP, ["mid_block"], channels=[64], freeze=False, call=call)
    head = ProjectedDiscriminator(feats, virtual_batch_size=2)
    obj = DMDObjective(UserTeacher(), wrap(unet, VP, "eps"), VP, gan_head=head)
    text = {"encoder_hidden_states": torch.randn(2, 1, 8)}
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    _, logs = obj.generator_loss(x0, cond=text, gan_kwargs=text, generator=torch.Generator().manual_seed(0))
    assert "g/gan" in logs and seen and seen[-1] is text["encoder_hidden_states"]
    seen.clear()
    obj.fake_score_loss(x0, real=torch.randn_like(x0), cond=text, gan_kwargs=text)
    assert len(seen) == 2 and all(e is text["encoder_hidden_states"] for e in seen)  # real and fake


@pytest.mark.parametrize("steps", [1, 4])
def test_sample_student_inputs_leaves_the_global_rng_alone(steps: int) -> None:
    timesteps = VP.timesteps(steps, "trailing")
    obj = DMDObjective(UserTeacher(), UserFakeScore(), VP, student_timesteps=timesteps)
    noise, student = torch.randn(2, 2, 4, 4), Student()
    state = torch.get_rng_state()
    g = torch.Generator().manual_seed(0)
    first = [obj.sample_student_inputs(noise, student=student, generator=g) for _ in range(8)]
    assert torch.equal(torch.get_rng_state(), state)
    g = torch.Generator().manual_seed(0)
    again = [obj.sample_student_inputs(noise, student=student, generator=g) for _ in range(8)]
    assert all(torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t) for a, b in zip(first, again, strict=True))
    if steps == 1:  # a one-step student draws nothing at all, with or without a generator
        obj.sample_student_inputs(noise, student=student)
        assert torch.equal(torch.get_rng_state(), state)
    else:
        assert len({int(inp.t[0]) for inp in first}) > 1  # the step is drawn


def test_gan_share_of_the_generator_gradient_is_dmd2s_on_sdxl_latents() -> None:
    """At the default weights the GAN term moves an SDXL-shaped sample as much, relative to
    matching, as in DMD2's SDXL configuration (0.5 * MSE averaged over every element, plus
    5e-3 * the mean softplus of the head's logits); summing matching over the 4x128x128
    elements would shrink the share 65,536-fold."""
    calls: list[Tensor] = []

    def real_x0(x_t: Tensor, t: Tensor) -> Tensor:
        calls.append(x_t)
        return 0.5 * torch.tanh(x_t)

    def fake_x0(x_t: Tensor, t: Tensor) -> Tensor:
        return 0.4 * torch.tanh(x_t) + 0.05

    teacher, fake = wrap(real_x0, VP, "x0"), wrap(fake_x0, VP, "x0")
    head = RecordingHead(4)
    x = torch.randn(2, 4, 128, 128, generator=torch.Generator().manual_seed(0), requires_grad=True)
    obj = DMDObjective(teacher, fake, VP, gan_head=head)  # the default weights
    (total,) = torch.autograd.grad(obj.generator_loss(x, generator=torch.Generator().manual_seed(1))[0], x)
    dm_only = DMDObjective(teacher, fake, VP)
    (dm,) = torch.autograd.grad(dm_only.generator_loss(x, generator=torch.Generator().manual_seed(1))[0], x)
    share = float((total - dm).norm() / dm.norm())
    # DMD2's SDXL configuration, from its definition, at the same noisy sample
    x_t = calls[-1]
    real, fake_est, xd = real_x0(x_t, x_t), fake_x0(x_t, x_t), x.detach()
    step = (fake_est - real) / (xd - real).abs().mean((1, 2, 3), keepdim=True)
    y = xd.clone().requires_grad_(True)
    (ref_dm,) = torch.autograd.grad(0.5 * nn.functional.mse_loss(y, y.detach() - step), y)
    (ref_gan,) = torch.autograd.grad(5e-3 * nn.functional.softplus(-head(y)[0]).mean(), y)
    torch.testing.assert_close(dm, ref_dm)  # the matching term is DMD2's loss_dm
    ref_share = float(ref_gan.norm() / ref_dm.norm())
    assert 1 / 3 < share / ref_share < 3, (share, ref_share)  # 3e-3 (default) vs SDXL's 5e-3
