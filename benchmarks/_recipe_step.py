"""One training step of the recipes at real sizes, built from the recipes' own code on ``meta``.

A `StepConfig` becomes the command line of ``examples/add_sdxl.py`` (SDXL) or
``examples/add_flow.py`` (SD3.5 medium, Flux.1 [dev]), parsed by the recipes' parser. The
networks are built at their published sizes on ``meta`` (``_architectures.py``; the tiny
configurations take the recipes' own tiny presets' networks) and handed to the family adapter's
``assemble`` (student and teacher as the recipe makes them: one copy of the weights under LoRA),
placed in the dtypes the adapter's ``placement`` gives, with the discriminator, objective and
optimisers the recipe builds (``recipe.loop``). The step is the training core's own
``recipe.step.train_step`` on a `RunState` whose accelerator is `OneProcess` and whose caption
encoder returns fixed embeddings (the text encoders stay resident, their small ``no_grad``
forward is not run). So the memory plan, ``gpu_check.py`` and the recipes cannot drift apart:
``tests/benchmarks/test_memory_estimate.py`` checks that this setup and the recipe's ``setup``
hold the same storages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import _architectures as arches
import addkit
from _estimate import Setup
from _materialize import Materializer



@dataclass(frozen=True)
class StepConfig:
    """One configuration of one training step, as recipe flags.

    Args:
        model: a key of ``_architectures.ARCHITECTURES`` (``sdxl``, ``sd35_medium``, ``flux_dev``,
            ``tiny_sdxl``, ``tiny_sd3``, ``tiny_flux``).
        resolution: image side in pixels (``--resolution``).
        batch: images per device (``--batch-size``).
        train: ``"full"`` (the whole student, float32 master weights) or ``"lora"`` (``--lora-rank``).
        checkpointing: ``--gradient-checkpointing`` of the student.
        discriminator: ``"dinov2"`` (ADD: pixels) or ``"teacher"`` (LADD: teacher features on latents).
        precision: ``"bf16"`` (``--mixed-precision bf16``) or ``"fp32"`` (``no``).
        lora_rank: LoRA rank.
    """

    model: str
    resolution: int
    batch: int
    train: str = "full"
    checkpointing: bool = False
    discriminator: str = "dinov2"
    precision: str = "bf16"
    lora_rank: int = 64

    @property
    def name(self) -> str:
        parts = [self.model, str(self.resolution), f"b{self.batch}", self.train]
        parts += ["gc"] if self.checkpointing else []
        parts += ["dinov2" if self.discriminator == "dinov2" else "teacherD"]
        return "/".join([*parts, self.precision, *([f"r{self.lora_rank}"] if self.train == "lora" else [])])

    @property
    def architecture(self) -> arches.Architecture:
        return arches.ARCHITECTURES[self.model]

    def argv(self) -> list[str]:
        """The recipe's flags for this configuration (its family's built-in preset, whose models are replaced)."""
        kind = self.architecture.kind
        family = ["--preset", "random"] if kind == "unet" else ["--preset", "tiny", "--model", kind]
        flags = [*family, "--resolution", str(self.resolution), "--batch-size", str(self.batch)]
        flags += ["--mixed-precision", "bf16" if self.precision == "bf16" else "no"]
        flags += ["--discriminator", self.discriminator]
        flags += ["--distill-space", "pixel" if self.discriminator == "dinov2" else "latent"]
        flags += ["--lora-rank", str(self.lora_rank)] if self.train == "lora" else []
        flags += ["--gradient-checkpointing"] if self.checkpointing else []
        return flags


class OneProcess:
    """The part of accelerate's ``Accelerator`` the training step reads, for one process.

    ``reduce`` of a fake tensor gives 0 (every step finite): a fake tensor has no value for the
    step's one host read, and the estimate is of a step that is taken.
    """

    num_processes, process_index, is_main_process, scaler = 1, 0, True, None

    def __init__(self, device: torch.device, precision: str) -> None:
        self.device, self.precision = device, precision

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> Any:
        from torch._subclasses.fake_tensor import is_fake

        return 0.0 if is_fake(tensor) else tensor


class FixedText:
    """The caption encoder of a `RunState`: fixed embeddings of the recipe's shapes (no forward)."""

    def __init__(self, cond: dict[str, Any], pooled: torch.Tensor) -> None:
        self.cond, self.pooled, self.device = cond, pooled, pooled.device

    def __call__(self, captions: list[str]) -> tuple[dict[str, Any], torch.Tensor]:
        return dict(self.cond), self.pooled

    def fixed(self, caption: str, n: int) -> tuple[dict[str, Any], torch.Tensor]:
        """A fixed prompt's embeddings (the flow encoder's cached empty / negative prompt)."""
        return self([caption] * n)


def _family(cfg: StepConfig) -> Any:
    try:
        from recipe.flow.family import FLOW
        from recipe.sdxl.family import SDXL
    except ModuleNotFoundError as err:
        if err.name != "recipe":
            raise
        raise ModuleNotFoundError(
            "the memory plan runs the recipes' own code in examples/recipe/: run it as "
            "`PYTHONPATH=examples python benchmarks/<script>.py` (run_all.py and pytest set it)"
        ) from err

    return SDXL if cfg.architecture.kind == "unet" else FLOW


def _networks(cfg: StepConfig, args: Any) -> dict[str, Any]:
    """The loaded networks the family's ``assemble`` takes, on ``meta`` (tiny: the recipes' presets')."""
    arch, kind = cfg.architecture, cfg.architecture.kind
    dinov2 = cfg.discriminator == "dinov2"
    if kind == "unet":
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        with torch.device("meta"):
            if arch.tiny:
                from recipe.sdxl import random as random_preset

                p = random_preset.build_parts(args.seed)
                nets = {"unet": p.unet, "vae": p.vae, "encoders": [p.text_encoder, p.text_encoder_2]}
                image = random_preset.image_encoder(args.seed) if dinov2 else None
            else:
                nets = {"unet": arches.denoiser(arch), "vae": arches.vae(arch), "encoders": arches.text_encoders(arch)}
                image = arches.image_encoder(arch) if dinov2 else None
        return {**nets, "scheduler": scheduler, "tokenizers": [None] * len(nets["encoders"]), "image_encoder": image}
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from recipe.flow import tiny

    with torch.device("meta"):
        if arch.tiny:
            parts = tiny.sd3_components(args.seed) if kind == "sd3" else tiny.flux_components(args.seed)
        else:
            encoders = arches.text_encoders(arch)
            parts = {"transformer": arches.denoiser(arch), "vae": arches.vae(arch)}
            for i, encoder in enumerate(encoders):
                suffix = f"_{i + 1}" if i else ""
                parts.update({f"text_encoder{suffix}": encoder, f"tokenizer{suffix}": None})
    if not arch.tiny:
        line = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
        dynamic = {"use_dynamic_shifting": True, **line} if kind == "flux" else {}
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0, **dynamic)
    cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    return {"pipe": cls(**parts)}


def _assemble(family: Any, args: Any, nets: dict[str, Any]) -> Any:
    """The family's models, as its ``load`` assembles them (the networks on ``meta``: peft puts a
    LoRA's weights beside its base's, a copy stays where it was)."""
    if "pipe" in nets:
        from recipe.flow import models as fm

        return fm.assemble(args, nets["pipe"])
    from recipe.sdxl import models as m

    return m.assemble(args, nets["unet"], nets["vae"], nets["scheduler"], nets["encoders"],
                      nets["tokenizers"], nets["image_encoder"])  # fmt: skip


def _place(make: Materializer, family: Any, models: Any, dtype: torch.dtype) -> None:
    """The family's ``placement``: trained networks first (a LoRA's weights in float32), then the rest."""
    rows = sorted(family.placement(models, dtype), key=lambda row: not row[2])
    for module, want, trained in rows:
        lora = trained and want != torch.float32
        make(module, want, keep_fp32=(lambda name: "lora_" in name) if lora else (lambda name: False))
    make(models.student, torch.float32)  # a full student copy stays float32 (autocast computes)


def _text(cfg: StepConfig, models: Any, make: Materializer) -> FixedText:
    """Fixed caption embeddings of the shapes the family's caption encoder returns."""
    arch, b = cfg.architecture, cfg.batch
    if cfg.architecture.kind == "unet":
        width = models.unet.config.cross_attention_dim
        pooled_dim = models.text_encoders[-1].config.projection_dim
        hidden = make.tensor(lambda: torch.randn(b, arch.text_len, width))
        pooled = make.tensor(lambda: torch.randn(b, pooled_dim))
        return FixedText({"encoder_hidden_states": hidden, "text_embeds": pooled}, pooled)
    width = models.transformer.config.joint_attention_dim
    hidden = make.tensor(lambda: torch.randn(b, arch.text_len, width))
    pooled = make.tensor(lambda: torch.randn(b, models.pooled_dim))
    cond: dict[str, Any] = {"encoder_hidden_states": hidden, "pooled_projections": pooled}
    if models.guidance is not None:
        cond["guidance"] = models.guidance
    return FixedText(cond, pooled)


def _batch(cfg: StepConfig, make: Materializer) -> dict[str, Any]:
    b, side = cfg.batch, cfg.resolution
    size = make.tensor(lambda: torch.full((b, 2), side, dtype=torch.long))
    return {
        "pixels": make.tensor(lambda: torch.rand(b, 3, side, side) * 2 - 1),
        "caption": ["a photo"] * b,
        "original_size": size,
        "crop_top_left": make.tensor(lambda: torch.zeros(b, 2, dtype=torch.long)),
    }


def build_state(cfg: StepConfig, make: Materializer) -> tuple[Any, dict[str, Any]]:
    """The recipe's `RunState` for ``cfg`` and one micro-batch, built on ``meta`` and materialized by ``make``."""
    from recipe import loop
    from recipe.args import parse_args
    from recipe.step import LossScaling, RunState

    family = _family(cfg)
    args = parse_args(family, cfg.argv())
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    models = _assemble(family, args, _networks(cfg, args))
    _place(make, family, models, dtype)
    arch = cfg.architecture
    dinov2 = (arches.dinov2_kwargs(arch) if not arch.tiny else None) if cfg.discriminator == "dinov2" else None
    with torch.device("meta"):
        disc = family.discriminator(args, models, None, dinov2=dinov2)
    make(disc, torch.float32)  # the recipe keeps the discriminator in float32, its feature network too
    make(disc.features, torch.float32)  # (held outside the heads' module tree; a teacher's is placed already)
    trainable = [p for p in models.student.parameters() if p.requires_grad]
    opt_g, opt_d, sched_g, sched_d = loop._optimisers(args, trainable, disc)
    state = RunState(
        args=args, accelerator=OneProcess(make.device, cfg.precision), family=family, models=models,
        student=models.student, denoiser=addkit.wrap(models.student, models.schedule, models.prediction),
        discriminator=disc, objective=loop._objective(family, args, models, disc, None),
        text=_text(cfg, models, make), opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d,
        scaling=LossScaling(None),
    )  # fmt: skip
    return state, _batch(cfg, make)


def parts_of(state: Any) -> dict[str, nn.Module]:
    """The run's networks by name, for the tracker (a module shared by two names counts for the first)."""
    models, disc = state.models, state.discriminator
    if hasattr(models, "pipe"):  # flow
        one = models.student is models.transformer
        parts = {"transformer (student, teacher)": models.student} if one else {
            "student": models.student, "teacher": models.transformer}  # fmt: skip
        parts.update({"vae": models.pipe.vae, "discriminator": disc})
        encoders = [m for k, m in models.pipe.components.items() if k.startswith("text_encoder") and m is not None]
    else:
        one = models.student is models.unet
        parts = {"student": models.student} if one else {"student": models.student, "teacher": models.unet}
        parts.update({"vae": models.vae, "discriminator": disc, "features": disc.features})
        encoders = list(models.text_encoders)
        if models.image_encoder is not None:
            parts["image_encoder"] = models.image_encoder
    parts.update({f"text_encoder_{i + 1}": e for i, e in enumerate(encoders)})
    return parts


def setup_for(cfg: StepConfig) -> Callable[[Materializer], Setup]:
    """The builder of ``cfg``'s `Setup` for ``_estimate``: the recipe's state and one ``train_step``."""

    def build(make: Materializer) -> Setup:
        from recipe.step import train_step

        state, batch = build_state(cfg, make)
        inputs = [t for t in batch.values() if isinstance(t, torch.Tensor)]
        inputs += [t for t in state.text.cond.values() if isinstance(t, torch.Tensor)]
        fsdp = cfg.architecture.kind == "unet" and cfg.train == "full"  # what --fsdp accepts and shards
        return Setup(
            parts_of(state), [state.opt_g, state.opt_d], inputs, lambda: _quiet(train_step, state, [batch]),
            fsdp_unit_bytes=fsdp_unit_bytes(state) if fsdp else 0,
            sharded=list(state.models.student.parameters()) if fsdp else [],
        )  # fmt: skip

    return build


def _quiet(fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` without warnings (the LR scheduler's "step before optimizer.step" on a first step)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(*args)


def fsdp_unit_bytes(state: Any) -> int:
    """What ``--fsdp`` holds unsharded for its largest unit (a down, mid or up block of the student):
    its float32 parameters gathered, and the next one prefetched, plus their float32 gradients
    before the reduce-scatter (``examples/recipe/fsdp.py``: the student only)."""
    unet = state.models.student
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    return 2 * largest * 4 + largest * 4
