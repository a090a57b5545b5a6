"""Protocols and literal types shared across addkit.

addkit's parts never depend on addkit's own classes. Each protocol below declares every
member the library calls, so any object that has them works, whether or not it subclasses
anything of addkit:

| protocol | who calls it | addkit's own |
|---|---|---|
| [`Schedule`][addkit.typing.Schedule] | everything that noises or converts | `VPSchedule`, `FlowSchedule` |
| [`Denoiser`][addkit.typing.Denoiser] | the samplers (``x0``) | `WrappedDenoiser` from `wrap` |
| [`Teacher`][addkit.typing.Teacher] | `distillation_loss`, `ADDObjective` (``predict``) | `WrappedDenoiser` |
| [`Discriminator`][addkit.typing.Discriminator] | `ADDObjective`, the R1 regularisers | `ProjectedDiscriminator` |
| [`FeatureNetwork`][addkit.typing.FeatureNetwork] | `ProjectedDiscriminator` | `DINOv2Features`, `CLIPFeatures`, `TeacherFeatures` |

**Time.** A schedule is either discrete (``is_discrete = True``: integer timesteps
``0 .. T-1`` as in diffusers, ``time_dtype = torch.long``) or continuous (floats in
``t_range``, ``time_dtype = torch.float32``; rectified flow uses ``[0, 1]`` with ``t = 1``
pure noise). Python numbers given as timesteps are checked on the host (a float is refused
on a discrete schedule, never truncated); tensors from their dtype, and their values only
under [`addkit.value_checks`][addkit.checks.value_checks].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Denoiser",
    "Discriminator",
    "FeatureNetwork",
    "HeadLogits",
    "Prediction",
    "Reduction",
    "Schedule",
    "Teacher",
    "TimeLike",
]

Prediction = Literal["eps", "v", "x0", "flow"]
"""What a network predicts: noise, velocity $v=\\alpha\\epsilon-\\sigma x_0$, the clean sample,
or the rectified-flow velocity $u=\\epsilon-x_0$."""

Reduction = Literal["mean", "sum", "none"]
"""How a loss reduces over the batch; ``"none"`` returns one value per sample."""

TimeLike = int | float | Tensor
"""A timestep: a Python number (applied to the whole batch) or a tensor of shape ``[B]``."""

HeadLogits = Tensor | Sequence[Tensor]
"""Discriminator logits (higher = real): one ``[B, K]`` tensor (one head) or a sequence of
``[B, K_h]`` tensors, one per head."""


@runtime_checkable
class Schedule(Protocol):
    """A noise schedule $x_t = \\alpha_t x_0 + \\sigma_t \\epsilon$: everything addkit calls on one.

    Attributes:
        is_discrete: integer timesteps (``True``, diffusers' VP schedules) or continuous time.
        num_train_timesteps: $T$, the training discretisation (1000 for SD/SDXL/SD3).
        time_dtype: dtype of the ``[B]`` time tensor a model receives: ``torch.long`` when
            discrete, ``torch.float32`` otherwise.
        t_range: the valid times ``(low, high)``, inclusive: ``(0, T - 1)`` when discrete,
            ``(0.0, 1.0)`` for rectified flow. The largest is the noisiest.
    """

    is_discrete: bool
    num_train_timesteps: int
    time_dtype: torch.dtype
    t_range: tuple[float, float]

    def alpha(self, t: TimeLike) -> Tensor:
        """Signal scale $\\alpha_t$ (same shape as ``t``)."""
        ...

    def sigma(self, t: TimeLike) -> Tensor:
        """Noise scale $\\sigma_t$ (same shape as ``t``)."""
        ...

    def coefficients(self, t: TimeLike, like: Tensor, *, fn: str | None = None) -> tuple[Tensor, Tensor]:
        """$(\\alpha_t, \\sigma_t)$ shaped ``[B, 1, ..., 1]`` on ``like``'s device, in at least float32.

        ``t`` is a scalar or ``[B]``; ``fn`` names the caller in error messages.
        """
        ...

    def add_noise(self, x0: Tensor, noise: Tensor, t: TimeLike) -> Tensor:
        """Forward process $\\alpha_t x_0 + \\sigma_t \\epsilon$ in ``x0``'s dtype."""
        ...

    def timesteps(self, n: int, spacing: str = "trailing") -> tuple[int | float, ...]:
        """``n`` inference timesteps, noisiest first (``"trailing"``: ADD's student set)."""
        ...


@runtime_checkable
class Denoiser(Protocol):
    """A model that returns clean-sample estimates: ``x0(x_t, t, **cond) -> Tensor``.

    What the samplers call. [`addkit.denoisers.wrap`][addkit.denoisers.wrap] turns any
    eps / v / x0 / flow network into one. ``t`` arrives as a ``[B]`` tensor of the schedule's
    ``time_dtype`` on ``x_t``'s device.
    """

    def x0(self, x_t: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """Estimate $x_0$ from $x_t$ at time $t$."""
        ...


@runtime_checkable
class Teacher(Protocol):
    """A frozen teacher for the distillation loss: predictions in any target, with guidance.

    What [`distillation_loss`][addkit.losses.distillation.distillation_loss] calls.
    [`WrappedDenoiser`][addkit.denoisers.WrappedDenoiser] implements it.
    """

    def predict(
        self,
        x_t: Tensor,
        t: TimeLike,
        *,
        target: str = "x0",
        guidance_scale: float | Tensor = 1.0,
        uncond: Mapping[str, Any] | None = None,
        **cond: Any,
    ) -> Tensor:
        """The ``target`` (``"x0" | "eps" | "v" | "flow"``) prediction at ``x_t``, ``t``.

        With ``guidance_scale != 1``, classifier-free guidance between ``cond`` and
        ``uncond`` (same keys). Shape and dtype of ``x_t``.
        """
        ...


@runtime_checkable
class Discriminator(Protocol):
    """A discriminator: images (or its own features) in, logits per head out; higher = real.

    What [`ADDObjective`][addkit.objective.ADDObjective] and the R1 regularisers call.
    ``extract`` is needed only for R1 on the heads' inputs
    ([`R1Features`][addkit.losses.regularizers.R1Features], ADD's placement), which then runs
    the heads through ``__call__(features=...)`` so that a DDP wrapper synchronises them.
    [`ProjectedDiscriminator`][addkit.discriminators.projected.ProjectedDiscriminator]
    implements it.
    """

    def __call__(
        self,
        images: Tensor | None = None,
        c_text: Tensor | None = None,
        c_image: Tensor | None = None,
        *,
        features: Sequence[Tensor] | None = None,
        per_head: bool = False,
        generator: torch.Generator | None = None,
        **feature_kwargs: Any,
    ) -> HeadLogits:
        """Logits of ``images`` (or of precomputed ``features``): ``[B, K]``, or one ``[B, K_h]``
        per head with ``per_head=True``."""
        ...

    def extract(
        self, images: Tensor, *, generator: torch.Generator | None = None, **feature_kwargs: Any
    ) -> list[Tensor]:
        """The heads' inputs, one tensor per head (graph-free when ``images`` needs no grad)."""
        ...


@runtime_checkable
class FeatureNetwork(Protocol):
    """A frozen network mapping images in ``[-1, 1]`` to token features, one per tap.

    ``forward(images[B, 3, H, W]) -> list[Tensor[B, C_i, N_i]]``. It resizes and normalises
    its own input, keeps its parameters frozen and in eval mode, and lets gradients flow to
    the input images.
    """

    def __call__(self, images: Tensor) -> list[Tensor]:
        """Token features for each tap."""
        ...

    @property
    def channels(self) -> list[int]:
        """Channel count ``C_i`` of each tap."""
        ...
