r"""DMDObjective: DMD2's generator and fake-score losses for one step, composed.

$$ \mathcal L_G = \mathcal L_\text{DM}(\hat x_\theta) + \lambda_\text{GAN}\,\mathcal L^G_\text{GAN}(\hat x_\theta)
   \;[+\;\lambda_\text{reg}\,\mathcal L_\text{reg}], \qquad
   \mathcal L_\text{fake} = \mathcal L_\text{denoise}(\mathrm{sg}(\hat x_\theta))
   + \lambda_\text{GAN}^D\,\mathcal L^D_\text{GAN}(x_0, \mathrm{sg}(\hat x_\theta)) $$

Like [`ADDObjective`][addkit.objective.ADDObjective] it owns no optimiser, no backward and no
loop. DMD2 updates the fake score several times per generator update (the two time-scale
rule; DMD2 uses 5), so a loop reads::

    for step in range(steps):
        for _ in range(fake_updates):                       # e.g. 5
            inp = objective.sample_student_inputs(noise(), student=student, **cond)
            with torch.no_grad():
                x0 = student.x0(inp.x_t, inp.t, **cond)
            loss_f, logs = objective.fake_score_loss(x0, real=real_latents(), cond=cond)
            opt_fake.zero_grad(); loss_f.backward(); opt_fake.step()
        inp = objective.sample_student_inputs(noise(), student=student, **cond)
        x0 = student.x0(inp.x_t, inp.t, **cond)
        loss_g, logs = objective.generator_loss(x0, cond=cond, uncond=uncond)
        opt_g.zero_grad(); loss_g.backward(); opt_g.step()

**How DMD2 differs from ADD.** No real data is needed for the generator's loss (the teacher's
score stands in for it; real samples feed only the optional GAN head); an extra network of
the teacher's size (the fake score) is trained and held in memory, unless it is a LoRA on the
teacher's weights; multi-step students train on their own earlier steps (backward
simulation) instead of on noised real samples.

References:
    Yin et al., *Improved Distribution Matching Distillation for Fast Image Synthesis*
    (DMD2), arXiv 2405.14867: the two time-scale update rule, the GAN head on the fake
    score (§4.3), backward simulation for multi-step generators.
    Yin et al., *One-step Diffusion with Distribution Matching Distillation* (DMD), arXiv
    2311.18828 (distribution matching, regression loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from addkit._checks import (
    check_batch,
    check_callable,
    check_choice,
    check_finite_inputs,
    check_floating,
    check_number,
    check_positive,
)
from addkit._random import randint, randn
from addkit._time import check_schedule, check_time_values
from addkit.losses.adversarial_registry import ADVERSARIAL_LOSSES, AdversarialLoss, AdversarialLossName
from addkit.losses.adversarial_registry import adversarial_loss as resolve_adversarial_loss
from addkit.losses.distillation import check_t_range, sample_distillation_timesteps
from addkit.losses.health import discriminator_stats
from addkit.losses.matching import distribution_matching_loss, fake_score_loss, regression_loss
from addkit.objective import StudentInputs
from addkit.parameterization import normalize_prediction
from addkit.sampling import sample
from addkit.typing import Denoiser, Discriminator, Schedule, Teacher

__all__ = ["DMDObjective"]

class DMDObjective:
    r"""DMD2's losses for one generator update and one fake-score update.

    **Student inputs.** ``sample_student_inputs`` picks a student step $k$ uniformly; with
    ``backward_simulation`` (DMD2, default) the input at step $k$ is made by running the
    student's own first $k$ steps from noise without gradient and re-noising its estimate to
    $t_k$ with fresh noise (what the sampler does at inference), so a multi-step student
    trains on the inputs it will see. Step 0 is pure noise.

    **Generator loss.** [`distribution_matching_loss`][addkit.losses.matching.distribution_matching_loss]
    (real score = the teacher with ``guidance_scale``, fake score without guidance) plus
    ``gan_weight`` times the GAN head's generator term, plus ``regression_weight`` times DMD's
    regression loss when a teacher pair is passed.

    **Scales.** Every term is a mean over each sample's elements (token logits for the GAN
    head, summed over heads), averaged over the batch, the convention of all addkit losses.
    The matching term then equals DMD2's ``loss_dm`` (``0.5 * mse(x, x - g)`` averaged over
    every element) in value and gradient, so DMD2's weights carry over: its GAN weight is
    $5\cdot10^{-3}$ for SDXL, $10^{-3}$ for SD 1.5 and $3\cdot10^{-3}$ for ImageNet (the
    default), with $10^{-2}$ on the head's discriminator term; its generator gradient clip
    is 10; its real-score guidance 8 for SDXL and 1.75 for SD 1.5.

    **Timesteps.** The matching loss draws $t$ uniformly over ``dm_t_range`` (DMD2: 20-980),
    the fake score's denoising loss over ``fake_t_range`` (DMD2: 0-999) and the GAN head's
    noise levels over ``gan_t_range`` (DMD2: 0-999), each drawn independently per sample.

    **Fake-score loss.** [`fake_score_loss`][addkit.losses.matching.fake_score_loss] in the
    fake score's ``fake_prediction`` space, plus ``gan_d_weight`` times the GAN head's
    discriminator term on noisy real and fake samples. The GAN head is any
    [`Discriminator`][addkit.typing.Discriminator]; DMD2's is a classifier on the fake score's
    bottleneck features:
    ``ProjectedDiscriminator(TeacherFeatures(fake_unet, schedule, ["mid_block"], channels=[C],
    freeze=False))`` (the features re-noise their input themselves, at the ``t=`` the
    objective passes: uniform over ``gan_t_range``). DMD2 runs the fake UNet for these features
    with the prompt: pass the UNet's conditioning in ``gan_kwargs`` (e.g.
    ``{"encoder_hidden_states": emb, "added_cond_kwargs": added}`` for an SDXL UNet), which
    reaches the feature network's call; ``c_text=`` there conditions the heads. Here the head's
    discriminator term trains the heads only (the features are read without gradient);
    DMD2's code also trains the fake score's encoder through it. The generator term's
    gradient passes through the fake score's network: zero the fake score's gradients
    before its own update (or freeze it during the generator step).

    Args:
        teacher: the frozen teacher (real score), any [`Teacher`][addkit.typing.Teacher].
        fake_score: the trainable fake score, a [`Teacher`][addkit.typing.Teacher], usually
            initialised from the teacher (DMD2), or a LoRA on the teacher's weights.
        schedule: the schedule of teacher, fake score and student.
        guidance_scale: the real score's classifier-free guidance (needs ``uncond``).
        fake_prediction: the fake score's prediction type (the space of its denoising loss).
        dm_t_range: timesteps of the matching loss, in schedule units; default
            ``[0.02, 0.98]`` of the schedule (DMD2: 20-980).
        fake_t_range: timesteps of the fake score's denoising loss; default the whole
            schedule (DMD2: 0-999).
        gan_head: the GAN head, or ``None`` (DMD2 without GAN).
        gan_t_range: the GAN head's noise levels: drawn uniformly over this range (schedule
            units; ``None``: the whole schedule, DMD2's 0-999) and passed to the head as
            ``t=`` (a [`TeacherFeatures`][addkit.discriminators.teacher.TeacherFeatures]
            takes it); ``"head"`` lets the head draw its own (e.g. LADD's logit-normal).
        gan_weight: $\lambda_\text{GAN}$ of the generator term; DMD2's ImageNet value
            (SDXL: $5\cdot10^{-3}$, SD 1.5: $10^{-3}$), meaningful because the matching
            term is on DMD2's scale (see above).
        gan_d_weight: weight of the discriminator term in the fake-score loss.
        gan_loss: ``"non_saturating"`` (DMD2), ``"hinge"`` or any
            [`AdversarialLoss`][addkit.losses.adversarial_registry.AdversarialLoss].
        student_timesteps: the student's timesteps; ``None`` is ``schedule.timesteps(4, "trailing")``.
        backward_simulation: build multi-step inputs from the student's own earlier steps.
        regression_weight: weight of DMD's regression loss (0: DMD2, off).

    Raises:
        ValueError: for an unknown option or a negative weight.
        TypeError: for a schedule, teacher or fake score that does not satisfy its protocol.

    Examples:
        >>> from addkit import VPSchedule, wrap
        >>> s = VPSchedule.scaled_linear()
        >>> teacher = wrap(lambda x, t: torch.zeros_like(x), s, "x0")
        >>> net = torch.nn.Linear(4, 4)
        >>> fake = wrap(lambda x, t: net(x), s, "eps")
        >>> obj = DMDObjective(teacher, fake, s)
        >>> x0 = torch.randn(2, 4, requires_grad=True)
        >>> sorted(obj.generator_loss(x0)[1]), sorted(obj.fake_score_loss(x0)[1])
        (['g/dm', 'g/total'], ['f/denoise', 'f/total'])
    """

    def __init__(
        self,
        teacher: Teacher,
        fake_score: Teacher,
        schedule: Schedule,
        *,
        guidance_scale: float = 1.0,
        fake_prediction: str = "eps",
        dm_t_range: tuple[float, float] | None = None,
        fake_t_range: tuple[float, float] | None = None,
        gan_head: Discriminator | None = None,
        gan_t_range: tuple[float, float] | Literal["head"] | None = None,
        gan_weight: float = 3e-3,
        gan_d_weight: float = 1e-2,
        gan_loss: AdversarialLossName | AdversarialLoss = "non_saturating",
        student_timesteps: Sequence[float] | None = None,
        backward_simulation: bool = True,
        regression_weight: float = 0.0,
    ) -> None:
        fn = "DMDObjective"
        check_schedule(fn, schedule)
        for name, obj in (("teacher", teacher), ("fake_score", fake_score)):
            if not callable(getattr(obj, "predict", None)):
                raise TypeError(
                    f"{fn}: {name} must satisfy addkit.typing.Teacher (predict(x_t, t, target=..., ...), "
                    f"e.g. addkit.wrap(unet, schedule, 'eps')), got {type(obj).__name__}"
                )
        if isinstance(gan_loss, str):
            check_choice(fn, "gan_loss", gan_loss, tuple(ADVERSARIAL_LOSSES))
        check_number(fn, "guidance_scale", guidance_scale)
        if dm_t_range is not None:
            check_t_range(fn, schedule, dm_t_range, name="dm_t_range")
        normalize_prediction(fake_prediction, fn=fn)
        if gan_head is not None:
            check_callable(fn, "gan_head", gan_head, hint=" (images -> logits, e.g. ProjectedDiscriminator)")
        for name, value in (
            ("gan_weight", gan_weight),
            ("gan_d_weight", gan_d_weight),
            ("regression_weight", regression_weight),
        ):
            check_positive(fn, name, value, allow_zero=True)
        self.teacher, self.fake_score, self.schedule = teacher, fake_score, schedule
        self.guidance_scale = guidance_scale
        self.fake_prediction = fake_prediction
        self.dm_t_range = dm_t_range
        self.fake_t_range = _whole_or(fn, schedule, "fake_t_range", fake_t_range)
        self.gan_head = gan_head
        if isinstance(gan_t_range, str):
            check_choice(fn, "gan_t_range", gan_t_range, ("head",))
        else:
            gan_t_range = _whole_or(fn, schedule, "gan_t_range", gan_t_range)
        self.gan_t_range = gan_t_range
        self.gan_weight, self.gan_d_weight = float(gan_weight), float(gan_d_weight)
        gan = resolve_adversarial_loss(gan_loss)
        self.d_loss_fn, self.g_loss_fn = gan.d_loss, gan.g_loss
        self.backward_simulation = bool(backward_simulation)
        self.regression_weight = float(regression_weight)
        if student_timesteps is None:
            student_timesteps = schedule.timesteps(4, "trailing")
        self.student_timesteps = check_time_values(
            fn, schedule, student_timesteps, name="student_timesteps", sequence=True
        )
        if not self.student_timesteps:
            raise ValueError(f"{fn}: student_timesteps must not be empty")

    def __repr__(self) -> str:
        return (
            f"DMDObjective(guidance_scale={self.guidance_scale}, gan={self.gan_head is not None}:"
            f"{self.gan_weight}/{self.gan_d_weight}, student_timesteps={self.student_timesteps}, "
            f"backward_simulation={self.backward_simulation})"
        )

    # -- student inputs ------------------------------------------------------------------------
    def sample_student_inputs(
        self,
        noise: Tensor,
        *,
        student: Denoiser | None = None,
        real: Tensor | None = None,
        step: int | None = None,
        generator: torch.Generator | None = None,
        **cond: Any,
    ) -> StudentInputs:
        """The student's input at a student step $k$ drawn uniformly (or ``step``).

        Args:
            noise: the generator's noise ``[B, ...]`` (the input at step 0).
            student: the student (``x0(x_t, t, **cond)``), needed for backward simulation at
                ``k > 0``.
            real: real samples ``[B, ...]``, used instead of the student's own steps when
                ``backward_simulation=False`` (noised to $t_k$ as in ADD).
            step: the student step $k$; drawn uniformly when ``None`` from ``generator``
                (on a CUDA generator the draw is read back to the host: pass a CPU
                generator to avoid that sync), from the global RNG only without one; a
                one-step student draws nothing.
            generator: randomness for $k$, the re-noising and backward simulation; with
                it the global RNG is left untouched.
            **cond: the student's conditioning for backward simulation.

        Returns:
            [`StudentInputs`][addkit.objective.StudentInputs] with one timestep for the batch.

        Raises:
            ValueError: for a missing ``student`` (or ``real``) where it is needed, or a ``step``
                out of range.
        """
        fn = "DMDObjective.sample_student_inputs"
        check_floating(fn, "noise", noise)
        check_batch(fn, "noise", noise)
        check_finite_inputs(fn, noise=noise, real=real)
        n = len(self.student_timesteps)
        if step is None:
            step = 0 if n == 1 else int(randint(0, n, (), generator=generator, device="cpu"))
        elif isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < n:
            raise ValueError(f"{fn}: step must be an integer in [0, {n - 1}], got {step!r}")
        t = torch.full(
            (noise.shape[0],),
            self.student_timesteps[step],
            dtype=self.schedule.time_dtype,
            device=noise.device,
        )
        pure = torch.full((noise.shape[0],), step == 0, device=noise.device)
        if step == 0:
            return StudentInputs(x_t=noise, t=t, noise=noise, is_pure_noise=pure)
        fresh = randn(tuple(noise.shape), device=noise.device, dtype=noise.dtype, generator=generator)
        if self.backward_simulation:
            if student is None:
                raise ValueError(f"{fn}: backward simulation at step {step} needs student=...")
            with torch.no_grad():
                x0 = sample(
                    student,
                    noise,
                    schedule=self.schedule,
                    timesteps=self.student_timesteps[:step],
                    generator=generator,
                    **cond,
                )
        else:
            if real is None:
                raise ValueError(f"{fn}: backward_simulation=False needs real=... samples to noise")
            x0 = real
        return StudentInputs(x_t=self.schedule.add_noise(x0, fresh, t), t=t, noise=fresh, is_pure_noise=pure)

    # -- generator -----------------------------------------------------------------------------
    def generator_loss(
        self,
        student_x0: Tensor,
        *,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        fake_cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        gan_kwargs: Mapping[str, Any] | None = None,
        regression_pair: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's loss: distribution matching (+ GAN, + regression).

        Args:
            student_x0: the student's samples ``[B, ...]`` (with grad).
            cond: the scores' conditioning (model keyword arguments).
            uncond: unconditional conditioning for the real score's guidance.
            fake_cond: the fake score's conditioning, if it differs from ``cond``.
            generator: randomness for the matching loss's timesteps and noise, and the head.
            gan_kwargs: keyword arguments for the GAN head: ``c_text=`` for its heads and the
                feature network's conditioning (e.g. the fake UNet's ``encoder_hidden_states``);
                a ``t=`` here overrides the drawn noise levels.
            regression_pair: ``(student_x0_of_stored_noise, teacher_x0)`` for DMD's regression
                loss (with ``regression_weight > 0``).

        Returns:
            ``(loss, logs)`` with ``g/dm``, ``g/gan`` (with a head), ``g/regression`` (with a
            pair) and ``g/total``, detached 0-dim tensors.
        """
        dm = distribution_matching_loss(
            student_x0,
            self.teacher,
            self.fake_score,
            schedule=self.schedule,
            t=self._t(student_x0, generator, self.dm_t_range),
            generator=generator,
            cond=cond,
            uncond=uncond,
            guidance_scale=self.guidance_scale,
            fake_cond=fake_cond,
        )
        total, logs = dm, {"g/dm": dm.detach()}
        if self.gan_head is not None and self.gan_weight > 0:
            kw = self._gan_kwargs(student_x0, generator, gan_kwargs)
            logits = self.gan_head(student_x0, per_head=True, generator=generator, **kw)
            gan = self.g_loss_fn(logits)
            total = total + self.gan_weight * gan
            logs["g/gan"] = gan.detach()
        if regression_pair is not None and self.regression_weight > 0:
            reg = regression_loss(*regression_pair)
            total = total + self.regression_weight * reg
            logs["g/regression"] = reg.detach()
        logs["g/total"] = total.detach()
        return total, logs

    # -- fake score ------------------------------------------------------------------------------
    def fake_score_loss(
        self,
        student_x0: Tensor,
        *,
        real: Tensor | None = None,
        cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        gan_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The fake score's loss: denoising on detached student samples (+ the GAN head's term).

        Args:
            student_x0: the student's samples ``[B, ...]`` (detached here).
            real: real samples for the GAN head (same shape); without them the head is not trained.
            cond: the fake score's conditioning.
            generator: randomness for the timesteps, noise and the head.
            gan_kwargs: keyword arguments for the GAN head (as in ``generator_loss``).

        Returns:
            ``(loss, logs)`` with ``f/denoise``, ``f/gan`` (with a head and ``real``; with
            the head's ``f/gan_rank``, ``f/gan_gap`` and the rest of
            [`discriminator_stats`][addkit.losses.health.discriminator_stats]) and ``f/total``.
        """
        fake = student_x0.detach()
        denoise = fake_score_loss(
            fake,
            self.fake_score,
            schedule=self.schedule,
            prediction=self.fake_prediction,
            t=self._t(fake, generator, self.fake_t_range),
            generator=generator,
            cond=cond,
        )
        total, logs = denoise, {"f/denoise": denoise.detach()}
        if self.gan_head is not None and real is not None and self.gan_d_weight > 0:
            real_kw = self._gan_kwargs(real, generator, gan_kwargs)
            fake_kw = self._gan_kwargs(fake, generator, gan_kwargs)
            real_logits = self.gan_head(real.detach(), per_head=True, generator=generator, **real_kw)
            fake_logits = self.gan_head(fake, per_head=True, generator=generator, **fake_kw)
            gan = self.d_loss_fn(real_logits, fake_logits)
            total = total + self.gan_d_weight * gan
            logs["f/gan"] = gan.detach()
            logs.update({f"f/gan_{k}": v for k, v in discriminator_stats(real_logits, fake_logits).items()})
        logs["f/total"] = total.detach()
        return total, logs

    def _t(
        self, like: Tensor, generator: torch.Generator | None, t_range: tuple[float, float] | None
    ) -> Tensor | None:
        """Timesteps ``[B]`` uniform over ``t_range``; ``None`` leaves the loss its default."""
        if t_range is None:
            return None
        return sample_distillation_timesteps(
            like.shape[0], self.schedule, t_range=t_range, generator=generator, device=like.device
        )

    def _gan_kwargs(
        self, like: Tensor, generator: torch.Generator | None, gan_kwargs: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """The head's keyword arguments, with the noise levels ``t=`` drawn unless the head draws them."""
        kw = dict(gan_kwargs or {})
        if self.gan_t_range != "head" and "t" not in kw:
            kw["t"] = self._t(like, generator, self.gan_t_range)  # type: ignore[arg-type]
        return kw


def _whole_or(fn: str, schedule: Schedule, name: str, t_range: Sequence[float] | None) -> tuple[float, float]:
    """``t_range`` checked against the schedule (`check_t_range`); ``None``: the whole schedule."""
    return schedule.t_range if t_range is None else check_t_range(fn, schedule, t_range, name=name)
