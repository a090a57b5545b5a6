r"""Gradient penalties for the discriminator: exact R1, APT's approximated R1, lazy intervals.

R1 penalises the discriminator's input gradient on real data. Where "input" is decides
the cost: ADD takes it w.r.t. the frozen feature maps fed to each head (cheap: the second
backward runs through the small heads only) with $\gamma = 10^{-5}$; taking it w.r.t. the
images is exact but runs the double backward through the feature ViT, which fused
attention kernels and ``torch.compile`` do not support (see
[`r1_penalty_images`][addkit.losses.regularizers.r1_penalty_images]). APT's approximation
needs no double backward at all.

References:
    Mescheder et al., *Which Training Methods for GANs do actually Converge?*, arXiv
    1801.04406, §4.1 (R1).
    Karras et al., *Analyzing and Improving the Image Quality of StyleGAN* (StyleGAN2),
    arXiv 1912.04958, §3.1 (lazy regularisation).
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042, §3.2, §4.
    Lin et al., *Diffusion Adversarial Post-Training for One-Step Video Generation*
    (APT), arXiv 2501.08316, §3.4, Eq. 9-10.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from addkit._checks import check_floating, check_positive
from addkit._reduce import reduce_loss
from addkit.losses._heads import as_heads, sum_all
from addkit.losses.adversarial import HeadLogits
from addkit.typing import Reduction

__all__ = ["LazyRegularizer", "approximate_r1", "r1_context", "r1_penalty", "r1_penalty_images"]


def _as_inputs(fn: str, real_inputs: Tensor | Sequence[Tensor], batch: int) -> list[Tensor]:
    if isinstance(real_inputs, Tensor):
        labelled = [("real_inputs", real_inputs)]
    elif isinstance(real_inputs, Sequence) and len(real_inputs) > 0:
        labelled = [(f"real_inputs[{i}]", x) for i, x in enumerate(real_inputs)]
    else:
        raise TypeError(
            f"{fn}: real_inputs must be a tensor or a non-empty sequence of tensors, "
            f"got {type(real_inputs).__name__}"
        )
    for label, x in labelled:
        check_floating(fn, label, x)
        if not x.requires_grad:
            raise ValueError(
                f"{fn}: {label} does not require grad: call .requires_grad_(True) on it before "
                f"the discriminator forward (e.g. real = real.detach().requires_grad_(True))"
            )
        if x.ndim == 0 or x.shape[0] != batch:
            raise ValueError(
                f"{fn}: {label} must have batch size {batch} like real_logits, "
                f"got shape {tuple(x.shape)}"
            )
    return [x for _, x in labelled]


def r1_penalty(
    real_logits: HeadLogits,
    real_inputs: Tensor | Sequence[Tensor],
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""R1 gradient penalty: squared norm of the discriminator's gradient on real inputs.

    $$ R_1(x_b) = \sum_i \Big\| \nabla_{u_{i,b}} \sum_h \sum_j D_h(x_b)_j \Big\|_2^2 $$

    The scalar differentiated for sample $b$ is the **sum** of its logits over tokens
    and heads (a token mean would scale the penalty by $1/K^2$); the squared L2 norm is
    taken per sample and summed over the inputs $u_i$; there is no ½ factor (StyleGAN2
    writes $\gamma/2$). When each head reads its own input (ADD: head $h$ on feature
    map $f_h$) this is $\sum_h \|\nabla_{f_h} \sum_j D_h(f_h)_j\|^2$. The gradient is
    built with ``create_graph=True`` so that ``gamma * r1`` trains the discriminator.
    Heads with batch-coupled normalisation (StyleGAN-T's local batch norm) make sample
    $b$'s gradient depend on its virtual batch; the penalty is still well defined.

    Which input: ADD uses the frozen feature maps fed to the heads, with
    $\gamma = 10^{-5}$; pass them (``f.detach().requires_grad_(True)`` before the heads)
    and the double backward never enters the feature network. For the exact penalty on
    images use [`r1_penalty_images`][addkit.losses.regularizers.r1_penalty_images] or run
    the forward inside [`r1_context`][addkit.losses.regularizers.r1_context].

    Args:
        real_logits: logits on real samples, ``[B, K]`` or one ``[B, K_h]`` per head,
            computed from ``real_inputs`` with gradients enabled.
        real_inputs: the tensor(s) the gradient is taken w.r.t., each ``[B, ...]`` and
            requiring grad: the images ``[B, C, H, W]`` or one feature map ``[B, C, N]``
            per head.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for ``[B]``.

    Returns:
        The penalty: a scalar, or ``[B]`` for ``reduction="none"``.

    Raises:
        ValueError: if an input does not require grad or is not in the graph of
            ``real_logits``, batch sizes differ, logits are non-finite or the reduction
            is unknown.
        TypeError: if logits or inputs are not floating-point tensors.

    Examples:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> w = torch.tensor([1.0, 2.0, 2.0], requires_grad=True)  # the discriminator
        >>> r1_penalty((x @ w)[:, None], x)  # |w|^2
        tensor(9., grad_fn=<MeanBackward0>)

    References:
        Mescheder et al., arXiv 1801.04406, §4.1 (R1, written with gamma / 2); ADD, arXiv
        2311.17042, §3.2 (R1 on the input of each head) and §4 (gamma = 1e-5).
    """
    fn = "r1_penalty"
    heads = as_heads(fn, "real_logits", real_logits)
    inputs = _as_inputs(fn, real_inputs, heads[0].shape[0])
    if not any(h.requires_grad for h in heads):
        raise ValueError(
            f"{fn}: real_logits do not require grad: run the discriminator with gradients "
            f"enabled (not under torch.no_grad()) on inputs that require grad"
        )
    total = sum_all([h.sum() for h in heads])
    grads = torch.autograd.grad(total, inputs, create_graph=True, allow_unused=True)
    for i, g in enumerate(grads):
        if g is None:
            label = f"real_inputs[{i}]" if len(inputs) > 1 else "real_inputs"
            raise ValueError(
                f"{fn}: {label} is not part of the graph of real_logits: pass the very "
                f"tensor the discriminator was run on, after .requires_grad_(True)"
            )
    per_sample = sum_all([g.square().flatten(1).sum(1) for g in grads])
    return reduce_loss(per_sample, reduction, fn=fn)


def r1_context() -> AbstractContextManager[None]:
    r"""Context for a forward whose R1 double backward goes through attention.

    The same as ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: fused
    scaled-dot-product-attention kernels (flash, memory-efficient, the CPU flash kernel)
    have no double backward. The forward must run inside this context; the error
    otherwise only appears at the later ``loss.backward()`` ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented").
    Double backward through a ``torch.compile``'d module is not supported either
    ("torch.compile with aot_autograd does not currently support double backward"): run
    the R1 forward through the uncompiled module.

    Returns:
        A context manager selecting the math attention backend.

    Examples:
        >>> with r1_context():
        ...     y = torch.nn.functional.scaled_dot_product_attention(*torch.randn(3, 1, 2, 4, 8))
    """
    return sdpa_kernel(SDPBackend.MATH)


def r1_penalty_images(
    discriminator: Callable[..., HeadLogits],
    real_images: Tensor,
    *,
    reduction: Reduction = "mean",
    **cond: Any,
) -> Tensor:
    r"""Exact R1 w.r.t. the images: a discriminator forward and its gradient, math attention.

    Runs ``discriminator(real_images, **cond)`` inside
    [`r1_context`][addkit.losses.regularizers.r1_context] on a copy of the images that
    requires grad, then [`r1_penalty`][addkit.losses.regularizers.r1_penalty]. The double
    backward goes through the feature network, at several times the cost of a
    discriminator forward; ADD's feature placement or
    [`approximate_r1`][addkit.losses.regularizers.approximate_r1] are the cheap
    alternatives. To reuse the logits for the real-sample loss, call ``r1_penalty``
    yourself inside ``r1_context()`` instead.

    Args:
        discriminator: ``discriminator(images, **cond) -> logits`` (``[B, K]`` or a list
            of heads), higher = real. It must not be ``torch.compile``'d.
        real_images: real samples ``[B, C, H, W]``; their own ``requires_grad`` is ignored.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
        **cond: conditioning passed to the discriminator (not differentiated).

    Returns:
        The penalty: a scalar, or ``[B]`` for ``reduction="none"``.

    Raises:
        ValueError: as [`r1_penalty`][addkit.losses.regularizers.r1_penalty].
        TypeError: if ``real_images`` is not a floating-point tensor.

    Examples:
        >>> d = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
        >>> r1_penalty_images(d, torch.randn(2, 3, 2, 2)).shape
        torch.Size([])

    References:
        Mescheder et al., arXiv 1801.04406, §4.1.
    """
    x = check_floating("r1_penalty_images", "real_images", real_images)
    x = x.detach().requires_grad_(True)
    with r1_context():
        logits = discriminator(x, **cond)
        return r1_penalty(logits, x, reduction=reduction)


def approximate_r1(
    discriminator: Callable[..., HeadLogits],
    real: Tensor,
    *,
    sigma: float = 0.01,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
    real_logits: HeadLogits | None = None,
    **cond: Any,
) -> Tensor:
    r"""APT's approximated R1: the change of the logits under a small input perturbation.

    $$ \ell_b = \sum_h \big\| D_h(x_b) - D_h(x_b + \sigma n_b) \big\|_2^2,
       \qquad n_b \sim \mathcal N(0, I) $$

    First-order only (two forwards, no double backward), so it works with fused
    attention, ``torch.compile``, FSDP and activation checkpointing. For small $\sigma$,
    $\mathbb E_n[\ell_b] \approx \sigma^2 \sum_{h,j} \|\nabla_x D_h(x_b)_j\|^2$, the
    squared Frobenius norm of the logits' Jacobian. That equals $\sigma^2$ times
    [`r1_penalty`][addkit.losses.regularizers.r1_penalty] when every token logit reads its
    own part of the input (one logit per sample, or per-token heads on features); with shared
    inputs (a ViT on images) R1's token-summed gradient also has cross terms. So
    ``lam * approximate_r1`` acts as an R1 weight of about ``lam * sigma**2``: APT's
    lambda = 100, sigma = 0.01 gives 0.01. Multiply by lambda yourself.

    ``sigma`` is a standard deviation. APT writes $\mathcal N(x, \sigma I)$ and calls
    $\sigma$ a "small variance"; public re-implementations add ``sigma * randn``. If
    APT meant a variance, its effective weight is $\lambda\sigma = 1$, not 0.01 (not
    settled by the paper).

    Args:
        discriminator: ``discriminator(x, **cond) -> logits`` (``[B, K]`` or a list of
            heads), higher = real.
        real: real samples ``[B, ...]``.
        sigma: standard deviation of the perturbation (APT: 0.01 images, 0.1 video).
        generator: random generator for the noise (``None``: the global one).
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
        real_logits: ``discriminator(real, **cond)`` if already computed (saves a forward).
        **cond: conditioning passed to both discriminator calls.

    Returns:
        The penalty: a scalar, or ``[B]`` for ``reduction="none"``.

    Raises:
        ValueError: for a non-positive ``sigma``, logits that differ in shape between the
            calls, non-finite logits or an unknown reduction.
        TypeError: if ``real`` or the logits are not floating-point tensors.

    Examples:
        >>> d = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
        >>> g = torch.Generator().manual_seed(0)
        >>> approximate_r1(d, torch.randn(2, 3, 2, 2), generator=g).shape
        torch.Size([])

    References:
        APT, arXiv 2501.08316, §3.4, Eq. 9-10 (lambda = 100, sigma = 0.01).
    """
    fn = "approximate_r1"
    check_floating(fn, "real", real)
    check_positive(fn, "sigma", sigma)
    if real_logits is None:
        real_logits = discriminator(real, **cond)
    noise = torch.randn(real.shape, generator=generator, dtype=real.dtype, device=real.device)
    clean = as_heads(fn, "real_logits", real_logits)
    noisy = as_heads(fn, "perturbed logits", discriminator(real + sigma * noise, **cond))
    if [h.shape for h in clean] != [h.shape for h in noisy]:
        raise ValueError(
            f"{fn}: real_logits must match the discriminator's output on the perturbed "
            f"input, got shapes {[tuple(h.shape) for h in clean]} and "
            f"{[tuple(h.shape) for h in noisy]}"
        )
    diffs = [(c - n).square().sum(1) for c, n in zip(clean, noisy, strict=True)]
    return reduce_loss(sum_all(diffs), reduction, fn=fn)


def _check_count(fn: str, name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value}")


class LazyRegularizer:
    r"""Apply a regulariser every ``interval`` steps, scaled by ``interval``.

    $$ L_D^{(s)} = L_D + [s \bmod N = 0] \cdot N \gamma R_1 $$

    keeps the average strength of $\gamma R_1$ while paying for it once every $N$
    steps (StyleGAN2 uses $N = 16$). Stateless: the step is passed in, so there is
    nothing to checkpoint. StyleGAN2's code also runs the regularisation as a separate
    optimiser step and, to compensate, scales Adam's learning rate by $c = N/(N+1)$ and
    its betas to $\beta^c$; that belongs to your optimiser set-up.

    Args:
        interval: apply the penalty on steps divisible by ``interval``; 1 means every
            step (ADD's default reading).

    Raises:
        TypeError: if ``interval`` is not an int.
        ValueError: if ``interval`` is less than 1.

    Examples:
        >>> lazy = LazyRegularizer(16)
        >>> [step for step in range(40) if lazy.due(step)], lazy.scale
        ([0, 16, 32], 16.0)

    References:
        StyleGAN2, arXiv 1912.04958, §3.1.
    """

    def __init__(self, interval: int = 16) -> None:
        _check_count("LazyRegularizer", "interval", interval, minimum=1)
        self.interval = interval

    @property
    def scale(self) -> float:
        """The factor to multiply the penalty by on the steps it is applied: ``interval``."""
        return float(self.interval)

    def due(self, step: int) -> bool:
        """Whether the penalty is applied at ``step`` (a non-negative integer)."""
        _check_count("LazyRegularizer.due", "step", step, minimum=0)
        return step % self.interval == 0

    def __repr__(self) -> str:
        return f"LazyRegularizer(interval={self.interval})"
