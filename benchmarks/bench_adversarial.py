"""Discriminator update with hinge + R1: where R1 is taken and how often it runs.

One update = real and fake forward through a projected discriminator (frozen DINOv2 ViT,
trainable heads), hinge loss, the regulariser, backward and an Adam step on the heads. The
naive way is the exact R1 on images every step: its double backward runs through the ViT and
needs the math attention backend. Against it, in the same run:

- ``r1_features``: ADD's placement, R1 on the head inputs (double backward through the heads);
- ``lazy16_r1_images`` / ``lazy16_r1_features``: the penalty on every 16th step, scaled by 16
  (StyleGAN2), timed as a whole 16-step cycle and divided by 16;
- ``approx_r1``: APT's first-order approximation (one more forward, fused attention kept);
- ``hinge``: no regulariser, the floor.

The figure is ``speedup_vs_naive = time(r1_images) / time(variant)``. Peak memory is that of
one update (for the lazy variants: of their R1 step, the most expensive one).

Run: ``python benchmarks/bench_adversarial.py --quick`` (tiny ViT on CPU) or without
``--quick`` on a GPU (DINOv2 ViT-S/14 at 224, batch 8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import _runner
from _common import finish, time_fn
from _memory import peak_memory
from addkit.discriminators import ProjectedDiscriminator
from addkit.losses import LazyRegularizer, approximate_r1, hinge_d_loss, r1_context, r1_penalty
from addkit.testing import tiny_dinov2_kwargs

NAME = "adversarial"
NAIVE = "r1_images"


@dataclass(frozen=True)
class Config:
    """Sizes of one run. ``vit`` holds ``timm.create_model`` overrides (empty: full ViT-S/14)."""

    batch: int
    resolution: int
    vit: dict[str, int]
    cond_dim: int
    lazy_interval: int = 16
    gamma: float = 1e-5
    min_run_time: float = 1.0


FULL = Config(batch=8, resolution=224, vit={}, cond_dim=1024)
QUICK = Config(
    batch=4, resolution=112, vit={"depth": 12, "embed_dim": 96, "num_heads": 3}, cond_dim=64, min_run_time=0.4
)
TINY = Config(batch=2, resolution=28, vit=tiny_dinov2_kwargs()["model_kwargs"], cond_dim=8, min_run_time=0.05)


def _discriminator(cfg: Config, device: torch.device) -> ProjectedDiscriminator:
    torch.manual_seed(0)
    D = ProjectedDiscriminator.from_dinov2(
        pretrained=False,
        resolution=cfg.resolution,
        model_kwargs=cfg.vit,
        c_text_dim=cfg.cond_dim,
        c_image_dim=cfg.cond_dim,
    )
    return D.to(device).train()


def make_steps(cfg: Config, device: torch.device) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """The update variants, each a closure running one (or one lazy cycle of) update(s)."""
    D = _discriminator(cfg, device)
    opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.0, 0.99))
    g = torch.Generator(device).manual_seed(0)
    shape = (cfg.batch, 3, cfg.resolution, cfg.resolution)
    real = torch.rand(shape, generator=g, device=device) * 2 - 1
    fake = torch.rand(shape, generator=g, device=device) * 2 - 1  # a detached generator sample
    cond = {
        "c_text": torch.randn(cfg.batch, cfg.cond_dim, generator=g, device=device),
        "c_image": torch.randn(cfg.batch, cfg.cond_dim, generator=g, device=device),
    }
    lazy = LazyRegularizer(cfg.lazy_interval)

    def heads(x: torch.Tensor, **c: torch.Tensor) -> list[torch.Tensor]:
        return D(x, **c, per_head=True)  # type: ignore[return-value]

    def update(reg: str, scale: float = 1.0) -> None:
        opt.zero_grad(set_to_none=True)
        fake_logits = D(fake, **cond, per_head=True)
        if reg == "r1_features":  # ADD §3.2: gradient w.r.t. the head inputs
            feats = [f.requires_grad_(True) for f in D.extract(real)]
            real_logits = D.classify(feats, **cond, per_head=True)
            penalty = cfg.gamma * r1_penalty(real_logits, feats)
        elif reg == "r1_images":  # exact R1 on pixels: double backward through the ViT
            x = real.detach().requires_grad_(True)
            with r1_context():
                real_logits = D(x, **cond, per_head=True)
            penalty = cfg.gamma * r1_penalty(real_logits, x)
        else:
            real_logits = D(real, **cond, per_head=True)
            penalty = None
            if reg == "approx_r1":  # APT: lambda = 100, sigma = 0.01
                penalty = 100.0 * approximate_r1(heads, real, real_logits=real_logits, generator=g, **cond)
        loss = hinge_d_loss(real_logits, fake_logits)
        if penalty is not None:
            loss = loss + scale * penalty
        loss.backward()
        opt.step()

    def cycle(reg: str) -> None:
        for step in range(lazy.interval):
            update(reg, lazy.scale) if lazy.due(step) else update("none")

    steps: dict[str, Callable[[], None]] = {
        "hinge": lambda: update("none"),
        "r1_images": lambda: update("r1_images"),
        "r1_features": lambda: update("r1_features"),
        "approx_r1": lambda: update("approx_r1"),
        f"lazy{lazy.interval}_r1_images": lambda: cycle("r1_images"),
        f"lazy{lazy.interval}_r1_features": lambda: cycle("r1_features"),
    }
    peaks = {  # one update; a lazy cycle peaks on its R1 step
        "hinge": lambda: update("none"),
        "r1_images": lambda: update("r1_images"),
        "r1_features": lambda: update("r1_features"),
        "approx_r1": lambda: update("approx_r1"),
        f"lazy{lazy.interval}_r1_images": lambda: update("r1_images", lazy.scale),
        f"lazy{lazy.interval}_r1_features": lambda: update("r1_features", lazy.scale),
    }
    mem_kw = {"modules": [D, D.features], "inputs": [real, fake, *cond.values()]}
    return steps, {"peaks": peaks, "mem_kw": mem_kw, "lazy": lazy}


def headline(rows: list[dict[str, Any]], interval: int) -> list[dict[str, Any]]:
    """The summary figures: speed-ups over exact image-space R1 every step, and its memory."""
    by = {r["name"]: r for r in rows}
    memory = by[NAIVE]["peak_bytes"] / max(by["r1_features"]["peak_bytes"], 1)
    lazy = by[f"lazy{interval}_r1_images"]["speedup_vs_naive"]
    figures = [
        ("R1 on head inputs (ADD) vs on images: step time", by["r1_features"]["speedup_vs_naive"]),
        (f"lazy R1 on images, every {interval} steps vs every step", lazy),
        ("approximated R1 (APT) vs exact R1 on images: step time", by["approx_r1"]["speedup_vs_naive"]),
        ("R1 on images vs on head inputs: peak memory", memory),
    ]
    return [{"figure": f, "value": v, "unit": "x"} for f, v in figures]


def run(cfg: Config, device: torch.device, *, out_dir: Path | None = None) -> dict[str, Any]:
    """Time and measure every variant, write the JSON and return its payload."""
    steps, extra = make_steps(cfg, device)
    per_call = {name: extra["lazy"].interval if name.startswith("lazy") else 1 for name in steps}
    for fn in extra["peaks"].values():  # warm up every path before timing any
        fn()
    rows = []
    for name, fn in steps.items():
        t = time_fn(fn, cfg.min_run_time, device=device)
        n = per_call[name]
        t = {k: v / n if k in ("median_s", "iqr_s", "mean_s") else v for k, v in t.items()}
        mem = peak_memory(extra["peaks"][name], device, **extra["mem_kw"])
        rows.append({"name": name, **t, "peak_bytes": mem, "steps_per_call": n})
    naive = next(r for r in rows if r["name"] == NAIVE)["median_s"]
    for r in rows:
        r["speedup_vs_naive"] = naive / r["median_s"]
    return finish(
        NAME, description="discriminator update: hinge + R1 placements, lazy R1, approximated R1",
        naive=NAIVE, headline=headline(rows, extra["lazy"].interval), config=cfg, device=device, rows=rows,
        out_dir=out_dir,
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--quick`` for the tiny CPU configuration."""
    _runner.main(run, quick=QUICK, full=FULL, description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    main()
