"""Reference recipe: Adversarial Diffusion Distillation of an SDXL (or SD 1.x/2.x) UNet.

Run ``python examples/add_sdxl.py`` (the ``tiny`` preset: the tiny world's pretrained
SDXL-architecture teacher distilled on a CPU in minutes, then scored) or ``accelerate launch examples/add_sdxl.py --pretrained stabilityai/stable-diffusion-xl-base-1.0
--data DIR ...``. See ``examples/README.md`` and ``docs/recipe.md``.

The loop lives here, the maths in addkit: ``ADDObjective`` builds the student inputs and both
losses (``--method dmd2``: ``DMDObjective``, see ``docs/dmd.md``). `setup` turns the command line into a `RunState` (models, data, optimisers,
distribution, resume); `train` runs `add_sdxl_step.train_step` until ``--max-steps`` and
samples, checkpoints and logs on the way. The parts live beside this file:

- ``add_sdxl_args.py``: flags, their checks, and the paths checked before anything is built;
- ``add_sdxl_models.py``: teacher and student (one UNet with LoRA), VAE, text, discriminator;
- ``add_sdxl_step.py``: the run state and one optimiser step (one host read, skip on non-finite);
- ``add_sdxl_dmd.py``: ``--method dmd2`` (the fake score, its optimiser, the GAN head, one DMD2 step);
- ``add_sdxl_checkpoint.py``: complete-or-absent checkpoints, verified on save and load;
- ``add_sdxl_fsdp.py``: ``--fsdp`` (FSDP2 ``fully_shard``, driven here);
- ``add_sdxl_report.py``: grids, diversity, export, the closing summary;
- ``add_sdxl_data.py``: data (an image + caption folder, a manifest, a ``datasets`` name);
- ``add_sdxl_tiny.py``, ``add_sdxl_random.py``: the ``tiny`` preset (the tiny world's data and
  scores) and the ``random`` preset (random-weight models, for plumbing checks).

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042 (ADD).
    Sauer et al., *Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
    Distillation*, arXiv 2403.12015 (the ``--discriminator teacher`` option).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import add_sdxl_data as data
import add_sdxl_dmd as dmd
import add_sdxl_fsdp as fsdp
import add_sdxl_random as random_preset
import add_sdxl_tiny as tiny
import addkit
from add_sdxl_args import NonFiniteLossError, RecipeError, check_paths, parse_args
from add_sdxl_checkpoint import (
    check_compatible,
    checkpoints,
    layout,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from add_sdxl_models import (
    TextEncoder,
    build_discriminator,
    load_models,
    place_models,
    vae_decode,
)
from add_sdxl_report import RunSummary, export, report, student_weights, teacher_apart
from add_sdxl_step import LossScaling, RunState, StepResult, train_step

__all__ = [
    "NonFiniteLossError", "RecipeError", "RunState", "checkpoints", "main", "make_accelerator",
    "parse_args", "setup", "train", "train_step",
]  # fmt: skip

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def make_accelerator(args: argparse.Namespace) -> Any:
    """accelerate's ``Accelerator`` for this run (processes, device, autocast, logs).

    Raises:
        RecipeError: for launches the recipe cannot run correctly.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration

    output_dir = Path(args.output_dir)
    acc = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with="tensorboard",
        step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != acc.num_processes:  # e.g. torchrun on CPU without ACCELERATE_USE_CPU=1
        raise RecipeError(
            f"{world} processes were launched but accelerate sees {acc.num_processes}: on CPU, "
            "run `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`"
        )
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise RecipeError(
            f"accelerate is configured for {acc.distributed_type.value}: this recipe shards the student "
            "itself; launch with --multi_gpu and pass --fsdp (DeepSpeed is not supported, see examples/README.md)"
        )
    if args.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise RecipeError(
            "--mixed-precision fp16 needs a GPU (on the CPU accelerate trains in float32): use bf16 or no"
        )
    return acc


def setup(args: argparse.Namespace, accelerator: Any = None) -> RunState:
    """Everything the loop needs: models, data, optimisers, distribution, and the resumed state.

    Args:
        args: from `parse_args` (its paths checked by ``check_paths``).
        accelerator: an ``Accelerator`` to use (default: `make_accelerator`); its ``scaler``
            (accelerate's fp16 ``GradScaler``) does the loss scaling.
    """
    from accelerate.utils import set_seed

    acc = accelerator or make_accelerator(args)
    say = print if acc.is_main_process else (lambda _: None)
    output_dir = Path(args.output_dir)
    resume = resolve_resume(args.resume, output_dir, say) if args.resume else None
    if resume is not None:
        now = {"fsdp": args.fsdp, "ema": bool(args.ema_decay), "lora": bool(args.lora_rank),
               "fake_score": args.method == "dmd2"}  # fmt: skip
        check_compatible(
            resume, layout(processes=acc.num_processes, scaler=acc.scaler is not None, **now), say
        )
    if args.preset in ("tiny", "random") and not args.data:
        make = tiny.make_dataset if args.preset == "tiny" else random_preset.make_dataset
        with acc.main_process_first():
            args.data = str(make(output_dir / f"{args.preset}_data", seed=args.seed))
    records = data.load_records(
        args.data, split=args.split, image_column=args.image_column, caption_column=args.caption_column
    )
    models = load_models(args)  # seeded: identical on every process; sets the default resolution
    fake = None
    if args.method == "dmd2":  # before placing: a LoRA fake score lives on the teacher
        fake = dmd.build_fake_score(models.teacher, lora_rank=args.lora_rank, seed=args.seed)
    place_models(models, acc.device, DTYPES[args.mixed_precision])
    if fake is not None:
        dmd.place_fake_score(fake, acc.device)
        dmd.attach_optimiser(
            fake, lr=args.lr_fake or args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps
        )
    disc = (dmd.sdxl_gan_head(args, models, fake) if fake else build_discriminator(args, models)).to(
        acc.device
    )
    set_seed(args.seed, device_specific=True)  # training randomness differs per process
    if args.fsdp:
        student = fsdp.shard(models.student, acc.device, acc.num_processes)
    else:
        student = acc.prepare(models.student)
    trainable = [p for p in models.student.parameters() if p.requires_grad]
    opt_g, opt_d, sched_g, sched_d = _optimisers(args, trainable, disc)
    state = RunState(
        args=args, accelerator=acc, models=models, student=student,
        denoiser=addkit.wrap(student, models.schedule, models.prediction), discriminator=disc,
        objective=_objective(args, models, disc, fake), text=TextEncoder(models, acc.device),
        opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d, scaling=LossScaling(acc.scaler),
        ema=_ema(args.ema_decay, trainable), fake=fake,
    )  # fmt: skip
    if resume is not None:
        load_checkpoint(state, resume, say=lambda _: None)  # checked and said above
        state.resumed_from = resume
        say(f"add_sdxl: resumed from {resume} at step {state.progress.step}")
    dataset = data.ImageCaptionDataset(records, args.resolution)
    at = {"start": state.progress.samples, "rank": acc.process_index, "world": acc.num_processes}
    sampler = data.StreamSampler(len(dataset), seed=args.seed, **at)
    state.data = iter(
        torch.utils.data.DataLoader(
            dataset,
            args.batch_size,
            sampler=sampler,
            num_workers=args.num_workers,
            generator=torch.Generator(),
        )
    )
    return state


def _optimisers(args: argparse.Namespace, trainable: list[nn.Parameter], disc: nn.Module) -> tuple:
    """AdamW (fused: no host reads in ``step``) for both, with a linear warm-up."""
    opt_g = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    betas = tuple(args.adam_betas_d)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr_d, betas=betas, weight_decay=0.0, fused=True)
    warmup = max(1, args.warmup_steps)
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / warmup)) for o in (opt_g, opt_d)
    ]
    return opt_g, opt_d, *schedules


def _ema(decay: float, trainable: list[nn.Parameter]) -> Any:
    """EMA of the trainable parameters (``AveragedModel``), starting from their initial values; None if off."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if not decay:
        return None
    ema = AveragedModel(nn.ParameterList(trainable), multi_avg_fn=get_ema_multi_avg_fn(decay))
    ema.requires_grad_(False).update_parameters(nn.ParameterList(trainable))
    return ema


def _objective(args: argparse.Namespace, models: Any, disc: Any, fake: Any) -> Any:
    """ADD's losses (or DMD2's with a fake score); options left unset take the library's defaults."""
    no_r1 = args.r1_placement == "none"
    try:
        if fake is not None:
            return dmd.build_objective(
                args, fake, models.schedule, models.prediction, disc, args.student_timesteps
            )
        return addkit.ADDObjective(
            addkit.wrap(models.teacher, models.schedule, models.prediction), disc, models.schedule,
            lambda_distill=args.lambda_distill, adversarial_weight=args.adversarial_weight,
            weighting=args.weighting, space=args.distill_space,
            decode=(lambda z: vae_decode(models.vae, z)) if args.discriminator == "dinov2" else None,
            guidance_scale=args.guidance_scale, adversarial_loss=args.adversarial_loss,
            r1_placement="features" if no_r1 else args.r1_placement, r1_gamma=0.0 if no_r1 else args.r1_gamma,
            r1_interval=args.r1_interval, student_timesteps=args.student_timesteps,
        )  # fmt: skip
    except (ValueError, TypeError) as err:  # e.g. a student timestep outside this model's schedule
        raise RecipeError(f"the objective refuses these options: {err}") from err


def train(args: argparse.Namespace) -> RunSummary:
    """Run the recipe; prints and returns the closing summary."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    state = setup(args)
    acc, progress, output_dir = state.accelerator, state.progress, Path(args.output_dir)
    acc.init_trackers(
        "add_sdxl", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))}
    )
    bar = tqdm(
        total=args.max_steps, initial=progress.step, disable=not acc.is_main_process, desc=args.method.upper()
    )
    last_checkpoint = state.resumed_from
    grid = None
    watch = addkit.losses.ChanceWatch(patience=200)
    try:
        while progress.step < args.max_steps:
            step_started = time.perf_counter()
            result = _train_step(state, [next(state.data) for _ in range(dmd.micro_batches_per_step(args))])
            bar.update(1)
            if _due(result.step, args.log_every, None):
                _log(state, result, bar, time.perf_counter() - step_started, watch)
            if progress.nonfinite_in_row >= args.max_nonfinite_in_row:
                raise NonFiniteLossError(
                    f"stopping: {progress.nonfinite_in_row} steps in a row (up to step {result.step}) had a "
                    f"non-finite loss or gradient and were skipped; the last checkpoint "
                    f"({last_checkpoint or 'none yet'}) is intact. Lower --lr / --lr-d, check --max-grad-norm, "
                    "the data and --mixed-precision"
                )
            if _due(result.step, args.sample_every, args.max_steps):
                with student_weights(state) as unet:
                    grid = report(state, unet, output_dir) if unet is not None else grid
                acc.wait_for_everyone()
            if _due(result.step, args.checkpoint_every, args.max_steps):
                last_checkpoint = save_checkpoint(state, output_dir, args.checkpoints_keep, last_checkpoint)
        scores = None
        with student_weights(state) as unet:
            exported = export(args, state.models, unet) if unet is not None else None
            if unet is not None and args.preset == "tiny":
                bar.close()
                print("add_sdxl: scoring teacher and student on the tiny world's held-out captions ...")
                with dmd.teacher_alone(state.fake), teacher_apart(state.models, unet) as (models, scored):
                    scores = tiny.evaluate(models, scored, output_dir, seed=args.seed)
            student = unet if args.fsdp else (acc.unwrap_model(state.student) if unet is not None else None)
        acc.wait_for_everyone()
    finally:
        bar.close()
        acc.end_training()
    summary = RunSummary(
        step=progress.step, nonfinite_total=progress.nonfinite_total, seconds=time.perf_counter() - started,
        checkpoint=last_checkpoint, export=exported, grid=grid, logs=output_dir / "logs",
        student=student, discriminator=state.discriminator, scores=scores,
    )  # fmt: skip
    if acc.is_main_process:
        print(summary.text(args))
    return summary


def _train_step(state: RunState, batches: list) -> StepResult:
    """ADD's step, or DMD2's (``--fake-steps`` fake-score updates, then the generator)."""
    if state.fake is not None:
        return dmd.train_step(state, batches, dmd.sdxl_inputs)
    return train_step(state, batches)


def _due(step: int, every: int, last: int | None) -> bool:
    """Every ``every`` steps and at step ``last``; never when ``every`` is 0."""
    return every > 0 and (step % every == 0 or step == last)


def _log(state: RunState, result: StepResult, bar: Any, seconds: float, watch: Any) -> None:
    """Write the step's scalars (one read of all logged tensors), show a few on the bar, and warn
    once if the discriminator's paired ranking stays at chance (``addkit.losses.ChanceWatch``)."""
    names = list(result.logs)
    values = torch.stack([result.logs[k].float() for k in names]).tolist()
    scalars = dict(zip(names, values))
    scalars.update({
        "lr/student": state.sched_g.get_last_lr()[0],
        "lr/discriminator": state.sched_d.get_last_lr()[0],
        **({"lr/fake_score": state.fake.scheduler.get_last_lr()[0]} if state.fake is not None else {}),
        "nonfinite/total": state.progress.nonfinite_total,
        "images_per_second": state.args.batch_size * state.accelerator.num_processes
        * state.args.gradient_accumulation / seconds,
    })  # fmt: skip
    state.accelerator.log(scalars, step=result.step)
    rank = scalars.get("d/rank", scalars.get("f/gan_rank"))
    message = watch.update(result.step, rank) if rank is not None else None
    if message and state.accelerator.is_main_process:
        warnings.warn(f"add_sdxl: {message}", stacklevel=1)
    shown = {
        k.split("/")[-1]: f"{scalars[k]:.3g}"
        for k in ("g/adv", "g/distill", "d/total", "d/rank", "g/dm", "f/denoise", "f/gan_rank")
        if k in scalars
    }
    bar.set_postfix(shown, refresh=False)


def main(argv: list[str] | None = None) -> RunSummary:
    """Parse ``argv``, check the paths and train; the entry point of ``python examples/add_sdxl.py``."""
    args = parse_args(argv, description=__doc__.split("\n\n")[0])
    check_paths(args)
    return train(args)


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, data.DataError) as err:
        print(f"add_sdxl: error: {err}", file=sys.stderr)
        sys.exit(1)
