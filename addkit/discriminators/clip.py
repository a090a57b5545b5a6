"""The image tower of an open_clip CLIP model as a frozen feature network.

Same taps and readout as [`DINOv2Features`][addkit.discriminators.vit.DINOv2Features]
(see [`addkit.discriminators.vit`][addkit.discriminators.vit]). ADD's ablation (Table 1a)
found a CLIP ViT-L a weaker feature network than DINOv2 ViT-S (FID 23.3 vs 20.6); StyleGAN-T
and the Projected-GAN line use CLIP features.

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042, Table 1a.
    Radford et al., *CLIP*, arXiv 2103.00020; Cherti et al., *OpenCLIP scaling laws*,
    arXiv 2212.07143.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from addkit.discriminators.vit import Readout, Tap, _hub_cached, _load_pretrained, _missing, _ViTFeatures

__all__ = ["CLIPFeatures"]

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPFeatures(_ViTFeatures):
    """The image tower of an open_clip CLIP model as a frozen feature network.

    Build it with [`from_open_clip`][addkit.discriminators.clip.CLIPFeatures.from_open_clip],
    or wrap ``model.visual`` yourself. The embedding tap is the input of the first block
    (patch embedding + class token + positional embedding, after ``ln_pre``).

    Args:
        visual: an open_clip ``VisionTransformer`` (``model.visual``); frozen in place.
        taps: block indices and/or ``"embed"``; default
            [`default_taps`][addkit.discriminators.vit.default_taps].
        readout: ``"add"`` or ``"drop"``.

    Raises:
        TypeError: if ``visual`` is not an open_clip ViT (e.g. a timm-backed tower: wrap its
            ``trunk`` with [`DINOv2Features`][addkit.discriminators.vit.DINOv2Features]).
        ValueError: for a tap the tower lacks.
    """

    _fn = "CLIPFeatures"

    def __init__(
        self, visual: nn.Module, *, taps: Sequence[Tap] | None = None, readout: Readout = "add"
    ) -> None:
        if not all(
            hasattr(visual, a) for a in ("forward_intermediates", "ln_pre", "transformer", "image_size")
        ):
            raise TypeError(
                f"CLIPFeatures: visual must be an open_clip VisionTransformer with forward_intermediates "
                f"(open_clip_torch 3.x), got {type(visual).__name__}"
            )
        super().__init__(
            depth=len(visual.transformer.resblocks),
            width=int(visual.transformer.width),
            taps=taps,
            resolution=int(visual.image_size[0]),
            mean=getattr(visual, "image_mean", None) or _OPENAI_MEAN,
            std=getattr(visual, "image_std", None) or _OPENAI_STD,
            readout=readout,
        )
        self.visual = visual
        self.freeze()

    @classmethod
    def from_open_clip(
        cls,
        model_name: str = "ViT-L-14",
        *,
        pretrained: bool | str = True,
        resolution: int | None = None,
        taps: Sequence[Tap] | None = None,
        readout: Readout = "add",
        **model_kwargs: Any,
    ) -> CLIPFeatures:
        """Create a CLIP model with ``open_clip.create_model`` and keep its image tower.

        Args:
            model_name: an open_clip architecture (ADD's ablation used a ViT-L CLIP).
            pretrained: ``True`` for OpenAI's weights (``"openai"``, with QuickGELU), a string
                for another open_clip tag or a local checkpoint file, ``False`` for random
                weights (tests, offline).
            resolution: input side; default the architecture's (open_clip resizes the
                positional embedding when it differs).
            taps: see the class.
            readout: see the class.
            **model_kwargs: passed to ``open_clip.create_model``.

        Raises:
            ModuleNotFoundError: if open_clip is missing (``pip install 'addkit[clip]'``).
            FileNotFoundError: for hub weights that are not cached while the hub cannot be
                reached (``HF_HUB_OFFLINE=1``, or no connection within 3 s); the message says
                what to pass instead.
        """
        try:
            import open_clip
        except ModuleNotFoundError as err:
            raise _missing("clip", "open_clip_torch", "CLIPFeatures.from_open_clip") from err
        tag = "openai" if pretrained is True else (pretrained or None)
        looks_like_file = isinstance(tag, str) and (
            os.sep in tag or tag.endswith((".bin", ".pt", ".safetensors"))
        )
        if looks_like_file and not os.path.isfile(tag):
            raise FileNotFoundError(f"CLIPFeatures.from_open_clip: pretrained={tag!r} is not a file")
        if tag == "openai":
            model_kwargs.setdefault("force_quick_gelu", True)
        if resolution is not None:
            model_kwargs.setdefault("force_image_size", resolution)

        def create() -> nn.Module:
            return open_clip.create_model(model_name, pretrained=tag, **model_kwargs)

        hub = (open_clip.get_pretrained_cfg(model_name, tag) or {}).get("hf_hub", "") if tag else ""
        if hub:  # a known tag whose weights come from the hub (a local file path has none)
            repo, filename = os.path.split(hub)
            names = (
                (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
            )
            what = f"{model_name!r} ({tag})"
            model = _load_pretrained("CLIPFeatures.from_open_clip", what, _hub_cached(repo, names), create)
        else:
            model = create()
        return cls(model.visual, taps=taps, readout=readout)

    _embed_module = "ln_pre"

    def _backbone(self) -> nn.Module:
        return self.visual

    def _intermediates(self, x: Tensor, blocks: list[int]) -> tuple[list[Tensor], list[Tensor | None]]:
        out = self.visual.forward_intermediates(
            x,
            indices=blocks,
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return list(out["image_intermediates"]), [p[:, 0] for p in out["image_intermediates_prefix"]]
