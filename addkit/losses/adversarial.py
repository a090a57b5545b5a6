r"""Adversarial losses for the discriminator and the generator (student).

Logits follow one convention: **higher means real**. A discriminator returns either one
tensor ``[B, K]`` (K token logits) or a sequence of such tensors, one per head (the
``K_h`` may differ between heads). Every loss here reduces the same way:

$$ \ell_b = \sum_{h} \frac{1}{K_h} \sum_{j=1}^{K_h} f\big(D_h(x_b)_j\big), \qquad
   L = \frac{1}{B} \sum_b w_b\, \ell_b , $$

i.e. a mean over tokens, a sum over heads and a mean over the batch (``reduction``): the
written form of ADD's Eq. 2-3 (ADD states no normalisation). A single ``[B, K]`` tensor
is one head, so the heads of a discriminator that concatenates its token logits are
*averaged*, weighted by token count: StyleGAN-T's "mean over all heads x tokens" (its
code also divides by the batch size once more). With H heads of equal token count that
is exactly $1/H$ times the sum over heads; pass the list of heads to get the sum. The
choice scales the adversarial terms by H, and with them the meaning of the distillation
weight $\lambda = 2.5$ and the R1 weight $\gamma$ set relative to them.

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042, §3.2.
    Sauer et al., *StyleGAN-T*, arXiv 2301.09515 (discriminator with token logits per head).
    Lim & Ye, *Geometric GAN*, arXiv 1705.02894 (hinge loss).
    Goodfellow et al., *Generative Adversarial Nets*, 2014, §3 (non-saturating loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from addkit._checks import check_choice, check_same_shape
from addkit._reduce import reduce_loss
from addkit.losses._heads import as_heads, sum_all
from addkit.typing import HeadLogits, Reduction

__all__ = [
    "HeadLogits",
    "HingeDLoss",
    "HingeGLoss",
    "NonSaturatingDLoss",
    "NonSaturatingGLoss",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
]

def _per_sample(heads: list[Tensor], f: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``f`` to every logit; mean over tokens, sum over heads: ``[B]``."""
    return sum_all([f(h).mean(1) for h in heads])


def _paired(
    fn: str, real_logits: HeadLogits, fake_logits: HeadLogits
) -> tuple[list[Tensor], list[Tensor]]:
    real = as_heads(fn, "real_logits", real_logits)
    fake = as_heads(fn, "fake_logits", fake_logits)
    if len(real) != len(fake):
        raise ValueError(
            f"{fn}: real_logits and fake_logits must have the same number of heads, "
            f"got {len(real)} and {len(fake)}"
        )
    for i, (r, f) in enumerate(zip(real, fake, strict=True)):
        tag = f"[{i}]" if len(real) > 1 else ""
        check_same_shape(fn, f"real_logits{tag}", r, f"fake_logits{tag}", f)
    return real, fake


def hinge_d_loss(
    real_logits: HeadLogits,
    fake_logits: HeadLogits,
    *,
    reduction: Reduction = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    r"""Hinge loss of the discriminator.

    $$ \ell_b = \sum_h \operatorname{mean}_j \big[\max(0, 1 - D_h(x_0)_j)
       + \max(0, 1 + D_h(\hat x)_j)\big] $$

    Args:
        real_logits: logits on real samples, ``[B, K]`` or one ``[B, K_h]`` per head.
        fake_logits: logits on generated samples (detached from the generator), same
            shapes as ``real_logits``.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
        weight: optional per-sample weight ``[B]``.

    Returns:
        The loss: a scalar, or ``[B]`` for ``reduction="none"``. It is 0 once every
        real logit is at least 1 and every fake logit at most -1.

    Raises:
        ValueError: on mismatched shapes, non-finite logits, an unknown reduction or a
            weight of the wrong shape.
        TypeError: if logits are not floating-point tensors.

    Examples:
        >>> hinge_d_loss(torch.tensor([[2.0, 0.5]]), torch.tensor([[-1.0, 0.0]]))
        tensor(0.7500)

    References:
        ADD, arXiv 2311.17042, §3.2, discriminator objective (Eq. 3).
    """
    fn = "hinge_d_loss"
    real, fake = _paired(fn, real_logits, fake_logits)
    per_sample = _per_sample(real, lambda r: torch.relu(1 - r)) + _per_sample(
        fake, lambda f: torch.relu(1 + f)
    )
    return reduce_loss(per_sample, reduction, weight=weight, fn=fn)


def hinge_g_loss(
    fake_logits: HeadLogits, *, reduction: Reduction = "mean", weight: Tensor | None = None
) -> Tensor:
    r"""Generator loss of the hinge GAN: the negated fake logits.

    $$ \ell_b = -\sum_h \operatorname{mean}_j D_h(\hat x)_j $$

    Args:
        fake_logits: logits on generated samples (with gradient to the generator),
            ``[B, K]`` or one ``[B, K_h]`` per head.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
        weight: optional per-sample weight ``[B]``.

    Returns:
        The loss: a scalar, or ``[B]`` for ``reduction="none"``.

    Raises:
        ValueError: on non-finite logits, an unknown reduction or a bad weight shape.
        TypeError: if logits are not floating-point tensors.

    Examples:
        >>> hinge_g_loss([torch.tensor([[1.0, 3.0]]), torch.tensor([[-1.0]])])
        tensor(-1.)

    References:
        ADD, arXiv 2311.17042, §3.2, generator objective (Eq. 2).
    """
    fn = "hinge_g_loss"
    per_sample = _per_sample(as_heads(fn, "fake_logits", fake_logits), lambda f: -f)
    return reduce_loss(per_sample, reduction, weight=weight, fn=fn)


def non_saturating_d_loss(
    real_logits: HeadLogits,
    fake_logits: HeadLogits,
    *,
    reduction: Reduction = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    r"""Non-saturating (logistic) loss of the discriminator.

    $$ \ell_b = \sum_h \operatorname{mean}_j \big[\operatorname{softplus}(-D_h(x_0)_j)
       + \operatorname{softplus}(D_h(\hat x)_j)\big] $$

    the binary cross-entropy of a sigmoid classifier, real = 1.

    Args:
        real_logits: logits on real samples, ``[B, K]`` or one ``[B, K_h]`` per head.
        fake_logits: logits on generated samples, same shapes as ``real_logits``.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
        weight: optional per-sample weight ``[B]``.

    Returns:
        The loss: a scalar, or ``[B]`` for ``reduction="none"``.

    Raises:
        ValueError: on mismatched shapes, non-finite logits, an unknown reduction or a
            weight of the wrong shape.
        TypeError: if logits are not floating-point tensors.

    Examples:
        >>> non_saturating_d_loss(torch.zeros(1, 3), torch.zeros(1, 3))  # 2 log 2
        tensor(1.3863)

    References:
        Goodfellow et al., 2014, §3; DMD2, arXiv 2405.14867, Eq. 4; APT, arXiv
        2501.08316, §3.1.
    """
    fn = "non_saturating_d_loss"
    real, fake = _paired(fn, real_logits, fake_logits)
    per_sample = _per_sample(real, lambda r: softplus(-r)) + _per_sample(fake, softplus)
    return reduce_loss(per_sample, reduction, weight=weight, fn=fn)


def non_saturating_g_loss(
    fake_logits: HeadLogits, *, reduction: Reduction = "mean", weight: Tensor | None = None
) -> Tensor:
    r"""Non-saturating generator loss.

    $$ \ell_b = \sum_h \operatorname{mean}_j \operatorname{softplus}(-D_h(\hat x)_j) $$

    Args:
        fake_logits: logits on generated samples (with gradient to the generator),
            ``[B, K]`` or one ``[B, K_h]`` per head.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
        weight: optional per-sample weight ``[B]``.

    Returns:
        The loss: a scalar, or ``[B]`` for ``reduction="none"``.

    Raises:
        ValueError: on non-finite logits, an unknown reduction or a bad weight shape.
        TypeError: if logits are not floating-point tensors.

    Examples:
        >>> non_saturating_g_loss(torch.zeros(2, 4), reduction="none")
        tensor([0.6931, 0.6931])

    References:
        Goodfellow et al., 2014, §3; DMD2, arXiv 2405.14867, Eq. 4.
    """
    fn = "non_saturating_g_loss"
    per_sample = _per_sample(as_heads(fn, "fake_logits", fake_logits), lambda f: softplus(-f))
    return reduce_loss(per_sample, reduction, weight=weight, fn=fn)


class _AdversarialLoss(nn.Module):
    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__()
        name = type(self).__name__
        self.reduction = check_choice(name, "reduction", reduction, get_args(Reduction))

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class HingeDLoss(_AdversarialLoss):
    """Module form of [`hinge_d_loss`][addkit.losses.adversarial.hinge_d_loss].

    Examples:
        >>> HingeDLoss()(torch.ones(2, 3), -torch.ones(2, 3))
        tensor(0.)
    """

    def forward(
        self, real_logits: HeadLogits, fake_logits: HeadLogits, weight: Tensor | None = None
    ) -> Tensor:
        return hinge_d_loss(real_logits, fake_logits, reduction=self.reduction, weight=weight)


class HingeGLoss(_AdversarialLoss):
    """Module form of [`hinge_g_loss`][addkit.losses.adversarial.hinge_g_loss].

    Examples:
        >>> HingeGLoss()(torch.ones(2, 3))
        tensor(-1.)
    """

    def forward(self, fake_logits: HeadLogits, weight: Tensor | None = None) -> Tensor:
        return hinge_g_loss(fake_logits, reduction=self.reduction, weight=weight)


class NonSaturatingDLoss(_AdversarialLoss):
    """Module form of [`non_saturating_d_loss`][addkit.losses.adversarial.non_saturating_d_loss]

    Examples:
        >>> NonSaturatingDLoss(reduction="sum")(torch.zeros(2, 1), torch.zeros(2, 1))
        tensor(2.7726)
    """

    def forward(
        self, real_logits: HeadLogits, fake_logits: HeadLogits, weight: Tensor | None = None
    ) -> Tensor:
        return non_saturating_d_loss(
            real_logits, fake_logits, reduction=self.reduction, weight=weight
        )


class NonSaturatingGLoss(_AdversarialLoss):
    """Module form of [`non_saturating_g_loss`][addkit.losses.adversarial.non_saturating_g_loss]

    Examples:
        >>> NonSaturatingGLoss()(torch.zeros(2, 1))
        tensor(0.6931)
    """

    def forward(self, fake_logits: HeadLogits, weight: Tensor | None = None) -> Tensor:
        return non_saturating_g_loss(fake_logits, reduction=self.reduction, weight=weight)
