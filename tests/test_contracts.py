"""The contracts between parts: protocols any user object can satisfy, defaults from the
schedule, and a training step and a sampler call that read nothing back from the device."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from addkit import ADDObjective, CUDAGraphSampler, FewStepSampler, FlowSchedule, VPSchedule, sample, wrap
from addkit.checks import value_checks
from addkit.discriminators import ProjectedDiscriminator
from addkit.losses import ApproximateR1, R1Features, R1Images
from addkit.testing import count_host_reads
from addkit.typing import Denoiser, Discriminator, Schedule, Teacher

# -- user-written parts that subclass nothing of addkit --------------------------------------


class CosineSchedule:
    """A continuous-time VP cosine schedule, t in [0, 1], written from the protocol alone."""

    is_discrete = False
    num_train_timesteps = 1000
    time_dtype = torch.float32
    t_range = (0.0, 1.0)

    def alpha(self, t: float | Tensor) -> Tensor:
        return torch.cos(torch.as_tensor(t, dtype=torch.float64) * math.pi / 2)

    def sigma(self, t: float | Tensor) -> Tensor:
        return torch.sin(torch.as_tensor(t, dtype=torch.float64) * math.pi / 2)

    def coefficients(
        self, t: float | Tensor, like: Tensor, *, fn: str | None = None
    ) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64, device=like.device).expand(like.shape[0])
        shape = (-1,) + (1,) * (like.ndim - 1)
        return self.alpha(t).to(like.dtype).reshape(shape), self.sigma(t).to(like.dtype).reshape(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def timesteps(self, n: int, spacing: str = "trailing") -> tuple[float, ...]:
        return tuple((n - i) / n for i in range(n))


class HalfTeacher:
    """A frozen 'teacher' whose clean estimate is half its input."""

    def __init__(self) -> None:
        self.calls: list[Tensor] = []

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
        assert target == "x0" and guidance_scale == 1.0
        self.calls.append(t)
        return 0.5 * x_t

    def x0(self, x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return self.predict(x_t, t, **cond)


class PatchDiscriminator(nn.Module):
    """A frozen patch embedding and one trainable 1x1 head: the Discriminator protocol by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 4, stride=4).requires_grad_(False)
        self.head = nn.Conv1d(8, 1, 1)

    def extract(
        self, images: Tensor, *, generator: torch.Generator | None = None, **kw: Tensor
    ) -> list[Tensor]:
        return [self.backbone(images).flatten(2)]

    def forward(
        self,
        images: Tensor | None = None,
        c_text: Tensor | None = None,
        c_image: Tensor | None = None,
        *,
        features: list[Tensor] | None = None,
        per_head: bool = False,
        generator: torch.Generator | None = None,
        **kw: Tensor,
    ) -> Tensor | list[Tensor]:
        feats = features if features is not None else self.extract(images)  # type: ignore[arg-type]
        logits = [self.head(f).squeeze(1) for f in feats]
        return logits if per_head else torch.cat(logits, 1)


def test_user_parts_satisfy_the_protocols() -> None:
    assert isinstance(CosineSchedule(), Schedule)
    assert isinstance(HalfTeacher(), Teacher) and isinstance(HalfTeacher(), Denoiser)
    assert isinstance(PatchDiscriminator(), Discriminator)
    # and addkit's own parts satisfy them too
    assert isinstance(VPSchedule.scaled_linear(), Schedule) and isinstance(FlowSchedule(), Schedule)
    assert isinstance(wrap(lambda x, t: x, FlowSchedule(), "x0"), Teacher)


@pytest.mark.parametrize("placement", ["features", "images", "approximate"])
def test_add_step_with_user_written_schedule_teacher_discriminator(placement: str) -> None:
    schedule, teacher, D = CosineSchedule(), HalfTeacher(), PatchDiscriminator()
    student = nn.Conv2d(3, 3, 3, padding=1)
    obj = ADDObjective(teacher, D, schedule, r1_placement=placement)
    assert obj.student_timesteps.tolist() == [1.0, 0.75, 0.5, 0.25]  # from schedule.timesteps(4)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    inp = obj.sample_student_inputs(real, generator=g)
    assert inp.t.dtype == torch.float32
    x0 = student(inp.x_t)
    loss_g, _ = obj.generator_loss(x0, student_t=inp.t, generator=g)
    loss_g.backward()
    assert student.weight.grad is not None and torch.isfinite(student.weight.grad).all()
    assert teacher.calls and teacher.calls[0].dtype == torch.float32  # teacher times from the schedule
    loss_d, logs = obj.discriminator_loss(real, x0.detach(), student_t=inp.t, step=0, generator=g)
    loss_d.backward()
    assert "d/r1" in logs and float(logs["d/r1"]) > 0
    assert D.head.weight.grad is not None and D.backbone.weight.grad is None


def test_sampler_with_user_written_schedule_and_denoiser() -> None:
    noise = torch.randn(2, 3, 8, 8)
    out = sample(HalfTeacher(), noise, schedule=CosineSchedule(), generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_inconsistent_user_schedule_is_refused_at_the_boundary() -> None:
    class Bad(CosineSchedule):
        time_dtype = torch.long  # says integer time but is_discrete=False

    with pytest.raises(TypeError, match=r"ADDObjective: schedule.time_dtype must be a floating torch.dtype"):
        ADDObjective(HalfTeacher(), PatchDiscriminator(), Bad())

    class Partial:
        is_discrete = False

        def alpha(self, t: Tensor) -> Tensor:
            return t

    with pytest.raises(
        TypeError, match=r"sample: schedule must satisfy addkit.typing.Schedule .* without sigma"
    ):
        sample(HalfTeacher(), torch.randn(1, 2), schedule=Partial())


# -- defaults from the schedule ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [(VPSchedule.scaled_linear(), (999, 749, 499, 249)), (FlowSchedule(shift=3.0), (1.0, 0.75, 0.5, 0.25))],
)
def test_default_student_timesteps_come_from_the_schedule(schedule: Schedule, expected: tuple) -> None:
    d = wrap(lambda x, t: 0.5 * x, schedule, "x0")
    assert FewStepSampler(d, schedule=schedule).timesteps == expected
    assert CUDAGraphSampler(d, schedule=schedule).timesteps == expected
    assert tuple(ADDObjective(d, None, schedule, adversarial_weight=0).student_timesteps.tolist()) == expected
    seen: list[Tensor] = []
    sample(d, torch.randn(2, 3), schedule=schedule, callback=lambda i, t, x_t, x0: seen.append(t))
    assert tuple(seen) == expected


def test_flow_schedule_samples_and_trains_with_all_defaults() -> None:
    schedule = FlowSchedule()
    net = nn.Conv2d(3, 3, 3, padding=1)
    student = wrap(lambda x, t: net(x), schedule, "flow")
    teacher = wrap(lambda x, t: 0.1 * x, schedule, "flow")
    obj = ADDObjective(teacher, PatchDiscriminator(), schedule)
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    inp = obj.sample_student_inputs(real)
    assert torch.equal(inp.x_t[inp.is_pure_noise], inp.noise[inp.is_pure_noise])
    loss_g, _ = obj.generator_loss(student.x0(inp.x_t, inp.t), student_t=inp.t)
    loss_g.backward()
    assert torch.isfinite(net.weight.grad).all()
    loss_d, _ = obj.discriminator_loss(real, student.x0(inp.x_t, inp.t).detach(), step=0)
    assert torch.isfinite(loss_d)
    out = sample(student, torch.randn(2, 3, 16, 16), schedule=schedule)
    assert torch.isfinite(out).all()


# -- no host reads in the hot path ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_add() -> dict:
    pytest.importorskip("diffusers")
    pytest.importorskip("timm")
    from addkit.testing import tiny_dinov2_kwargs, tiny_sdxl_unet, tiny_vae

    schedule = VPSchedule.scaled_linear()
    vae = tiny_vae().requires_grad_(False)
    D = ProjectedDiscriminator.from_dinov2(**tiny_dinov2_kwargs(), c_text_dim=16)
    objective = ADDObjective(
        wrap(tiny_sdxl_unet(seed=0).requires_grad_(False), schedule, "eps"),
        D,
        schedule,
        decode=lambda z: vae.decode(z).sample.clamp(-1, 1),
        space="pixel",  # ADD: pixel-space distillation, reusing the decoded student image
    )
    B = 2
    cond = {
        "encoder_hidden_states": torch.randn(B, 5, 32),
        "text_embeds": torch.randn(B, 16),
        "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]]).repeat(B, 1),
    }
    return {
        "objective": objective,
        "student": wrap(tiny_sdxl_unet(seed=1), schedule, "eps"),
        "cond": cond,
        "latents": torch.randn(B, 4, 8, 8),
        "images": torch.rand(B, 3, 16, 16) * 2 - 1,
    }


def _add_step(parts: dict, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One generator + discriminator step (R1 on features, pixel distillation), backward included."""
    obj, student, cond = parts["objective"], parts["student"], parts["cond"]
    c_text = cond["text_embeds"]
    inp = obj.sample_student_inputs(parts["latents"], generator=generator)
    x0 = student.x0(inp.x_t, inp.t, **cond)
    loss_g, _ = obj.generator_loss(x0, teacher_cond=cond, c_text=c_text, student_t=inp.t, generator=generator)
    loss_g.backward()
    with torch.no_grad():
        fake = obj.discriminator_input(x0.detach())
    loss_d, logs = obj.discriminator_loss(
        parts["images"], fake, c_text=c_text, student_t=inp.t, step=0, generator=generator
    )
    loss_d.backward()
    assert "d/r1" in logs  # R1 on the heads' inputs ran
    return loss_g.detach(), loss_d.detach()


def test_add_step_reads_nothing_back_from_the_device(tiny_add: dict) -> None:
    g = torch.Generator().manual_seed(0)
    _add_step(tiny_add, g)  # first call: lazy initialisation outside the count
    with count_host_reads() as reads:
        loss_g, loss_d = _add_step(tiny_add, g)
    assert reads.count == 0, reads.summary()
    assert torch.isfinite(loss_g) and torch.isfinite(loss_d)
    with value_checks(), count_host_reads() as checked:
        _add_step(tiny_add, g)
    assert checked.count > 0  # the counter sees the reads that value checks make


def test_non_finite_student_output_flows_into_the_loss(tiny_add: dict) -> None:
    obj, cond = tiny_add["objective"], tiny_add["cond"]
    x0 = torch.full_like(tiny_add["latents"], float("nan"), requires_grad=True)
    t = torch.tensor([999, 249])
    loss_g, _ = obj.generator_loss(x0, teacher_cond=cond, c_text=cond["text_embeds"], student_t=t)
    assert not torch.isfinite(loss_g)  # no exception: the trainer skips the step
    with value_checks(), pytest.raises(ValueError, match="must be finite"):
        obj.generator_loss(x0, teacher_cond=cond, c_text=cond["text_embeds"], student_t=t)


def test_four_step_sample_reads_nothing_back_from_the_device(tiny_add: dict) -> None:
    student, cond = tiny_add["student"], tiny_add["cond"]
    noise = torch.randn_like(tiny_add["latents"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sample(student, noise, schedule=student.schedule, generator=g, **cond)
        with count_host_reads() as reads:
            out = sample(student, noise, schedule=student.schedule, generator=g, **cond)
    assert reads.count == 0, reads.summary()
    assert out.shape == noise.shape


def test_flow_sample_reads_nothing_back_from_the_device() -> None:
    pytest.importorskip("diffusers")
    from addkit.testing import tiny_sd3_transformer

    schedule = FlowSchedule(shift=3.0)
    d = wrap(tiny_sd3_transformer(), schedule, "flow")
    cond = {"encoder_hidden_states": torch.randn(1, 3, 16), "pooled_projections": torch.randn(1, 8)}
    noise = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        sample(d, noise, schedule=schedule, **cond)
        with count_host_reads() as reads:
            sample(d, noise, schedule=schedule, **cond)
    assert reads.count == 0, reads.summary()


# -- the R1 placements are small objects the objective composes --------------------------------


def test_objective_takes_an_r1_object_and_its_default_gamma() -> None:
    D = PatchDiscriminator()
    for reg, gamma in ((R1Features(), 1e-5), (R1Images(), 1e-5), (ApproximateR1(sigma=0.05), 100.0)):
        obj = ADDObjective(HalfTeacher(), D, CosineSchedule(), r1_placement=reg)
        assert obj.r1 is reg and obj.r1_gamma == gamma
