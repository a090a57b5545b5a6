"""ADD on the toy: the student loop, built from addkit's public parts only.

One step (ADD §3, Fig. 2):

1. real images $x_0$ noised at a student timestep $s \\in \\{999, 749, 499, 249\\}$ (pure noise
   at 999): ``ADDObjective.sample_student_inputs``;
2. the student's $\\hat x_\\theta = $ ``student.x0(x_s, s, class_labels=y)``;
3. generator loss $\\mathcal L^G_{adv} + \\lambda \\mathcal L_{distill}$ (``generator_loss``):
   the projected discriminator on the frozen ``"disc"`` classifier's taps, the teacher
   re-noising $\\hat x_\\theta$ at $t \\in [20, 980]$;
4. discriminator loss, hinge + $\\gamma R_1$ on the head inputs (``discriminator_loss``).

Discriminator conditioning: ``c_text`` is the one-hot class (the toy's text embedding),
``c_image`` the ``"disc"`` classifier's pooled features of the real $x_0$ (ADD uses DINOv2
ViT-L's CLS token), zeroed by the objective at the pure-noise step.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from addkit import DiffAugment, ProjectedDiscriminator, TappedFeatures, wrap
from addkit.objective import ADDObjective

from .data import NEGATIVE_LABEL, NULL_LABEL, NUM_CLASSES, load_digits_split, sample_batch
from .nets import Classifier
from .teacher import PREDICTION, schedule


@dataclass(frozen=True)
class RunConfig:
    """One distillation run; the defaults are the toy's "ADD" row."""

    name: str = "add"
    seed: int = 0
    steps: int = 300
    batch_size: int = 32
    lr_student: float = 5e-5
    lr_disc: float = 5e-3
    d_steps: int = 4
    lambda_distill: float = 2.5
    adversarial_weight: float = 1.0
    weighting: str = "exponential"
    guidance_scale: float = 1.0
    r1_gamma: float = 1e-5
    d_conditioning: bool = True
    augment: str = ""  # DiffAugment policy; none here: at 8x8 a one-pixel shift is 12 % of the image


TAPS = ("block1.0", "block2.0", "block3.0")
"""The first conv of each classifier block (64, 16 and 4 tokens): taken before the block's
GroupNorm, which would normalise away the per-image contrast that tells blur from ink."""


def make_discriminator(disc_net: Classifier, conditioned: bool, augment: str) -> ProjectedDiscriminator:
    """A projected discriminator on three taps of the frozen ``"disc"`` classifier."""
    features = TappedFeatures(copy.deepcopy(disc_net), list(TAPS), resolution=None)
    dim = disc_net.feature_dim
    return ProjectedDiscriminator(
        features,
        c_text_dim=NUM_CLASSES if conditioned else None,
        c_image_dim=dim if conditioned else None,
        augment=DiffAugment(augment) if augment else None,
        norm="batch",  # the study's numbers (docs/results.md) came from StyleGAN-T's heads
    )


def distill(
    teacher_unet: nn.Module, disc_net: Classifier, cfg: RunConfig, *, log=print
) -> tuple[nn.Module, dict[str, list[float]]]:
    """Train a student initialised from the teacher; returns it (eval) and per-step logs."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    sched = schedule()
    data = load_digits_split("train")
    teacher = wrap(teacher_unet, sched, PREDICTION)
    student_unet = copy.deepcopy(teacher_unet).train().requires_grad_(True)
    student = wrap(student_unet, sched, PREDICTION)
    adversarial = cfg.adversarial_weight > 0
    D = make_discriminator(disc_net, cfg.d_conditioning, cfg.augment) if adversarial else None
    objective = ADDObjective(
        teacher, D, sched,
        lambda_distill=cfg.lambda_distill, adversarial_weight=cfg.adversarial_weight,
        weighting=cfg.weighting, guidance_scale=cfg.guidance_scale, space="latent",
        adversarial_loss="hinge", r1_placement="features", r1_gamma=cfg.r1_gamma,
    )  # fmt: skip
    opt_g = torch.optim.Adam(student_unet.parameters(), lr=cfg.lr_student, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_disc, betas=(0.0, 0.99)) if D else None
    logs: dict[str, list[float]] = defaultdict(list)
    start = time.time()
    for step in range(cfg.steps):
        x0, y = sample_batch(data, cfg.batch_size, g)
        c_text = c_image = None
        if D is not None and cfg.d_conditioning:
            c_text = F.one_hot(y, NUM_CLASSES).float()
            with torch.no_grad():
                c_image = disc_net.features(x0)
        inp = objective.sample_student_inputs(x0, generator=g)

        # Generator (student) step.
        if D is not None:
            D.requires_grad_(False)
        student_x0 = student.x0(inp.x_t, inp.t, class_labels=y)
        loss_g, logs_g = objective.generator_loss(
            student_x0,
            teacher_cond={"class_labels": y},
            teacher_uncond={"class_labels": torch.full_like(y, NULL_LABEL)},
            negative_cond={"class_labels": torch.full_like(y, NEGATIVE_LABEL)},
            c_text=c_text, c_image=c_image, student_t=inp.t, generator=g,
        )  # fmt: skip
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        row = dict(logs_g)

        # Discriminator steps: the same real and fake batch, a fresh augmentation each time.
        if D is not None:
            D.requires_grad_(True)
            for k in range(cfg.d_steps):
                loss_d, logs_d = objective.discriminator_loss(
                    objective.discriminator_input(x0),
                    objective.discriminator_input(student_x0.detach()),
                    c_text=c_text, c_image=c_image, student_t=inp.t, step=step * cfg.d_steps + k, generator=g,
                )  # fmt: skip
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
            row.update(logs_d)
        record(logs, row, step, cfg, start, log)
    return student_unet.eval().requires_grad_(False), dict(logs)


def record(logs: dict[str, list[float]], row: dict, step: int, cfg: object, start: float, log) -> None:
    """Append one step's logs; every fifth of the run, print their running means."""
    for k, v in row.items():
        logs[k].append(v.item())
    if (step + 1) % max(1, cfg.steps // 5) == 0:
        summary = ", ".join(f"{k} {sum(v[-20:]) / len(v[-20:]):.3g}" for k, v in sorted(logs.items()))
        log(
            f"  [{cfg.name} seed {cfg.seed}] step {step + 1}/{cfg.steps} ({time.time() - start:.0f}s): {summary}"
        )


def config_dict(cfg: RunConfig) -> dict:
    """The run's settings as a plain dict (for the results JSON)."""
    return asdict(cfg)
