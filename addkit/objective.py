r"""ADDObjective: ADD's generator and discriminator losses for one training step.

$$ \mathcal L_G = \lambda_\text{adv}\,\mathcal L^G_\text{adv}(\hat x_\theta)
   + \lambda\,\mathcal L_\text{distill}(\hat x_\theta), \qquad
   \mathcal L_D = \mathcal L^D_\text{adv}(x_0, \mathrm{sg}(\hat x_\theta)) + \gamma\,R_1 $$

with $\lambda = 2.5$ and $\gamma = 10^{-5}$ (ADD §4). The objective composes addkit's parts
(student inputs, [`distillation_loss`][addkit.losses.distillation.distillation_loss], the
adversarial losses, R1) and owns nothing else: no optimiser, no ``.backward()``, no loop.
One step of your trainer reads::

    inp = objective.sample_student_inputs(latents)
    student_x0 = student.x0(inp.x_t, inp.t, **cond)
    loss_g, logs = objective.generator_loss(student_x0, teacher_cond=cond, student_t=inp.t, ...)
    loss_g.backward(); opt_g.step()
    with torch.no_grad():
        fake = objective.discriminator_input(student_x0.detach())
    loss_d, logs = objective.discriminator_loss(real_images, fake, student_t=inp.t, step=step, ...)
    loss_d.backward(); opt_d.step()

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042, §3, §4.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

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
    check_same_shape,
)
from addkit._random import randint, randn
from addkit._time import check_schedule, check_time_values
from addkit.losses._heads import as_heads
from addkit.losses.adversarial_registry import (
    ADVERSARIAL_LOSSES,
    AdversarialLoss,
    AdversarialLossName,
)
from addkit.losses.adversarial_registry import adversarial_loss as resolve_adversarial_loss
from addkit.losses.distillation import (
    DISTANCES,
    Distance,
    Weighting,
    check_t_range,
    distillation_loss,
    sample_distillation_timesteps,
)
from addkit.losses.health import discriminator_stats
from addkit.losses.regularizers import LazyRegularizer, R1Placement, R1Regularizer, r1_regularizer
from addkit.typing import Discriminator, HeadLogits, Schedule, Teacher

__all__ = ["ADDObjective", "R1Placement", "StudentInputs"]

@dataclass(frozen=True)
class StudentInputs:
    """Noised real samples for the student, from [`ADDObjective.sample_student_inputs`][addkit.objective.ADDObjective.sample_student_inputs].

    Attributes:
        x_t: the student's input ``[B, ...]``.
        t: the student timestep of each sample ``[B]`` (``long`` for a discrete schedule).
        noise: the noise used ``[B, ...]``.
        is_pure_noise: ``[B]`` bool, true where ``t`` is the first (largest) student
            timestep and ``x_t`` carries no signal.
    """

    x_t: Tensor
    t: Tensor
    noise: Tensor
    is_pure_noise: Tensor


class ADDObjective:
    r"""ADD's two losses, composed from addkit's parts.

    **Student inputs.** ``sample_student_inputs`` draws $s$ uniformly from
    ``student_timesteps`` and noises real samples with the schedule. ADD enforces zero
    terminal SNR because inference starts from pure noise; with ``terminal="replace"``
    (default) the input at the largest student timestep *is* the noise while the model is
    still told that timestep (what the released eps-prediction Turbo models imply, and
    DMD2's code does). ``terminal="schedule"`` uses the schedule as it is: choose it with a
    zero-terminal-SNR schedule (a rescaled VP schedule with a v/x0 student, or flow).

    **Generator loss.** $\lambda_\text{adv} \mathcal L^G_\text{adv} + \lambda
    \mathcal L_\text{distill}$: the discriminator sees ``discriminator_input(student_x0)``
    (decoded with gradient when ``decode`` is given, as ADD's DINOv2 discriminator sees
    pixels); the distillation loss re-noises the student estimate at a teacher time drawn
    from ``distill_t_range`` (default ``[0.02, 0.98]`` of the schedule; ADD does not state
    its range) and measures the distance in ``space`` (ADD: ``"pixel"`` for latent
    models, reusing the decoded student image).

    **Discriminator loss.** Hinge (or non-saturating) on real and detached fake images in
    two separate discriminator calls, plus $\gamma R_1$ on real images, every
    ``r1_interval`` steps scaled by the interval. ``r1_placement="features"`` (ADD)
    differentiates w.r.t. the frozen features fed to the heads; ``"images"`` is exact and
    runs the double backward through the feature network under the math attention backend; ``"approximate"`` is APT's
    first-order penalty (default $\gamma = 100$, $\sigma = 0.01$). Each placement is a small
    object in [`addkit.losses.regularizers`][addkit.losses.regularizers]
    ([`R1Features`][addkit.losses.regularizers.R1Features],
    [`R1Images`][addkit.losses.regularizers.R1Images],
    [`ApproximateR1`][addkit.losses.regularizers.ApproximateR1]); pass one of them, or your
    own [`R1Regularizer`][addkit.losses.regularizers.R1Regularizer], as ``r1_placement``.
    ``r1_gamma=0`` turns R1 off.

    **Image conditioning.** ADD conditions the discriminator on an embedding of the real
    image the student input came from. At the pure-noise student step that embedding
    carries information the student cannot have, so by default its rows are zeroed there
    (for real and fake alike) when ``student_t`` is passed (our reading; the paper does not
    say how the image embedding is handled at that step).

    **No host synchronisation.** One generator + discriminator step reads no tensor value
    back to the host (checks use metadata; value checks only under
    [`addkit.value_checks`][addkit.checks.value_checks]). A non-finite value anywhere makes
    the returned loss non-finite instead of raising, so your trainer can skip the step
    (``torch.isfinite(loss)``, one read you choose to make). Logs are detached 0-dim tensors;
    call ``.item()`` when you write them.

    Args:
        teacher: the frozen teacher, any [`Teacher`][addkit.typing.Teacher] (e.g. a
            [`WrappedDenoiser`][addkit.denoisers.WrappedDenoiser] from ``wrap``).
        discriminator: any [`Discriminator`][addkit.typing.Discriminator] (called as
            ``D(images, c_text=..., c_image=..., per_head=True, generator=...)``), e.g. a
            [`ProjectedDiscriminator`][addkit.discriminators.projected.ProjectedDiscriminator];
            ``None`` only with ``adversarial_weight=0``. Real and fake are scored in separate
            calls: a discriminator whose outputs depend on the rest of its batch (batch
            normalisation, e.g. ``ProjectedDiscriminator(norm="batch")``) cannot see a fault
            that all fakes share; addkit's default heads normalise each sample alone. Under
            DDP, either wrap it and keep its parameters' ``requires_grad`` fixed (DDP's
            reducer breaks when they are toggled off for the generator step), or leave it
            unwrapped and average its gradients yourself (what ``examples/add_sdxl.py``
            does). R1 on features calls ``extract`` on the wrapped module and the heads through ``forward(features=...)``.
        schedule: the schedule of the student inputs and the teacher (any
            [`Schedule`][addkit.typing.Schedule]).
        lambda_distill: weight $\lambda$ of the distillation loss (ADD: 2.5); 0 turns it off.
        adversarial_weight: weight of the generator's adversarial loss; 0 turns it off.
        weighting: distillation weighting $c(t)$ (``"exponential"``, ``"sds"``, ``"nfsd"``
            or a callable).
        sds_weight: $w(\alpha_t, \sigma_t)$ for SDS/NFSD weighting.
        distance: distillation distance (``"l2"``: mean squared error per sample).
        space: ``"latent"`` or ``"pixel"`` (decode both estimates; needs ``decode``).
        discriminator_sees: ``"decoded"`` (``decode(x0)`` when ``decode`` is given: ADD) or
            ``"latents"`` (``x0`` itself, e.g. a teacher-feature discriminator next to
            pixel-space distillation).
        decode: latents ``->`` images in ``[-1, 1]``, differentiable (a VAE decoder). Used
            for the discriminator's input and for ``space="pixel"``.
        guidance_scale: teacher classifier-free guidance in the distillation loss (needs
            ``teacher_uncond``); NFSD's scale with ``weighting="nfsd"``.
        nfsd_threshold: NFSD's switch time (default 20 % of the schedule).
        distill_t_range: teacher timesteps ``(low, high)`` in schedule units.
        adversarial_loss: ``"hinge"`` (ADD), ``"non_saturating"`` or any
            [`AdversarialLoss`][addkit.losses.adversarial_registry.AdversarialLoss] (a
            discriminator loss and its generator loss).
        r1_placement: ``"features"``, ``"images"``, ``"approximate"`` or an
            [`R1Regularizer`][addkit.losses.regularizers.R1Regularizer] (see above).
        r1_gamma: R1 weight; ``None`` takes the placement's ``default_gamma`` (1e-5 for
            features and images, 100 for approximate).
        r1_interval: lazy regularisation interval (1 = every step; above 1,
            ``discriminator_loss`` needs ``step=``).
        r1_sigma: the perturbation of ``"approximate"``.
        student_timesteps: the student's timesteps; ``None`` is
            ``schedule.timesteps(4, "trailing")``: ADD's ``(999, 749, 499, 249)`` for a VP
            schedule, ``(1.0, 0.75, 0.5, 0.25)`` for rectified flow.
        terminal: ``"replace"`` or ``"schedule"`` (see above).
        zero_image_cond_at_terminal: zero ``c_image`` rows at the pure-noise step.

    Raises:
        ValueError: for an unknown option, negative weights, a student timestep outside
            the schedule, ``space="pixel"`` without ``decode`` or no discriminator while
            the adversarial loss is on.
        TypeError: for a schedule or teacher that does not satisfy its protocol, or float
            student timesteps on a discrete schedule.

    Examples:
        >>> from addkit import VPSchedule, wrap
        >>> s = VPSchedule.scaled_linear()
        >>> teacher = wrap(lambda x, t: torch.zeros_like(x), s, "eps")
        >>> D = lambda x, per_head=False, generator=None: [x.flatten(1)[:, :3]]
        >>> obj = ADDObjective(teacher, D, s)
        >>> inp = obj.sample_student_inputs(torch.randn(4, 2, 8, 8))
        >>> loss, logs = obj.generator_loss(teacher.x0(inp.x_t, inp.t), student_t=inp.t)
        >>> sorted(logs)
        ['g/adv', 'g/distill', 'g/logits_fake', 'g/total']
    """

    def __init__(
        self,
        teacher: Teacher,
        discriminator: Discriminator | None,
        schedule: Schedule,
        *,
        lambda_distill: float = 2.5,
        adversarial_weight: float = 1.0,
        weighting: Weighting = "exponential",
        sds_weight: Callable[[Tensor, Tensor], Tensor] | None = None,
        distance: Distance = "l2",
        space: Literal["latent", "pixel"] = "latent",
        decode: Callable[[Tensor], Tensor] | None = None,
        discriminator_sees: Literal["decoded", "latents"] = "decoded",
        guidance_scale: float = 1.0,
        nfsd_threshold: float | None = None,
        distill_t_range: tuple[float, float] | None = None,
        adversarial_loss: AdversarialLossName | AdversarialLoss = "hinge",
        r1_placement: R1Placement | R1Regularizer = "features",
        r1_gamma: float | None = None,
        r1_interval: int = 1,
        r1_sigma: float = 0.01,
        student_timesteps: Sequence[float] | None = None,
        terminal: Literal["replace", "schedule"] = "replace",
        zero_image_cond_at_terminal: bool = True,
    ) -> None:
        fn = "ADDObjective"
        check_positive(fn, "lambda_distill", lambda_distill, allow_zero=True)
        check_positive(fn, "adversarial_weight", adversarial_weight, allow_zero=True)
        check_choice(fn, "space", space, ("latent", "pixel"))
        if isinstance(adversarial_loss, str):
            check_choice(fn, "adversarial_loss", adversarial_loss, tuple(ADVERSARIAL_LOSSES))
        adversarial = resolve_adversarial_loss(adversarial_loss)
        check_choice(fn, "terminal", terminal, ("replace", "schedule"))
        check_choice(fn, "discriminator_sees", discriminator_sees, ("decoded", "latents"))
        if isinstance(weighting, str):
            check_choice(fn, "weighting", weighting, ("exponential", "sds", "nfsd"))
        if space == "pixel" and decode is None:
            raise ValueError(f"{fn}: space='pixel' needs decode=<latents -> images>, got None")
        if discriminator is None and adversarial_weight > 0:
            raise ValueError(f"{fn}: discriminator=None needs adversarial_weight=0 (distillation only)")
        if discriminator is not None:
            hint = " (images -> logits, e.g. ProjectedDiscriminator)"
            check_callable(fn, "discriminator", discriminator, hint=hint)
        for name, f in (("decode", decode), ("sds_weight", sds_weight)):
            if f is not None:
                check_callable(fn, name, f)
        if not isinstance(guidance_scale, Tensor):
            check_number(fn, "guidance_scale", guidance_scale)
        if nfsd_threshold is not None:
            check_number(fn, "nfsd_threshold", nfsd_threshold)
        if isinstance(distance, str):
            check_choice(fn, "distance", distance, DISTANCES)
        check_positive(fn, "r1_sigma", r1_sigma)
        if isinstance(r1_placement, str):
            check_choice(fn, "r1_placement", r1_placement, get_args(R1Placement))
        else:
            hint = " (an R1Regularizer instance, e.g. R1Features())"
            check_callable(fn, "r1_placement", r1_placement, hint=hint)
        self.r1 = r1_regularizer(r1_placement, sigma=r1_sigma)
        gamma = self.r1.default_gamma if r1_gamma is None else r1_gamma
        check_positive(fn, "r1_gamma", gamma, allow_zero=True)
        check_schedule(fn, schedule)
        if distill_t_range is not None:
            check_t_range(fn, schedule, distill_t_range, name="distill_t_range")
        if not callable(getattr(teacher, "predict", None)) and lambda_distill > 0:
            raise TypeError(
                f"{fn}: teacher must satisfy addkit.typing.Teacher (predict(x_t, t, target=..., ...), "
                f"e.g. addkit.wrap(unet, schedule, 'eps')), got {type(teacher).__name__}"
            )
        self.teacher = teacher
        self.discriminator = discriminator
        self.schedule = schedule
        self.lambda_distill = float(lambda_distill)
        self.adversarial_weight = float(adversarial_weight)
        self.weighting = weighting
        self.sds_weight = sds_weight
        self.distance = distance
        self.space = space
        self.decode = decode
        self.discriminator_sees = discriminator_sees
        self.guidance_scale = guidance_scale
        self.nfsd_threshold = nfsd_threshold
        self.distill_t_range = distill_t_range
        self.d_loss_fn, self.g_loss_fn = adversarial.d_loss, adversarial.g_loss
        self.r1_gamma = float(gamma)
        self.lazy_r1 = LazyRegularizer(r1_interval)
        self.terminal = terminal
        self.zero_image_cond_at_terminal = zero_image_cond_at_terminal
        self.student_timesteps = self._student_timesteps(fn, student_timesteps)

    def _student_timesteps(self, fn: str, timesteps: Sequence[float] | None) -> Tensor:
        if timesteps is None:
            timesteps = self.schedule.timesteps(4, "trailing")
        values = check_time_values(fn, self.schedule, timesteps, name="student_timesteps", sequence=True)
        if not values:
            raise ValueError(f"{fn}: student_timesteps must not be empty")
        return torch.tensor(values, dtype=self.schedule.time_dtype)

    def __repr__(self) -> str:
        return (
            f"ADDObjective(lambda_distill={self.lambda_distill}, adversarial_weight="
            f"{self.adversarial_weight}, weighting={self.weighting!r}, space={self.space!r}, "
            f"r1={self.r1!r}:{self.r1_gamma}/{self.lazy_r1.interval}, "
            f"student_timesteps={self.student_timesteps.tolist()})"
        )

    # -- student inputs ------------------------------------------------------------------
    def sample_student_inputs(
        self, x0: Tensor, generator: torch.Generator | None = None
    ) -> StudentInputs:
        """Noise real samples at student timesteps drawn uniformly from ``student_timesteps``.

        Args:
            x0: real samples (latents for a latent model) ``[B, ...]``.
            generator: random generator for the timesteps and the noise; its device is
                used for drawing (results are moved to ``x0``'s device).

        Returns:
            [`StudentInputs`][addkit.objective.StudentInputs]; where ``is_pure_noise`` is
            true and ``terminal="replace"``, ``x_t`` equals ``noise`` exactly.

        Raises:
            TypeError: if ``x0`` is not a floating tensor.
            ValueError: if ``x0`` has no batch dimension.
        """
        fn = "ADDObjective.sample_student_inputs"
        check_floating(fn, "x0", x0)
        check_batch(fn, "x0", x0)
        check_finite_inputs(fn, x0=x0)
        if x0.ndim < 2:
            raise ValueError(f"{fn}: x0 must have shape [B, ...] with at least 2 dims, got {tuple(x0.shape)}")
        index = randint(0, len(self.student_timesteps), (x0.shape[0],), device=x0.device, generator=generator)
        t = self.student_timesteps.to(x0.device)[index]
        noise = randn(tuple(x0.shape), device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.schedule.add_noise(x0, noise, t)
        pure = t == self.student_timesteps.max().to(t.device)
        if self.terminal == "replace":
            x_t = torch.where(pure.reshape(-1, *([1] * (x0.ndim - 1))), noise, x_t)
        return StudentInputs(x_t=x_t, t=t, noise=noise, is_pure_noise=pure)

    # -- helpers ---------------------------------------------------------------------------
    def discriminator_input(self, x0: Tensor) -> Tensor:
        """What the discriminator sees for a clean estimate: ``decode(x0)``, or ``x0``.

        ``decode(x0)`` when ``decode`` is given and ``discriminator_sees="decoded"``.

        Gradients flow when ``x0`` requires grad; wrap the call in ``torch.no_grad()`` for
        the discriminator step's fake images.
        """
        return self.decode(x0) if self._d_decodes else x0

    @property
    def _d_decodes(self) -> bool:
        return self.decode is not None and self.discriminator_sees == "decoded"

    def _image_cond(self, fn: str, c_image: Tensor | None, student_t: Tensor | None) -> Tensor | None:
        if c_image is None or student_t is None or not self.zero_image_cond_at_terminal:
            return c_image
        if student_t.shape != (c_image.shape[0],):
            raise ValueError(
                f"{fn}: student_t must have shape ({c_image.shape[0]},) like c_image's batch, "
                f"got {tuple(student_t.shape)}"
            )
        pure = (student_t == self.student_timesteps.max().to(student_t.device)).reshape(-1, 1)
        return c_image.masked_fill(pure, 0.0)

    def _require_discriminator(self) -> Discriminator:
        if self.discriminator is None:
            raise ValueError("ADDObjective: no discriminator was given (adversarial_weight=0)")
        return self.discriminator

    def _logits(
        self, images: Tensor, c_text: Tensor | None, c_image: Tensor | None,
        generator: torch.Generator | None, **kwargs: Any,
    ) -> HeadLogits:
        cond = {k: v for k, v in (("c_text", c_text), ("c_image", c_image)) if v is not None}
        return self._require_discriminator()(images, per_head=True, generator=generator, **cond, **kwargs)

    # -- generator -------------------------------------------------------------------------
    def generator_loss(
        self,
        student_x0: Tensor,
        *,
        teacher_cond: Mapping[str, Any] | None = None,
        teacher_uncond: Mapping[str, Any] | None = None,
        negative_cond: Mapping[str, Any] | None = None,
        c_text: Tensor | None = None,
        c_image: Tensor | None = None,
        student_t: Tensor | None = None,
        generator: torch.Generator | None = None,
        feature_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's loss $\\lambda_\\text{adv} L^G_\\text{adv} + \\lambda L_\\text{distill}$.

        Args:
            student_x0: the student's clean estimate ``[B, ...]`` (with grad), e.g.
                ``student.x0(inp.x_t, inp.t, **cond)``.
            teacher_cond: the teacher's conditioning (model keyword arguments).
            teacher_uncond: unconditional conditioning for teacher CFG / NFSD.
            negative_cond: negative-prompt conditioning for NFSD.
            c_text: the discriminator's text embedding ``[B, D_t]``.
            c_image: the discriminator's image embedding ``[B, D_i]`` (of the real image).
            student_t: the student timesteps ``[B]`` (zeroes ``c_image`` at pure noise).
            generator: randomness for the teacher timesteps, re-noising and augmentation.
            feature_kwargs: extra arguments for the discriminator's feature network (e.g.
                ``encoder_hidden_states`` for
                [`TeacherFeatures`][addkit.discriminators.teacher.TeacherFeatures]).

        Returns:
            ``(loss, logs)`` with logs ``g/adv``, ``g/logits_fake``, ``g/distill``,
            ``g/total`` (terms that are switched off are absent).

        Raises:
            ValueError: for bad shapes or conditioning (from the parts).
        """
        fn = "ADDObjective.generator_loss"
        check_floating(fn, "student_x0", student_x0)
        check_batch(fn, "student_x0", student_x0)
        check_finite_inputs(fn, student_x0=student_x0, c_text=c_text, c_image=c_image)
        logs: dict[str, Tensor] = {}
        total = student_x0.new_zeros((), dtype=torch.float32)
        decoded = None
        if self.adversarial_weight > 0:
            d_input = self.discriminator_input(student_x0)
            decoded = d_input if self._d_decodes else None
            c_img = self._image_cond(fn, c_image, student_t)
            logits = self._logits(d_input, c_text, c_img, generator, **(feature_kwargs or {}))
            adv = self.g_loss_fn(logits)
            total = total + self.adversarial_weight * adv
            logs["g/adv"] = adv.detach()
            logs["g/logits_fake"] = _mean_logit(logits)
        if self.lambda_distill > 0:
            distill = self._distill(fn, student_x0, decoded, teacher_cond, teacher_uncond, negative_cond, generator)
            total = total + self.lambda_distill * distill
            logs["g/distill"] = distill.detach()
        logs["g/total"] = total.detach()
        return total, logs

    def _distill(
        self, fn: str, student_x0: Tensor, decoded: Tensor | None,
        cond: Mapping[str, Any] | None, uncond: Mapping[str, Any] | None,
        negative: Mapping[str, Any] | None, generator: torch.Generator | None,
    ) -> Tensor:
        device = student_x0.device
        t = sample_distillation_timesteps(
            student_x0.shape[0], self.schedule, t_range=self.distill_t_range, generator=generator, device=device
        )
        noise = randn(tuple(student_x0.shape), device=device, dtype=student_x0.dtype, generator=generator)
        pixel = self.space == "pixel"
        return distillation_loss(
            student_x0, self.teacher, t, noise, schedule=self.schedule,
            weighting=self.weighting, sds_weight=self.sds_weight, distance=self.distance,
            cond=cond, uncond=uncond, negative_cond=negative, guidance_scale=self.guidance_scale,
            nfsd_threshold=self.nfsd_threshold, space=self.space, decode=self.decode,
            decoded_student=decoded if pixel else None,
        )

    # -- discriminator ---------------------------------------------------------------------
    def discriminator_loss(
        self,
        real: Tensor,
        fake: Tensor,
        *,
        c_text: Tensor | None = None,
        c_image: Tensor | None = None,
        student_t: Tensor | None = None,
        step: int | None = None,
        generator: torch.Generator | None = None,
        feature_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss: adversarial on real vs detached fake, plus $\\gamma R_1$.

        Args:
            real: real samples as the discriminator sees them (images in ``[-1, 1]`` for
                a pixel discriminator; see
                [`discriminator_input`][addkit.objective.ADDObjective.discriminator_input]).
            fake: the student's samples, same shape (detached here).
            c_text: text embedding ``[B, D_t]`` (same for real and fake).
            c_image: image embedding of the real images ``[B, D_i]``.
            student_t: the student timesteps ``[B]`` of the fakes.
            step: the training step, for lazy R1; required when ``r1_interval > 1``.
            generator: randomness for augmentation and the approximate R1 noise.
            feature_kwargs: extra arguments for the discriminator's feature network.

        Returns:
            ``(loss, logs)`` with logs ``d/adv``, ``d/logits_real``, ``d/logits_fake``,
            ``d/real_acc`` (fraction of real tokens scored > 0), ``d/fake_acc``, ``d/rank``
            (fraction of real/fake pairs ranked right) and ``d/gap`` (mean real minus fake
            score; see [`discriminator_stats`][addkit.losses.health.discriminator_stats]),
            ``d/r1`` (on the steps it is computed) and ``d/total``.

        Raises:
            ValueError: for mismatched shapes or conditioning, or no ``step`` with
                ``r1_interval > 1``.
        """
        fn = "ADDObjective.discriminator_loss"
        check_floating(fn, "real", real)
        check_floating(fn, "fake", fake)
        check_batch(fn, "real", real)
        check_same_shape(fn, "real", real, "fake", fake)
        check_finite_inputs(fn, real=real, fake=fake, c_text=c_text, c_image=c_image)
        c_image = self._image_cond(fn, c_image, student_t)
        regularise = self.r1_gamma > 0 and self.lazy_r1.due(step)
        fk = dict(feature_kwargs or {})
        real_logits, r1 = self._real_logits(real.detach(), c_text, c_image, generator, regularise, fk)
        fake_logits = self._logits(fake.detach(), c_text, c_image, generator, **fk)
        adv = self.d_loss_fn(real_logits, fake_logits)
        total = adv
        logs = {"d/adv": adv.detach()}
        logs.update({f"d/{k}": v for k, v in discriminator_stats(real_logits, fake_logits).items()})
        if r1 is not None:
            total = total + self.r1_gamma * self.lazy_r1.scale * r1
            logs["d/r1"] = r1.detach()
        logs["d/total"] = total.detach()
        return total, logs

    def _real_logits(
        self, real: Tensor, c_text: Tensor | None, c_image: Tensor | None,
        generator: torch.Generator | None, regularise: bool, fk: dict[str, Any],
    ) -> tuple[HeadLogits, Tensor | None]:
        if not regularise:
            return self._logits(real, c_text, c_image, generator, **fk), None
        cond = {k: v for k, v in (("c_text", c_text), ("c_image", c_image)) if v is not None}
        D = self._require_discriminator()
        logits, r1 = self.r1(D, real, generator=generator, feature_kwargs=fk, **cond)
        if not isinstance(r1, Tensor) or r1.ndim != 0:
            got = tuple(r1.shape) if isinstance(r1, Tensor) else type(r1).__name__
            raise ValueError(
                f"ADDObjective.discriminator_loss: the R1 placement {self.r1!r} must return (logits, "
                f"a scalar penalty), got a penalty of shape {got}: reduce it over the batch (e.g. .mean())"
            )
        return logits, r1


def _mean_logit(logits: HeadLogits) -> Tensor:
    heads = as_heads("ADDObjective", "logits", logits)
    return torch.stack([h.detach().float().mean() for h in heads]).mean()
