"""ADDObjective: student inputs, composition of the losses, R1 placements, a full step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from addkit.checks import value_checks
from addkit.denoisers import wrap
from addkit.discriminators import DiffAugment, ProjectedDiscriminator, TappedFeatures
from addkit.losses import (
    AdversarialLoss,
    distillation_loss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
    r1_penalty,
)
from addkit.objective import ADDObjective
from addkit.schedules import FlowSchedule, VPSchedule

VP = VPSchedule.scaled_linear()


class Net(nn.Module):
    """A tiny conditional eps-network on ``[B, 2, 8, 8]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.t = nn.Embedding(1000, 2)
        self.c = nn.Linear(4, 2)

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        return self.conv(x) + (self.t(t) + self.c(text))[:, :, None, None]


def _disc(augment: bool = False) -> ProjectedDiscriminator:
    net = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), nn.GELU(), nn.Conv2d(8, 8, 2, stride=2))
    feats = TappedFeatures(net, ["0", "2"], resolution=16)
    return ProjectedDiscriminator(
        feats, c_text_dim=4, c_image_dim=3, augment=DiffAugment() if augment else None, virtual_batch_size=2
    )


def _decode(x: Tensor) -> Tensor:  # latents [B, 2, 8, 8] -> images [B, 3, 16, 16] in [-1, 1]
    up = nn.functional.interpolate(x, scale_factor=2)
    return torch.tanh(torch.cat([up, up[:, :1]], 1))


@pytest.fixture
def parts() -> tuple[nn.Module, nn.Module, ProjectedDiscriminator]:
    teacher = Net().requires_grad_(False)
    return teacher, copy.deepcopy(teacher).requires_grad_(True), _disc()


def test_student_inputs_pure_noise_at_999() -> None:
    obj = ADDObjective(wrap(Net(), VP, "eps"), None, VP, adversarial_weight=0.0)
    x0 = torch.randn(256, 2, 4, 4)
    inp = obj.sample_student_inputs(x0, torch.Generator().manual_seed(0))
    assert set(inp.t.tolist()) == {999, 749, 499, 249}
    pure = inp.t == 999
    assert torch.equal(inp.is_pure_noise, pure)
    assert torch.equal(inp.x_t[pure], inp.noise[pure])  # exactly the noise, no leaked signal
    torch.testing.assert_close(inp.x_t[~pure], VP.add_noise(x0, inp.noise, inp.t)[~pure])
    again = obj.sample_student_inputs(x0, torch.Generator().manual_seed(0))
    assert torch.equal(again.x_t, inp.x_t) and torch.equal(again.t, inp.t)


def test_student_inputs_schedule_mode_and_flow() -> None:
    obj = ADDObjective(wrap(Net(), VP, "eps"), None, VP, adversarial_weight=0.0, terminal="schedule")
    x0 = torch.randn(64, 2, 4, 4)
    inp = obj.sample_student_inputs(x0)
    torch.testing.assert_close(inp.x_t, VP.add_noise(x0, inp.noise, inp.t))
    flow = FlowSchedule(shift=3.0)
    fobj = ADDObjective(wrap(lambda x, t: x, flow, "x0"), None, flow, adversarial_weight=0.0)
    assert fobj.student_timesteps.tolist() == [1.0, 0.75, 0.5, 0.25]
    finp = fobj.sample_student_inputs(x0)
    assert finp.t.dtype == torch.float32
    assert torch.equal(finp.x_t[finp.t == 1.0], finp.noise[finp.t == 1.0])


def test_generator_loss_composes_the_parts(parts) -> None:
    teacher_net, student_net, D = parts
    D.eval()
    teacher = wrap(teacher_net, VP, "eps")
    obj = ADDObjective(
        teacher, D, VP, lambda_distill=2.5, adversarial_weight=0.7, weighting="sds", decode=_decode
    )
    x0, text, c_img = torch.randn(4, 2, 8, 8), torch.randn(4, 4), torch.randn(4, 3)
    inp = obj.sample_student_inputs(x0)
    student_x0 = wrap(student_net, VP, "eps").x0(inp.x_t, inp.t, text=text)
    loss, logs = obj.generator_loss(
        student_x0, teacher_cond={"text": text}, c_text=text, c_image=c_img, student_t=inp.t,
        generator=torch.Generator().manual_seed(3),
    )
    # the same terms by hand, with the same randomness
    g = torch.Generator().manual_seed(3)
    masked = c_img.masked_fill((inp.t == 999)[:, None], 0.0)
    adv = hinge_g_loss(D(_decode(student_x0), text, masked, per_head=True))
    t = torch.randint(20, 981, (4,), generator=g)
    noise = torch.randn(student_x0.shape, generator=g)
    dist = distillation_loss(student_x0, teacher, t, noise, weighting="sds", cond={"text": text})
    torch.testing.assert_close(loss, 0.7 * adv + 2.5 * dist)
    torch.testing.assert_close(logs["g/adv"], adv.detach())
    torch.testing.assert_close(logs["g/distill"], dist.detach())
    assert set(logs) == {"g/adv", "g/logits_fake", "g/distill", "g/total"}
    assert all(not v.requires_grad and v.ndim == 0 for v in logs.values())


def test_image_condition_zeroed_at_pure_noise() -> None:
    seen: list[Tensor] = []

    def spy(x, c_text=None, c_image=None, *, per_head=False, generator=None):
        seen.append(c_image)
        return [x.flatten(1)[:, :2]]

    obj = ADDObjective(wrap(Net(), VP, "eps"), spy, VP, lambda_distill=0.0, r1_gamma=0.0)
    t = torch.tensor([999, 749, 999, 249])
    c_img = torch.ones(4, 3)
    obj.generator_loss(torch.randn(4, 2, 8, 8), c_image=c_img, student_t=t)
    obj.discriminator_loss(torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8), c_image=c_img, student_t=t)
    assert len(seen) == 3  # fake (G), real and fake (D)
    for c in seen:
        assert torch.equal(c[:, 0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    off = ADDObjective(spy and wrap(Net(), VP, "eps"), spy, VP, lambda_distill=0.0,
                       zero_image_cond_at_terminal=False)
    off.generator_loss(torch.randn(4, 2, 8, 8), c_image=c_img, student_t=t)
    assert torch.equal(seen[-1], c_img)


def test_discriminator_loss_hinge_and_r1_on_features(parts) -> None:
    _, _, D = parts
    D.eval()  # spectral norm's power iteration would move between the calls in train mode
    obj = ADDObjective(wrap(Net(), VP, "eps"), D, VP, r1_gamma=0.5, r1_interval=4)
    real, fake = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1
    text = torch.randn(4, 4)
    c_img = torch.randn(4, 3)
    loss, logs = obj.discriminator_loss(real, fake, c_text=text, c_image=c_img, step=8)
    feats = [f.requires_grad_() for f in D.extract(real)]
    real_logits = D.classify(feats, text, c_img, per_head=True)
    fake_logits = D(fake, text, c_img, per_head=True)
    want_adv = hinge_d_loss(real_logits, fake_logits)
    want_r1 = r1_penalty(real_logits, feats)
    torch.testing.assert_close(logs["d/r1"], want_r1.detach())
    torch.testing.assert_close(loss, want_adv + 0.5 * 4 * want_r1)
    loss.backward()
    assert all(p.grad is not None for p in D.heads.parameters())
    assert all(p.grad is None for p in D.features.parameters())
    assert "d/r1" not in obj.discriminator_loss(real, fake, c_text=text, c_image=c_img, step=9)[1]
    with pytest.raises(ValueError, match=r"step is required with interval=4"):
        obj.discriminator_loss(real, fake, c_text=text, c_image=c_img)
    _, lazy_logs = obj.discriminator_loss(real, fake, c_text=text, c_image=c_img, step=9)
    assert "d/r1" not in lazy_logs
    for key in ("d/adv", "d/logits_real", "d/logits_fake", "d/real_acc", "d/fake_acc", "d/total"):
        assert key in logs and torch.isfinite(logs[key])


def test_r1_on_images_matches_r1_penalty_images() -> None:
    D = _disc().eval()
    obj = ADDObjective(wrap(Net(), VP, "eps"), D, VP, r1_placement="images", r1_gamma=1.0)
    real, fake = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    c = {"c_text": torch.randn(2, 4), "c_image": torch.randn(2, 3)}
    _, logs = obj.discriminator_loss(real, fake, **c)
    x = real.clone().requires_grad_()
    want = r1_penalty(D(x, per_head=True, **c), x)
    torch.testing.assert_close(logs["d/r1"], want.detach())


def test_approximate_r1_uses_the_same_augmentation_for_both_calls() -> None:
    D = _disc(augment=True).train()
    c = {"c_text": torch.randn(4, 4), "c_image": torch.randn(4, 3)}
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    tiny = ADDObjective(wrap(Net(), VP, "eps"), D, VP, r1_placement="approximate", r1_sigma=1e-6)
    _, logs = tiny.discriminator_loss(real, real.clone(), generator=torch.Generator().manual_seed(0), **c)
    # with one shared augmentation the perturbation is all that differs: ~ sigma^2 |grad|^2
    assert float(logs["d/r1"]) < 1e-6
    big = ADDObjective(wrap(Net(), VP, "eps"), D, VP, r1_placement="approximate", r1_sigma=0.1)
    _, big_logs = big.discriminator_loss(real, real.clone(), generator=torch.Generator().manual_seed(0), **c)
    assert float(big_logs["d/r1"]) > 1e3 * float(logs["d/r1"])


def test_one_training_step_on_a_tiny_problem(parts) -> None:
    teacher_net, student_net, D = parts
    D.augment = DiffAugment()
    teacher, student = wrap(teacher_net, VP, "eps"), wrap(student_net, VP, "eps")
    obj = ADDObjective(teacher, D, VP, space="pixel", decode=_decode, guidance_scale=3.0, weighting="nfsd")
    opt_g = torch.optim.Adam(student_net.parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x0, text = torch.randn(4, 2, 8, 8).tanh(), torch.randn(4, 4)
    null, neg = torch.zeros(4, 4), -text
    c_img = torch.randn(4, 3)
    before_s = [p.clone() for p in student_net.parameters()]
    before_d = [p.clone() for p in D.parameters()]
    before_t = [p.clone() for p in teacher_net.parameters()]
    inp = obj.sample_student_inputs(x0, g)
    student_x0 = student.x0(inp.x_t, inp.t, text=text)
    loss_g, logs_g = obj.generator_loss(
        student_x0, teacher_cond={"text": text}, teacher_uncond={"text": null}, negative_cond={"text": neg},
        c_text=text, c_image=c_img, student_t=inp.t, generator=g,
    )
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    with torch.no_grad():
        fake = obj.discriminator_input(student_x0.detach())
    loss_d, logs_d = obj.discriminator_loss(
        _decode(x0), fake, c_text=text, c_image=c_img, student_t=inp.t, step=0, generator=g
    )
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    assert torch.isfinite(loss_g) and torch.isfinite(loss_d)
    assert {"g/adv", "g/distill", "g/total"} <= set(logs_g) and {"d/adv", "d/r1", "d/total"} <= set(logs_d)
    assert all(not torch.equal(a, b) for a, b in zip(before_s, student_net.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_d, D.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_t, teacher_net.parameters()))


def test_pixel_space_decodes_the_student_once(parts) -> None:
    teacher_net, student_net, D = parts
    calls = []

    def decode(x: Tensor) -> Tensor:
        calls.append(x.requires_grad)
        return _decode(x)

    obj = ADDObjective(wrap(teacher_net, VP, "eps"), D, VP, space="pixel", decode=decode)
    D.eval()
    student_x0 = torch.randn(2, 2, 8, 8, requires_grad=True)
    obj.generator_loss(student_x0, teacher_cond={"text": torch.randn(2, 4)}, c_text=torch.randn(2, 4),
                       c_image=torch.randn(2, 3))
    assert calls == [True, False]  # the student once (with grad), the teacher target once


def test_distillation_only_and_adversarial_only() -> None:
    teacher = wrap(Net(), VP, "eps")
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    cond = {"teacher_cond": {"text": torch.randn(2, 4)}}
    _, logs = ADDObjective(teacher, None, VP, adversarial_weight=0.0).generator_loss(x, **cond)
    assert set(logs) == {"g/distill", "g/total"}
    D = lambda x, *a, per_head=False, generator=None: [x.flatten(1)[:, :4]]  # noqa: E731
    _, logs = ADDObjective(teacher, D, VP, lambda_distill=0.0).generator_loss(x, **cond)
    assert set(logs) == {"g/adv", "g/logits_fake", "g/total"}


class TwoHeads(nn.Module):
    """A discriminator with a weight to train: two heads on the flattened input."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x: Tensor, *, per_head: bool = False, generator=None) -> list[Tensor]:
        flat = x.flatten(1)
        return [flat[:, :3] * self.w, flat[:, 3:5].sin()]


def _ls_d(real: list[Tensor], fake: list[Tensor]) -> Tensor:  # least-squares GAN, a = 0, b = c = 1
    return sum(((r - 1) ** 2).mean() + (f**2).mean() for r, f in zip(real, fake, strict=True))


def _ls_g(fake: list[Tensor]) -> Tensor:
    return sum(((f - 1) ** 2).mean() for f in fake)


def test_a_user_written_adversarial_loss_is_used() -> None:
    D = TwoHeads()
    pair = AdversarialLoss(_ls_d, _ls_g, name="least_squares")
    obj = ADDObjective(wrap(Net(), VP, "eps"), D, VP, lambda_distill=0.0, adversarial_weight=0.3, r1_gamma=0.0,
                       adversarial_loss=pair)
    x = torch.randn(4, 2, 2, 2, requires_grad=True)
    loss, logs = obj.generator_loss(x)
    loss.backward()
    want = _ls_g(D(x))
    torch.testing.assert_close(logs["g/adv"], want.detach())
    torch.testing.assert_close(loss, 0.3 * want)
    torch.testing.assert_close(x.grad, torch.autograd.grad(0.3 * want, x)[0])
    D.zero_grad()
    real, fake = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    loss, logs = obj.discriminator_loss(real, fake)
    loss.backward()
    want = _ls_d(D(real), D(fake))
    torch.testing.assert_close(logs["d/adv"], want.detach())
    torch.testing.assert_close(D.w.grad, torch.autograd.grad(want, D.w)[0])
    assert not torch.allclose(want, hinge_d_loss(D(real), D(fake)))  # the choice matters here


def test_adversarial_loss_names_pick_the_library_functions() -> None:
    teacher = wrap(Net(), VP, "eps")
    hinge = ADDObjective(teacher, TwoHeads(), VP)
    assert (hinge.d_loss_fn, hinge.g_loss_fn) == (hinge_d_loss, hinge_g_loss)
    ns = ADDObjective(teacher, TwoHeads(), VP, adversarial_loss="non_saturating")
    assert (ns.d_loss_fn, ns.g_loss_fn) == (non_saturating_d_loss, non_saturating_g_loss)


def test_bad_arguments_raise_clear_errors() -> None:
    teacher = wrap(Net(), VP, "eps")
    D = _disc()
    with pytest.raises(ValueError, match="weighting must be one of"):
        ADDObjective(teacher, D, VP, weighting="exp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs decode"):
        ADDObjective(teacher, D, VP, space="pixel")
    with pytest.raises(ValueError, match="adversarial_weight=0"):
        ADDObjective(teacher, None, VP)
    with pytest.raises(ValueError, match="1000|999"):
        ADDObjective(teacher, D, VP, student_timesteps=(1000, 500))
    with pytest.raises(ValueError, match="r1_placement must be one of"):
        ADDObjective(teacher, D, VP, r1_placement="pixels")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lambda_distill"):
        ADDObjective(teacher, D, VP, lambda_distill=-1.0)
    with pytest.raises(ValueError, match="ADDObjective: adversarial_loss must be one of 'hinge', 'non_sat"):
        ADDObjective(teacher, D, VP, adversarial_loss="wgan")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"wrap the pair as AdversarialLoss\(d_loss, g_loss\)"):
        ADDObjective(teacher, D, VP, adversarial_loss=(_ls_d, _ls_g))  # type: ignore[arg-type]
    obj = ADDObjective(teacher, D, VP)
    with pytest.raises(ValueError, match="real and fake must have the same shape"):
        obj.discriminator_loss(torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16))
    with pytest.raises(ValueError, match="student_t must have shape"):
        obj.discriminator_loss(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), c_text=torch.randn(2, 4),
                               c_image=torch.randn(2, 3), student_t=torch.tensor([999]))
    nan_real = torch.full((2, 3, 16, 16), float("nan"))
    loss, _ = obj.discriminator_loss(nan_real, torch.rand(2, 3, 16, 16), c_text=torch.randn(2, 4),
                                     c_image=torch.randn(2, 3))
    assert not torch.isfinite(loss)  # flows into the loss (a trainer skips the step)
    with value_checks(), pytest.raises(ValueError, match="finite"):
        obj.discriminator_loss(nan_real, torch.rand(2, 3, 16, 16), c_text=torch.randn(2, 4),
                               c_image=torch.randn(2, 3))
    with pytest.raises(TypeError, match="floating"):
        obj.sample_student_inputs(torch.zeros(2, 3, dtype=torch.long))


def test_feature_kwargs_reach_the_feature_network() -> None:
    seen: list[dict] = []

    class Spy(nn.Module):
        channels = [2]

        def forward(self, images: Tensor, **kw: Tensor) -> list[Tensor]:
            seen.append(kw)
            return [images.flatten(2)[:, :2]]

    D = ProjectedDiscriminator(Spy(), virtual_batch_size=2).eval()
    obj = ADDObjective(wrap(Net(), VP, "eps"), D, VP, lambda_distill=0.0)
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    kw = {"encoder_hidden_states": torch.ones(2, 3)}
    obj.generator_loss(x, feature_kwargs=kw)
    obj.discriminator_loss(x.detach(), x.detach(), feature_kwargs=kw)
    assert len(seen) == 3 and all(s.keys() == {"encoder_hidden_states"} for s in seen)


def test_discriminator_can_see_latents_while_distillation_decodes(parts) -> None:
    teacher_net, _, _ = parts
    seen: list[tuple[int, ...]] = []

    def D(x, *a, per_head=False, generator=None):
        seen.append(tuple(x.shape))
        return [x.flatten(1)[:, :4]]

    obj = ADDObjective(wrap(teacher_net, VP, "eps"), D, VP, space="pixel", decode=_decode,
                       discriminator_sees="latents")
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    _, logs = obj.generator_loss(x, teacher_cond={"text": torch.randn(2, 4)})
    assert seen == [(2, 2, 8, 8)] and "g/distill" in logs
    assert obj.discriminator_input(x).shape == x.shape
