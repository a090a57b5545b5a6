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

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from addkit._checks import check_callable, check_choice, check_finite_inputs, check_floating, check_positive
from addkit._random import randn
from addkit._reduce import reduce_loss
from addkit._unwrap import unwrap_module
from addkit.losses._heads import as_heads, sum_all
from addkit.typing import Discriminator, HeadLogits, Reduction

__all__ = [
    "ApproximateR1",
    "LazyRegularizer",
    "R1Features",
    "R1Images",
    "R1Placement",
    "R1Regularizer",
    "approximate_r1",
    "r1_context",
    "r1_penalty",
    "r1_penalty_images",
    "r1_regularizer",
]


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
        check_finite_inputs(fn, **{label: x})
        if not x.requires_grad:
            raise ValueError(
                f"{fn}: {label} does not require grad: call .requires_grad_(True) on it before "
                f"the discriminator forward (e.g. real = real.detach().requires_grad_(True))"
            )
        if x.ndim == 0 or x.shape[0] != batch:
            raise ValueError(
                f"{fn}: {label} must have batch size {batch} like real_logits, got shape {tuple(x.shape)}"
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
    check_floating("r1_penalty_images", "real_images", real_images)
    check_callable("r1_penalty_images", "discriminator", discriminator)
    check_finite_inputs("r1_penalty_images", real_images=real_images)
    return _logits_and_r1_on_images(lambda x: discriminator(x, **cond), real_images, reduction)[1]


def _logits_and_r1_on_images(
    call: Callable[[Tensor], HeadLogits], real: Tensor, reduction: Reduction = "mean"
) -> tuple[HeadLogits, Tensor]:
    """``call`` on a copy of ``real`` that requires grad, under math attention; logits and R1."""
    x = real.detach().requires_grad_(True)
    with r1_context():
        logits = call(x)
        return logits, r1_penalty(logits, x, reduction=reduction)


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
        generator: random generator for the noise (``None``: the global one); the noise is
            drawn on its device and moved to ``real``'s.
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
    check_finite_inputs(fn, real=real)
    check_positive(fn, "sigma", sigma)
    check_callable(fn, "discriminator", discriminator)
    if real_logits is None:
        real_logits = discriminator(real, **cond)
    noise = randn(tuple(real.shape), device=real.device, dtype=real.dtype, generator=generator)
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

    def due(self, step: int | None) -> bool:
        """Whether the penalty is applied at ``step`` (a non-negative integer).

        ``step`` may be ``None`` only with ``interval == 1`` (every step is due).

        Raises:
            ValueError: if ``step`` is ``None`` with an interval above 1 (the penalty would be
                applied, scaled by the interval, on every call), or negative.
            TypeError: if ``step`` is not an int.
        """
        fn = "LazyRegularizer.due"
        if step is None:
            if self.interval > 1:
                raise ValueError(
                    f"{fn}: step is required with interval={self.interval} (pass the training step, "
                    f"e.g. discriminator_loss(..., step=step)); without it the penalty would be applied, "
                    f"scaled by {self.interval}, on every call"
                )
            return True
        _check_count(fn, "step", step, minimum=0)
        return step % self.interval == 0

    def __repr__(self) -> str:
        return f"LazyRegularizer(interval={self.interval})"


# -- R1 placements: where the penalty is taken, as small callables ---------------------------

R1Placement = Literal["features", "images", "approximate"]
"""Where R1 is taken: the heads' input features (ADD), the images (exact), APT's approximation."""


@runtime_checkable
class R1Regularizer(Protocol):
    """One R1 placement: the discriminator's logits on real samples and their penalty.

    ``reg(discriminator, real, generator=..., feature_kwargs=..., **cond) -> (logits, r1)``
    returns the per-head real logits (reused for the adversarial loss, so the real forward
    runs once) and the batch-mean penalty. ``default_gamma`` is the weight its source uses.
    """

    default_gamma: float

    def __call__(
        self,
        discriminator: Discriminator,
        real: Tensor,
        *,
        generator: torch.Generator | None = None,
        feature_kwargs: Mapping[str, Any] | None = None,
        **cond: Any,
    ) -> tuple[HeadLogits, Tensor]:
        """Real logits per head and the penalty (a scalar)."""
        ...


class R1Features:
    """R1 w.r.t. the frozen features fed to the heads (ADD §3.2; $\\gamma = 10^{-5}$).

    Calls ``discriminator.extract(real)`` (through a DDP-style wrapper's ``.module``), makes
    the features leaves that require grad, runs the heads through
    ``discriminator(features=...)`` (so a DDP wrapper synchronises the heads' gradients) and
    differentiates w.r.t. the features: the double backward never enters the feature network.
    A noise-conditioned discriminator (``noise_conditioned``, e.g. LADD's heads) draws one
    ``t`` (unless ``feature_kwargs`` holds one) for both the features and the heads.

    Examples:
        >>> from addkit.discriminators import ProjectedDiscriminator, TappedFeatures
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4))
        >>> D = ProjectedDiscriminator(TappedFeatures(net, ["0"], resolution=16))
        >>> logits, r1 = R1Features()(D, torch.rand(2, 3, 16, 16))
        >>> r1.shape
        torch.Size([])
    """

    default_gamma = 1e-5

    def __call__(
        self,
        discriminator: Discriminator,
        real: Tensor,
        *,
        generator: torch.Generator | None = None,
        feature_kwargs: Mapping[str, Any] | None = None,
        **cond: Any,
    ) -> tuple[HeadLogits, Tensor]:
        extract = getattr(unwrap_module(discriminator), "extract", None)
        if not callable(extract):
            raise TypeError(
                f"R1Features: the discriminator must have extract(images) and accept features=... "
                f"(addkit.typing.Discriminator, e.g. ProjectedDiscriminator), got {type(discriminator).__name__}; "
                f"use R1Images or ApproximateR1 (r1_placement='images' or 'approximate') for other discriminators"
            )
        fk = dict(feature_kwargs or {})
        inner = unwrap_module(discriminator)
        if getattr(inner, "noise_conditioned", False):  # one noise level for the features and the heads
            if fk.get("t") is None:
                fk["t"] = inner.sample_t(real.shape[0], generator=generator, device=real.device)
            cond = {**cond, "t": fk["t"]}
        feats = [f.detach().requires_grad_(True) for f in extract(real, generator=generator, **fk)]
        logits = discriminator(features=feats, per_head=True, **cond)
        return logits, r1_penalty(logits, feats)

    def __repr__(self) -> str:
        return "R1Features()"


class R1Images:
    """Exact R1 w.r.t. the images: the double backward runs through the feature network.

    Runs under [`r1_context`][addkit.losses.regularizers.r1_context] (math attention); see
    [`r1_penalty_images`][addkit.losses.regularizers.r1_penalty_images].

    Examples:
        >>> d = lambda x, per_head=True, generator=None: x.flatten(1)[:, :2]
        >>> R1Images()(d, torch.rand(3, 4))[1]   # each sample: two unit gradients
        tensor(2.)
    """

    default_gamma = 1e-5

    def __call__(
        self,
        discriminator: Discriminator,
        real: Tensor,
        *,
        generator: torch.Generator | None = None,
        feature_kwargs: Mapping[str, Any] | None = None,
        **cond: Any,
    ) -> tuple[HeadLogits, Tensor]:
        fk = dict(feature_kwargs or {})
        return _logits_and_r1_on_images(
            lambda x: discriminator(x, per_head=True, generator=generator, **cond, **fk), real
        )

    def __repr__(self) -> str:
        return "R1Images()"


class ApproximateR1:
    """APT's first-order R1 ([`approximate_r1`][addkit.losses.regularizers.approximate_r1]; $\\gamma = 100$).

    Both discriminator calls (clean and perturbed) see the same augmentation: each gets a
    generator in the same state as ``generator`` (the default generator of ``real``'s device
    without one); afterwards the caller's generator is advanced past those draws and then
    draws the perturbation, so no two draws share random numbers. Reads no device value.

    Args:
        sigma: standard deviation of the perturbation (APT: 0.01 for images).

    Raises:
        ValueError: for a non-positive ``sigma``.

    Examples:
        >>> d = lambda x, per_head=True, generator=None: x.flatten(1)[:, :2]
        >>> _, r1 = ApproximateR1(sigma=0.01)(d, torch.rand(3, 4), generator=torch.Generator().manual_seed(0))
        >>> bool(r1 > 0)
        True
    """

    default_gamma = 100.0

    def __init__(self, sigma: float = 0.01) -> None:
        self.sigma = float(check_positive("ApproximateR1", "sigma", sigma))

    def __call__(
        self,
        discriminator: Discriminator,
        real: Tensor,
        *,
        generator: torch.Generator | None = None,
        feature_kwargs: Mapping[str, Any] | None = None,
        **cond: Any,
    ) -> tuple[HeadLogits, Tensor]:
        fk = dict(feature_kwargs or {})
        source = generator if generator is not None else _default_generator(real.device)
        state = source.get_state()
        clean, perturbed = (_generator_at(source, state) for _ in range(2))

        def call(x: Tensor, g: torch.Generator) -> HeadLogits:
            return discriminator(x, per_head=True, generator=g, **cond, **fk)

        logits = call(real, clean)
        source.set_state(clean.get_state())  # past the augmentation draws
        r1 = approximate_r1(
            lambda x: call(x, perturbed), real, sigma=self.sigma, generator=source, real_logits=logits
        )
        return logits, r1

    def __repr__(self) -> str:
        return f"ApproximateR1(sigma={self.sigma})"


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    if device.type == "cpu":
        return torch.default_generator
    raise ValueError(f"ApproximateR1: pass generator=... for samples on {device}")


def _generator_at(source: torch.Generator, state: Tensor) -> torch.Generator:
    g = torch.Generator(device=source.device)
    g.set_state(state)
    return g


_PLACEMENTS: dict[str, Callable[..., R1Regularizer]] = {
    "features": R1Features,
    "images": R1Images,
    "approximate": ApproximateR1,
}


def r1_regularizer(placement: R1Placement | R1Regularizer, *, sigma: float = 0.01) -> R1Regularizer:
    """The R1 placement named ``placement`` (or ``placement`` itself when it is a regulariser).

    Args:
        placement: ``"features"`` ([`R1Features`][addkit.losses.regularizers.R1Features]),
            ``"images"`` ([`R1Images`][addkit.losses.regularizers.R1Images]),
            ``"approximate"`` ([`ApproximateR1`][addkit.losses.regularizers.ApproximateR1]), or
            any [`R1Regularizer`][addkit.losses.regularizers.R1Regularizer].
        sigma: the perturbation of ``"approximate"``.

    Raises:
        ValueError: for an unknown name.
        TypeError: for an object that is not callable or has no ``default_gamma``.

    Examples:
        >>> r1_regularizer("approximate", sigma=0.05)
        ApproximateR1(sigma=0.05)
    """
    fn = "r1_regularizer"
    if isinstance(placement, str):
        check_choice(fn, "placement", placement, tuple(_PLACEMENTS))
        return ApproximateR1(sigma) if placement == "approximate" else _PLACEMENTS[placement]()
    check_callable(fn, "placement", placement, hint=" (an R1Regularizer instance)")
    if not hasattr(placement, "default_gamma"):
        raise TypeError(
            f"{fn}: placement must be one of {tuple(_PLACEMENTS)} or an R1Regularizer "
            f"(callable with a default_gamma), got {type(placement).__name__}"
        )
    return placement
