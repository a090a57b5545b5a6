"""Projected discriminator (DINOv2 ViT-S/14 + heads) forward/backward: paths, precision, layout.

Two paths, as a training step runs them:

- ``fake``: generator step, the images require grad and the backward goes through the frozen
  ViT to them (heads frozen too, as in a G step);
- ``real``: discriminator step on real images; addkit's ``extract`` runs the ViT without a
  graph and only the heads are differentiated. The naive way, ``real_naive``, is a plain
  module whose backbone is an ordinary (trainable, unused) submodule: the ViT keeps its graph
  and the backward computes its weight gradients for nothing.

Each path runs at two input sizes (224 and DINOv2's native 518 on a GPU), in fp32 and under
bf16 autocast, with contiguous and channels-last images and weights. The figures:
``speedup_vs_naive`` for the real path, and ``vs_fp32`` / ``vs_contiguous`` for each setting.

Run: ``python benchmarks/bench_discriminator.py --quick`` (shrunken ViT, small inputs, CPU)
or without ``--quick`` on a GPU (ViT-S/14 at 224 and 518, batch 8).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import _runner
from _common import finish, time_fn
from _memory import peak_memory
from addkit.discriminators import ProjectedDiscriminator
from addkit.losses import hinge_d_loss, hinge_g_loss
from addkit.testing import tiny_dinov2_kwargs

NAME = "discriminator"
PATHS = ("fake", "real", "real_naive")


@dataclass(frozen=True)
class Config:
    """Sizes of one run. ``vit`` holds ``timm.create_model`` overrides (empty: full ViT-S/14)."""

    batch: int
    resolutions: tuple[int, ...]
    vit: dict[str, int]
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    layouts: tuple[str, ...] = ("contiguous", "channels_last")
    min_run_time: float = 1.0


FULL = Config(batch=8, resolutions=(224, 518), vit={})
QUICK = Config(
    batch=4, resolutions=(56, 112), vit={"depth": 12, "embed_dim": 96, "num_heads": 3}, min_run_time=0.25
)
TINY = Config(
    batch=2,
    resolutions=(28,),
    vit=tiny_dinov2_kwargs()["model_kwargs"],
    layouts=("contiguous",),
    min_run_time=0.05,
)


def make_step(
    D: ProjectedDiscriminator, images: torch.Tensor, path: str, dtype: str
) -> Callable[[], None]:
    """One forward + backward of ``path`` under ``dtype`` (``"fp32"`` or ``"bf16"`` autocast)."""
    device = images.device
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def real_half(logits: Any) -> torch.Tensor:  # hinge D loss; fakes at -1 add nothing
        return hinge_d_loss(logits, [torch.full_like(h, -1.0) for h in logits])

    def fake() -> None:  # generator step: gradient to the images through the frozen ViT
        x = images.detach().requires_grad_(True)
        with amp:
            loss = hinge_g_loss(D(x, per_head=True))
        torch.autograd.grad(loss, x)

    def real() -> None:  # discriminator step: ViT without a graph, heads differentiated
        with amp:
            loss = real_half(D(images, per_head=True))
        loss.backward()

    def real_naive() -> None:  # a backbone that is just a trainable submodule
        with amp:
            feats = D.features(images)
            loss = real_half(D.classify(feats, per_head=True))
        loss.backward()

    return {"fake": fake, "real": real, "real_naive": real_naive}[path]


def _setup(cfg: Config, resolution: int, path: str, layout: str, device: torch.device) -> tuple[Any, ...]:
    torch.manual_seed(0)
    D = ProjectedDiscriminator.from_dinov2(pretrained=False, resolution=resolution, model_kwargs=cfg.vit)
    D = D.to(device).train()
    D.requires_grad_(path != "fake")  # heads: trained in the D step, frozen in the G step
    D.features.requires_grad_(path == "real_naive")
    g = torch.Generator(device).manual_seed(0)
    images = torch.rand(cfg.batch, 3, resolution, resolution, generator=g, device=device) * 2 - 1
    if layout == "channels_last":
        D = D.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    return D, images


def headline(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """Summary figures at the largest input size."""
    res = max(cfg.resolutions)
    by = {r["name"]: r for r in rows}
    real, naive, fake = (by[f"{res}/{p}/fp32/contiguous"] for p in ("real", "real_naive", "fake"))
    figures = [
        (f"{res}px real path, no ViT graph vs naive: time", real["speedup_vs_naive"]),
        (f"{res}px real path vs naive: peak memory", naive["peak_bytes"] / max(real["peak_bytes"], 1)),
        (f"{res}px fake path (grads to images) / real path: time", fake["median_s"] / real["median_s"]),
    ]
    if "bf16" in cfg.dtypes:
        bf16 = by[f"{res}/fake/bf16/contiguous"]["vs_fp32"]
        figures.append((f"{res}px fake path, bf16 autocast vs fp32: time", bf16))
    if "channels_last" in cfg.layouts:
        cl = by[f"{res}/fake/fp32/channels_last"]["vs_contiguous"]
        figures.append((f"{res}px fake path, channels-last vs contiguous: time", cl))
    return [{"figure": f, "value": v, "unit": "x"} for f, v in figures]


def run(cfg: Config, device: torch.device, *, out_dir: Path | None = None) -> dict[str, Any]:
    """Time and measure every (resolution, path, dtype, layout), write the JSON, return it."""
    rows = []
    for res, path, dtype, layout in itertools.product(cfg.resolutions, PATHS, cfg.dtypes, cfg.layouts):
        D, images = _setup(cfg, res, path, layout, device)
        step = make_step(D, images, path, dtype)
        step()  # warm-up outside the timer too (first-call allocations, autocast caches)
        t = time_fn(step, cfg.min_run_time, device=device)
        mem = peak_memory(step, device, modules=[D, D.features], inputs=[images])
        name = f"{res}/{path}/{dtype}/{layout}"
        rows.append({"name": name, "resolution": res, "path": path, "dtype": dtype, "layout": layout,
                     **t, "peak_bytes": mem})
    by = {(r["resolution"], r["path"], r["dtype"], r["layout"]): r for r in rows}
    for (res, path, dtype, layout), r in by.items():
        r["vs_fp32"] = by[(res, path, "fp32", layout)]["median_s"] / r["median_s"]
        r["vs_contiguous"] = by[(res, path, dtype, "contiguous")]["median_s"] / r["median_s"]
        naive = by[(res, "real_naive", dtype, layout)]["median_s"]
        r["speedup_vs_naive"] = naive / r["median_s"] if path != "fake" else None
    return finish(
        NAME, description="projected DINOv2 discriminator fwd+bwd: fake (grads to images) vs real (no graph)",
        naive="real_naive", headline=headline(rows, cfg), config=cfg, device=device, rows=rows, out_dir=out_dir,
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--quick`` for the shrunken CPU configuration."""
    _runner.main(run, quick=QUICK, full=FULL, description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    main()
