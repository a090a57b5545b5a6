"""Differentiable augmentation (DiffAugment) for discriminator inputs.

The same random transforms, drawn independently per sample, are applied to real and to
generated images, so the discriminator cannot tell them apart by the augmentation; being
differentiable, they pass the generator's gradient through. Operations, on images in
``[-1, 1]`` (StyleGAN-T's ranges, per sample):

- ``"color"``: brightness $x + u - \\tfrac12$, then saturation $(x - \\bar x_{c}) \\cdot 2u + \\bar x_{c}$
  (mean over channels per pixel), then contrast $(x - \\bar x)(u + \\tfrac12) + \\bar x$ (mean over
  the image), each with its own $u \\sim U[0, 1)$;
- ``"translation"``: an integer shift of up to ``translation_ratio`` (1/8) of the size in
  each direction, zero-padded;
- ``"cutout"``: a square of ``cutout_ratio`` (0.2) of the size, centred uniformly, set to 0.

Random numbers come only from ``generator`` (global RNG when ``None``).

References:
    Zhao et al., *Differentiable Augmentation for Data-Efficient GAN Training*, arXiv
    2006.10738, §3.
    Sauer et al., *StyleGAN-T*, arXiv 2301.09515 (policy ``color,translation,cutout``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from addkit._checks import check_choice, check_finite_inputs, check_floating, check_ndim, check_positive
from addkit._random import rand, randint

__all__ = ["DiffAugment", "diff_augment"]

_OPS = ("color", "translation", "cutout")


def _uniform(x: Tensor, generator: torch.Generator | None, *shape: int) -> Tensor:
    return rand((x.shape[0], *shape), device=x.device, generator=generator).to(x.dtype)


def _randint(x: Tensor, generator: torch.Generator | None, low: int, high: int) -> Tensor:
    return randint(low, high, (x.shape[0],), device=x.device, generator=generator)


def _color(x: Tensor, generator: torch.Generator | None) -> Tensor:
    x = x + (_uniform(x, generator, 1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(x, generator, 1, 1, 1) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, generator, 1, 1, 1) + 0.5) + mean


def _translation(x: Tensor, generator: torch.Generator | None, ratio: float) -> Tensor:
    B, _, H, W = x.shape
    sy, sx = int(H * ratio + 0.5), int(W * ratio + 0.5)
    ty, tx = _randint(x, generator, -sy, sy + 1), _randint(x, generator, -sx, sx + 1)
    padded = F.pad(x, (sx, sx, sy, sy))
    rows = torch.arange(H, device=x.device)[None] + (sy + ty)[:, None]  # [B, H]
    cols = torch.arange(W, device=x.device)[None] + (sx + tx)[:, None]  # [B, W]
    batch = torch.arange(B, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return rearrange(out, "b h w c -> b c h w")


def _cutout(x: Tensor, generator: torch.Generator | None, ratio: float) -> Tensor:
    _, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    top = _randint(x, generator, 0, H) - ch // 2
    left = _randint(x, generator, 0, W) - cw // 2
    ys = torch.arange(H, device=x.device)[None] - top[:, None]  # [B, H]
    xs = torch.arange(W, device=x.device)[None] - left[:, None]  # [B, W]
    inside = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]
    return x * (~inside)[:, None].to(x.dtype)


def _parse_policy(fn: str, policy: str | Sequence[str]) -> list[str]:
    ops = [p.strip() for p in policy.split(",") if p.strip()] if isinstance(policy, str) else list(policy)
    for op in ops:
        check_choice(fn, "policy entry", op, _OPS)
    return ops


def diff_augment(
    x: Tensor,
    policy: str | Sequence[str] = "color,translation,cutout",
    *,
    generator: torch.Generator | None = None,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.2,
) -> Tensor:
    """Apply DiffAugment to a batch of images, differentiably, with per-sample random draws.

    Args:
        x: images ``[B, C, H, W]`` in ``[-1, 1]``.
        policy: operations in order, comma-separated or a list, from ``"color"``,
            ``"translation"``, ``"cutout"``; ``""`` is the identity.
        generator: source of randomness (on any device); the global RNG when ``None``.
        translation_ratio: largest shift as a fraction of the size (1/8).
        cutout_ratio: side of the cut-out square as a fraction of the size (0.2).

    Returns:
        Augmented images, same shape and dtype.

    Raises:
        ValueError: for an unknown policy entry or a tensor that is not ``[B, C, H, W]``.

    Examples:
        >>> x = torch.zeros(2, 3, 8, 8)
        >>> g = torch.Generator().manual_seed(0)
        >>> y = diff_augment(x, "translation,cutout", generator=g)
        >>> y.shape, bool((y == 0).all())
        (torch.Size([2, 3, 8, 8]), True)
    """
    fn = "diff_augment"
    check_floating(fn, "x", x)
    check_ndim(fn, "x", x, 4, layout="[B, C, H, W]")
    check_finite_inputs(fn, x=x)
    check_positive(fn, "translation_ratio", translation_ratio, allow_zero=True)
    check_positive(fn, "cutout_ratio", cutout_ratio, allow_zero=True)
    for op in _parse_policy(fn, policy):
        if op == "color":
            x = _color(x, generator)
        elif op == "translation":
            x = _translation(x, generator, translation_ratio)
        else:
            x = _cutout(x, generator, cutout_ratio)
    return x


class DiffAugment(nn.Module):
    """Module form of [`diff_augment`][addkit.discriminators.augment.diff_augment].

    Args:
        policy: operations in order (default StyleGAN-T's ``"color,translation,cutout"``).
        translation_ratio: largest shift as a fraction of the size.
        cutout_ratio: side of the cut-out square as a fraction of the size.
    """

    def __init__(
        self,
        policy: str | Sequence[str] = "color,translation,cutout",
        *,
        translation_ratio: float = 0.125,
        cutout_ratio: float = 0.2,
    ) -> None:
        super().__init__()
        self.policy = _parse_policy("DiffAugment", policy)
        fn = "DiffAugment"
        self.translation_ratio = check_positive(fn, "translation_ratio", translation_ratio, allow_zero=True)
        self.cutout_ratio = check_positive(fn, "cutout_ratio", cutout_ratio, allow_zero=True)

    def extra_repr(self) -> str:
        return f"policy={','.join(self.policy)!r}"

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``x`` ``[B, C, H, W]`` (see ``diff_augment``)."""
        return diff_augment(
            x,
            self.policy,
            generator=generator,
            translation_ratio=self.translation_ratio,
            cutout_ratio=self.cutout_ratio,
        )
