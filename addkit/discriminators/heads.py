"""Discriminator heads on features, with projection conditioning (StyleGAN-T design).

One head per tap maps a token sequence ``[B, C, N]`` (``dims=1``) or a feature map on its
spatial grid ``[B, C, H, W]`` (``dims=2``) to one logit per token ``[B, N]`` (``N = H W``):

1. a block with kernel 1, then a residual block with kernel ``k``, each block being a
   spectral-normalised convolution -> a normalisation -> ``LeakyReLU(0.2)``; the residual sum is
   scaled by $1/\\sqrt 2$. ``dims=1``: StyleGAN-T's ``Conv1d`` with kernel 9 and circular
   padding over ViT tokens (whose order carries no 2-D neighbourhood a 1-D kernel could use).
   ``dims=2``: ``Conv2d`` with a ``k × k`` kernel (default 3, the same nine taps) and zero
   padding, for features that live on an image grid: a UNet's feature maps, or a diffusion
   transformer's image tokens put back on their patch grid (LADD's heads on teacher features);
2. an output convolution (kernel 1) to ``cmap_dim`` channels when conditioned, else to 1;
3. projection conditioning (Miyato & Koyama) with $c_{map} = W c$:

$$ \\ell_{b,n} = \\frac{1}{\\sqrt{d_{map}}} \\sum_{j=1}^{d_{map}} h_{b,j,n}\\, c_{map,b,j}. $$

Higher logits mean "real".

**Normalisation.** StyleGAN-T normalises with
[`BatchNormLocal`][addkit.discriminators.heads.BatchNormLocal] over virtual batches of 8 and
calls the discriminator on real and fake batches separately. Whatever a whole batch shares
(a colour cast, a contrast change, a blur on every sample) is then subtracted or divided away
before any weight sees it: a generator trained from scratch differs from the data sample by
sample, but a distilled student's faults are largely systematic, shared by its whole batch, and
measured on addkit's tiny world a separately-called batch-normalised discriminator stays near
chance on exactly those faults. addkit's default ``norm="sample"`` is
[`SampleNorm`][addkit.discriminators.heads.SampleNorm]: each sample is normalised over its own
channels and tokens (``GroupNorm`` with one group), so no sample's logits depend on the rest
of the batch, whichever way the caller batches real and fake (ADD's objective, DMD2's GAN
head, your own loop). ``norm="batch"`` keeps StyleGAN-T's normalisation for parity; feed it
real and fake mixed inside each virtual batch.

Spectral norm uses ``torch.nn.utils.parametrizations.spectral_norm`` (one power iteration
per training-mode forward, none in eval mode); it supports double backward, which R1 on
the head inputs needs.

References:
    Sauer et al., *StyleGAN-T*, arXiv 2301.09515, §3.2 (discriminator heads).
    Miyato & Koyama, *cGANs with Projection Discriminator*, arXiv 1802.05637.
    Miyato et al., *Spectral Normalization for GANs*, arXiv 1802.05957.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import einsum
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from addkit._checks import check_choice, check_finite_inputs, check_floating, check_ndim, check_positive_int

__all__ = [
    "BatchNormLocal",
    "DiscHead",
    "EqualizedLinear",
    "HeadNorm",
    "SampleNorm",
    "noise_level_embedding",
    "projection_logits",
]

HeadNorm = Literal["sample", "batch"]
"""The heads' normalisation: per sample ([`SampleNorm`][addkit.discriminators.heads.SampleNorm]) or
over virtual batches ([`BatchNormLocal`][addkit.discriminators.heads.BatchNormLocal], StyleGAN-T)."""


def noise_level_embedding(r: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` (float32) of noise fractions ``r`` ``[B]`` in ``[0, 1]``.

    $[\\cos(1000\\, r\\, f_k),\\ \\sin(1000\\, r\\, f_k)]$ with $f_k = 10000^{-k/(d/2)}$,
    $k = 0 \\ldots d/2 - 1$: the transformer / DDPM time embedding (Vaswani et al. 2017; Ho et
    al. 2020) of ``1000 r``, so the discriminator's heads see the noise level on the scale a
    diffusion model's time embedding uses.

    Examples:
        >>> noise_level_embedding(torch.tensor([0.0]), 4)
        tensor([[1., 1., 0., 0.]])
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=r.device, dtype=torch.float32) / half)
    angle = 1000.0 * r.float()[:, None] * freqs
    return torch.cat([angle.cos(), angle.sin()], dim=1)


def projection_logits(h: Tensor, cmap: Tensor) -> Tensor:
    """Projection-conditioned logits $\\ell_{b,n} = \\sum_j h_{b,j,n} c_{b,j} / \\sqrt{d}$.

    Args:
        h: head output ``[B, d, N]``.
        cmap: projected conditioning ``[B, d]``.

    Returns:
        Logits ``[B, N]``.

    Examples:
        >>> projection_logits(torch.ones(1, 4, 3), torch.ones(1, 4))
        tensor([[2., 2., 2.]])
    """
    fn = "projection_logits"
    check_ndim(fn, "h", check_floating(fn, "h", h), 3, layout="[B, d, N]")
    check_ndim(fn, "cmap", check_floating(fn, "cmap", cmap), 2, layout="[B, d]")
    if cmap.shape != h.shape[:2]:
        want, got = tuple(h.shape[:2]), tuple(cmap.shape)
        raise ValueError(f"{fn}: cmap must have shape {want} ([B, d] of h), got {got}")
    check_finite_inputs(fn, h=h, cmap=cmap)
    return einsum(h, cmap, "b d n, b d -> b n") / math.sqrt(h.shape[1])


class BatchNormLocal(nn.Module):
    """Batch norm over small groups of samples ("virtual batches"), without running stats.

    The batch is split into $G = \\lceil B / v \\rceil$ contiguous groups of near-equal size
    (sizes differ by at most one; StyleGAN-T's grouping when $G$ divides $B$). Per group and
    channel, mean and biased variance are taken over the group's samples and tokens:

    $$ y = \\gamma\\,\\frac{x - \\mu_g}{\\sqrt{\\sigma_g^2 + \\epsilon}} + \\beta. $$

    Train and eval modes behave the same. Statistics are computed in (at least) float32. Every
    sample's output depends on the others in its group: what a whole group shares is removed.
    Called on real and fake batches separately (StyleGAN-T), a fault common to every fake is
    invisible; mix real and fake inside each group, or use
    [`SampleNorm`][addkit.discriminators.heads.SampleNorm] (addkit's default).

    Args:
        num_features: channels ``C``.
        virtual_batch_size: $v$, samples per group (StyleGAN-T: 8).
        eps: added to the variance.
        affine: learn $\\gamma$ (ones) and $\\beta$ (zeros).

    Examples:
        >>> bn = BatchNormLocal(4)
        >>> y = bn(torch.randn(16, 4, 10))
        >>> torch.allclose(y[:8].mean((0, 2)), torch.zeros(4), atol=1e-6)
        True
    """

    def __init__(
        self, num_features: int, *, virtual_batch_size: int = 8, eps: float = 1e-5, affine: bool = True
    ) -> None:
        super().__init__()
        check_positive_int("BatchNormLocal", "num_features", num_features)
        check_positive_int("BatchNormLocal", "virtual_batch_size", virtual_batch_size)
        self.virtual_batch_size = int(virtual_batch_size)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def group_index(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        """Group of each sample ``[B]``: $\\lfloor i G / B \\rfloor$."""
        groups = math.ceil(batch_size / self.virtual_batch_size)
        return torch.arange(batch_size, device=device) * groups // batch_size

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` ``[B, C, N]`` (or ``[B, C, H, W]``); returns the same shape and dtype."""
        check_ndim("BatchNormLocal", "x", check_floating("BatchNormLocal", "x", x), (3, 4), layout="[B, C, N]")
        check_finite_inputs("BatchNormLocal", x=x)
        shape, x = x.shape, x.flatten(2)
        B, C, N = x.shape
        groups = math.ceil(B / self.virtual_batch_size)
        idx = self.group_index(B, x.device)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in >= float32
        zeros = x32.new_zeros(groups, C)
        count = x32.new_zeros(groups).index_add(0, idx, x32.new_full((B,), float(N)))[:, None]
        mean_g = zeros.index_add(0, idx, x32.sum(2)) / count
        centred = x32 - mean_g[idx][..., None]
        var_g = zeros.index_add(0, idx, centred.square().sum(2)) / count
        y = centred * torch.rsqrt(var_g[idx][..., None] + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)[:, None] + self.bias.to(y.dtype)[:, None]
        return y.to(x.dtype).reshape(shape)


class SampleNorm(nn.Module):
    """Per-sample normalisation of tokens ``[B, C, N]``: one mean and variance per sample.

    $$ y_{b,c,n} = \\gamma_c\\,\\frac{x_{b,c,n} - \\mu_b}{\\sqrt{\\sigma_b^2 + \\epsilon}} + \\beta_c, $$

    $\\mu_b$ and $\\sigma_b^2$ over all channels and tokens of sample $b$ (``GroupNorm`` with one
    group, computed in at least float32). No sample sees another, so a discriminator built on it
    gives each image the same logits alone or in any batch, and a shift or scale shared by a
    batch of fakes stays visible as a change of the channels' pattern.

    Args:
        num_features: channels ``C``.
        eps: added to the variance.

    Examples:
        >>> norm = SampleNorm(4)
        >>> x = torch.randn(3, 4, 10)
        >>> torch.allclose(norm(x)[1:], norm(x[1:]))   # independent of the batch
        True
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        check_positive_int("SampleNorm", "num_features", num_features)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` ``[B, C, N]`` (or ``[B, C, H, W]``); returns the same shape and dtype."""
        check_ndim("SampleNorm", "x", check_floating("SampleNorm", "x", x), (3, 4), layout="[B, C, N]")
        check_finite_inputs("SampleNorm", x=x)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        y = F.group_norm(x32, 1, self.weight.to(x32.dtype), self.bias.to(x32.dtype), self.eps)
        return y.to(x.dtype)


def _norm(kind: HeadNorm, channels: int, virtual_batch_size: int) -> nn.Module:
    if kind == "batch":
        return BatchNormLocal(channels, virtual_batch_size=virtual_batch_size)
    return SampleNorm(channels)


class EqualizedLinear(nn.Module):
    """Linear layer with equalised learning rate (StyleGAN-T's conditioning map).

    The weight is drawn from $N(0, 1)$ and scaled by $1/\\sqrt{d_{in}}$ at run time; with
    Adam this makes the effective step size independent of ``in_features``. Bias starts at 0.

    Args:
        in_features: $d_{in}$.
        out_features: $d_{out}$.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        check_positive_int("EqualizedLinear", "in_features", in_features)
        check_positive_int("EqualizedLinear", "out_features", out_features)
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.gain = 1.0 / math.sqrt(in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, d_in] -> [B, d_out]``."""
        check_finite_inputs("EqualizedLinear", x=check_floating("EqualizedLinear", "x", x))
        return F.linear(x, self.weight * self.gain, self.bias)


def _conv(dims: int, channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.Conv2d(channels, out_channels, kernel_size, padding=kernel_size // 2)


def _block(
    channels: int, kernel_size: int, norm: HeadNorm, virtual_batch_size: int, dims: int
) -> nn.Sequential:
    conv = _conv(dims, channels, channels, kernel_size)
    return nn.Sequential(spectral_norm(conv), _norm(norm, channels, virtual_batch_size), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class DiscHead(nn.Module):
    """One discriminator head: tokens ``[B, C, N]`` or a grid ``[B, C, H, W]`` to logits ``[B, N]``.

    Args:
        channels: ``C`` of the tap it reads.
        c_dim: width of the conditioning vector, or ``None`` for an unconditional head.
        cmap_dim: projection width $d_{map}$ (StyleGAN-T: 64).
        kernel_size: kernel of the residual block (odd); default 9 for tokens (StyleGAN-T), 3
            (``3 × 3``) for a grid.
        dims: ``1``, a token sequence ``[B, C, N]`` read with circular padding; ``2``, a
            feature map ``[B, C, H, W]`` read with ``k × k`` kernels and zero padding.
        norm: ``"sample"`` ([`SampleNorm`][addkit.discriminators.heads.SampleNorm], default: no
            coupling between samples) or ``"batch"``
            ([`BatchNormLocal`][addkit.discriminators.heads.BatchNormLocal], StyleGAN-T's; see the
            module notes).
        virtual_batch_size: group size of ``norm="batch"``.

    Examples:
        >>> head = DiscHead(16, c_dim=8)
        >>> head(torch.randn(2, 16, 10), torch.randn(2, 8)).shape
        torch.Size([2, 10])
        >>> DiscHead(16, dims=2)(torch.randn(2, 16, 4, 6)).shape
        torch.Size([2, 24])
    """

    def __init__(
        self,
        channels: int,
        *,
        c_dim: int | None = None,
        cmap_dim: int = 64,
        kernel_size: int | None = None,
        norm: HeadNorm = "sample",
        virtual_batch_size: int = 8,
        dims: int = 1,
    ) -> None:
        super().__init__()
        check_choice("DiscHead", "norm", norm, ("sample", "batch"))
        check_choice("DiscHead", "dims", dims, (1, 2))
        if kernel_size is None:
            kernel_size = 9 if dims == 1 else 3
        for name, value in (("channels", channels), ("cmap_dim", cmap_dim), ("kernel_size", kernel_size)):
            check_positive_int("DiscHead", name, value)
        if c_dim is not None:
            check_positive_int("DiscHead", "c_dim", c_dim)
        if kernel_size % 2 == 0:
            raise ValueError(f"DiscHead: kernel_size must be a positive odd number, got {kernel_size}")
        self.channels = int(channels)
        self.c_dim = c_dim
        self.cmap_dim = int(cmap_dim)
        self.kernel_size = int(kernel_size)
        self.norm = norm
        self.dims = int(dims)
        self.main = nn.Sequential(
            _block(channels, 1, norm, virtual_batch_size, dims),
            _Residual(_block(channels, kernel_size, norm, virtual_batch_size, dims)),
        )
        out_channels = self.cmap_dim if c_dim else 1
        self.out = spectral_norm(_conv(dims, channels, out_channels, 1))
        self.cmapper = EqualizedLinear(c_dim, self.cmap_dim) if c_dim else None

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Logits ``[B, N]`` of ``x`` (``[B, C, N]``, or ``[B, C, H, W]`` with ``N = H W``) given ``c`` ``[B, c_dim]``."""
        fn = "DiscHead"
        check_floating(fn, "x", x)
        check_ndim(fn, "x", x, self.dims + 2, layout="[B, C, N]" if self.dims == 1 else "[B, C, H, W]")
        check_finite_inputs(fn, x=x, c=c)
        if x.shape[1] != self.channels:
            raise ValueError(f"{fn}: x must have {self.channels} channels, got shape {tuple(x.shape)}")
        if self.dims == 1 and x.shape[2] < self.kernel_size // 2:
            raise ValueError(
                f"{fn}: x needs at least {self.kernel_size // 2} tokens for kernel_size "
                f"{self.kernel_size} with circular padding, got shape {tuple(x.shape)}"
            )
        h = self.out(self.main(x)).flatten(2)
        if self.cmapper is None:
            if c is not None:
                raise ValueError(f"{fn}: got conditioning c but the head was built with c_dim=None")
            return h[:, 0]
        if c is None or c.ndim != 2 or c.shape != (x.shape[0], self.c_dim):
            got = None if c is None else tuple(c.shape)
            raise ValueError(f"{fn}: c must have shape ({x.shape[0]}, {self.c_dim}), got {got}")
        return projection_logits(h, self.cmapper(c))
