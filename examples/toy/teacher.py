"""Train the teacher: a class-conditional v-prediction diffusion model, cached on disk.

Standard DDPM training on the scaled-linear schedule of SD/SDXL (T = 1000),
$\\mathcal{L} = \\lVert v_\\theta(x_t, t, y) - v \\rVert^2$ with
$v = \\alpha_t \\epsilon - \\sigma_t x_0$, labels dropped to the null label 10% of the
time (classifier-free guidance) and a few negative-class images (NFSD). The EMA of the
weights is the teacher.

References:
    Ho et al., *Denoising Diffusion Probabilistic Models*, 2020.
    Salimans & Ho, *Progressive Distillation*, 2022 (v-prediction).
    Ho & Salimans, *Classifier-Free Diffusion Guidance*, 2022.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from addkit import VPSchedule, to_v

from .data import NULL_LABEL, load_digits_split, sample_batch
from .nets import UNET_CONFIG, load_or_train, make_unet

PREDICTION = "v"


def schedule() -> VPSchedule:
    """The SD/SDXL schedule: scaled-linear betas 0.00085 → 0.012, T = 1000."""
    return VPSchedule.scaled_linear()


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA of ``model``'s parameters (``torch.optim.swa_utils.AveragedModel``), starting at its weights.

    The ``n``-th ``update_parameters(model)`` sets
    $\\theta_{ema} \\leftarrow d_n\\,\\theta_{ema} + (1 - d_n)\\,\\theta$ with the warm-up
    $d_n = \\min(d, n / (n + 9))$ (0.1 for the first update).
    """

    def average(ema_param: torch.Tensor, param: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = int(num_averaged)  # updates so far, the initial copy included
        return ema_param.lerp(param, 1.0 - min(decay, n / (n + 9)))

    ema = AveragedModel(model, avg_fn=average)
    ema.update_parameters(model)  # the average starts at the current weights
    return ema


def train_teacher(
    steps: int,
    *,
    batch_size: int = 64,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    p_uncond: float = 0.1,
    negative_fraction: float = 0.05,
    seed: int = 0,
    log=print,
) -> tuple[nn.Module, list[float]]:
    """Train from scratch; returns the EMA model (eval, frozen) and the loss per step."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = load_digits_split("train")
    sched = schedule()
    model = make_unet(seed)
    ema = ema_model(model, ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_at(i: int) -> float:  # linear warm-up, then linear decay to 10 %
        return min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * (1 - i / steps))

    losses: list[float] = []
    start = time.time()
    for i in range(steps):
        x0, y = sample_batch(data, batch_size, g, negative_fraction=negative_fraction)
        y = torch.where(torch.rand(batch_size, generator=g) < p_uncond, NULL_LABEL, y)
        t = torch.randint(0, sched.num_train_timesteps, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = sched.add_noise(x0, noise, t)
        target = to_v(x0, x_t, t, schedule=sched, prediction="x0")  # alpha eps - sigma x0
        loss = (model(x_t, t, class_labels=y).sample - target).square().mean()
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        losses.append(loss.item())
        if (i + 1) % max(1, steps // 10) == 0:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"teacher step {i + 1}/{steps}: loss {recent:.4f} ({time.time() - start:.0f}s)")
    return ema.module.requires_grad_(False).eval(), losses


def cached_teacher(out_dir: Path, steps: int, *, seed: int = 0, log=print) -> tuple[nn.Module, list[float]]:
    """The teacher for this config, from ``out_dir`` or trained and saved; and its losses."""
    config = {"unet": UNET_CONFIG, "steps": steps, "seed": seed, "prediction": PREDICTION, "v": 1}
    key = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def train() -> tuple[nn.Module, dict]:
        model, losses = train_teacher(steps, seed=seed, log=log)
        return model, {"losses": losses, "config": json.dumps(config, default=str)}

    model, extra = load_or_train(Path(out_dir) / f"teacher-{key}.pt", lambda: make_unet(seed), train, log=log)
    return model, list(extra["losses"])
