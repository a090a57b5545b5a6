"""ADD training setups at real sizes, built on ``meta``: the models, the batch and one step.

``_setup_sdxl.sdxl_setup`` is the step of ``examples/add_sdxl.py`` (teacher and student UNets, VAE encode of
the batch, ``ADDObjective`` generator and discriminator losses under bf16 autocast, gradient
clipping, both AdamW steps), with its models at SDXL's sizes: ADD's DINOv2 ViT-S/14
discriminator on decoded pixels with pixel-space distillation and the DINOv2 ViT-L/14 image
embedding, or LADD's teacher-feature discriminator on latents. The two CLIP text encoders stay
resident as in the recipe; their forward (under ``no_grad``, small) is not run.

``_setup_flow.flow_setup`` is the step of ``examples/add_flow.py`` (LADD) for an SD3.5-medium- or
Flux.1-dev-size transformer: a LoRA student whose teacher is the same transformer with its
adapters disabled (``addkit.denoisers.AdaptersDisabled``: one copy of the weights), the
teacher-feature discriminator on the text-conditioned teacher, no distillation loss; or a full
fine-tune of a float32 copy beside the frozen bf16 transformer. Text encoders (CLIP, T5-XXL)
and the VAE stay resident as in the recipe; the VAE encodes the batch each step.

Both return a builder for ``_estimate.estimate_step_memory`` and
``_estimate.measure_step_memory`` (`setup_for` picks one); this module holds what they share:
`StepConfig`, the placement of weights in their dtypes, the step itself. ``model="tiny*"``
builds the same setups from ``addkit.testing``'s tiny configs (the tests and ``gpu_check.py``'s
self-check).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import _architectures as arches
import addkit
from _estimate import Setup
from _materialize import Materializer
from addkit.denoisers import WrappedDenoiser

LORA_TARGETS_UNET = ["to_k", "to_q", "to_v", "to_out.0"]  # examples/add_sdxl.py
LORA_TARGETS_FLOW = [*LORA_TARGETS_UNET, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass(frozen=True)
class StepConfig:
    """One configuration of one training step.

    Args:
        model: a key of ``_architectures.ARCHITECTURES`` (``sdxl``, ``sd35_medium``, ``flux_dev``,
            ``tiny_sdxl``, ``tiny_sd3``, ``tiny_flux``).
        resolution: image side in pixels.
        batch: images per device.
        train: ``"full"`` (the whole student, float32 master weights) or ``"lora"``.
        checkpointing: gradient checkpointing of the trained network.
        vae_checkpointing: gradient checkpointing of the VAE decoder too (the recipe does not;
            pixel-space losses keep its activations at full resolution).
        teacher_checkpointing: gradient checkpointing of the teacher's feature pass, which
            keeps a graph in the generator step (the recipes do not). With LoRA the teacher is
            then a second module object holding the student's base tensors (still one copy of
            the weights) instead of ``AdaptersDisabled``, which must suspend checkpointing.
        discriminator: ``"dinov2"`` (pixels) or ``"teacher"`` (teacher features on latents).
        precision: ``"bf16"`` (autocast, frozen networks in bf16) or ``"fp32"``.
        lora_rank: LoRA rank.
    """

    model: str
    resolution: int
    batch: int
    train: str = "full"
    checkpointing: bool = False
    vae_checkpointing: bool = False
    teacher_checkpointing: bool = False
    discriminator: str = "dinov2"
    precision: str = "bf16"
    lora_rank: int = 64

    @property
    def name(self) -> str:
        parts = [self.model, str(self.resolution), f"b{self.batch}", self.train]
        parts += ["gc"] if self.checkpointing else []
        parts += ["vae-gc"] if self.vae_checkpointing else []
        parts += ["teacher-gc"] if self.teacher_checkpointing else []
        parts += ["dinov2" if self.discriminator == "dinov2" else "teacherD"]
        parts += [self.precision] + ([f"r{self.lora_rank}"] if self.train == "lora" else [])
        return "/".join(parts)


def add_lora(module: nn.Module, rank: int, targets: list[str]) -> None:
    from peft import LoraConfig

    module.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    )


def copy_student(cfg: StepConfig, teacher: nn.Module, targets: list[str]) -> nn.Module:
    """examples/add_sdxl.py: a trainable copy of the teacher, or a LoRA on a copy."""
    student = copy.deepcopy(teacher)
    if cfg.train == "lora":
        add_lora(student, cfg.lora_rank, targets)
    else:
        student.requires_grad_(True)
    student.train()
    if cfg.checkpointing:
        student.enable_gradient_checkpointing()
    return student


def place_weights(
    make: Materializer, cfg: StepConfig, student: nn.Module, frozen: list[nn.Module]
) -> torch.dtype:
    low = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    for module in frozen:
        make(module, low)
    if cfg.train == "lora":  # frozen base in the compute dtype, LoRA weights in float32 (the recipe)
        make(student, low, keep_fp32=lambda name: "lora_" in name)
    else:  # full fine-tune: float32 master weights under autocast
        make(student, torch.float32)
    return low


def autocast_for(cfg: StepConfig, device: torch.device) -> Callable[[], Any]:
    if cfg.precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def trainable_params(*modules: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                seen[id(p)] = p
    return list(seen.values())


def fsdp_unit_bytes(blocks: list[nn.Module], full: bool) -> int:
    """What FSDP holds unsharded: the largest block's bf16 parameters twice (gathered, and the next
    one prefetched), plus its float32 gradients before the reduce-scatter when the block is trained."""
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    return 2 * largest * 2 + (largest * 4 if full else 0)


def train_step(
    *,
    objective: addkit.ADDObjective,
    student: WrappedDenoiser,
    disc: addkit.ProjectedDiscriminator,
    trainable: list[nn.Parameter],
    opts: list[torch.optim.Optimizer],
    prepare: Callable[[], tuple[torch.Tensor, torch.Tensor, dict[str, Any], torch.Tensor, Any]],
    autocast: Callable[[], Any],
    generator: torch.Generator,
    feature_kwargs: dict[str, Any] | None = None,
) -> Callable[[], None]:
    """The recipe's micro-step and optimiser step (examples/add_sdxl.py ``micro_step`` / ``train``)."""

    def step() -> None:
        x0, real, cond, pooled, c_image = prepare()
        inp = objective.sample_student_inputs(x0, generator=generator)
        disc.requires_grad_(False)  # generator step: gradients reach the student only
        with autocast():
            student_x0 = student.x0(inp.x_t, inp.t, **cond)
            loss_g, _ = objective.generator_loss(
                student_x0,
                teacher_cond=cond,
                c_text=pooled,
                c_image=c_image,
                student_t=inp.t,
                generator=generator,
                feature_kwargs=feature_kwargs,
            )
        loss_g.backward()
        disc.requires_grad_(True)
        with autocast():
            with torch.no_grad():
                fake = objective.discriminator_input(student_x0.detach())
            loss_d, _ = objective.discriminator_loss(
                real,
                fake,
                c_text=pooled,
                c_image=c_image,
                student_t=inp.t,
                step=1,
                generator=generator,
                feature_kwargs=feature_kwargs,
            )
        loss_d.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=True)
        torch.nn.utils.clip_grad_norm_(list(disc.parameters()), float("inf"), foreach=True)
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)

    return step


def setup_for(cfg: StepConfig) -> Callable[[Materializer], Setup]:
    """The builder for ``cfg``'s architecture family (a UNet: SDXL's recipe; a transformer: the flow one)."""
    from _setup_flow import flow_setup
    from _setup_sdxl import sdxl_setup

    kind = arches.ARCHITECTURES[cfg.model].kind
    return sdxl_setup(cfg) if kind == "unet" else flow_setup(cfg)
