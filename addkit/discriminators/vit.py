"""ViT feature networks with StyleGAN-T's taps: the shared machinery and DINOv2 (timm).

[`DINOv2Features`][addkit.discriminators.vit.DINOv2Features] here and
[`CLIPFeatures`][addkit.discriminators.clip.CLIPFeatures] (open_clip) read block outputs
with the backbone's own ``forward_intermediates`` (stopping after the last tapped block),
and the patch embedding (after the positional embedding) with a hook scoped to the call.
The class token is *added* to every patch token and then dropped ("add" readout, as in DPT
and StyleGAN-T), giving ``[B, C, N]`` with ``N`` patch tokens.

Default taps for a ViT of depth $d$: the patch embedding and blocks
$d/4 - 1,\\ d/2 - 1,\\ 3d/4 - 1,\\ d - 1$ (0-based), i.e. ``("embed", 2, 5, 8, 11)`` for
ViT-S/B: five heads.

References:
    Sauer et al., *StyleGAN-T*, arXiv 2301.09515, §3 (frozen ViT features, taps).
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042, §3.2 and Table 1a
    (DINOv2 ViT-S is the best feature network).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from einops import rearrange
from torch import Tensor, nn

from addkit._checks import check_choice, check_positive_int
from addkit.discriminators.features import FrozenFeatures, check_images, preprocess_images, recording

__all__ = ["DINOv2Features", "Readout", "Tap", "default_taps"]

Tap = int | Literal["embed"]
"""A tap: a 0-based block index, or ``"embed"`` for the patch embedding after the positional
embedding."""

Readout = Literal["add", "drop"]
"""How the class token is used: added to every patch token (``"add"``) or dropped."""


def default_taps(depth: int) -> tuple[Tap, ...]:
    """StyleGAN-T's taps for a ViT of ``depth`` blocks: embedding + four evenly spaced blocks.

    Examples:
        >>> default_taps(12)
        ('embed', 2, 5, 8, 11)
        >>> default_taps(24)
        ('embed', 5, 11, 17, 23)
    """
    blocks = sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)})
    return ("embed", *blocks)


class _ViTFeatures(FrozenFeatures):
    """Tap parsing, pre-processing and readout shared by the ViT feature networks."""

    _fn = "_ViTFeatures"
    _num_prefix = 1  # class token (+ registers) before the patch tokens

    def __init__(
        self,
        *,
        depth: int,
        width: int,
        taps: Sequence[Tap] | None,
        resolution: int,
        mean: Sequence[float],
        std: Sequence[float],
        readout: Readout,
    ) -> None:
        super().__init__()
        self.readout = check_choice(self._fn, "readout", readout, ("add", "drop"))
        self.taps: list[Tap] = list(default_taps(depth) if taps is None else taps)
        for i, tap in enumerate(self.taps):
            if not (
                tap == "embed" or (isinstance(tap, int) and not isinstance(tap, bool) and 0 <= tap < depth)
            ):
                raise ValueError(
                    f"{self._fn}: taps[{i}]={tap!r} is not a tap of this ViT; valid taps are 'embed' "
                    f"and block indices 0..{depth - 1} (depth {depth})"
                )
        if len(set(self.taps)) != len(self.taps) or not self.taps:
            raise ValueError(f"{self._fn}: taps must be non-empty and distinct, got {self.taps}")
        self.width = width
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    @property
    def channels(self) -> list[int]:
        """Channel count of each tap (the ViT width for all of them)."""
        return [self.width] * len(self.taps)

    _embed_module = ""  # submodule whose output is the "embed" tap (tokens with prefix)

    def _backbone(self) -> nn.Module:
        raise NotImplementedError

    def _intermediates(self, x: Tensor, blocks: list[int]) -> tuple[list[Tensor], list[Tensor | None]]:
        """Backbone-specific: patch tokens ``[B, N, C]`` and CLS ``[B, C]`` of each block."""
        raise NotImplementedError

    def _read(self, patches: Tensor, cls: Tensor | None) -> Tensor:
        if self.readout == "add" and cls is not None:
            patches = patches + cls[:, None]
        return rearrange(patches, "b n c -> b c n")

    def forward(self, images: Tensor) -> list[Tensor]:
        """Token features ``[B, C, N]`` per tap of ``images`` ``[B, 3, H, W]`` in ``[-1, 1]``."""
        x = preprocess_images(check_images(self._fn, images), self.resolution, self.mean, self.std)
        blocks = sorted(t for t in self.taps if t != "embed")
        names = [self._embed_module] if "embed" in self.taps else []
        with recording(self._backbone(), names, fn=self._fn) as rec:
            patches, cls = self._intermediates(x, blocks or [0])  # block 0 only when just "embed"
        by_tap: dict[Tap, Tensor] = {b: self._read(p, c) for b, p, c in zip(blocks, patches, cls)}
        if names:
            embed, n = rec[self._embed_module], self._num_prefix
            by_tap["embed"] = self._read(embed[:, n:], embed[:, 0] if n else None)
        return [by_tap[t] for t in self.taps]


def _missing(extra: str, package: str, where: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"{where} needs {package}: pip install 'addkit[{extra}]'")


_T = TypeVar("_T")
_OFFLINE_HINT = (
    "pass pretrained=False for random weights (tests, offline), pretrained='/path/to/weights' for a "
    "local file, or download them once online (the Hugging Face cache keeps them) and set HF_HUB_OFFLINE=1"
)


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, no route), or None if it can.

    One TCP connection with a 3 s timeout instead of the hub client's retries (about a minute
    per file). Behind a proxy the client's own connection decides.
    """
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=3.0).close()
    except OSError as err:
        return f"{url.hostname}:{port} cannot be reached ({err.strerror or err})"
    return None


def _load_pretrained(where: str, what: str, cached: bool, load: Callable[[], _T]) -> _T:
    """``load()`` weights from the hub, failing at once, with what to do, when it is out of reach.

    Args:
        where: the calling function, for the message.
        what: the weights, for the message.
        cached: whether the weights are already in the Hugging Face cache (then offline is fine).
        load: the call that loads (and may download) the weights.

    Raises:
        FileNotFoundError: the weights are not cached and the hub cannot be reached.
    """
    reason = None if cached else _hub_unreachable()
    if reason is not None:
        raise FileNotFoundError(
            f"{where}: the weights of {what} are not cached and {reason}: {_OFFLINE_HINT}"
        )
    try:
        return load()
    except OSError as err:  # the hub client's "not found locally" / connection errors
        raise FileNotFoundError(
            f"{where}: could not load the weights of {what} ({err}): {_OFFLINE_HINT}"
        ) from err


def _hub_cached(repo_id: str | None, filenames: Sequence[str]) -> bool:
    """Whether one of ``filenames`` of the hub repository ``repo_id`` is in the local cache."""
    if not repo_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


class DINOv2Features(_ViTFeatures):
    """DINOv2 (or any timm ``VisionTransformer``) as a frozen feature network.

    Build it with [`from_timm`][addkit.discriminators.vit.DINOv2Features.from_timm] (the only
    place weights are loaded), or wrap a timm model you already have.

    Args:
        model: a timm ``VisionTransformer`` (needs ``forward_intermediates``); frozen in place.
        taps: block indices and/or ``"embed"``; default
            [`default_taps`][addkit.discriminators.vit.default_taps] (``embed, 2, 5, 8, 11``
            for ViT-S/14).
        resolution: square input side; default the model's ``img_size``. It must equal
            ``img_size`` unless the model was built with ``dynamic_img_size=True``.
        readout: ``"add"`` (CLS added to patch tokens) or ``"drop"``.

    Raises:
        TypeError: if ``model`` is not a timm ViT.
        ValueError: for a tap the model lacks, a resolution it cannot take, or
            ``readout="add"`` without a class token.

    Examples:
        >>> feats = DINOv2Features.from_timm(
        ...     "vit_small_patch14_dinov2", pretrained=False, resolution=56,
        ...     depth=4, embed_dim=32, num_heads=2)
        >>> feats.taps, feats.channels
        (['embed', 0, 1, 2, 3], [32, 32, 32, 32, 32])
        >>> [tuple(f.shape) for f in feats(torch.zeros(1, 3, 64, 64))][:2]
        [(1, 32, 16), (1, 32, 16)]
    """

    _fn = "DINOv2Features"

    def __init__(
        self,
        model: nn.Module,
        *,
        taps: Sequence[Tap] | None = None,
        resolution: int | None = None,
        readout: Readout = "add",
    ) -> None:
        if not all(hasattr(model, a) for a in ("forward_intermediates", "blocks", "patch_embed", "norm_pre")):
            raise TypeError(
                f"DINOv2Features: model must be a timm VisionTransformer, got {type(model).__name__}"
            )
        native = int(model.patch_embed.img_size[0])
        if resolution is not None:
            check_positive_int("DINOv2Features", "resolution", resolution)
        resolution = native if resolution is None else int(resolution)
        if resolution != native and not getattr(model, "dynamic_img_size", False):
            raise ValueError(
                f"DINOv2Features: resolution={resolution} differs from the model's img_size {native}; "
                f"build the model with img_size={resolution} or dynamic_img_size=True"
            )
        if readout == "add" and getattr(model, "cls_token", None) is None:
            raise ValueError(
                f"DINOv2Features: readout='add' needs a class token, but {type(model).__name__} "
                "has none; use readout='drop'"
            )
        cfg = getattr(model, "pretrained_cfg", None) or {}
        super().__init__(
            depth=len(model.blocks),
            width=int(model.embed_dim),
            taps=taps,
            resolution=resolution,
            mean=cfg.get("mean", (0.485, 0.456, 0.406)),
            std=cfg.get("std", (0.229, 0.224, 0.225)),
            readout=readout,
        )
        self.model = model
        self._num_prefix = int(model.num_prefix_tokens)
        self.freeze()

    @classmethod
    def from_timm(
        cls,
        model_name: str = "vit_small_patch14_dinov2.lvd142m",
        *,
        pretrained: bool | str = True,
        resolution: int = 224,
        taps: Sequence[Tap] | None = None,
        readout: Readout = "add",
        **model_kwargs: Any,
    ) -> DINOv2Features:
        """Create the backbone with ``timm.create_model`` and wrap it.

        The positional embedding is built for ``resolution`` (timm resamples the pretrained
        one once, at load time). ADD uses DINOv2 ViT-S/14; 224 keeps it cheap, 518 is native.

        Args:
            model_name: a timm model name, with or without its pretrained tag.
            pretrained: ``True`` loads timm's weights (Hugging Face hub, cached), a string is
                a local checkpoint file, ``False`` leaves random weights (tests, offline).
            resolution: square input side.
            taps: see the class.
            readout: see the class.
            **model_kwargs: passed to ``timm.create_model`` (e.g. ``depth=4`` for tests).

        Raises:
            ModuleNotFoundError: if timm is missing (``pip install 'addkit[timm]'``).
            FileNotFoundError: with ``pretrained=True``, if the weights are not cached and the
                hub cannot be reached (``HF_HUB_OFFLINE=1``, or no connection within 3 s); the
                message says what to pass instead.
        """
        try:
            import timm
        except ModuleNotFoundError as err:
            raise _missing("timm", "timm", "DINOv2Features.from_timm") from err
        if isinstance(pretrained, str):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(
                    f"DINOv2Features.from_timm: pretrained={pretrained!r} is not a file; {_OFFLINE_HINT}"
                )
            model_kwargs.setdefault("pretrained_cfg_overlay", {"file": pretrained})

        def create() -> nn.Module:
            return timm.create_model(
                model_name, pretrained=bool(pretrained), img_size=resolution, **model_kwargs
            )

        if pretrained is True:
            cfg = timm.models.get_pretrained_cfg(model_name)
            repo = getattr(cfg, "hf_hub_id", None)
            cached = _hub_cached(repo, ("model.safetensors", "pytorch_model.bin"))
            model = _load_pretrained("DINOv2Features.from_timm", repr(model_name), cached, create)
        else:
            model = create()
        return cls(model, taps=taps, resolution=resolution, readout=readout)

    _embed_module = "norm_pre"

    def _backbone(self) -> nn.Module:
        return self.model

    def _intermediates(self, x: Tensor, blocks: list[int]) -> tuple[list[Tensor], list[Tensor | None]]:
        with_prefix = self._num_prefix > 0
        out = self.model.forward_intermediates(
            x,
            indices=blocks,
            return_prefix_tokens=with_prefix,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        if not with_prefix:
            return list(out), [None] * len(out)
        return [o[0] for o in out], [o[1][:, 0] for o in out]
