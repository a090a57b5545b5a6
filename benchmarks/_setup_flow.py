"""The step of ``examples/add_flow.py`` (LADD) at SD3.5-medium and Flux.1-dev sizes (see ``_add_setups.py``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import _architectures as arches
import addkit
from _add_setups import (
    LORA_TARGETS_FLOW,
    StepConfig,
    add_lora,
    autocast_for,
    fsdp_unit_bytes,
    place_weights,
    train_step,
    trainable_params,
)
from _estimate import Setup
from _materialize import Materializer
from addkit.denoisers import AdaptersDisabled


def _same_tensors(module: nn.Module) -> nn.Module:
    """A second module object holding ``module``'s parameter and buffer tensors (no copy of them)."""
    memo: dict[int, Any] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def default_taps(transformer: nn.Module, count: int = 4) -> list[str]:
    """``count`` blocks evenly spaced over the depth, the last included (examples/add_flow_models.py)."""
    names = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    names += [
        f"single_transformer_blocks.{i}"
        for i in range(len(getattr(transformer, "single_transformer_blocks", [])))
    ]
    count = min(count, len(names))
    return [names[round((k + 1) * len(names) / count) - 1] for k in range(count)]


def flow_setup(cfg: StepConfig) -> Callable[[Materializer], Setup]:
    """The step of ``examples/add_flow.py`` (LADD: teacher features, no distillation) for ``cfg``.

    LoRA: the transformer with adapters *is* the student and ``AdaptersDisabled`` of it the
    teacher (one copy of the weights; gradient checkpointing is suspended in the teacher's
    passes, so the feature pass of the generator step keeps its activations). Full: a float32
    copy is trained beside the frozen bf16 transformer. Text encoders and VAE stay resident as
    in the recipe; the VAE encodes the batch each step, the text encoders' forward is not run.
    """
    arch = arches.ARCHITECTURES[cfg.model]
    flux = arch.kind == "flux"

    def build(make: Materializer) -> Setup:
        with torch.device("meta"):
            base = arches.denoiser(arch).requires_grad_(False)
            vae = arches.vae(arch).requires_grad_(False)
            encoders = [e.requires_grad_(False) for e in arches.text_encoders(arch)]
            if cfg.train == "lora" and cfg.teacher_checkpointing:
                teacher = _same_tensors(base)  # the base without adapters: checkpointing stays correct
                add_lora(base, cfg.lora_rank, LORA_TARGETS_FLOW)
                student = base
            elif cfg.train == "lora":
                add_lora(base, cfg.lora_rank, LORA_TARGETS_FLOW)
                student, teacher = base, AdaptersDisabled(base)
            else:
                student, teacher = copy.deepcopy(base).requires_grad_(True), base
            student.train()
            if cfg.checkpointing:
                student.enable_gradient_checkpointing()
            if cfg.teacher_checkpointing:
                teacher.enable_gradient_checkpointing()
        frozen = [vae, *encoders] + ([base] if cfg.train == "full" else [])
        frozen += [teacher] if cfg.train == "lora" and cfg.teacher_checkpointing else []
        place_weights(make, cfg, student, frozen)
        schedule = addkit.FlowSchedule(shift=3.0)
        teacher_w = addkit.wrap(teacher, schedule, "flow")
        taps = default_taps(base)
        width = base.config.num_attention_heads * base.config.attention_head_dim
        with torch.device("meta"):
            features = addkit.TeacherFeatures(
                teacher,
                schedule,
                taps,
                channels=[width] * len(taps),
                call=teacher_w,
                select=lambda out: out[1],
            )
            disc = addkit.ProjectedDiscriminator(features, c_text_dim=arch.pooled_dim)
        make(disc, torch.float32)
        b, side = cfg.batch, cfg.resolution
        g = torch.Generator(make.device).manual_seed(0)  # draws on the step's device
        pixels = make.tensor(lambda: torch.rand(b, 3, side, side) * 2 - 1)
        text = make.tensor(lambda: torch.randn(b, arch.text_len, arch.text_dim))
        pooled = make.tensor(lambda: torch.randn(b, arch.pooled_dim))
        cond: dict[str, Any] = {"encoder_hidden_states": text, "pooled_projections": pooled}
        if flux and base.config.guidance_embeds:
            cond["guidance"] = make.tensor(lambda: torch.full((b,), 3.5))
        objective = addkit.ADDObjective(
            teacher_w,
            disc,
            schedule,
            lambda_distill=0.0,
            space="latent",
            discriminator_sees="latents",
            student_timesteps=schedule.timesteps(4),
        )

        def prepare() -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], torch.Tensor, Any]:
            with torch.no_grad():  # examples/add_flow_models.py ``encode_images``
                z = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=g).float()
                x0 = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
            return x0, x0, cond, pooled, None

        trainable = trainable_params(student)
        opts = [  # examples/add_flow.py: AdamW's default on a GPU, foreach
            torch.optim.AdamW(
                trainable, lr=1e-4 if cfg.train == "lora" else 1e-5, weight_decay=1e-2, foreach=True
            ),
            torch.optim.AdamW(disc.parameters(), lr=2e-5, betas=(0.0, 0.99), weight_decay=0.0, foreach=True),
        ]
        step = train_step(
            objective=objective,
            student=addkit.wrap(student, schedule, "flow"),
            disc=disc,
            trainable=trainable,
            opts=opts,
            prepare=prepare,
            autocast=autocast_for(cfg, make.device),
            generator=g,
            feature_kwargs=cond,
        )
        blocks = [*base.transformer_blocks, *getattr(base, "single_transformer_blocks", [])]
        if cfg.train == "full":
            parts = {"student": student, "teacher": base}
        elif cfg.teacher_checkpointing:
            parts = {"student": student, "teacher": teacher}  # two module objects, one set of tensors
        else:
            parts = {"transformer (student, teacher)": base}
        parts.update({"vae": vae, "discriminator": disc})
        parts.update({f"text_encoder_{i + 1}": e for i, e in enumerate(encoders)})
        return Setup(
            parts,
            opts,
            [pixels, *cond.values()],
            step,
            fsdp_unit_bytes=fsdp_unit_bytes(blocks, cfg.train == "full"),
        )

    return build
