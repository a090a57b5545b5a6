"""Projected discriminator: a frozen feature network plus small trainable heads.

$$ D(x, c) = \\big[\\, h_k(F_k(\\operatorname{aug}(x)),\\ c) \\,\\big]_{k=1}^{K_{taps}}
   \\in \\mathbb{R}^{B \\times \\sum_k N_k} $$

one logit per token of every tap, concatenated (higher = real). The loss decides how to
reduce them; addkit's losses default to sum over heads, mean over tokens and batch when
given the list of heads, which ``per_head=True`` returns.

A feature network that
declares ``layout = "grid"`` (e.g. [`TeacherFeatures`][addkit.discriminators.teacher.TeacherFeatures])
returns ``[B, C_k, h_k, w_k]`` maps and gets 2-D heads; token features ``[B, C_k, N_k]`` get
StyleGAN-T's 1-D heads.

**Noise-level conditioning** (``c_noise_dim``, LADD). When the feature network re-noises its
input to a drawn level $\\hat t$ (it has ``sample_t`` and ``schedule``), the heads can be told
$\\hat t$: one draw per sample feeds both the features and a sinusoidal embedding of the noise
fraction $r = \\sigma_{\\hat t}/(\\alpha_{\\hat t} + \\sigma_{\\hat t})$ (1,000 r, as diffusion
models embed time), concatenated with the text and image embeddings before each head's
projection. Without it a head must judge a nearly clean and a nearly pure-noise input with the
same weights.

The feature network is held *outside* the module tree: ``parameters()``, ``state_dict()``,
``requires_grad_()`` and DDP see only the heads, so an optimizer built from
``D.parameters()`` and a GAN loop that toggles ``D.requires_grad_(...)`` never touch the
backbone. ``.to()``, ``.cuda()``, ``.half()`` and friends are forwarded to it, and
``state_dict(include_features=True)`` adds it under the ``features.`` prefix.

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042, §3.2 (frozen
    DINOv2 features, trainable heads, text + image conditioning, R1 on the head inputs).
    Sauer et al., *StyleGAN-T*, arXiv 2301.09515, §3.2.
    Sauer et al., *Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
    Distillation*, arXiv 2403.12015, §3 (heads on the teacher's token grid, conditioned on
    the noise level and the text).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from addkit._checks import check_callable, check_finite_inputs, check_floating, check_positive_int
from addkit._dtype import as_module_dtype
from addkit.discriminators.clip import CLIPFeatures
from addkit.discriminators.heads import DiscHead, HeadNorm, noise_level_embedding
from addkit.discriminators.teacher import noise_fraction
from addkit.discriminators.vit import DINOv2Features
from addkit.typing import FeatureNetwork

__all__ = ["ProjectedDiscriminator"]

_PREFIX = "features."


class ProjectedDiscriminator(nn.Module):
    """ADD's discriminator: frozen features, one [`DiscHead`][addkit.discriminators.heads.DiscHead] per tap.

    Conditioning: ``c_text`` and ``c_image`` (when configured) are concatenated and each
    head projects the result with its own linear map to ``cmap_dim``. How ADD combines its
    text and image embeddings is not stated in the paper (arXiv 2311.17042, §3.2 says only
    that both condition the heads); concatenation is the choice made here. Zeroing ``c_image`` at the pure-noise student
    step is left to the caller.

    Gradient and memory policy of [`extract`][addkit.discriminators.projected.ProjectedDiscriminator.extract]:
    images that do not require grad (real images, detached fakes) run the feature network
    under ``torch.no_grad()``, so the returned features are graph-free leaves; images that
    require grad (generator step) keep the graph to the images. The feature network never
    gets parameter gradients.

    Args:
        features: a [`FeatureNetwork`][addkit.typing.FeatureNetwork] (``channels`` + a call
            returning ``[B, C_i, N_i]`` per tap), e.g.
            [`DINOv2Features`][addkit.discriminators.vit.DINOv2Features]. An ``nn.Module``
            one is frozen (``requires_grad_(False)``, ``eval()``) unless it says
            ``frozen = False`` (a ``TeacherFeatures(..., freeze=False)`` on DMD2's fake score).
        c_text_dim: width of the text embedding, or ``None`` for no text conditioning.
        c_image_dim: width of the image embedding, or ``None``.
        c_noise_dim: width of the noise-level embedding (even), or ``None`` (default) for
            heads that are not told $\\hat t$. Needs a feature network that draws it
            (``sample_t`` and ``schedule``, e.g. ``TeacherFeatures``). LADD: set it.
        augment: called as ``augment(images, generator=...)`` before the features in
            training mode (e.g. [`DiffAugment`][addkit.discriminators.augment.DiffAugment]);
            ``None`` for none. Not applied in eval mode.
        cmap_dim: projection width (StyleGAN-T: 64).
        kernel_size: residual-block kernel of the heads (default 9 for tokens, 3 × 3 for a grid).
        norm: the heads' normalisation, ``"sample"`` (default: each sample alone, so real and
            fake may be scored in separate calls) or ``"batch"`` (StyleGAN-T's local batch norm;
            see [`addkit.discriminators.heads`][addkit.discriminators.heads] for why it is not
            the default).
        virtual_batch_size: group size of ``norm="batch"`` (8).

    Raises:
        TypeError: if ``features`` has no ``channels``, or ``c_noise_dim`` is set for a
            feature network without ``sample_t`` and ``schedule``.

    Examples:
        >>> from addkit.discriminators import TappedFeatures
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU())
        >>> D = ProjectedDiscriminator(TappedFeatures(net, ["0", "1"], resolution=32), c_text_dim=6)
        >>> D(torch.rand(2, 3, 64, 64) * 2 - 1, c_text=torch.randn(2, 6)).shape
        torch.Size([2, 128])
        >>> sorted({k.split(".")[0] for k in D.state_dict()})
        ['heads']
    """

    def __init__(
        self,
        features: FeatureNetwork,
        *,
        c_text_dim: int | None = None,
        c_image_dim: int | None = None,
        c_noise_dim: int | None = None,
        augment: Callable[..., Tensor] | None = None,
        cmap_dim: int = 64,
        kernel_size: int | None = None,
        norm: HeadNorm = "sample",
        virtual_batch_size: int = 8,
    ) -> None:
        super().__init__()
        fn = "ProjectedDiscriminator"
        if not hasattr(features, "channels") or not callable(features):
            raise TypeError(
                f"{fn}: features must be a FeatureNetwork (callable with a `channels` list), "
                f"got {type(features).__name__}"
            )
        for name, dim in (("c_text_dim", c_text_dim), ("c_image_dim", c_image_dim), ("c_noise_dim", c_noise_dim)):
            if dim is not None:
                check_positive_int(fn, name, dim)
        if c_noise_dim is not None:
            if c_noise_dim % 2:
                raise ValueError(f"{fn}: c_noise_dim must be even (cos and sin pairs), got {c_noise_dim}")
            if not callable(getattr(features, "sample_t", None)) or not hasattr(features, "schedule"):
                raise TypeError(
                    f"{fn}: c_noise_dim conditions the heads on the noise level the feature network draws, so "
                    f"features needs sample_t(batch, generator=, device=) and a schedule (e.g. TeacherFeatures), "
                    f"got {type(features).__name__}"
                )
        layout = getattr(features, "layout", "tokens")
        if layout not in ("tokens", "grid"):
            raise ValueError(f"{fn}: features.layout must be 'tokens' or 'grid', got {layout!r}")
        if augment is not None:
            check_callable(fn, "augment", augment, hint=" (e.g. DiffAugment())")
        if isinstance(features, nn.Module) and getattr(features, "frozen", True):
            features.requires_grad_(False).eval()
        self.__dict__["_features"] = features  # not a registered submodule: see module docs
        call = features.forward if isinstance(features, nn.Module) else features
        self._features_take_generator = "generator" in inspect.signature(call).parameters
        self.c_text_dim = c_text_dim
        self.c_image_dim = c_image_dim
        self.c_noise_dim = c_noise_dim
        self.layout = layout
        c_dim = (c_text_dim or 0) + (c_image_dim or 0) + (c_noise_dim or 0) or None
        self.heads = nn.ModuleList(
            DiscHead(
                c,
                c_dim=c_dim,
                cmap_dim=cmap_dim,
                kernel_size=kernel_size,
                norm=norm,
                virtual_batch_size=virtual_batch_size,
                dims=2 if layout == "grid" else 1,
            )
            for c in features.channels
        )
        self.augment = augment

    # -- construction from pretrained backbones -------------------------------------------
    @classmethod
    def from_dinov2(
        cls,
        model_name: str = "vit_small_patch14_dinov2.lvd142m",
        *,
        pretrained: bool | str = True,
        resolution: int = 224,
        taps: Sequence[int | str] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> ProjectedDiscriminator:
        """ADD's default: DINOv2 ViT-S/14 features (timm), five heads.

        Args:
            model_name: timm model name.
            pretrained: ``True`` for timm's weights (downloaded once from the Hugging Face hub,
                then cached), a path for a local file, ``False`` for random weights (tests,
                offline).
            resolution: DINOv2 input side (224 default; 518 native).
            taps: see [`DINOv2Features`][addkit.discriminators.vit.DINOv2Features].
            model_kwargs: extra ``timm.create_model`` arguments.
            **kwargs: passed to the constructor (``c_text_dim``, ``augment``, ...).

        Raises:
            FileNotFoundError: with ``pretrained=True``, at once, when the weights are not cached
                and the hub cannot be reached (``HF_HUB_OFFLINE=1``, or no connection in 3 s);
                the message says to pass ``pretrained=False`` or a local weights path.
        """
        features = DINOv2Features.from_timm(
            model_name, pretrained=pretrained, resolution=resolution, taps=taps, **dict(model_kwargs or {})
        )
        return cls(features, **kwargs)

    @classmethod
    def from_clip(
        cls,
        model_name: str = "ViT-L-14",
        *,
        pretrained: bool | str = True,
        resolution: int | None = None,
        taps: Sequence[int | str] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> ProjectedDiscriminator:
        """CLIP image-tower features (open_clip, ADD's other ablated backbone).

        See [`CLIPFeatures`][addkit.discriminators.clip.CLIPFeatures].

        Args:
            model_name: open_clip architecture.
            pretrained: ``True`` for OpenAI's weights, a tag or file path, ``False`` for random.
            resolution: input side (default the architecture's).
            taps: block indices and/or ``"embed"``.
            model_kwargs: extra ``open_clip.create_model`` arguments.
            **kwargs: passed to the constructor.

        Raises:
            FileNotFoundError: at once, for hub weights that are not cached while the hub cannot
                be reached; the message says to pass ``pretrained=False`` or a local path.
        """
        features = CLIPFeatures.from_open_clip(
            model_name, pretrained=pretrained, resolution=resolution, taps=taps, **dict(model_kwargs or {})
        )
        return cls(features, **kwargs)

    # -- forward -------------------------------------------------------------------------------
    @property
    def noise_conditioned(self) -> bool:
        """Whether the heads take the noise level ``t`` (built with ``c_noise_dim``)."""
        return self.c_noise_dim is not None

    def sample_t(
        self, batch_size: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Noise levels ``[B]`` from the feature network (``features.sample_t``), for the caller who
        runs [`extract`][addkit.discriminators.projected.ProjectedDiscriminator.extract] and
        [`classify`][addkit.discriminators.projected.ProjectedDiscriminator.classify] apart."""
        draw = getattr(self._features, "sample_t", None)
        if not callable(draw):
            raise TypeError(
                f"ProjectedDiscriminator.sample_t: the feature network {type(self._features).__name__} draws no noise level"
            )
        return draw(batch_size, generator=generator, device=device)

    @property
    def features(self) -> FeatureNetwork:
        """The frozen feature network (not part of ``parameters()`` or ``state_dict()``)."""
        return self._features

    def extract(
        self, images: Tensor, *, generator: torch.Generator | None = None, **feature_kwargs: Any
    ) -> list[Tensor]:
        """Augment (in training mode) and compute the head inputs ``[B, C_i, N_i]``.

        For R1 on the head inputs (ADD §3.2), make the real features require grad and
        differentiate the logits with respect to them::

            feats = [f.requires_grad_() for f in D.extract(real)]
            logits = D.classify(feats, c_text, c_image)

        Args:
            images: ``[B, 3, H, W]`` in ``[-1, 1]`` (latents for
                [`TeacherFeatures`][addkit.discriminators.teacher.TeacherFeatures]), in any
                floating dtype: outside autocast they are cast (differentiably) to the feature
                network's dtype, so a float16 decode feeds a float32 backbone.
            generator: randomness for the augmentation, and for the feature network when its
                forward takes a ``generator`` (TeacherFeatures' noise and noise level).
            **feature_kwargs: passed to the feature network (e.g. ``t=``,
                ``encoder_hidden_states=`` for TeacherFeatures).

        Returns:
            One tensor per head (``[B, C_i, N_i]``, or ``[B, C_i, h_i, w_i]`` for a grid
            layout); graph-free when ``images`` does not require grad.

        Raises:
            TypeError: if ``images`` is not a floating tensor.
            ValueError: for an empty batch, or if the feature network breaks its contract
                (count, rank, channels).
        """
        fn = "ProjectedDiscriminator.extract"
        check_floating(fn, "images", images)
        if images.ndim == 0 or images.shape[0] == 0:
            raise ValueError(f"{fn}: images must hold at least one sample [B, ...], got shape {tuple(images.shape)}")
        check_finite_inputs(fn, images=images)
        images = self._as_feature_dtype(images)
        if self._features_take_generator:
            feature_kwargs["generator"] = generator
        with torch.set_grad_enabled(images.requires_grad and torch.is_grad_enabled()):
            x = images
            if self.augment is not None and self.training:
                x = self.augment(x, generator=generator)
            feats = list(self._features(x, **feature_kwargs))
        channels = [h.channels for h in self.heads]
        if len(feats) != len(channels):
            raise ValueError(
                f"{fn}: the feature network returned {len(feats)} taps, expected {len(channels)}"
            )
        rank, tail = (4, "h, w") if self.layout == "grid" else (3, "N")
        for i, (f, c) in enumerate(zip(feats, channels)):
            if f.ndim != rank or f.shape[0] != images.shape[0] or f.shape[1] != c:
                raise ValueError(
                    f"{fn}: feature {i} must have shape ({images.shape[0]}, {c}, {tail}), got {tuple(f.shape)}"
                )
        return feats

    def _as_feature_dtype(self, images: Tensor) -> Tensor:
        """Images in the feature network's dtype (a differentiable cast), unless autocast decides."""
        return as_module_dtype(images, self._features) if isinstance(self._features, nn.Module) else images

    def classify(
        self,
        features: Sequence[Tensor],
        c_text: Tensor | None = None,
        c_image: Tensor | None = None,
        *,
        t: Tensor | float | None = None,
        per_head: bool = False,
    ) -> Tensor | list[Tensor]:
        """Logits ``[B, sum_k N_k]`` (float32, higher = real) of the head inputs.

        ``features`` come from
        [`extract`][addkit.discriminators.projected.ProjectedDiscriminator.extract].

        Args:
            features: one ``[B, C_k, N_k]`` tensor per head.
            c_text: text embedding ``[B, c_text_dim]``; required iff ``c_text_dim`` was set.
            c_image: image embedding ``[B, c_image_dim]``; required iff ``c_image_dim`` was set.
            t: the noise level(s) the features were drawn at (schedule units, scalar or
                ``[B]``); required iff ``c_noise_dim`` was set.
            per_head: return one ``[B, N_k]`` tensor per head instead of their concatenation.

        Returns:
            ``[B, sum_k N_k]`` logits, or a list of ``[B, N_k]`` with ``per_head=True``.

        Raises:
            ValueError: for a wrong number of features or conditioning of the wrong width,
                missing or unexpected.
        """
        fn = "ProjectedDiscriminator.classify"
        if len(features) != len(self.heads):
            raise ValueError(
                f"{fn}: expected {len(self.heads)} feature tensors (one per head), got {len(features)}"
            )
        check_finite_inputs(fn, features=list(features), c_text=c_text, c_image=c_image)
        c = self._conditioning(fn, c_text, c_image, features[0].shape[0], t, features[0].device)
        dtype = next(self.heads.parameters()).dtype
        cast = not torch.is_autocast_enabled(features[0].device.type)
        c = c.to(dtype) if c is not None and cast else c
        logits = [head(f.to(dtype) if cast else f, c).float() for head, f in zip(self.heads, features)]
        return logits if per_head else torch.cat(logits, dim=1)

    def forward(
        self,
        images: Tensor | None = None,
        c_text: Tensor | None = None,
        c_image: Tensor | None = None,
        *,
        features: Sequence[Tensor] | None = None,
        t: Tensor | float | None = None,
        per_head: bool = False,
        generator: torch.Generator | None = None,
        **feature_kwargs: Any,
    ) -> Tensor | list[Tensor]:
        """``classify(extract(images), c_text, c_image)``: logits ``[B, K]``, higher = real.

        With ``per_head=True``, one ``[B, N_k]`` tensor per head (what addkit's losses need
        for their default "sum over heads, mean over tokens" reduction).

        Pass ``features=`` (from [`extract`][addkit.discriminators.projected.ProjectedDiscriminator.extract])
        instead of ``images`` to run the heads only. That keeps the trainable part inside
        ``forward``, which a ``DistributedDataParallel`` wrapper needs to synchronise the
        heads' gradients (R1 on the head inputs goes this way).

        ``t``: the noise level for the feature network (e.g. ``TeacherFeatures``'s $\\hat t$).
        With noise-conditioned heads (``c_noise_dim``) one draw (``sample_t``, when ``t`` is
        ``None``) goes to both the features and the heads; with ``features=`` pass the ``t``
        they were drawn at.

        Raises:
            ValueError: unless exactly one of ``images`` and ``features`` is given.
        """
        if (images is None) == (features is None):
            raise ValueError(
                "ProjectedDiscriminator.forward: pass exactly one of images=... and features=..., "
                f"got {'both' if images is not None else 'neither'}"
            )
        if images is not None:
            if self.noise_conditioned and t is None and images.ndim > 0 and images.shape[0] > 0:
                t = self.sample_t(images.shape[0], generator=generator, device=images.device)
            if t is not None:
                feature_kwargs["t"] = t
            features = self.extract(images, generator=generator, **feature_kwargs)
        head_t = t if self.noise_conditioned else None
        return self.classify(features or [], c_text, c_image, t=head_t, per_head=per_head)

    def _conditioning(
        self,
        fn: str,
        c_text: Tensor | None,
        c_image: Tensor | None,
        batch: int,
        t: Tensor | float | None,
        device: torch.device,
    ) -> Tensor | None:
        parts = []
        for name, c, dim in (("c_text", c_text, self.c_text_dim), ("c_image", c_image, self.c_image_dim)):
            if dim is None:
                if c is not None:
                    raise ValueError(f"{fn}: got {name} but the discriminator was built with {name}_dim=None")
                continue
            if c is None:
                raise ValueError(f"{fn}: {name} is required (built with {name}_dim={dim}), got None")
            check_floating(fn, name, c)
            if tuple(c.shape) != (batch, dim):
                raise ValueError(f"{fn}: {name} must have shape ({batch}, {dim}), got {tuple(c.shape)}")
            parts.append(c)
        if self.c_noise_dim is None:
            if t is not None:
                raise ValueError(f"{fn}: got t but the heads were built with c_noise_dim=None")
        else:
            if t is None:
                raise ValueError(
                    f"{fn}: t (the noise level the features were drawn at) is required: the heads were built "
                    f"with c_noise_dim={self.c_noise_dim}"
                )
            t = torch.as_tensor(t, device=device)
            if t.ndim == 0:
                t = t.expand(batch)
            if tuple(t.shape) != (batch,):
                raise ValueError(f"{fn}: t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
            r = noise_fraction(self._features.schedule, t)  # type: ignore[attr-defined]
            emb = noise_level_embedding(r, self.c_noise_dim)
            parts.append(emb.to(parts[0].dtype) if parts else emb)
        return torch.cat(parts, dim=1) if parts else None

    # -- module plumbing: keep the backbone frozen, out of state_dict, but moved along ----------
    def train(self, mode: bool = True) -> ProjectedDiscriminator:
        """Set the heads' mode; the feature network stays in eval mode."""
        super().train(mode)
        if isinstance(self._features, nn.Module):
            self._features.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ProjectedDiscriminator:
        if recurse and isinstance(self._features, nn.Module):
            self._features._apply(fn)
        return super()._apply(fn, recurse)

    def state_dict(
        self,
        *,
        destination: Any = None,
        prefix: str = "",
        keep_vars: bool = False,
        include_features: bool = False,
    ) -> dict[str, Any]:
        """Trainable state (heads); with ``include_features`` also the backbone under ``features.``."""
        out = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if include_features and isinstance(self._features, nn.Module):
            self._features.state_dict(destination=out, prefix=prefix + _PREFIX, keep_vars=keep_vars)
        return out

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load heads; ``features.``-prefixed entries (if any) go to the feature network."""
        own = {k: v for k, v in state_dict.items() if not k.startswith(_PREFIX)}
        backbone = {k[len(_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
        result = super().load_state_dict(own, strict=strict, assign=assign)
        if backbone and isinstance(self._features, nn.Module):
            extra = self._features.load_state_dict(backbone, strict=strict, assign=assign)
            result.missing_keys.extend(_PREFIX + k for k in extra.missing_keys)
            result.unexpected_keys.extend(_PREFIX + k for k in extra.unexpected_keys)
        return result

    def extra_repr(self) -> str:
        name = type(self._features).__name__
        dims = f"c_text_dim={self.c_text_dim}, c_image_dim={self.c_image_dim}, c_noise_dim={self.c_noise_dim}"
        return f"features={name} (frozen, not in state_dict), {dims}"
