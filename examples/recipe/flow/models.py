"""Models of ``add_flow.py``: the pipeline's parts, student and teacher (one copy with LoRA), discriminator.

- ``load_models``: a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (or the tiny
  preset's) supplies the text encoders, tokenizers, VAE, scheduler and the transformer. With
  ``--lora-rank r`` the transformer gets LoRA adapters (diffusers' ``add_adapter``) and *is* the
  student; the teacher is the same module with its adapters disabled
  (``addkit.denoisers.AdaptersDisabled``), so the transformer's weights are held once. A full
  fine-tune trains a copy and keeps the pipeline's transformer as the frozen teacher.
- ``flow_schedule``: the student's ``FlowSchedule`` with the model's shift (SD3: the
  scheduler's 3.0; Flux: $e^{\\mu}$ for the training resolution's token count, as
  ``FluxPipeline`` computes it).
- ``PromptEncoder``: captions to the transformer's conditioning with the pipeline's own
  ``encode_prompt`` (SD3: CLIP-L + CLIP-G + T5; Flux: pooled CLIP + T5).
- ``build_discriminator``: LADD's heads on the teacher's image tokens at several blocks, or
  ADD's DINOv2 on decoded images.
"""

from __future__ import annotations

import argparse
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import recipe.flow.tiny as tiny
import addkit
from recipe.args import RecipeError
from recipe.lora import add_lora
from addkit.denoisers import AdaptersDisabled

FAMILIES = ("sd3", "flux")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""Attention projections of both streams (diffusers' SD3 and Flux LoRA scripts adapt the same)."""
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale for FLUX.1-dev
TOKEN_PATCH = 2  # latent pixels per token side: SD3's patch_size, Flux's 2 x 2 packing
VAE_FACTOR = 8  # the SD3 / SD3.5 / FLUX.1 VAEs downsample by 8 (four levels: 2 ** 3)

DIFFUSERS_FLOOR = "0.35.2"
"""The oldest diffusers the recipe runs on (pyproject's floor): the first whose SD3 and Flux
pipelines import beside transformers 5 (0.30.3 to 0.35.1 import ``FLAX_WEIGHTS_NAME``, which
transformers 5 removed). Older ones also lack the exported scheduler's ``stochastic_sampling``
(before 0.34, silently ignored) and 2-D Flux ``txt_ids`` / ``img_ids`` (0.30)."""


def resolution_problem(resolution: int, family: str, vae_factor: int = VAE_FACTOR) -> str | None:
    """Why ``--resolution`` cannot be used, or ``None``: the side must be a multiple of VAE factor x patch.

    SD3's pipeline refuses other sides and Flux's silently resizes them; the message names the
    flag, the value and the nearest valid sides.
    """
    multiple = vae_factor * TOKEN_PATCH
    if resolution % multiple == 0:
        return None
    low, high = resolution - resolution % multiple, resolution - resolution % multiple + multiple
    nearest = f"{low} or {high}" if low > 0 else str(high)
    name = {"sd3": "SD3", "flux": "Flux"}[family]
    return (f"--resolution {resolution}: {name} needs a multiple of {multiple} (the VAE downsamples by "
            f"{vae_factor}, a token covers {TOKEN_PATCH} x {TOKEN_PATCH} latent pixels); nearest valid: {nearest}")  # fmt: skip


@dataclass
class FlowModels:
    """What the recipe trains and reads; see the module docs."""

    family: str  # "sd3" or "flux"
    pipe: Any  # the diffusers pipeline (text encoders, tokenizers, VAE, scheduler)
    student: nn.Module  # the transformer being trained (LoRA on the base, or a full copy)
    teacher: nn.Module  # AdaptersDisabled(student) with LoRA; the frozen base otherwise
    schedule: addkit.FlowSchedule
    guidance: float | None  # the guidance-embedding scale of a guidance-distilled Flux

    prediction: str = "flow"  # what the transformers predict (addkit.wrap's prediction)

    @property
    def transformer(self) -> nn.Module:
        """The base transformer (the student itself with LoRA)."""
        return self.pipe.transformer

    @property
    def pooled_dim(self) -> int:
        return int(self.transformer.config.pooled_projection_dim)


def diffusers_conflicts() -> list[str]:
    """A message when the installed diffusers is older than `DIFFUSERS_FLOOR` (none otherwise)."""
    import diffusers
    from packaging.version import Version

    if Version(diffusers.__version__) >= Version(DIFFUSERS_FLOOR):
        return []
    return [
        f"diffusers {diffusers.__version__} is older than add_flow.py's floor {DIFFUSERS_FLOOR} (older SD3 / "
        "Flux pipelines do not import beside transformers 5, and an exported scheduler's "
        f"stochastic_sampling needs 0.34): pip install -U 'diffusers>={DIFFUSERS_FLOOR}'"
    ]


def flow_schedule(pipe: Any, resolution: int) -> addkit.FlowSchedule:
    """The model's shift: the scheduler's for SD3, $e^{\\mu(N)}$ for Flux at ``resolution`` pixels."""
    scheduler = pipe.scheduler
    if not scheduler.config.get("use_dynamic_shifting", False):
        return addkit.FlowSchedule.from_diffusers(scheduler)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = image_token_count(pipe, resolution)  # Flux packs 2 x 2 latent patches into one token
    cfg = scheduler.config
    mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    return addkit.FlowSchedule.from_diffusers(scheduler, mu=mu)


def load_models(args: argparse.Namespace, weight_dtype: torch.dtype) -> FlowModels:
    """Pipeline, student, teacher and schedule (tiny preset or a diffusers checkpoint)."""
    if args.preset == "tiny":
        variant = {"guidance_embeds": args.tiny_flux == "dev"} if args.model == "flux" else {}
        pipe = tiny.pipeline(args.model, args.seed, **variant)
    else:
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        cls = StableDiffusion3Pipeline if args.model == "sd3" else FluxPipeline
        pipe = cls.from_pretrained(args.pretrained, revision=args.revision, torch_dtype=weight_dtype)
    return assemble(args, pipe)


def assemble(args: argparse.Namespace, pipe: Any) -> FlowModels:
    """`FlowModels` from a loaded pipeline (frozen here): the student made from its transformer.

    What `load_models` does after loading, and what the benchmarks do with a pipeline built at
    real sizes on ``meta`` (``benchmarks/_recipe_step.py``), so both hold the same objects.
    """
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    base = pipe.transformer
    guidance = None
    if base.config.get("guidance_embeds", False):  # FLUX.1-dev: teacher and student take the same scale
        guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    elif args.guidance is not None:
        raise RecipeError(f"--guidance {args.guidance}: this transformer has no guidance embedding")
    if args.lora_rank:
        add_lora(base, args.lora_rank, args.lora_targets, seed=args.seed)
        student, teacher = base, AdaptersDisabled(base)  # one copy of the transformer's weights
    else:
        student, teacher = copy.deepcopy(base).requires_grad_(True), base
    student.train()
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    if problem := resolution_problem(args.resolution, args.model, pipe.vae_scale_factor):
        raise RecipeError(problem)  # a checkpoint whose VAE is not the 8x one the flag was checked against
    schedule = flow_schedule(pipe, args.resolution)
    return FlowModels(args.model, pipe, student, teacher, schedule, guidance)


def placement(models: FlowModels, dtype: torch.dtype) -> list[tuple[nn.Module, torch.dtype, bool]]:
    """Where each network's weights go: ``(module, dtype, trained_in_float32)``.

    Every pipeline component (a LoRA student's base among them) in the compute ``dtype``; the
    trained weights in float32 (a LoRA's adapters, or the full student copy). One policy for the
    recipe (`place_models`) and the memory plan (``benchmarks/_recipe_step.py``).
    """
    out = [(m, dtype, False) for m in models.pipe.components.values() if isinstance(m, nn.Module)]
    lora = models.student is models.transformer
    return [*out, (models.student, dtype if lora else torch.float32, True)]


def place_models(models: FlowModels, device: torch.device, dtype: torch.dtype) -> None:
    """The networks to ``device`` as `placement` says."""
    from diffusers.training_utils import cast_training_params

    for module, want, trained in placement(models, dtype):
        module.to(device, dtype=want)
        if trained and want != torch.float32:
            cast_training_params(module, dtype=torch.float32)


class PromptEncoder:
    """Captions -> ``(cond, pooled)``: the transformer's keyword arguments and the pooled text.

    ``cond`` holds ``encoder_hidden_states`` and ``pooled_projections`` (and ``guidance`` for a
    guidance-distilled Flux); ``pooled`` conditions the discriminator's heads.

    A fixed prompt (the empty one of CFG, NFSD's negative) is encoded once per encoder with
    `fixed` and repeated for each batch, rather than run through T5 and CLIP at every step.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (its ``encode_prompt`` runs).
        guidance: the Flux guidance-embedding scale, or ``None``.
        device: where the embeddings go.
        max_sequence_length: T5 tokens.
    """

    def __init__(
        self, pipe: Any, guidance: float | None, device: torch.device, max_sequence_length: int
    ) -> None:
        self.pipe, self.guidance, self.device, self.max_sequence_length = (
            pipe,
            guidance,
            device,
            max_sequence_length,
        )
        self._fixed: dict[str, tuple[dict[str, Any], torch.Tensor]] = {}

    def fixed(self, caption: str, n: int) -> tuple[dict[str, Any], torch.Tensor]:
        """``self([caption] * n)``, with ``caption`` encoded on the first call only (then repeated)."""
        if caption not in self._fixed:
            self._fixed[caption] = self([caption])
        cond, pooled = self._fixed[caption]
        cond = {k: v.repeat(n, *(1,) * (v.ndim - 1)) if torch.is_tensor(v) else v for k, v in cond.items()}
        return cond, pooled.repeat(n, 1)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[dict[str, Any], torch.Tensor]:
        pipe, n = self.pipe, self.max_sequence_length
        if family(pipe) == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                list(captions),
                None,
                None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=n,
            )
        else:
            embeds, pooled, _ = pipe.encode_prompt(
                list(captions), None, device=self.device, max_sequence_length=n
            )
        cond: dict[str, Any] = {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}
        if self.guidance is not None:
            cond["guidance"] = self.guidance
        return cond, pooled.float()


def unconditional(prompts: PromptEncoder, cond: dict[str, Any]) -> dict[str, Any]:
    """The empty caption's conditioning (SD3's negative prompt), same batch (Flux keeps its guidance).

    Encoded once per ``prompts`` (`PromptEncoder.fixed`), not at every step.
    """
    empty, _ = prompts.fixed("", cond["encoder_hidden_states"].shape[0])
    return {**cond, **{k: v for k, v in empty.items() if k != "guidance"}}


def family(pipe: Any) -> str:
    """``"sd3"`` or ``"flux"`` from the pipeline's transformer."""
    name = type(pipe.transformer).__name__
    if name.startswith("SD3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    raise RecipeError(f"expected an SD3 or Flux transformer, got {name}")


def encode_images(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Latents of images in ``[-1, 1]``: $(z - \\text{shift}) \\cdot \\text{scale}$ (SD3 / Flux VAEs)."""
    z = vae.encode(pixels.to(vae.dtype)).latent_dist.sample().float()
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in about ``[-1, 1]`` (differentiable)."""
    z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return vae.decode(z.to(vae.dtype)).sample.to(latents.dtype)


def block_names(transformer: nn.Module) -> list[str]:
    """The transformer blocks in call order (Flux: double-stream, then single-stream)."""
    names = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    singles = getattr(transformer, "single_transformer_blocks", [])
    return names + [f"single_transformer_blocks.{i}" for i in range(len(singles))]


def default_taps(transformer: nn.Module, count: int) -> list[str]:
    """``count`` blocks evenly spaced over the depth, the last block included."""
    names = block_names(transformer)
    count = min(count, len(names))
    return [names[round((k + 1) * len(names) / count) - 1] for k in range(count)]


def image_token_count(pipe: Any, resolution: int) -> int:
    """Image tokens of a ``resolution``-pixel image: one per 2 x 2 latent patch (SD3 and Flux)."""
    side = resolution // pipe.vae_scale_factor
    return (side // 2) ** 2


def image_tokens(output: Any, num_image: int) -> torch.Tensor:
    """The image stream ``[B, num_image, C]`` of a transformer block's output, in each diffusers form.

    SD3's joint blocks and Flux's double-stream blocks return ``(text tokens, image tokens)``
    (every diffusers release; SD3's last block gives ``None`` for the text), and so do Flux's
    single-stream blocks from diffusers 0.35. Before 0.35 a single-stream block returns one
    tensor, the text tokens followed by the image tokens: its last ``num_image`` tokens.

    Raises:
        ValueError: a tensor output with no more than ``num_image`` tokens (the resolution the
            count was built for is not the one run).
    """
    if isinstance(output, (tuple, list)):
        return output[1]
    if output.ndim != 3 or output.shape[1] <= num_image:
        raise ValueError(
            f"image_tokens: a single-stream block's output must be [B, text + {num_image} image tokens, C], "
            f"got shape {tuple(output.shape)}: was the discriminator built for another resolution?"
        )
    return output[:, -num_image:]


def image_token_select(pipe: Any, resolution: int) -> Callable[[Any], torch.Tensor]:
    """`image_tokens` for ``resolution``-pixel images: the ``select`` of teacher-feature taps."""
    return functools.partial(image_tokens, num_image=image_token_count(pipe, resolution))


NOISE_DIM = 64
"""Width of the noise-level embedding LADD's heads are conditioned on."""


def build_discriminator(
    args: argparse.Namespace, models: FlowModels, teacher: Any, dinov2: dict[str, Any] | None = None
) -> addkit.ProjectedDiscriminator:
    """LADD (``--discriminator teacher``) or ADD's DINOv2 (``dinov2``), heads seeded from ``--seed``.

    Args:
        args: the run's flags.
        models: the run's models.
        teacher: the wrapped teacher (``addkit.wrap``), which the feature network calls.
        dinov2: ``ProjectedDiscriminator.from_dinov2``'s network arguments (default: the tiny
            preset's random network, or ``--dinov2`` with its pretrained weights).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 2)
        if args.discriminator == "teacher":
            inner = models.transformer
            taps = list(args.teacher_taps or default_taps(inner, args.num_taps))
            width = inner.config.num_attention_heads * inner.config.attention_head_dim
            features = addkit.TeacherFeatures(
                models.teacher,
                models.schedule,
                taps,
                channels=[width] * len(taps),
                call=teacher,
                select=image_token_select(models.pipe, args.resolution),
                logit_mean=args.disc_logit_mean,
                logit_std=args.disc_logit_std,
                noise_space=args.disc_noise_space,
            )
            # LADD: 2-D heads on each tapped block's patch grid, told the noise level and the caption
            return addkit.ProjectedDiscriminator(features, c_text_dim=models.pooled_dim, c_noise_dim=NOISE_DIM)
        augment = addkit.DiffAugment() if args.augment else None
        if dinov2 is None and args.preset == "tiny":
            from addkit.testing import tiny_dinov2_kwargs

            dinov2 = tiny_dinov2_kwargs()
        network = dinov2 or {
            "model_name": args.dinov2, "pretrained": args.dinov2_weights or True, "resolution": args.dinov2_resolution,
        }  # fmt: skip
        return addkit.ProjectedDiscriminator.from_dinov2(**network, c_text_dim=models.pooled_dim, augment=augment)
