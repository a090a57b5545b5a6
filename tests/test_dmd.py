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
    obj = DMDObjective(teacher, fake, VP, gan_head=head, gan_weight=0.2, gan_d_weight=0.7,
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
