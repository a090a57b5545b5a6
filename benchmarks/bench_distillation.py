"""Distillation step: how much of it is the teacher forward, and what the naive way costs.

One step = re-noise the student sample, run the frozen teacher with classifier-free guidance,
form the target, the weighted squared error and its backward to the student sample. Variants:

- ``teacher_forward``: only the guided teacher forward (batched cond + uncond, no graph): the
  floor any implementation pays;
- ``addkit``: ``addkit.losses.distillation_loss`` with its backward;
- ``naive``: the way it is often written: the teacher runs with autograd on (its graph is built
  and kept although the target is detached) and CFG as two separate forwards.

The figures: ``share_outside_teacher = 1 - time(teacher_forward) / time(addkit)`` (what the
loss itself costs around the teacher) and ``speedup_vs_naive = time(naive) / time(variant)``.

Run: ``python benchmarks/bench_distillation.py --quick`` (tiny UNet, CPU) or without
``--quick`` on a GPU (SD-1.5-sized UNet, random weights, 64x64 latents, bf16).
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
from addkit.denoisers import wrap
from addkit.losses import distillation_loss, sample_distillation_timesteps
from addkit.schedules import VPSchedule
from addkit.testing import tiny_sd_unet

NAME = "distillation"
NAIVE = "naive"


@dataclass(frozen=True)
class Config:
    """Sizes of one run: the UNet and the batch.

    ``unet`` overrides the config of ``addkit.testing.tiny_sd_unet`` (empty: that tiny UNet).
    """

    batch: int
    latent: int
    unet: dict[str, Any] = field(default_factory=dict)
    text_len: int = 77
    dtype: str = "fp32"
    guidance_scale: float = 4.0
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
FULL = Config(batch=4, latent=64, unet=SD15_UNET, dtype="bf16")
QUICK = Config(batch=4, latent=16, text_len=16, min_run_time=0.5)
TINY = Config(batch=2, latent=8, text_len=4, min_run_time=0.05)


def make_steps(cfg: Config, device: torch.device) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """The three variants as closures over one teacher and one batch."""
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    net = tiny_sd_unet(sample_size=cfg.latent, **cfg.unet).to(device, dtype).requires_grad_(False)
    schedule = VPSchedule.scaled_linear()
    teacher = wrap(net, schedule, "eps")
    g = torch.Generator(device).manual_seed(0)
    shape = (cfg.batch, net.config.in_channels, cfg.latent, cfg.latent)
    x0 = torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_(True)
    noise = torch.randn(shape, generator=g, device=device, dtype=dtype)
    width = net.config.cross_attention_dim
    text = torch.randn(cfg.batch, cfg.text_len, width, generator=g, device=device, dtype=dtype)
    cond, uncond = {"encoder_hidden_states": text}, {"encoder_hidden_states": torch.zeros_like(text)}
    t = sample_distillation_timesteps(cfg.batch, schedule, generator=g, device=device)
    s = cfg.guidance_scale

    def teacher_forward() -> None:
        with torch.no_grad():
            x_t = schedule.add_noise(x0.detach(), noise, t)
            teacher.x0(x_t, t, guidance_scale=s, uncond=uncond, **cond)

    def addkit() -> None:
        loss = distillation_loss(x0, teacher, t, noise, cond=cond, uncond=uncond, guidance_scale=s)
        x0.grad = None
        loss.backward()

    def naive() -> None:
        a, sig = schedule.coefficients(t, x0)
        x_t = a * x0 + sig * noise  # graph kept through the teacher input
        eps_c = net(x_t, t, **cond).sample
        eps_u = net(x_t, t, **uncond).sample
        target = (x_t - sig * (eps_u + s * (eps_c - eps_u))) / a
        loss = (a.flatten() * (x0 - target.detach()).float().square().flatten(1).mean(1)).mean()
        x0.grad = None
        loss.backward()

    steps = {"teacher_forward": teacher_forward, "addkit": addkit, NAIVE: naive}
    return steps, {"mem_kw": {"modules": [net], "inputs": [x0, noise, text]}}


def run(cfg: Config, device: torch.device, *, out_dir: Path | None = None) -> dict[str, Any]:
    """Time and measure every variant, write the JSON and return its payload."""
    steps, extra = make_steps(cfg, device)
    for fn in steps.values():  # warm up every path before timing any
        fn()
    rows = []
    for name, fn in steps.items():
        timing = time_fn(fn, cfg.min_run_time, device=device)
        rows.append({"name": name, **timing, "peak_bytes": peak_memory(fn, device, **extra["mem_kw"])})
    by = {r["name"]: r for r in rows}
    for r in rows:
        r["speedup_vs_naive"] = by[NAIVE]["median_s"] / r["median_s"]
    share = 1.0 - by["teacher_forward"]["median_s"] / by["addkit"]["median_s"]
    headline = [
        {"figure": "share of the addkit step outside the teacher forward", "value": share, "unit": ""},
        {"figure": "addkit vs naive (teacher graph kept, two CFG passes)",
         "value": by["addkit"]["speedup_vs_naive"], "unit": "x"},
    ]
    return finish(
        NAME, description="distillation step (guided teacher, loss, backward): teacher share and naive way",
        naive=NAIVE, headline=headline, config=cfg, device=device, rows=rows, out_dir=out_dir,
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--quick`` for the tiny CPU configuration."""
    _runner.main(run, quick=QUICK, full=FULL, description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    main()
