"""A rectified-flow teacher on the toy, and ADD and LADD students distilled from it.

The teacher is the VP teacher's UNet trained as a flow model (SD3/Flux's objective): with
$x_t = (1 - t)\\,x_0 + t\\,\\epsilon$ it predicts the velocity $u = \\epsilon - x_0$,
$t \\sim U(0, 1)$ (shift 1: 8×8 images need none), the same data, label dropout, negative class,
optimiser and EMA as the VP teacher. It samples with Euler steps (``renoise="deterministic"``,
diffusers' ``FlowMatchEulerDiscreteScheduler`` step) on trailing times from $t = 1$.

Students start from the teacher and train on the flow student times (1, 0.75, 0.5, 0.25), pure
noise at $t = 1$:

- **ADD**: the toy's ADD row (classifier-feature discriminator with class and image
  conditioning, hinge + R1, λ = 2.5 exponential distillation), with the flow teacher;
- **LADD**: the discriminator reads the *teacher's* features (``TeacherFeatures`` on its down
  and mid blocks, class-conditioned like the teacher) on real and generated images re-noised to
  a logit-normal noise level $\\hat t$ (m = 1, s = 1), heads conditioned on the class; no
  distillation loss and no second image network. An ablation draws lower noise levels
  (m = −1): does LADD's high noise leave the teacher too little of an 8×8 image to read?

Optimiser settings are the ADD row's (chosen on the VP teacher; not tuned here).

References:
    Liu et al., *Flow Straight and Fast*, arXiv 2209.03003 (rectified flow).
    Sauer et al., arXiv 2311.17042 (ADD) and arXiv 2403.12015 (LADD).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addkit import FlowSchedule, ProjectedDiscriminator, TeacherFeatures, wrap
from addkit.discriminators.teacher import FeatureLayout
from addkit.objective import ADDObjective
from addkit.sampling import sample

from .data import NEGATIVE_LABEL, NULL_LABEL, NUM_CLASSES, SIZE, load_digits_split, sample_batch
from .distill import RunConfig, make_discriminator, record
from .nets import UNET_CONFIG, Classifier, load_or_train, make_unet
from .teacher import ema_model

PREDICTION = "flow"
STUDENT_STEPS = {1: (1.0,), 4: (1.0, 0.75, 0.5, 0.25)}
TEACHER_TAPS = ("unet.down_blocks.0", "unet.down_blocks.1", "unet.mid_block")
"""LADD's taps: the UNet's two down blocks (32 and 64 channels, 4×4 tokens) and its mid block
(64); the teacher's up path is skipped (``stop_early``)."""


def schedule() -> FlowSchedule:
    """Rectified flow without shift: $\\sigma_t = t$."""
    return FlowSchedule(shift=1.0)


class FlowUNet(nn.Module):
    """The toy UNet as a flow model ``u(x_t, t, class_labels)``; ``t`` in ``[0, 1]`` enters as ``1000 t``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_t: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        return self.unet(x_t, t * 1000, class_labels=class_labels).sample


def train_flow_teacher(
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
    """Flow matching, $\\lVert u_\\theta(x_t, t, y) - (\\epsilon - x_0)\\rVert^2$: EMA model, losses."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data, sched = load_digits_split("train"), schedule()
    model = FlowUNet(make_unet(seed))
    ema = ema_model(model, ema_decay)  # the VP teacher's EMA and warm-up
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    losses: list[float] = []
    start = time.time()
    for i in range(steps):
        x0, y = sample_batch(data, batch_size, g, negative_fraction=negative_fraction)
        y = torch.where(torch.rand(batch_size, generator=g) < p_uncond, NULL_LABEL, y)
        t = torch.rand(batch_size, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = (model(sched.add_noise(x0, noise, t), t, class_labels=y) - (noise - x0)).square().mean()
        for group in opt.param_groups:  # the VP teacher's schedule: warm-up, linear decay to 10 %
            group["lr"] = lr * min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * (1 - i / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        losses.append(loss.item())
        if (i + 1) % max(1, steps // 10) == 0:
            log(
                f"flow teacher step {i + 1}/{steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"({time.time() - start:.0f}s)"
            )
    return ema.module.requires_grad_(False).eval(), losses


def cached_flow_teacher(
    out_dir: Path, steps: int, *, seed: int = 0, log=print
) -> tuple[nn.Module, list[float]]:
    """The flow teacher for this config, from ``out_dir`` or trained and saved; and its losses."""
    config = {"unet": UNET_CONFIG, "steps": steps, "seed": seed, "prediction": PREDICTION, "v": 1}
    key = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def train() -> tuple[nn.Module, dict]:
        model, losses = train_flow_teacher(steps, seed=seed, log=log)
        return model, {"losses": losses}

    path = Path(out_dir) / f"flow-teacher-{key}.pt"
    model, extra = load_or_train(path, lambda: FlowUNet(make_unet(seed)), train, log=log)
    return model, list(extra["losses"])


@torch.no_grad()
def euler_sample(denoiser: object, labels: Tensor, steps: int, generator: torch.Generator) -> Tensor:
    """The teacher's ODE: ``steps`` Euler steps on trailing times from pure noise, clamped to ``[-1, 1]``."""
    sched = schedule()
    noise = torch.randn(labels.shape[0], 3, SIZE, SIZE, generator=generator)
    x0 = sample(
        denoiser,
        noise,
        schedule=sched,
        timesteps=sched.timesteps(steps),
        renoise="deterministic",
        class_labels=labels,
    )
    return x0.clamp(-1, 1)


def ladd_discriminator(
    teacher: nn.Module, logit_mean: float = 1.0, *, heads: FeatureLayout = "grid", t: float | None = None
) -> ProjectedDiscriminator:
    """LADD's discriminator: heads on the flow teacher's taps, conditioned on the class (one-hot).

    The noise level is logit-normal with mean ``logit_mean`` and std 1 (LADD: m = 1), or fixed at
    ``t``. ``heads="grid"`` (LADD's): 2-D heads on each tap's feature map with per-sample
    normalisation, conditioned on the noise level too. ``heads="tokens"``: this study's first LADD
    rows, StyleGAN-T's 1-D heads (circular kernel 9 over the flattened map, local batch norm) that
    are not told the noise level.
    """
    channels = [UNET_CONFIG["block_out_channels"][0]] + [UNET_CONFIG["block_out_channels"][-1]] * 2
    features = TeacherFeatures(
        teacher, schedule(), list(TEACHER_TAPS), channels=channels, logit_mean=logit_mean, t=t, layout=heads
    )
    if heads == "tokens":
        return ProjectedDiscriminator(features, c_text_dim=NUM_CLASSES, norm="batch")
    return ProjectedDiscriminator(features, c_text_dim=NUM_CLASSES, c_noise_dim=16 if t is None else None)


@dataclass(frozen=True)
class LaddConfig:
    """LADD's discriminator in the toy: the noise levels' logit-normal mean and the heads."""

    logit_mean: float = 1.0
    heads: FeatureLayout = "grid"


def distill_flow(
    teacher: nn.Module, disc_net: Classifier, cfg: RunConfig, *, ladd: LaddConfig | None, log=print
) -> tuple[nn.Module, dict[str, list[float]]]:
    """ADD or LADD student of the flow teacher; returns it (eval) and per-step logs.

    Args:
        ladd: ``None`` for ADD; for LADD, its discriminator's noise levels and heads.
    """
    is_ladd = ladd is not None
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    sched, data = schedule(), load_digits_split("train")
    student_net = copy.deepcopy(teacher).train().requires_grad_(True)
    student = wrap(student_net, sched, PREDICTION)
    D = (
        ladd_discriminator(teacher, ladd.logit_mean, heads=ladd.heads)
        if ladd is not None
        else make_discriminator(disc_net, cfg.d_conditioning, cfg.augment)
    )
    objective = ADDObjective(
        wrap(teacher, sched, PREDICTION),
        D,
        sched,
        lambda_distill=0.0 if is_ladd else cfg.lambda_distill,
        weighting=cfg.weighting,
        space="latent",
        discriminator_sees="latents",
        r1_gamma=cfg.r1_gamma,
        student_timesteps=STUDENT_STEPS[4],
    )
    opt_g = torch.optim.Adam(student_net.parameters(), lr=cfg.lr_student, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_disc, betas=(0.0, 0.99))
    logs: dict[str, list[float]] = defaultdict(list)
    start = time.time()
    for step in range(cfg.steps):
        x0, y = sample_batch(data, cfg.batch_size, g)
        cond = {"class_labels": y}
        c_text = F.one_hot(y, NUM_CLASSES).float()
        with torch.no_grad():
            c_image = None if is_ladd else disc_net.features(x0)
        feature_kwargs = cond if is_ladd else None  # the teacher's features, conditioned on the class
        inp = objective.sample_student_inputs(x0, generator=g)
        D.requires_grad_(False)
        student_x0 = student.x0(inp.x_t, inp.t, **cond)
        loss_g, row = objective.generator_loss(
            student_x0,
            teacher_cond=cond,
            teacher_uncond={"class_labels": torch.full_like(y, NULL_LABEL)},
            negative_cond={"class_labels": torch.full_like(y, NEGATIVE_LABEL)},
            c_text=c_text,
            c_image=c_image,
            student_t=inp.t,
            generator=g,
            feature_kwargs=feature_kwargs,
        )
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)
        for k in range(cfg.d_steps):
            loss_d, logs_d = objective.discriminator_loss(
                x0,
                student_x0.detach(),
                c_text=c_text,
                c_image=c_image,
                student_t=inp.t,
                step=step * cfg.d_steps + k,
                generator=g,
                feature_kwargs=feature_kwargs,
            )
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        record(logs, {**row, **logs_d}, step, cfg, start, log)
    return student_net.eval().requires_grad_(False), dict(logs)


def cached_flow_student(
    out_dir: Path,
    teacher: nn.Module,
    disc_net: Classifier,
    cfg: RunConfig,
    *,
    ladd: LaddConfig | None,
    teacher_steps: int,
    log=print,
) -> tuple[nn.Module, dict[str, list[float]]]:
    """``distill_flow``'s student from ``out_dir``, or trained and saved (a killed study resumes)."""
    config = {"run": asdict(cfg), "ladd": ladd is not None, "teacher_steps": teacher_steps, "v": 1}
    if ladd is not None:
        config["ladd_config"] = asdict(ladd)
    key = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]

    def train() -> tuple[nn.Module, dict]:
        student, logs = distill_flow(teacher, disc_net, cfg, ladd=ladd, log=log)
        return student, {"logs": logs}

    path = Path(out_dir) / f"flow-student-{cfg.name}-s{cfg.seed}-{key}.pt"
    student, extra = load_or_train(path, lambda: copy.deepcopy(teacher), train, log=log)
    return student, dict(extra["logs"])


LADD_MEAN = -1.0
"""The toy LADD rows' logit-normal mean: chosen on the discriminator-only probes
(``examples/toy/ladd_probe.py``, docs/results.md), where LADD's m = 1 leaves an 8×8 image too
noisy for the teacher's features to tell the student's one-step output from data."""


def flow_runs(
    base: RunConfig, main_seeds: tuple[int, ...], ablation_seeds: tuple[int, ...]
) -> list[tuple[str, RunConfig, LaddConfig | None, tuple[int, ...]]]:
    """(row label, run config, LADD's discriminator or None for ADD, seeds) of the flow students."""
    return [
        ("ADD (flow teacher)", replace(base, name="flow_add"), None, main_seeds),
        (f"LADD (grid heads told t̂, m = {LADD_MEAN:g})", replace(base, name="flow_ladd_grid"),
         LaddConfig(LADD_MEAN), main_seeds),
        ("LADD, LADD's m = 1", replace(base, name="flow_ladd_grid_m1"), LaddConfig(1.0), ablation_seeds),
    ]  # fmt: skip
