"""How well a discriminator separates real from fake: the numbers to log beside its loss.

Sign accuracy (the fraction of real tokens scored above 0, of fake tokens below) is what GAN
code usually logs, and it hides a discriminator that has learned: while logits are small, a
hinge or softplus loss moves them slowly, and a discriminator that already scores every real
image above its fake can sit near 0.5 sign accuracy for a long time. Two numbers show it:

- **paired ranking** ``rank``: with real and fake batches in the same order (fake ``b`` made from
  real ``b``'s noised input and with the same conditioning, as in ADD's step), the fraction of
  pairs whose real sample gets the higher score $s_b = \\sum_k \\operatorname{mean}_n \\ell_{k,b,n}$;
  0.5 is chance, 1 is a perfect ranking;
- **logit gap** ``gap``: mean real score minus mean fake score (0 at chance).

Both are detached 0-dim tensors: computing them reads nothing back to the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from addkit._checks import check_number, check_positive_int
from addkit.losses._heads import as_heads
from addkit.typing import HeadLogits

__all__ = ["ChanceWatch", "discriminator_stats"]


def _scores(heads: list[Tensor]) -> Tensor:
    """Per-sample score ``[B]``: the sum over heads of each head's mean logit over its tokens."""
    return torch.stack([h.detach().float().flatten(1).mean(1) for h in heads]).sum(0)


def _fraction_positive(heads: list[Tensor]) -> Tensor:
    return torch.cat([h.detach().flatten() > 0 for h in heads]).float().mean()


def discriminator_stats(real_logits: HeadLogits, fake_logits: HeadLogits) -> dict[str, Tensor]:
    """Sign accuracies, paired ranking and logit gap of one discriminator step.

    Args:
        real_logits: the discriminator's logits on real samples, ``[B, K]`` or one ``[B, K_h]``
            per head (higher = real).
        fake_logits: its logits on the fakes, the same layout; row ``b`` is paired with real
            row ``b``.

    Returns:
        Detached float32 scalars: ``logits_real`` and ``logits_fake`` (mean over heads of each
        head's mean logit), ``real_acc`` (fraction of real tokens > 0), ``fake_acc`` (fraction
        of fake tokens not > 0), ``rank`` (fraction of pairs with the real
        score above the fake's; ties count half) and ``gap`` (mean real minus mean fake score).

    Raises:
        ValueError: if the two have different batch sizes or head counts.

    Examples:
        >>> real = torch.tensor([[2.0, 1.0], [-1.0, 0.5]])
        >>> fake = torch.tensor([[0.0, -1.0], [0.5, 1.0]])
        >>> s = discriminator_stats(real, fake)
        >>> float(s["rank"]), float(s["gap"])   # pair 0: 1.5 > -0.5; pair 1: -0.25 < 0.75
        (0.5, 0.5)
    """
    fn = "discriminator_stats"
    real = as_heads(fn, "real_logits", real_logits)
    fake = as_heads(fn, "fake_logits", fake_logits)
    if len(real) != len(fake) or real[0].shape[0] != fake[0].shape[0]:
        raise ValueError(
            f"{fn}: real_logits and fake_logits must have the same heads and batch size, got "
            f"{[tuple(h.shape) for h in real]} and {[tuple(h.shape) for h in fake]}"
        )
    s_real, s_fake = _scores(real), _scores(fake)
    wins = (s_real > s_fake).float() + 0.5 * (s_real == s_fake).float()
    n = float(len(real))
    return {
        "logits_real": s_real.mean() / n,
        "logits_fake": s_fake.mean() / n,
        "real_acc": _fraction_positive(real),
        "fake_acc": 1.0 - _fraction_positive(fake),
        "rank": wins.mean(),
        "gap": (s_real - s_fake).mean(),
    }


class ChanceWatch:
    """Warns once when a discriminator's paired ranking stays at chance for ``patience`` steps.

    Feed it the logged ``rank`` (a host float: call it where you already read your logs). A
    discriminator still at chance after the warm-up gives the generator no adversarial signal,
    which a loss curve alone does not show. Each value at or above ``threshold`` restarts the count.

    Args:
        patience: steps at chance before the warning (counted between the steps you feed).
        threshold: ranking below which a step counts as chance (0.5 is chance exactly).

    Examples:
        >>> watch = ChanceWatch(patience=100)
        >>> watch.update(50, 0.52) is None
        True
        >>> print(watch.update(149, 0.49))  # doctest: +ELLIPSIS
        the discriminator has ranked real above fake no better than chance (rank < 0.6) for 100 steps ...
        >>> watch.update(300, 0.5) is None   # once
        True
    """

    def __init__(self, patience: int = 200, threshold: float = 0.6) -> None:
        check_positive_int("ChanceWatch", "patience", patience)
        check_number("ChanceWatch", "threshold", threshold, low=0.5, high=1.0)
        self.patience, self.threshold = patience, float(threshold)
        self._since: int | None = None
        self.warned = False

    def update(self, step: int, rank: float) -> str | None:
        """Record ``rank`` at ``step``; the warning the first time chance has lasted ``patience`` steps.

        Raises:
            TypeError, ValueError: for a ``rank`` that is not a number in ``[0, 1]`` (NaN included).
        """
        value = float(rank) if isinstance(rank, Tensor) else rank
        rank = check_number("ChanceWatch.update", "rank", value, low=0, high=1)
        if rank >= self.threshold:
            self._since = None
            return None
        self._since = step if self._since is None else self._since
        if self.warned or step - self._since + 1 < self.patience:
            return None
        self.warned = True
        return (
            f"the discriminator has ranked real above fake no better than chance (rank < {self.threshold:g}) "
            f"for {step - self._since + 1} steps (since step {self._since}): the adversarial loss gives the "
            "generator no signal. Try a higher discriminator learning rate, a feature network whose blocks "
            "see the whole image, less augmentation at small resolutions, and heads that normalise per "
            "sample (ProjectedDiscriminator(norm='sample'))"
        )
