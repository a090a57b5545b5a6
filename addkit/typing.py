"""Protocols and literal types shared across addkit.

addkit's parts never depend on addkit's own classes: a teacher is anything that satisfies
[`Denoiser`][addkit.typing.Denoiser], a discriminator backbone anything that satisfies
[`FeatureNetwork`][addkit.typing.FeatureNetwork], a schedule anything that satisfies
[`Schedule`][addkit.typing.Schedule].
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Denoiser", "FeatureNetwork", "Prediction", "Reduction", "Schedule", "TimeLike"]

Prediction = Literal["eps", "v", "x0", "flow"]
"""What a network predicts: noise, velocity $v=\\alpha\\epsilon-\\sigma x_0$, the clean sample,
or the rectified-flow velocity $u=\\epsilon-x_0$."""

Reduction = Literal["mean", "sum", "none"]
"""How a loss reduces over the batch; ``"none"`` returns one value per sample."""

TimeLike = int | float | Tensor
"""A timestep: a Python number (applied to the whole batch) or a tensor of shape ``[B]``."""


@runtime_checkable
class Schedule(Protocol):
    """A noise schedule $x_t = \\alpha_t x_0 + \\sigma_t \\epsilon$."""

    is_discrete: bool
    num_train_timesteps: int

    def alpha(self, t: TimeLike) -> Tensor:
        """Signal scale $\\alpha_t$."""
        ...

    def sigma(self, t: TimeLike) -> Tensor:
        """Noise scale $\\sigma_t$."""
        ...

    def add_noise(self, x0: Tensor, noise: Tensor, t: TimeLike) -> Tensor:
        """Forward process $\\alpha_t x_0 + \\sigma_t \\epsilon$."""
        ...


@runtime_checkable
class Denoiser(Protocol):
    """A model that returns clean-sample estimates: ``x0(x_t, t, **cond) -> Tensor``.

    [`addkit.denoisers.wrap`][addkit.denoisers.wrap] turns any eps / v / x0 / flow
    network into one.
    """

    def x0(self, x_t: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """Estimate $x_0$ from $x_t$ at time $t$."""
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
