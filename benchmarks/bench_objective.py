"""One ADD training step (generator and discriminator), what value checks cost, and one DMD2 step.

One step = noise real latents at a student timestep, the student's $\\hat x_0$, the generator
loss (decode, DINOv2-feature discriminator with text conditioning, pixel-space distillation
through the frozen teacher) and its backward, then the discriminator loss (real and detached
fake, R1 on the heads' inputs) and its backward: what ``ADDObjective`` composes. Variants:

- ``addkit``: the default, which reads no tensor value back to the host (checks from
  metadata only);
- ``value_checks``: the same step under ``addkit.value_checks()``, which checks finiteness and
  timestep ranges by reading the device, as every step did before checks became opt-in;
- ``dmd2``: one DMD2 step on the same models: ``DMDObjective``'s generator update
  (distribution matching through the teacher and a teacher-sized fake score) and one
  fake-score update, each with its backward (DMD2 repeats the fake-score update 5 times per
  generator update; the row times one of each). No discriminator, no VAE decode.

Each row records ``host_reads``: the device-to-host reads of one step, counted with
``addkit.testing.count_host_reads``. On a CPU a read costs little (the figures measure the
checks' arithmetic); on a GPU each one is a synchronisation that drains the launch queue, which
is what the full-size run shows. ``speedup_vs_naive = time(value_checks) / time(variant)``.

Run: ``python benchmarks/bench_objective.py --quick`` (tiny SDXL-architecture models, CPU) or
without ``--quick`` on a GPU (SD-1.5-sized UNets, 64x64 latents, DINOv2 ViT-S at 224, bf16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import _runner
from _common import finish, time_fn
from _memory import peak_memory
from addkit import ADDObjective, DMDObjective, ProjectedDiscriminator, VPSchedule, value_checks, wrap
from addkit.testing import count_host_reads, tiny_dinov2_kwargs, tiny_sd_unet, tiny_vae

NAME = "objective"
NAIVE = "value_checks"


@dataclass(frozen=True)
class Config:
    """Sizes of one run.

    ``unet`` and ``vae`` override the configs of ``addkit.testing.tiny_sd_unet`` / ``tiny_vae``
    (empty: the tiny ones); ``dinov2`` overrides ``tiny_dinov2_kwargs()`` (empty: the tiny ViT).
    """

    batch: int
    latent: int
    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    dinov2: dict[str, Any] = field(default_factory=dict)
    text_len: int = 8
    dtype: str = "fp32"
    min_run_time: float = 1.0


SD15_UNET: dict[str, Any] = {  # SD 1.5's architecture (diffusers' UNet2DConditionModel defaults)
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
SD_VAE: dict[str, Any] = {  # SD's AutoencoderKL: 8x downsampling
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
VIT_S: dict[str, Any] = {"resolution": 224, "model_kwargs": {}}  # DINOv2 ViT-S/14 at 224, random weights
FULL = Config(batch=4, latent=64, unet=SD15_UNET, vae=SD_VAE, dinov2=VIT_S, text_len=77, dtype="bf16")
QUICK = Config(batch=4, latent=8, min_run_time=1.0)
TINY = Config(batch=2, latent=8, min_run_time=0.05)


def make_steps(cfg: Config, device: torch.device) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """The two variants as closures over one student, teacher, VAE, discriminator and batch."""
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32

    def place(module: torch.nn.Module) -> torch.nn.Module:
        return module.to(device) if dtype == torch.float32 else module.to(device, dtype)

    schedule = VPSchedule.scaled_linear()
    teacher_net = place(tiny_sd_unet(sample_size=cfg.latent, seed=0, **cfg.unet)).requires_grad_(False)
    student_net = place(tiny_sd_unet(sample_size=cfg.latent, seed=1, **cfg.unet))
    vae = place(tiny_vae(seed=2, **cfg.vae)).requires_grad_(False)
    width = student_net.config.cross_attention_dim
    d_kwargs = {**tiny_dinov2_kwargs(), **cfg.dinov2}
    D = ProjectedDiscriminator.from_dinov2(**d_kwargs, c_text_dim=width).to(device)
    objective = ADDObjective(
        wrap(teacher_net, schedule, "eps"),
        D,
        schedule,
        decode=lambda z: vae.decode(z).sample.clamp(-1, 1),
        space="pixel",
    )
    student = wrap(student_net, schedule, "eps")
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(cfg.batch, 4, cfg.latent, cfg.latent, generator=g, device=device, dtype=dtype)
    with torch.no_grad():
        images = objective.discriminator_input(latents)
    text = torch.randn(cfg.batch, cfg.text_len, width, generator=g, device=device, dtype=dtype)
    pooled = text.mean(1).float()
    cond = {"encoder_hidden_states": text}

    def step() -> None:
        inp = objective.sample_student_inputs(latents, generator=g)
        x0 = student.x0(inp.x_t, inp.t, **cond)
        loss_g, _ = objective.generator_loss(
            x0, teacher_cond=cond, c_text=pooled, student_t=inp.t, generator=g
        )
        loss_g.backward()
        with torch.no_grad():
            fake = objective.discriminator_input(x0.detach())
        loss_d, _ = objective.discriminator_loss(
            images, fake, c_text=pooled, student_t=inp.t, step=0, generator=g
        )
        loss_d.backward()
        student_net.zero_grad(set_to_none=True)
        D.zero_grad(set_to_none=True)

    def checked() -> None:
        with value_checks():
            step()

    fake_net = place(tiny_sd_unet(sample_size=cfg.latent, seed=3, **cfg.unet))
    dmd = DMDObjective(objective.teacher, wrap(fake_net, schedule, "eps"), schedule)

    def dmd2() -> None:
        inp = dmd.sample_student_inputs(torch.randn_like(latents), student=student, step=0, generator=g)
        x0 = student.x0(inp.x_t, inp.t, **cond)
        loss_g, _ = dmd.generator_loss(x0, cond=cond, generator=g)
        loss_g.backward()
        loss_f, _ = dmd.fake_score_loss(x0, cond=cond, generator=g)
        loss_f.backward()
        student_net.zero_grad(set_to_none=True)
        fake_net.zero_grad(set_to_none=True)

    steps = {"add": step, NAIVE: checked, "dmd2": dmd2}
    mem = {"modules": [teacher_net, student_net, vae, D, fake_net], "inputs": [latents, images, text]}
    return steps, {"mem_kw": mem}


def run(cfg: Config, device: torch.device, *, out_dir: Path | None = None) -> dict[str, Any]:
    """Time, count host reads and measure every variant, write the JSON and return its payload."""
    steps, extra = make_steps(cfg, device)
    for fn in steps.values():  # warm up every path before timing any
        fn()
    rows = []
    for name, fn in steps.items():
        with count_host_reads() as reads:
            fn()
        timing = time_fn(fn, cfg.min_run_time, device=device)
        peak = peak_memory(fn, device, **extra["mem_kw"])
        rows.append({"name": name, **timing, "peak_bytes": peak, "host_reads": reads.count})
    by = {r["name"]: r for r in rows}
    for r in rows:
        r["speedup_vs_naive"] = by[NAIVE]["median_s"] / r["median_s"]
    headline = [
        {
            "figure": "host reads in one ADD step (default)",
            "value": float(by["add"]["host_reads"]),
            "unit": "",
        },
        {"figure": "host reads with value checks on", "value": float(by[NAIVE]["host_reads"]), "unit": ""},
        {"figure": "default step vs value checks on", "value": by["add"]["speedup_vs_naive"], "unit": "x"},
        {
            "figure": "DMD2 step time / ADD step time",
            "value": by["dmd2"]["median_s"] / by["add"]["median_s"],
            "unit": "x",
        },
    ]
    return finish(
        NAME,
        description="one ADD step (G + D, R1 on features, pixel distillation): default vs value checks; one DMD2 step",
        naive=NAIVE,
        headline=headline,
        config=cfg,
        device=device,
        rows=rows,
        out_dir=out_dir,
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--quick`` for the tiny CPU configuration."""
    _runner.main(run, quick=QUICK, full=FULL, description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    main()
