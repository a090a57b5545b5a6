"""The adversarial losses by name: a discriminator loss and its generator loss, as one pair.

[`ADDObjective`][addkit.objective.ADDObjective] (``adversarial_loss=``) and
[`DMDObjective`][addkit.dmd.DMDObjective] (``gan_loss=``) take a name from
[`ADVERSARIAL_LOSSES`][addkit.losses.adversarial_registry.ADVERSARIAL_LOSSES] or any
[`AdversarialLoss`][addkit.losses.adversarial_registry.AdversarialLoss], resolved by
[`adversarial_loss`][addkit.losses.adversarial_registry.adversarial_loss]; recipes take their
choices from the same mapping.

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042, §3.2 (hinge).
    Yin et al., *Improved Distribution Matching Distillation* (DMD2), arXiv 2405.14867, Eq. 4
    (non-saturating).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from torch import Tensor

from addkit._checks import check_choice
from addkit.losses.adversarial import (
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from addkit.typing import HeadLogits

__all__ = ["ADVERSARIAL_LOSSES", "AdversarialLoss", "AdversarialLossName", "adversarial_loss"]

AdversarialLossName = Literal["hinge", "non_saturating"]
"""The registered adversarial losses: hinge (ADD) and non-saturating (DMD2, APT)."""


def _label(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _check_member(name: str, fn: Any, n_logits: int, usage: str) -> None:
    if isinstance(fn, type):
        raise TypeError(
            f"AdversarialLoss: {name} is the class {fn.__name__}: pass an instance, e.g. {fn.__name__}()"
        )
    if not callable(fn):
        raise TypeError(f"AdversarialLoss: {name} must be callable as {usage}, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    try:
        signature.bind(*range(n_logits))
    except TypeError as e:
        raise TypeError(
            f"AdversarialLoss: {name} must be callable as {usage}, "
            f"but {_label(fn)} has signature {signature} ({e})"
        ) from None


@dataclass(frozen=True, repr=False)
class AdversarialLoss:
    """A discriminator loss and the generator loss that goes with it.

    ``d_loss(real_logits, fake_logits) -> loss`` and ``g_loss(fake_logits) -> loss``, both
    called positionally on the discriminator's logits (higher = real: one ``[B, K]`` tensor or
    one ``[B, K_h]`` per head) and returning a scalar to minimise, like
    [`hinge_d_loss`][addkit.losses.adversarial.hinge_d_loss] and
    [`hinge_g_loss`][addkit.losses.adversarial.hinge_g_loss]. Functions and module instances
    both work.

    Attributes:
        d_loss: the discriminator's loss.
        g_loss: the generator's loss.
        name: a label for logs and ``repr``.

    Raises:
        TypeError: if a member is not callable, is a class rather than an instance, or
            cannot take its logits positionally (e.g. the two swapped).

    Examples:
        >>> import torch
        >>> ls_d = lambda real, fake: ((real - 1) ** 2).mean() + (fake**2).mean()
        >>> ls_g = lambda fake: ((fake - 1) ** 2).mean()
        >>> pair = AdversarialLoss(ls_d, ls_g, name="least_squares")
        >>> pair.g_loss(torch.zeros(2, 3))
        tensor(1.)
    """

    d_loss: Callable[[HeadLogits, HeadLogits], Tensor]
    g_loss: Callable[[HeadLogits], Tensor]
    name: str = "custom"

    def __post_init__(self) -> None:
        _check_member("d_loss", self.d_loss, 2, "d_loss(real_logits, fake_logits)")
        _check_member("g_loss", self.g_loss, 1, "g_loss(fake_logits)")
        if not isinstance(self.name, str):
            raise TypeError(f"AdversarialLoss: name must be a str, got {type(self.name).__name__}")

    def __repr__(self) -> str:
        return f"AdversarialLoss({_label(self.d_loss)}, {_label(self.g_loss)}, name={self.name!r})"


ADVERSARIAL_LOSSES: Mapping[str, AdversarialLoss] = MappingProxyType(
    {
        "hinge": AdversarialLoss(hinge_d_loss, hinge_g_loss, name="hinge"),
        "non_saturating": AdversarialLoss(
            non_saturating_d_loss, non_saturating_g_loss, name="non_saturating"
        ),
    }
)
"""The adversarial losses by name (read-only); ``tuple(ADVERSARIAL_LOSSES)`` lists the names."""


def adversarial_loss(loss: AdversarialLossName | AdversarialLoss) -> AdversarialLoss:
    """The adversarial loss named ``loss`` (or ``loss`` itself when it is an ``AdversarialLoss``).

    Args:
        loss: ``"hinge"`` ([`hinge_d_loss`][addkit.losses.adversarial.hinge_d_loss],
            [`hinge_g_loss`][addkit.losses.adversarial.hinge_g_loss]; ADD), ``"non_saturating"``
            ([`non_saturating_d_loss`][addkit.losses.adversarial.non_saturating_d_loss],
            [`non_saturating_g_loss`][addkit.losses.adversarial.non_saturating_g_loss]; DMD2), or
            any [`AdversarialLoss`][addkit.losses.adversarial_registry.AdversarialLoss].

    Returns:
        The pair of losses.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        TypeError: for anything else, e.g. a bare ``(d_loss, g_loss)`` tuple.

    Examples:
        >>> adversarial_loss("hinge").d_loss is hinge_d_loss
        True
    """
    fn = "adversarial_loss"
    if isinstance(loss, str):
        return ADVERSARIAL_LOSSES[check_choice(fn, "loss", loss, tuple(ADVERSARIAL_LOSSES))]
    if not isinstance(loss, AdversarialLoss):
        hint = ": wrap the pair as AdversarialLoss(d_loss, g_loss)" if isinstance(loss, tuple) else ""
        raise TypeError(
            f"{fn}: loss must be one of {tuple(ADVERSARIAL_LOSSES)} or an AdversarialLoss, "
            f"got {type(loss).__name__}{hint}"
        )
    return loss
