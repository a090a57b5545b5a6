"""Frozen feature networks: the shared contract and a wrapper that taps any ``nn.Module``.

A feature network maps images in ``[-1, 1]`` ``[B, 3, H, W]`` to a list of token features
``[B, C_i, N_i]``, one per tap (see [`FeatureNetwork`][addkit.typing.FeatureNetwork]). It
resizes and normalises its own input, keeps its parameters frozen and stays in eval mode;
gradients still flow through it to the input images (generator step, pixel-space R1).

This module holds the base class [`FrozenFeatures`][addkit.discriminators.features.FrozenFeatures],
the pre-processing and token helpers, and
[`TappedFeatures`][addkit.discriminators.features.TappedFeatures], which turns any network into a
feature network by naming the submodules to tap. Taps are read with forward hooks that are
registered inside each call and removed before it returns, even on error: nothing global,
nothing left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from addkit._checks import check_callable, check_finite_inputs, check_floating, check_ndim, check_positive_int
from addkit.typing import FeatureNetwork

__all__ = [
    "FeatureNetwork",
    "FrozenFeatures",
    "TappedFeatures",
    "check_images",
    "default_select",
    "preprocess_images",
    "recording",
    "resolve_submodules",
    "to_tokens",
]


class FrozenFeatures(nn.Module):
    """Base class for feature networks: parameters frozen, always in eval mode.

    Subclasses call [`freeze`][addkit.discriminators.features.FrozenFeatures.freeze] at the
    end of ``__init__`` and implement ``forward(images) -> list[Tensor[B, C_i, N_i]]`` and the
    ``channels`` property. ``train(True)`` is a no-op, so a discriminator put in train mode
    never switches dropout or batch statistics on inside its backbone.
    """

    def freeze(self) -> FrozenFeatures:
        """Set ``requires_grad=False`` on every parameter and switch to eval mode."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenFeatures:
        """Stay in eval mode whatever ``mode`` is (the backbone is frozen)."""
        return super().train(False)

    @property
    def channels(self) -> list[int]:
        """Channel count ``C_i`` of each tap."""
        raise NotImplementedError


def check_images(fn: str, images: Any, *, channels: int | None = 3) -> Tensor:
    """Raise unless ``images`` is a floating ``[B, channels, H, W]`` tensor; return it."""
    check_floating(fn, "images", images)
    check_ndim(fn, "images", images, 4, layout="[B, C, H, W]")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(
            f"{fn}: images must have {channels} channels ([B, {channels}, H, W] in [-1, 1]), "
            f"got shape {tuple(images.shape)}"
        )
    check_finite_inputs(fn, images=images)
    return images


def preprocess_images(
    images: Tensor,
    size: int | None,
    mean: Tensor | None = None,
    std: Tensor | None = None,
) -> Tensor:
    """Resize images in ``[-1, 1]`` and normalise them with a backbone's mean and std.

    Downsampling uses area interpolation (StyleGAN-T's choice), upsampling bilinear; both are
    differentiable. Normalisation maps to ``[0, 1]`` first: $(\\frac{x + 1}{2} - \\mu) / s$.

    Args:
        images: ``[B, 3, H, W]`` in ``[-1, 1]``.
        size: square side to resize to, or ``None`` to keep the size.
        mean: per-channel mean ``[3]`` in ``[0, 1]`` units, or ``None`` to skip normalising.
        std: per-channel std ``[3]``; required with ``mean``.

    Returns:
        ``[B, 3, size, size]`` in the input's dtype.

    Examples:
        >>> x = torch.zeros(1, 3, 8, 8)
        >>> y = preprocess_images(x, 4, torch.tensor([0.5] * 3), torch.tensor([0.5] * 3))
        >>> y.shape, float(y.abs().max())
        (torch.Size([1, 3, 4, 4]), 0.0)
    """
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        if images.shape[-2] >= size and images.shape[-1] >= size:
            images = F.interpolate(images, size=(size, size), mode="area")
        else:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if mean is not None:
        shift = (2 * mean - 1).to(device=images.device, dtype=images.dtype)
        scale = (2 * std).to(device=images.device, dtype=images.dtype)
        images = (images - shift.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1)
    return images


def default_select(output: Any) -> Tensor:
    """A tapped submodule's output as a tensor: the tensor itself or a tuple's first item.

    diffusers' down blocks return ``(hidden_states, residuals)``; the first item is the
    feature map. Pass your own ``select`` where that is wrong (SD3's joint blocks return
    ``(encoder_hidden_states, hidden_states)``: use ``lambda out: out[1]``).
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"default_select: a tapped submodule returned {type(output).__name__}, expected a "
        "tensor or a tuple whose first item is a tensor; pass select=callable(output) -> Tensor"
    )


def to_tokens(x: Tensor, *, fn: str = "to_tokens", name: str = "feature") -> Tensor:
    """Token layout ``[B, C, N]`` for a feature map or a token sequence.

    - ``[B, C, H, W]`` (or any ``[B, C, *spatial]``, rank >= 4): spatial dims flattened;
    - ``[B, N, C]`` (rank 3, the transformer convention): transposed.

    Examples:
        >>> to_tokens(torch.zeros(2, 8, 4, 4)).shape
        torch.Size([2, 8, 16])
        >>> to_tokens(torch.zeros(2, 16, 8)).shape
        torch.Size([2, 8, 16])
    """
    if x.ndim == 3:
        return rearrange(x, "b n c -> b c n")
    if x.ndim >= 4:
        return x.flatten(2)
    raise ValueError(
        f"{fn}: {name} must be a token sequence [B, N, C] or a feature map [B, C, H, W], "
        f"got shape {tuple(x.shape)}"
    )


class _StopForward(Exception):
    """Raised by a tap hook once every tap is recorded, to skip the rest of the forward."""


def resolve_submodules(fn: str, module: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """Look up each tap name with ``get_submodule``; raise a ``ValueError`` naming bad ones."""
    if len(set(names)) != len(names):
        raise ValueError(f"{fn}: taps must be distinct names, got {list(names)}")
    found = []
    for i, name in enumerate(names):
        try:
            found.append(module.get_submodule(name))
        except AttributeError:
            children = [n for n, _ in module.named_children()][:12]
            raise ValueError(
                f"{fn}: taps[{i}]={name!r} is not a submodule of {type(module).__name__} "
                f"(its children are {children}; nested names use dots, e.g. 'blocks.2')"
            ) from None
    return found


@contextmanager
def recording(
    module: nn.Module,
    names: Sequence[str],
    *,
    select: Callable[[Any], Tensor] = default_select,
    stop_early: bool = False,
    fn: str = "recording",
) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of named submodules during the calls made inside the block.

    Hooks are registered on entry and removed on exit, also when the block raises. With
    ``stop_early`` the forward is cut short once every tap has fired (a UNet tapped up to
    its mid block skips its decoder); the block then ends normally.

    Yields:
        A dict ``name -> selected output`` (first call of each submodule), filled as the
        forward runs.
    """
    outputs: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if name not in outputs:
                outputs[name] = select(output)
            if stop_early and len(outputs) == len(names):
                raise _StopForward

        return hook

    handles = [
        m.register_forward_hook(make_hook(n)) for n, m in zip(names, resolve_submodules(fn, module, names))
    ]
    try:
        yield outputs
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in outputs]
    if missing:
        raise RuntimeError(f"{fn}: the forward pass never ran the tapped submodules {missing}")


class TappedFeatures(FrozenFeatures):
    """Turn any image network into a feature network by naming the submodules to tap.

    The wrapped module is frozen in place (``requires_grad_(False)``, ``eval()``). Each call
    resizes to ``resolution``, normalises with ``mean``/``std``, runs the module with hooks
    scoped to the call, and returns each tap as tokens ``[B, C, N]``
    ([`to_tokens`][addkit.discriminators.features.to_tokens]).

    Args:
        module: any ``nn.Module`` taking ``[B, in_channels, H, W]`` images.
        taps: dotted submodule names, e.g. ``["layer1", "layer3.1"]``; outputs come in this order.
        channels: ``C_i`` per tap; if ``None`` they are read from one forward on a zero image.
        resolution: square input side, or ``None`` to pass images at their own size.
        mean: per-channel mean in ``[0, 1]`` units (e.g. ImageNet's); ``None`` leaves images
            in ``[-1, 1]``.
        std: per-channel std; required with ``mean``.
        select: maps a tapped submodule's raw output to a tensor
            ([`default_select`][addkit.discriminators.features.default_select]).
        stop_early: cut the forward short once every tap has fired.
        in_channels: channels the module takes: 3 for RGB networks, 4 for a network on SD
            latents, 1 for grayscale. ``mean``/``std`` need one value per channel.

    Raises:
        ValueError: if a tap is not a submodule of ``module``, ``mean``/``std`` come alone or
            do not have ``in_channels`` values, or ``in_channels`` is not positive.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3))
        >>> feats = TappedFeatures(net, ["1", "2"], resolution=32)
        >>> feats.channels
        [8, 16]
        >>> [tuple(f.shape) for f in feats(torch.zeros(2, 3, 64, 64))]
        [(2, 8, 225), (2, 16, 169)]
    """

    def __init__(
        self,
        module: nn.Module,
        taps: Sequence[str],
        *,
        channels: Sequence[int] | None = None,
        resolution: int | None = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        select: Callable[[Any], Tensor] = default_select,
        stop_early: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        fn = "TappedFeatures"
        if not isinstance(module, nn.Module):
            raise TypeError(f"{fn}: module must be an nn.Module, got {type(module).__name__}")
        if (mean is None) != (std is None):
            raise ValueError(f"{fn}: pass both mean and std, or neither; got mean={mean}, std={std}")
        check_positive_int(fn, "in_channels", in_channels)
        if resolution is not None:
            check_positive_int(fn, "resolution", resolution)
        check_callable(fn, "select", select)
        for name, stat in (("mean", mean), ("std", std)):
            if stat is not None and len(stat) != in_channels:
                raise ValueError(
                    f"{fn}: {name} must have one value per input channel ({in_channels}), got {list(stat)}"
                )
        self.in_channels = in_channels
        self.module = module
        self.taps = list(taps)
        if not self.taps:
            raise ValueError(f"{fn}: taps must name at least one submodule, got {self.taps}")
        resolve_submodules(fn, module, self.taps)
        self.resolution = resolution
        self.select = select
        self.stop_early = stop_early
        self.register_buffer("mean", None if mean is None else torch.tensor(mean), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std), persistent=False)
        self.freeze()
        if channels is None:
            side = resolution or 224
            param = next(module.parameters(), torch.zeros(()))
            probe = param.new_zeros(1, in_channels, side, side)
            with torch.no_grad():
                channels = [f.shape[1] for f in self(probe)]
        self._channels = [int(c) for c in channels]

    @property
    def channels(self) -> list[int]:
        """Channel count ``C_i`` of each tap."""
        return list(self._channels)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Token features ``[B, C_i, N_i]`` of ``images`` ``[B, in_channels, H, W]`` in ``[-1, 1]``."""
        fn = "TappedFeatures"
        images = check_images(fn, images, channels=self.in_channels)
        x = preprocess_images(images, self.resolution, self.mean, self.std)
        with recording(self.module, self.taps, select=self.select, stop_early=self.stop_early, fn=fn) as out:
            self.module(x)
        return [to_tokens(out[name], fn=fn, name=f"tap {name!r}") for name in self.taps]
