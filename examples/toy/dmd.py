"""DMD2 on the toy: the same teacher, data and metrics as ADD, built from addkit's public parts.

One generator update (DMD2):

1. ``fake_updates`` times: the student's sample from noise (backward simulation: at a random
   student step $k$ the input comes from its own first $k$ steps), then the fake score's
   denoising loss on it, plus, with the GAN head, the head's discriminator term on noisy real
   and fake samples (``DMDObjective.fake_score_loss``);
2. the student's sample again, then distribution matching through the frozen teacher (real
   score) and the fake score, plus the head's generator term (``generator_loss``).

The fake score starts as a copy of the teacher (DMD2); the GAN head is a projected
discriminator on the fake score's mid-block features (``TeacherFeatures(..., freeze=False)``).
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from torch import nn

from addkit import DMDObjective, ProjectedDiscriminator, TeacherFeatures, wrap

from .data import NULL_LABEL, load_digits_split, sample_batch
from .distill import record
from .teacher import PREDICTION, schedule


@dataclass(frozen=True)
class DMDConfig:
    """One DMD2 run; the defaults are the toy's "DMD2" row."""

    name: str = "dmd2"
    seed: int = 0
    steps: int = 300
    batch_size: int = 32
    lr_student: float = 5e-5
    lr_fake: float = 5e-5
    fake_updates: int = 5  # DMD2's two time-scale rule
    guidance_scale: float = 1.0
    gan: bool = True
    gan_weight: float = 3e-3
    gan_d_weight: float = 1e-2
    lr_head: float = 5e-3
    head_norm: str = "batch"  # StyleGAN-T's heads, as the rows were measured ("sample": addkit's default)


def _gan_head(fake_unet: nn.Module, norm: str = "batch") -> ProjectedDiscriminator:
    sched = schedule()
    channels = fake_unet.config.block_out_channels[-1]

    def call(x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> object:
        return fake_unet(x_t, t, class_labels=class_labels)

    feats = TeacherFeatures(  # token heads: docs/results.md's DMD2 rows were measured with them
        fake_unet, sched, ["mid_block"], channels=[channels], call=call, freeze=False, layout="tokens"
    )
    return ProjectedDiscriminator(feats, norm=norm, virtual_batch_size=8)


def distill_dmd(
    teacher_unet: nn.Module, cfg: DMDConfig, *, student_timesteps: tuple[int, ...], log=print
) -> tuple[nn.Module, dict[str, list[float]]]:
    """Train a DMD2 student initialised from the teacher; returns it (eval) and per-step logs."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    sched = schedule()
    data = load_digits_split("train")
    teacher = wrap(teacher_unet, sched, PREDICTION)
    student_unet = copy.deepcopy(teacher_unet).train().requires_grad_(True)
    fake_unet = copy.deepcopy(teacher_unet).train().requires_grad_(True)
    student, fake = wrap(student_unet, sched, PREDICTION), wrap(fake_unet, sched, PREDICTION)
    head = _gan_head(fake_unet, cfg.head_norm) if cfg.gan else None
    objective = DMDObjective(
        teacher, fake, sched, guidance_scale=cfg.guidance_scale, fake_prediction=PREDICTION,
        gan_head=head, gan_weight=cfg.gan_weight, gan_d_weight=cfg.gan_d_weight,
        student_timesteps=student_timesteps,
    )  # fmt: skip
    opt_g = torch.optim.Adam(student_unet.parameters(), lr=cfg.lr_student, betas=(0.0, 0.99))
    opt_f = torch.optim.Adam(fake_unet.parameters(), lr=cfg.lr_fake, betas=(0.0, 0.99))
    opt_h = torch.optim.Adam(head.parameters(), lr=cfg.lr_head, betas=(0.0, 0.99)) if head else None
    logs: dict[str, list[float]] = defaultdict(list)
    start = time.time()

    def student_sample(y: torch.Tensor, *, grad: bool) -> torch.Tensor:
        c = teacher_unet.config
        noise = torch.randn(len(y), c.in_channels, c.sample_size, c.sample_size, generator=g)
        inp = objective.sample_student_inputs(noise, student=student, generator=g, class_labels=y)
        with torch.set_grad_enabled(grad):
            return student.x0(inp.x_t, inp.t, class_labels=y)

    for step in range(cfg.steps):
        row: dict[str, torch.Tensor] = {}
        for _ in range(cfg.fake_updates):
            real, y = sample_batch(data, cfg.batch_size, g)
            x0 = student_sample(y, grad=False)
            loss_f, logs_f = objective.fake_score_loss(
                x0, real=real, cond={"class_labels": y}, generator=g, gan_kwargs={"class_labels": y}
            )
            opt_f.zero_grad(set_to_none=True)
            if opt_h:
                opt_h.zero_grad(set_to_none=True)
            loss_f.backward()
            opt_f.step()
            if opt_h:
                opt_h.step()
            row.update(logs_f)
        _, y = sample_batch(data, cfg.batch_size, g)
        x0 = student_sample(y, grad=True)
        loss_g, logs_g = objective.generator_loss(
            x0,
            cond={"class_labels": y},
            uncond={"class_labels": torch.full_like(y, NULL_LABEL)},
            generator=g,
            gan_kwargs={"class_labels": y},
        )
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        row.update(logs_g)
        record(logs, row, step, cfg, start, log)
    return student_unet.eval().requires_grad_(False), dict(logs)


def dmd_config_dict(cfg: DMDConfig) -> dict:
    """The run's settings as a plain dict (for the results JSON)."""
    return asdict(cfg)


def dmd_runs(seeds: tuple[int, ...], steps: int) -> list[tuple[str, DMDConfig, tuple[int, ...]]]:
    """(row label, run config, seeds) of the DMD2 rows: with the GAN head and without.

    Both rows take the main seeds: whether the head helps is read against the seed spread.
    """
    base = DMDConfig(steps=steps)
    return [
        ("DMD2 (distribution matching + GAN head)", base, seeds),
        ("DMD2 without GAN head", DMDConfig(name="dmd2_no_gan", steps=steps, gan=False), seeds),
    ]


def run_dmd_study(cfg: object, out: object, *, log=print) -> dict:
    """The teacher rows and the DMD2 rows (1 and 4 steps) with the study's teacher, metrics and seeds.

    Writes ``results_dmd.json``, ``table_dmd.md`` and ``samples_dmd.png`` into ``out``; the
    teacher and classifiers come from the same cache as the ADD study, so the rows compare.
    """
    import json
    from pathlib import Path

    from .data import NUM_CLASSES, reference_set
    from .metrics import Evaluator
    from .nets import cached_classifier
    from .plots import labelled_grids, to_pil_grid
    from .sampling import ddim_sample, student_sample
    from .study import STUDENT_STEPS, _aggregate, _eval_labels, markdown_table
    from .teacher import cached_teacher

    out = Path(out)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    eval_net, _ = cached_classifier(out, 24, 1, cfg.classifier_steps, log=log)
    teacher_unet, _ = cached_teacher(out, cfg.teacher_steps, log=log)
    real, real_labels = reference_set(load_digits_split("train"), cfg.n_real, seed=7)
    evaluate = Evaluator(eval_net, real, real_labels)
    labels, grid_labels = _eval_labels(cfg.per_class), _eval_labels(8)
    teacher = wrap(teacher_unet, schedule(), PREDICTION)
    rows: list[dict] = []
    for n in cfg.teacher_step_counts:
        per_seed = [evaluate(ddim_sample(teacher, labels, n, torch.Generator().manual_seed(1000 + s)), labels)
                    for s in cfg.teacher_sample_seeds]  # fmt: skip
        rows.append({"row": "teacher (DDIM)", "steps": n, "metrics": _aggregate(per_seed)})
    grids = []
    for label, run, seeds in dmd_runs(cfg.main_seeds, cfg.distill_steps):
        if not seeds:
            continue
        per_steps: dict[int, list[dict[str, float]]] = {1: [], 4: []}
        for seed in seeds:
            student_unet, _ = distill_dmd(
                teacher_unet,
                DMDConfig(**{**asdict(run), "seed": seed}),
                student_timesteps=STUDENT_STEPS[4],
                log=log,
            )
            student = wrap(student_unet, schedule(), PREDICTION)
            for n in (1, 4):
                gen = torch.Generator().manual_seed(2000 + seed)
                per_steps[n].append(evaluate(student_sample(student, labels, STUDENT_STEPS[n], gen), labels))
                if seed == seeds[0]:
                    img = student_sample(
                        student, grid_labels, STUDENT_STEPS[n], torch.Generator().manual_seed(0)
                    )
                    grids.append((f"{run.name}, {n} step{'s' * (n > 1)}", to_pil_grid(img, NUM_CLASSES)))
        for n in (1, 4):
            rows.append({"row": label, "run": run.name, "steps": n, "config": dmd_config_dict(run),
                         "metrics": _aggregate(per_steps[n])})  # fmt: skip
            log(
                f"{label}, {n} steps: {rows[-1]['metrics']['fd']['mean']:.3f} FD ({time.time() - start:.0f}s)"
            )
    labelled_grids(grids, out / "samples_dmd.png")
    results = {"rows": rows, "seconds": time.time() - start, "torch": torch.__version__}
    (out / "results_dmd.json").write_text(json.dumps(results, indent=1))
    (out / "table_dmd.md").write_text(markdown_table(rows))
    log(f"done in {results['seconds']:.0f}s; table:\n{markdown_table(rows)}")
    return results
