"""The recipes' loop, written once: set up a run for a `recipe.family.Family`, train it, close it.

`setup` turns the command line into a `recipe.step.RunState` (accelerate, the family's models,
discriminator and objective, optimisers, EMA, data, resume); `train` runs `recipe.step.train_step`
(or DMD2's `recipe.dmd.train_step`) until ``--max-steps``, and samples, checkpoints and logs on the
way; `main` is what ``python examples/add_sdxl.py`` and ``python examples/add_flow.py`` run.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import addkit
import recipe.dmd as dmd
import recipe.fsdp as fsdp
from recipe import data
from recipe.args import NonFiniteLossError, RecipeError, check_paths, parse_args
from recipe.checkpoint import check_compatible, layout, load_checkpoint, resolve_resume, save_checkpoint
from recipe.family import Family
from recipe.report import RunSummary, student_weights
from recipe.step import LossScaling, RunState, StepResult, train_step

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
MODEL_FILE = "model.safetensors"  # the file the checkpoint manifest expects for the student


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


def setup(family: Family, args: argparse.Namespace, accelerator: Any = None) -> RunState:
    """Everything the loop needs: models, data, optimisers, distribution, and the resumed state.

    Args:
        family: the model family's adapter.
        args: from `recipe.args.parse_args` (its paths checked by ``check_paths``).
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
    if args.preset != "none" and not args.data:
        with acc.main_process_first():
            args.data = str(family.make_data(args, output_dir / f"{args.preset}_data"))
    models, fake = family.load(args, acc.device, DTYPES[args.mixed_precision])  # seeded; sets the resolution
    dataset = family.dataset(args, output_dir)
    if fake is not None:
        dmd.attach_optimiser(
            fake, lr=args.lr_fake or args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps
        )
    disc = family.discriminator(args, models, fake).to(acc.device)
    set_seed(args.seed, device_specific=True)  # training randomness differs per process
    if args.fsdp:
        student = fsdp.shard(models.student, acc.device, acc.num_processes)
    else:
        student = acc.prepare(models.student)
        if args.lora_rank:
            _checkpoint_lora_only(acc)
    trainable = [p for p in models.student.parameters() if p.requires_grad]
    opt_g, opt_d, sched_g, sched_d = _optimisers(args, trainable, disc)
    state = RunState(
        args=args, accelerator=acc, family=family, models=models, student=student,
        denoiser=addkit.wrap(student, models.schedule, models.prediction), discriminator=disc,
        objective=_objective(family, args, models, disc, fake), text=family.text(args, models, acc.device),
        opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d, scaling=LossScaling(acc.scaler),
        ema=_ema(args.ema_decay, trainable), fake=fake,
    )  # fmt: skip
    if resume is not None:
        load_checkpoint(state, resume, say=lambda _: None)  # checked and said above
        state.resumed_from = resume
        say(f"{family.name}: resumed from {resume} at step {state.progress.step}")
    at = {"start": state.progress.samples, "rank": acc.process_index, "world": acc.num_processes}
    sampler = data.StreamSampler(len(dataset), seed=args.seed, **at)
    state.data = iter(
        torch.utils.data.DataLoader(  # its own generator: iterating leaves the global RNG alone
            dataset, args.batch_size, sampler=sampler, num_workers=args.num_workers, generator=torch.Generator()
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


def _checkpoint_lora_only(accelerator: Any) -> None:
    """With LoRA, a checkpoint's ``model.safetensors`` holds the adapters only, not the frozen base again."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            state = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(output_dir) / MODEL_FILE))
        weights.clear()  # accelerate then writes no model file of its own

    def load(models: list, input_dir: str) -> None:
        model = accelerator.unwrap_model(models.pop())
        state = load_file(str(Path(input_dir) / MODEL_FILE), device=str(accelerator.device))
        set_peft_model_state_dict(model, state)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _objective(family: Family, args: argparse.Namespace, models: Any, disc: Any, fake: Any) -> Any:
    """ADD's losses (or DMD2's with a fake score); options left unset take the library's defaults."""
    timesteps = family.student_timesteps(args, models)
    no_r1 = args.r1_placement == "none"
    try:
        if fake is not None:
            return dmd.build_objective(args, fake, models.schedule, models.prediction, disc, timesteps)
        options = {
            "lambda_distill": args.lambda_distill, "adversarial_weight": args.adversarial_weight,
            "weighting": args.weighting, "space": args.distill_space, "guidance_scale": args.guidance_scale,
            "adversarial_loss": args.adversarial_loss, "r1_placement": "features" if no_r1 else args.r1_placement,
            "r1_gamma": 0.0 if no_r1 else args.r1_gamma, "r1_interval": args.r1_interval,
            "student_timesteps": timesteps,
        }  # fmt: skip
        return family.add_objective(args, models, disc, options)
    except (ValueError, TypeError) as err:  # e.g. a student timestep outside this model's schedule
        raise RecipeError(f"the objective refuses these options: {err}") from err


def train(family: Family, args: argparse.Namespace) -> RunSummary:
    """Run the recipe; prints and returns the closing summary."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    state = setup(family, args)
    acc, progress, output_dir = state.accelerator, state.progress, Path(args.output_dir)
    acc.init_trackers(
        family.name, config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    )
    bar = tqdm(
        total=args.max_steps, initial=progress.step, disable=not acc.is_main_process, desc=args.method.upper()
    )
    last_checkpoint = state.resumed_from
    grid = scores = exported = student = None
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
                with student_weights(state) as network:
                    grid = family.report(state, network, result.step) if network is not None else grid
                acc.wait_for_everyone()
            if _due(result.step, args.checkpoint_every, args.max_steps):
                last_checkpoint = save_checkpoint(state, output_dir, args.checkpoints_keep, last_checkpoint)
        with student_weights(state) as network:
            if network is not None:
                exported = family.export(state, network)
                bar.close()
                scores = family.evaluate(state, network)
            student = network if args.fsdp else (acc.unwrap_model(state.student) if network is not None else None)
        acc.wait_for_everyone()
    finally:
        bar.close()
        acc.end_training()
    summary = RunSummary(
        name=family.name, step=progress.step, nonfinite_total=progress.nonfinite_total,
        seconds=time.perf_counter() - started, checkpoint=last_checkpoint, export=exported, grid=grid,
        logs=output_dir / "logs", student=student, discriminator=state.discriminator, scores=scores,
        sample=family.sample_command(args, exported) if exported is not None else None,
        table=family.scores_table(scores) if scores is not None else None, ema=state.ema, models=state.models,
    )  # fmt: skip
    if acc.is_main_process:
        print(summary.text(args))
    return summary


def _train_step(state: RunState, batches: list) -> StepResult:
    """ADD's step, or DMD2's (``--fake-steps`` fake-score updates, then the generator)."""
    if state.fake is not None:
        return dmd.train_step(state, batches, state.family.dmd_inputs)
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
        * dmd.micro_batches_per_step(state.args) / seconds,
    })  # fmt: skip
    state.accelerator.log(scalars, step=result.step)
    rank = scalars.get("d/rank", scalars.get("f/gan_rank"))
    message = watch.update(result.step, rank) if rank is not None else None
    if message and state.accelerator.is_main_process:
        warnings.warn(f"{state.family.name}: {message}", stacklevel=1)
    shown = {
        k.split("/")[-1]: f"{scalars[k]:.3g}"
        for k in ("g/adv", "g/distill", "d/total", "d/rank", "g/dm", "f/denoise", "f/gan_rank")
        if k in scalars
    }
    bar.set_postfix(shown, refresh=False)


def main(family: Family, argv: list[str] | None = None, description: str = "") -> RunSummary:
    """Parse ``argv`` for ``family``, check the paths and train; what the entry points run."""
    args = parse_args(family, argv, description=description)
    check_paths(args)
    return train(family, args)


def run_script(family: Family, description: str) -> None:
    """``main`` for ``python examples/<recipe>.py``: a `RecipeError` or data error is one line on stderr, exit 1."""
    import sys

    try:
        main(family, description=description)
    except (RecipeError, data.DataError) as err:
        print(f"{family.name}: error: {err}", file=sys.stderr)
        sys.exit(1)
