"""Turn any network into a denoiser that returns $\\hat x_0$ (or eps / v / flow).

One currency at the interface (k-diffusion's lesson): every part of addkit asks a model for
$\\hat x_0(x_t, t)$. [`wrap`][addkit.denoisers.wrap] binds a network to its schedule and
prediction type; adapters translate diffusers' call conventions; classifier-free guidance
runs the conditional and unconditional branches in one batched forward.
[`AdaptersDisabled`][addkit.denoisers.AdaptersDisabled] runs a LoRA-adapted student as its
frozen base, so that teacher and student share one copy of the weights.

Examples:
    >>> import torch
    >>> from addkit.schedules import VPSchedule
    >>> net = lambda x_t, t: torch.zeros_like(x_t)          # predicts eps = 0
    >>> d = wrap(net, VPSchedule.scaled_linear(), "eps")
    >>> x_t = torch.ones(2, 3)
    >>> torch.allclose(d.x0(x_t, 999), x_t / 0.068265, rtol=1e-5)
    True
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from addkit._checks import (
    check_callable,
    check_finite_inputs,
    check_floating,
    check_guidance_scale,
    check_same_shape,
)
from addkit._dtype import as_module_dtype, module_dtype
from addkit._reduce import append_dims
from addkit._time import batch_time, check_schedule
from addkit._unwrap import unwrap_chain, unwrap_module
from addkit.parameterization import convert, normalize_prediction
from addkit.typing import Schedule

__all__ = [
    "AdaptersDisabled",
    "DiffusersFluxAdapter",
    "DiffusersTransformerAdapter",
    "DiffusersUNetAdapter",
    "WrappedDenoiser",
    "adapters_disabled",
    "apply_cfg",
    "wrap",
]


def apply_cfg(
    cond: Tensor, uncond: Tensor, guidance_scale: float | Tensor, *, rescale: float = 0.0
) -> Tensor:
    """Classifier-free guidance $u + s\\,(c - u)$, with optional CFG rescale.

    $$ \\hat y = u + s (c - u), \\qquad
       \\hat y \\leftarrow \\phi\\,\\hat y\\,\\frac{\\operatorname{std}(c)}{\\operatorname{std}(\\hat y)}
       + (1 - \\phi)\\,\\hat y $$

    The same form applies to eps, v, x0 or flow outputs (every conversion is affine in the
    prediction, so guiding before or after converting gives the same $\\hat x_0$).

    Args:
        cond: conditional prediction ``[B, ...]``.
        uncond: unconditional (or negative-prompt) prediction, same shape.
        guidance_scale: $s$, a number or one per sample ``[B]``.
        rescale: $\\phi \\in [0, 1]$ of Lin et al. 2023 Alg. 2 (0 = off; they recommend 0.7).

    Returns:
        The guided prediction. Where the guided prediction of a sample is constant, the
        rescale leaves it unchanged (the std ratio is undefined there).

    Raises:
        ValueError: for ``cond`` and ``uncond`` of different shapes (no broadcasting), a
            ``guidance_scale`` that is neither a number nor ``[B]``, or ``rescale`` outside
            ``[0, 1]``.
        TypeError: for non-floating inputs.

    References:
        Ho & Salimans, *Classifier-Free Diffusion Guidance*, 2022.
        Lin et al., arXiv 2305.08891, §3.4, Algorithm 2.
    """
    fn = "apply_cfg"
    check_floating(fn, "cond", cond)
    check_floating(fn, "uncond", uncond)
    check_same_shape(fn, "cond", cond, "uncond", uncond)
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0.0 <= rescale <= 1.0:
        raise ValueError(f"{fn}: rescale must be a number in [0, 1] (0 = off, 0.7 recommended), got {rescale!r}")
    check_guidance_scale(fn, "guidance_scale", guidance_scale)
    check_finite_inputs(fn, cond=cond, uncond=uncond)
    scale = torch.as_tensor(guidance_scale, dtype=cond.dtype, device=cond.device)
    if scale.ndim > 1 or (scale.ndim == 1 and scale.shape[0] != cond.shape[0]):
        raise ValueError(
            f"{fn}: guidance_scale must be a number or have shape ({cond.shape[0]},) (one per sample), "
            f"got shape {tuple(scale.shape)}"
        )
    if scale.ndim == 1:
        scale = append_dims(scale, cond.ndim)
    guided = uncond + scale * (cond - uncond)
    if rescale and cond.ndim > 1:
        dims = list(range(1, cond.ndim))
        std_c, std_g = cond.std(dim=dims, keepdim=True), guided.std(dim=dims, keepdim=True)
        # a constant guided prediction has nothing to rescale: keep it (no 0 / 0)
        factor = torch.where(std_g > 0, std_c / std_g.clamp_min(torch.finfo(std_g.dtype).tiny), 1.0)
        guided = rescale * guided * factor + (1 - rescale) * guided
    return guided


def _cat_cond(fn: str, uncond: Any, cond: Any, key: str) -> Any:
    """Concatenate unconditional and conditional inputs along the batch (recursively)."""
    if isinstance(cond, Tensor):
        if not isinstance(uncond, Tensor) or uncond.shape != cond.shape:
            got = tuple(uncond.shape) if isinstance(uncond, Tensor) else type(uncond).__name__
            raise ValueError(
                f"{fn}: uncond[{key!r}] must be a tensor of shape {tuple(cond.shape)} like "
                f"cond[{key!r}], got {got}"
            )
        return torch.cat([uncond, cond])
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise ValueError(f"{fn}: uncond[{key!r}] must have the keys {sorted(cond)}")
        return {k: _cat_cond(fn, uncond[k], cond[k], f"{key}.{k}") for k in cond}
    if uncond != cond:
        raise ValueError(f"{fn}: non-tensor conditioning {key!r} must be equal in cond and uncond")
    return cond


class WrappedDenoiser(nn.Module):
    """A network bound to its schedule and prediction type.

    ``forward`` returns the network's raw prediction; [`x0`][addkit.denoisers.WrappedDenoiser.x0],
    ``eps``, ``v`` and ``flow`` convert it, optionally with classifier-free guidance.

    Args:
        model: callable ``model(x_t, t, **cond) -> prediction`` with ``t`` of shape ``[B]``
            (integers for a discrete schedule, floats in ``[0, 1]`` for flow).
        schedule: the noise schedule the model was trained with.
        prediction: ``"eps" | "v" | "x0" | "flow"`` (diffusers' names accepted).
    """

    def __init__(self, model: Callable[..., Tensor], schedule: Schedule, prediction: str) -> None:
        super().__init__()
        self.model = check_callable("WrappedDenoiser", "model", model)
        self.schedule = check_schedule("WrappedDenoiser", schedule)
        self.prediction = normalize_prediction(prediction, fn="WrappedDenoiser")

    def _batch_t(self, t: Any, x_t: Tensor, fn: str) -> Tensor:
        return batch_time(fn, self.schedule, t, x_t)

    def forward(self, x_t: Tensor, t: Any, **cond: Any) -> Tensor:
        """The network's raw prediction for ``x_t`` at ``t`` (scalar or ``[B]``)."""
        fn = type(self).__name__
        check_floating(fn, "x_t", x_t)
        check_finite_inputs(fn, x_t=x_t)
        model_x_t = self._as_model_dtype(x_t)
        out = self.model(model_x_t, self._batch_t(t, x_t, fn), **cond)
        return out if model_x_t is x_t else out.to(x_t.dtype)

    def _as_model_dtype(self, x_t: Tensor) -> Tensor:
        """``x_t`` in an ``nn.Module`` model's dtype, cast back afterwards (see `addkit._dtype`)."""
        return as_module_dtype(x_t, self.model) if isinstance(self.model, nn.Module) else x_t

    def predict(
        self,
        x_t: Tensor,
        t: Any,
        *,
        target: str = "x0",
        guidance_scale: float | Tensor = 1.0,
        uncond: Mapping[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        **cond: Any,
    ) -> Tensor:
        """Prediction converted to ``target``, with classifier-free guidance if asked.

        Args:
            x_t: noisy input ``[B, ...]``.
            t: timestep(s): a scalar or ``[B]``.
            target: ``"x0" | "eps" | "v" | "flow"``.
            guidance_scale: CFG scale $s$ (number or ``[B]``); 1 runs the conditional
                branch only.
            uncond: unconditional (or negative) conditioning, same keys and shapes as
                ``cond``; required when ``guidance_scale != 1``.
            guidance_rescale: CFG rescale $\\phi$ (0 = off).
            **cond: conditioning passed to the model (plain tensors or dicts of tensors).

        Returns:
            The ``target`` prediction, shape and dtype of ``x_t``.

        Raises:
            ValueError: if guidance is asked without ``uncond`` or with mismatched
                conditioning, or a Python timestep lies outside the schedule.
            RuntimeError: for a tensor ``t`` with a value outside the schedule (a device-side
                check, no host read; on CUDA a device-side assert; a ``ValueError`` under
                [`addkit.value_checks`][addkit.checks.value_checks]).
        """
        fn = f"{type(self).__name__}.predict"
        check_floating(fn, "x_t", x_t)
        check_guidance_scale(fn, "guidance_scale", guidance_scale)
        check_finite_inputs(fn, x_t=x_t)
        t = self._batch_t(t, x_t, fn)
        model_x_t = self._as_model_dtype(x_t)
        guided = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0)
        if not guided:
            raw = self.model(model_x_t, t, **cond)
        else:
            if uncond is None:
                raise ValueError(f"{fn}: guidance_scale={guidance_scale} needs uncond=... (same keys as cond)")
            if set(uncond) != set(cond):
                raise ValueError(
                    f"{fn}: uncond keys {sorted(uncond)} must equal cond keys {sorted(cond)}"
                )
            both = {k: _cat_cond(fn, uncond[k], cond[k], k) for k in cond}
            doubled = torch.cat([model_x_t, model_x_t])
            raw_u, raw_c = self.model(doubled, torch.cat([t, t]), **both).chunk(2)
            raw = apply_cfg(raw_c, raw_u, guidance_scale, rescale=guidance_rescale)
        check_floating(fn, "model output", raw)
        if raw.shape != x_t.shape:
            raise ValueError(
                f"{fn}: the model returned shape {tuple(raw.shape)} for x_t of shape {tuple(x_t.shape)}"
            )
        check_finite_inputs(fn, **{"model output": raw})
        alpha, sigma = self.schedule.coefficients(t, x_t, fn=fn)
        return convert(raw.to(x_t.dtype), x_t, alpha, sigma, source=self.prediction, target=target)

    def x0(self, x_t: Tensor, t: Any, **kwargs: Any) -> Tensor:
        """$\\hat x_0$; keyword arguments as [`predict`][addkit.denoisers.WrappedDenoiser.predict]."""
        return self.predict(x_t, t, target="x0", **kwargs)

    def eps(self, x_t: Tensor, t: Any, **kwargs: Any) -> Tensor:
        """$\\hat\\epsilon$; keyword arguments as [`predict`][addkit.denoisers.WrappedDenoiser.predict]."""
        return self.predict(x_t, t, target="eps", **kwargs)

    def v(self, x_t: Tensor, t: Any, **kwargs: Any) -> Tensor:
        """$\\hat v$; keyword arguments as [`predict`][addkit.denoisers.WrappedDenoiser.predict]."""
        return self.predict(x_t, t, target="v", **kwargs)

    def flow(self, x_t: Tensor, t: Any, **kwargs: Any) -> Tensor:
        """$\\hat u = \\hat\\epsilon - \\hat x_0$; keyword arguments as [`predict`][addkit.denoisers.WrappedDenoiser.predict]."""
        return self.predict(x_t, t, target="flow", **kwargs)


class DiffusersUNetAdapter(nn.Module):
    """Call a diffusers UNet (``UNet2DConditionModel``, ``UNet2DModel``) as ``f(x_t, t, **cond)``.

    SDXL's extra conditioning can be given flat (``text_embeds=``, ``time_ids=``) so that
    classifier-free guidance can batch it, or as ``added_cond_kwargs=``. Inputs are cast to
    the UNet's dtype and the output back to ``x_t``'s; ``t`` is passed as given (integer
    steps for a VP schedule, as diffusers' pipelines pass them).

    Args:
        unet: the diffusers UNet, bare or wrapped (DDP, FSDP, ``torch.compile``, peft); a
            wrapper is called as given, so that its gradient sync, compiled code or LoRA
            layers run.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text_embeds: Tensor | None = None,
        time_ids: Tensor | None = None,
        **cond: Any,
    ) -> Tensor:
        """Run the UNet; ``cond`` holds e.g. ``encoder_hidden_states`` or ``class_labels``."""
        dtype = module_dtype(self.unet) or x_t.dtype
        added = dict(cond.pop("added_cond_kwargs", None) or {})
        if text_embeds is not None:
            added["text_embeds"] = text_embeds
        if time_ids is not None:
            added["time_ids"] = time_ids
        if added:
            cond["added_cond_kwargs"] = {k: v.to(dtype) for k, v in added.items()}
        if cond.get("encoder_hidden_states") is not None:
            cond["encoder_hidden_states"] = cond["encoder_hidden_states"].to(dtype)
        out = self.unet(x_t.to(dtype), t, return_dict=False, **cond)[0]
        return out.to(x_t.dtype)


class DiffusersTransformerAdapter(nn.Module):
    """Call an SD3-style diffusers transformer as ``f(x_t, t, **cond)``.

    The transformer receives ``timestep`` as ``StableDiffusion3Pipeline`` passes it:
    $1000\\,\\sigma_t$ in float32 for a [`FlowSchedule`][addkit.schedules.FlowSchedule],
    whatever the transformer's dtype (bf16 would round it to a multiple of 4 above 512), and
    the integer step unchanged for a VP schedule. ``x_t`` and floating conditioning
    (``encoder_hidden_states``, ``pooled_projections``) are cast to the transformer's dtype,
    the output back to ``x_t``'s.

    Args:
        transformer: e.g. ``SD3Transformer2DModel``, bare or wrapped (DDP, FSDP,
            ``torch.compile``, peft); a wrapper is called as given.
        schedule: the schedule ``t`` refers to.
    """

    def __init__(self, transformer: nn.Module, schedule: Schedule) -> None:
        super().__init__()
        self.transformer = transformer
        self.schedule = check_schedule("DiffusersTransformerAdapter", schedule)

    def forward(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Run the transformer with ``hidden_states=x_t`` and the diffusers timestep."""
        dtype = module_dtype(self.transformer) or x_t.dtype
        if self.schedule.is_discrete:
            timestep = t
        else:
            sigma = self.schedule.sigma(t)
            timestep = (sigma * self.schedule.num_train_timesteps).to(torch.float32)
        cond = {
            k: (v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v)
            for k, v in cond.items()
        }
        out = self.transformer(hidden_states=x_t.to(dtype), timestep=timestep, return_dict=False, **cond)[0]
        return out.to(x_t.dtype)


class DiffusersFluxAdapter(nn.Module):
    """Call a diffusers ``FluxTransformer2DModel`` on unpacked latents as ``f(x_t, t, **cond)``.

    Flux works on packed latents; this adapter takes ``x_t`` as ``[B, C, H, W]`` like every
    other denoiser and does what ``FluxPipeline`` does around the transformer: it packs 2×2
    patches into ``HW/4`` tokens of ``4C`` channels, builds the rotary positions
    (``img_ids`` rows $(0, i, j)$ for patch row $i$ and column $j$, ``txt_ids`` zeros), passes
    ``timestep`` $= \\sigma_t \\in [0, 1]$ in float32 (Flux scales it by 1000 itself) and, for a
    guidance-distilled model (``guidance_embeds=True``, e.g. FLUX.1-dev), the ``guidance``
    scale; then unpacks the output. ``x_t`` and floating conditioning are cast to the
    transformer's dtype, the output back to ``x_t``'s.

    Conditioning: ``encoder_hidden_states`` ``[B, L, D]`` (T5), ``pooled_projections``
    ``[B, P]`` (pooled CLIP), ``guidance`` (a number or ``[B]``; required exactly when the
    model has ``guidance_embeds``); ``txt_ids`` ``[L, 3]`` and ``img_ids`` ``[HW/4, 3]``
    override the built positions.

    Args:
        transformer: e.g. ``FluxTransformer2DModel``, bare or wrapped (DDP, FSDP,
            ``torch.compile``, peft,
            [`AdaptersDisabled`][addkit.denoisers.AdaptersDisabled]); a wrapper is called as given.
        schedule: a flow schedule (e.g. ``FlowSchedule(shift=math.exp(mu))`` for Flux's
            resolution-dependent shift).

    Raises:
        TypeError: for a discrete (VP) schedule: Flux is a rectified-flow model.
    """

    def __init__(self, transformer: nn.Module, schedule: Schedule) -> None:
        super().__init__()
        fn = "DiffusersFluxAdapter"
        self.transformer = transformer
        self.schedule = check_schedule(fn, schedule)
        if schedule.is_discrete:
            raise TypeError(
                f"{fn}: Flux transformers are rectified-flow models: pass a FlowSchedule, got {schedule!r}"
            )
        config = getattr(unwrap_module(transformer), "config", None)
        self.guidance_embeds = bool(getattr(config, "guidance_embeds", False))

    def forward(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Pack ``x_t`` ``[B, C, H, W]`` (even ``H``, ``W``), run the transformer, unpack."""
        fn = "DiffusersFluxAdapter"
        if x_t.ndim != 4 or x_t.shape[-2] % 2 or x_t.shape[-1] % 2:
            raise ValueError(
                f"{fn}: x_t must be unpacked latents [B, C, H, W] with even H and W (2x2 patches), "
                f"got shape {tuple(x_t.shape)}"
            )
        dtype = module_dtype(self.transformer) or x_t.dtype
        h, w = x_t.shape[-2] // 2, x_t.shape[-1] // 2
        guidance = self._guidance(fn, cond.pop("guidance", None), x_t)
        text = cond.get("encoder_hidden_states")
        img_ids = cond.pop("img_ids", None)
        txt_ids = cond.pop("txt_ids", None)
        if img_ids is None:
            img_ids = _flux_image_ids(h, w, device=x_t.device, dtype=dtype)
        if txt_ids is None and text is not None:
            txt_ids = torch.zeros(text.shape[1], 3, device=x_t.device, dtype=dtype)
        cond = {
            k: (v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v)
            for k, v in cond.items()
        }
        tokens = rearrange(x_t, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
        sigma = self.schedule.sigma(t).to(torch.float32)
        out = self.transformer(
            hidden_states=tokens.to(dtype), timestep=sigma, guidance=guidance,
            img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **cond,
        )[0]  # fmt: skip
        out = rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=2, pw=2)
        return out.to(x_t.dtype)

    def _guidance(self, fn: str, guidance: Any, x_t: Tensor) -> Tensor | None:
        """The guidance scale ``[B]`` in float32 (as ``FluxPipeline`` passes it), or ``None``."""
        if guidance is None:
            if self.guidance_embeds:
                raise ValueError(
                    f"{fn}: this Flux transformer has guidance_embeds=True (guidance-distilled, e.g. "
                    "FLUX.1-dev): pass guidance=<scale> (FluxPipeline's default is 3.5)"
                )
            return None
        if not self.guidance_embeds:
            raise ValueError(
                f"{fn}: guidance={guidance!r} was given but this Flux transformer has no guidance "
                "embedding (guidance_embeds=False, e.g. FLUX.1-schnell): leave guidance out"
            )
        scale = torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device)
        if scale.ndim > 1 or (scale.ndim == 1 and scale.shape[0] != x_t.shape[0]):
            raise ValueError(
                f"{fn}: guidance must be a number or have shape ({x_t.shape[0]},), "
                f"got shape {tuple(scale.shape)}"
            )
        return scale.expand(x_t.shape[0])


def _flux_image_ids(h: int, w: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rotary positions ``[h * w, 3]`` of Flux's packed latent tokens: rows ``(0, i, j)``."""
    i, j = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.stack([torch.zeros_like(i), i, j], dim=-1)
    return rearrange(ids, "h w k -> (h w) k").to(dtype)


def _adapter_layers(model: nn.Module) -> list[nn.Module]:
    """peft's adapter layers (LoRA, LoHa, ...) inside ``model``, found by class name (no import)."""
    return [
        m for m in model.modules()
        if any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft") for c in type(m).__mro__)
    ]  # fmt: skip


def _check_adapted(fn: str, model: Any) -> list[nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module with peft adapters, got {type(model).__name__}")
    layers = _adapter_layers(model)
    if not layers:
        raise ValueError(
            f"{fn}: {type(model).__name__} has no peft adapter layers: add them with diffusers' "
            "model.add_adapter(LoraConfig(...)) or peft's get_peft_model (a fully fine-tuned student "
            "needs its own frozen teacher copy)"
        )
    return layers


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base inside the block: every enabled peft adapter layer switched off.

    What peft's ``PeftModel.disable_adapter()`` and diffusers' ``disable_adapters()`` /
    ``enable_adapters()`` do, for either kind of model (and inside DDP, ``torch.compile``
    wrappers), restoring exactly the state found: layers that were off stay off, and every
    ``requires_grad`` flag is put back (peft clears the adapters' flags while they are off).

    Gradient checkpointing (the ``gradient_checkpointing`` flag of diffusers and transformers
    modules) is suspended inside the block: a checkpointed segment is recomputed during the
    backward pass, after the block, when the adapters are on again, and would not match its
    forward. A forward with gradients inside the block therefore keeps its activations.

    Yields:
        ``model`` itself.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if it has no peft adapter layers.

    Examples:
        >>> from peft import LoraConfig, get_peft_model
        >>> base = nn.Sequential(nn.Linear(2, 2))
        >>> lora = get_peft_model(base, LoraConfig(target_modules=["0"], init_lora_weights=False))
        >>> x = torch.ones(1, 2)
        >>> with adapters_disabled(lora):
        ...     off = lora(x)
        >>> torch.equal(off, lora.base_model.model[0].base_layer(x)), torch.equal(off, lora(x))
        (True, False)
    """
    layers = [layer for layer in _check_adapted("adapters_disabled", model) if not layer.disable_adapters]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.enable_adapters(False)
    for module in checkpointed:
        module.gradient_checkpointing = False
    try:
        yield model
    finally:
        for module in checkpointed:
            module.gradient_checkpointing = True
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


class AdaptersDisabled(nn.Module):
    """The frozen base of a LoRA-adapted model, without a second copy of its weights.

    ``forward`` calls ``model`` inside [`adapters_disabled`][addkit.denoisers.adapters_disabled]:
    with a LoRA student, ``AdaptersDisabled(student)`` *is* the teacher (and LADD's feature
    network), and the transformer's weights are held once. The model is kept outside this
    module's tree: ``parameters()``, ``state_dict()``, ``requires_grad_()``, ``train()`` and
    ``.to()`` see nothing, so freezing the view (as
    [`TeacherFeatures`][addkit.discriminators.teacher.TeacherFeatures] does) never freezes the
    adapters or switches the student to eval mode. ``get_submodule`` looks into the innermost
    model, so feature taps are named as on the bare network (``"transformer_blocks.3"``).
    [`wrap`][addkit.denoisers.wrap] sees through it and picks the model's diffusers adapter.

    Pass the model *without* its DDP wrapper (``accelerator.unwrap_model(student)``): a DDP
    forward that leaves the trainable adapters unused breaks DDP's gradient reduction.

    Args:
        model: a peft ``PeftModel`` or a diffusers model with ``add_adapter(...)`` layers.

    Raises:
        TypeError, ValueError: as [`adapters_disabled`][addkit.denoisers.adapters_disabled].

    Examples:
        >>> from peft import LoraConfig, get_peft_model
        >>> student = get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig(target_modules=["0"]))
        >>> teacher = AdaptersDisabled(student)
        >>> list(teacher.parameters()), teacher.get_submodule("0") is student.base_model.model[0]
        ([], True)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _check_adapted("AdaptersDisabled", model)
        self.__dict__["model"] = model  # not a registered submodule: see above

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with its adapters disabled."""
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def get_submodule(self, target: str) -> nn.Module:
        """A submodule of the innermost model (``""``: the innermost model itself)."""
        return unwrap_module(self.model).get_submodule(target)

    def extra_repr(self) -> str:
        return f"model={type(unwrap_module(self.model)).__name__} (adapters disabled, not a submodule)"


def _is_diffusers(model: Any, *names: str) -> bool:
    """Whether the model inside ``model``'s wrappers is one of diffusers' ``names`` (no import)."""
    if "diffusers" not in sys.modules:
        return False
    inner = unwrap_chain(model)[-1]
    return any(c.__name__ in names and c.__module__.startswith("diffusers") for c in type(inner).__mro__)


_ADAPTED = ("UNet2DConditionModel", "UNet2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")


def _rewrap(denoiser: WrappedDenoiser, schedule: Schedule, prediction: str) -> WrappedDenoiser:
    """``denoiser`` itself when asked for its own schedule and prediction; refused otherwise."""
    wanted = normalize_prediction(prediction, fn="wrap")
    same = schedule is denoiser.schedule or (
        type(schedule) is type(denoiser.schedule) and repr(schedule) == repr(denoiser.schedule)
    )
    if not same or wanted != denoiser.prediction:
        raise ValueError(
            f"wrap: model is a WrappedDenoiser already, bound to {denoiser.schedule!r} and "
            f"prediction={denoiser.prediction!r}; got {schedule!r} and prediction={wanted!r}: wrap its "
            "network (denoiser.model) instead"
        )
    return denoiser


def wrap(model: Callable[..., Tensor], schedule: Schedule, prediction: str) -> WrappedDenoiser:
    """Bind a network to its schedule and prediction type.

    diffusers UNets, SD3-style transformers and Flux transformers (which then take unpacked
    latents ``[B, C, H, W]``, see [`DiffusersFluxAdapter`][addkit.denoisers.DiffusersFluxAdapter])
    are adapted automatically, also inside ``DistributedDataParallel``, FSDP,
    ``torch.compile``, a peft ``PeftModel`` or [`AdaptersDisabled`][addkit.denoisers.AdaptersDisabled]
    (and accelerate's ``prepare``, which returns these): the adapter is chosen from the
    innermost model and calls the wrapper, so that gradient sync, compiled code and LoRA layers
    run.
    Any other callable ``model(x_t, t, **cond)`` is used as is. A denoiser wrapped already is
    returned unchanged when its schedule and prediction are the ones given (refused otherwise).
    A plain ``nn.Sequential`` is refused: it takes one input, not ``(x_t, t)``; a diffusers model
    inside your own module is not detected (it is called as your ``forward`` says), so put the
    adapter inside (``DiffusersUNetAdapter(unet)``) when your module passes ``x_t`` and ``t`` on.

    Args:
        model: the network, bare or wrapped.
        schedule: its noise schedule.
        prediction: ``"eps" | "v" | "x0" | "flow"`` (or diffusers' ``"epsilon"``,
            ``"v_prediction"``, ``"sample"``).

    Returns:
        A [`WrappedDenoiser`][addkit.denoisers.WrappedDenoiser] with ``.x0`` / ``.eps`` /
        ``.v`` / ``.flow``.

    Raises:
        ValueError: for an unknown prediction type, or a denoiser wrapped already with another
            schedule or prediction.
        TypeError: if ``model`` is not callable, or is a plain ``nn.Sequential``.
    """
    if isinstance(model, WrappedDenoiser):
        return _rewrap(model, schedule, prediction)
    check_callable("wrap", "model", model)
    if type(unwrap_chain(model)[-1]) is nn.Sequential:
        inside = [type(m).__name__ for m in unwrap_chain(model)[-1].modules() if _is_diffusers(m, *_ADAPTED)]
        held = f" holding a diffusers {inside[0]}" if inside else ""
        raise TypeError(
            f"wrap: model is a plain nn.Sequential{held}, which takes one input, not (x_t, t, **cond): "
            "pass the network itself, or a module whose forward(x_t, t, **cond) calls it"
        )
    if _is_diffusers(model, "UNet2DConditionModel", "UNet2DModel"):
        model = DiffusersUNetAdapter(model)  # type: ignore[arg-type]
    elif _is_diffusers(model, "SD3Transformer2DModel"):
        model = DiffusersTransformerAdapter(model, schedule)  # type: ignore[arg-type]
    elif _is_diffusers(model, "FluxTransformer2DModel"):
        model = DiffusersFluxAdapter(model, schedule)  # type: ignore[arg-type]
    return WrappedDenoiser(model, schedule, prediction)
