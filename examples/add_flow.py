"""ADD and LADD for diffusers rectified-flow transformers: SD3 / SD3.5 and Flux.

    python examples/add_flow.py --model sd3                  # tiny preset: random SD3-like models, CPU
    python examples/add_flow.py --model flux --lora-rank 4   # tiny Flux (guidance-distilled form)
    accelerate launch examples/add_flow.py --model sd3 \\
        --pretrained stabilityai/stable-diffusion-3.5-medium --data DIR --lora-rank 64 ...

See ``docs/flow.md``. The loop lives here, the maths in addkit: ``ADDObjective`` draws the
student inputs at the student times (``FlowSchedule.timesteps(n)`` with the model's shift: pure
noise at t = 1) and builds both losses; this file owns models, data, optimisers, distribution
(accelerate: DDP), logs and the export. Checkpoints, data reading and the run counters are the
SDXL recipe's (``add_sdxl_checkpoint``, ``add_sdxl_data``, ``add_sdxl_step.Progress``).

Discriminator: LADD's (default) reads the teacher's image tokens at several transformer blocks
on latents re-noised to a logit-normal noise level, heads conditioned on the pooled text; no
image is decoded. ``--discriminator dinov2`` is ADD's: DINOv2 on VAE-decoded images. The
distillation loss is optional (``--lambda-distill``; LADD trains adversarially only). Data:
real images (``--data-source real``) or latents the teacher draws for each batch of captions
(``--data-source teacher``, LADD's synthetic data).

``--method dmd2`` trains with ``DMDObjective`` instead (``add_flow_dmd.py``, the step of
``add_sdxl_dmd.py``): a fake score copied from the teacher, ``--fake-steps`` updates of it per
generator update, a GAN head on its last block (the only reader of real images).

References:
    Sauer et al., *Adversarial Diffusion Distillation*, arXiv 2311.17042 (ADD).
    Sauer et al., *Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
    Distillation*, arXiv 2403.12015 (LADD).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import add_flow_data as data
import add_flow_dmd as flow_dmd
import add_flow_models as fm
import add_flow_report as report
import add_sdxl_dmd as dmd
import add_sdxl_tiny
import addkit
from add_flow_args import parse_args
from add_sdxl_args import NonFiniteLossError, RecipeError
from add_sdxl_checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from add_sdxl_step import LossScaling, Progress
from addkit.objective import ADDObjective
from addkit.sampling import sample

MODEL_FILE = "model.safetensors"  # the file the checkpoint manifest expects for the student

__all__ = ["NonFiniteLossError", "RecipeError", "Run", "main", "parse_args", "setup", "train", "train_step"]


# ---------------------------------------------------------------------------------------------
# Setup: everything a step reads
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one optimiser step reads and changes.

    The names the SDXL recipe's checkpoint module reads (``accelerator``, ``student``,
    ``discriminator``, ``opt_g``, ``opt_d``, ``sched_g``, ``sched_d``, ``scaling``, ``ema``,
    ``progress``, ``fsdp``, ``trainable``) are spelled as in its ``RunState``.
    """

    args: argparse.Namespace
    accelerator: Any
    models: fm.FlowModels
    student: Any  # the prepared (DDP-wrapped) student
    denoiser: addkit.WrappedDenoiser  # the student, wrapped for the objective
    teacher: addkit.WrappedDenoiser  # the teacher (the student's base with LoRA)
    discriminator: addkit.ProjectedDiscriminator
    objective: ADDObjective
    prompts: fm.PromptEncoder
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: Any
    sched_d: Any
    ema: torch.optim.swa_utils.AveragedModel | None  # over the trainable parameters
    output_dir: Path
    scaling: LossScaling = field(default_factory=lambda: LossScaling(None))  # bf16 or float32: no scaler
    progress: Progress = field(default_factory=Progress)
    batches: Any = None
    fsdp: bool = False
    fake: Any = None  # --method dmd2: add_sdxl_dmd.FakeScore (objective: addkit.DMDObjective)

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for group in self.opt_g.param_groups for p in group["params"]]


@dataclass
class StepResult:
    """One optimiser step: whether it was skipped, the logs (floats)."""

    skipped: bool
    logs: dict[str, float]


def setup(args: argparse.Namespace) -> Run:
    """Models, discriminator, objective, optimisers, data and (with ``--resume``) the saved state."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers.training_utils import cast_training_params

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with="tensorboard",
        step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
    )
    say = print if accelerator.is_main_process else (lambda _: None)
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        raise RecipeError(
            "processes were launched but accelerate sees fewer: on CPU, run "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`"
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        raise RecipeError("FSDP is not supported by this recipe: use DDP (with --lora-rank for large models)")
    resume = resolve_resume(args.resume, output_dir, say) if args.resume else None
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    models = fm.load_models(args, weight_dtype)  # seeded: identical on every process
    for module in models.pipe.components.values():  # frozen parts (and a LoRA student's base) in weight_dtype
        if isinstance(module, nn.Module):
            module.to(device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
    models.student.to(device)
    if args.lora_rank or weight_dtype != torch.float32:  # trained weights in float32 (autocast computes)
        cast_training_params(models.student, dtype=torch.float32)
    teacher = addkit.wrap(models.teacher, models.schedule, "flow")
    fake = flow_dmd.build(args, models, device) if args.method == "dmd2" else None
    if fake is not None:
        disc = flow_dmd.gan_head(args, models, fake).to(device)
    else:
        disc = fm.build_discriminator(args, models, teacher).to(device)
    set_seed(args.seed, device_specific=True)  # training randomness differs per process
    trainable = [p for p in models.student.parameters() if p.requires_grad]
    student = accelerator.prepare(models.student)
    if args.lora_rank:
        _checkpoint_lora_only(accelerator)
    opt_g = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    opt_d = torch.optim.AdamW(  # DMD2's step gates its updates on the device: fused AdamW's found_inf
        disc.parameters(),
        lr=args.lr_d,
        betas=tuple(args.adam_betas_d),
        weight_decay=0.0,
        fused=fake is not None,
    )
    warmup = max(1, args.warmup_steps)
    sched_g, sched_d = (
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / warmup)) for o in (opt_g, opt_d)
    )
    run = Run(
        args=args,
        accelerator=accelerator,
        models=models,
        student=student,
        denoiser=addkit.wrap(student, models.schedule, "flow"),
        teacher=teacher,
        discriminator=disc,
        objective=_objective(args, models, teacher, disc, fake),
        prompts=fm.PromptEncoder(models.pipe, models.guidance, device, args.max_sequence_length),
        opt_g=opt_g,
        opt_d=opt_d,
        sched_g=sched_g,
        sched_d=sched_d,
        ema=_ema(args.ema_decay, trainable),
        output_dir=output_dir,
        fake=fake,
    )
    if resume is not None:
        load_checkpoint(run, resume, say)
        say(f"add_flow: resumed from {resume} at step {run.progress.step}")
    run.batches = iter(_loader(args, accelerator, run.progress, output_dir))
    return run


def _objective(args: argparse.Namespace, models: fm.FlowModels, teacher: Any, disc: Any, fake: Any) -> Any:
    if fake is not None:  # --method dmd2
        timesteps = models.schedule.timesteps(args.student_steps)
        return dmd.build_objective(args, fake, models.schedule, "flow", disc, timesteps)
    no_r1 = args.r1_placement == "none"
    return ADDObjective(
        teacher,
        disc,
        models.schedule,
        lambda_distill=args.lambda_distill,
        weighting=args.weighting,
        space=args.distill_space,
        decode=(lambda z: fm.decode_latents(models.pipe.vae, z)) if args.discriminator == "dinov2" else None,
        discriminator_sees="latents" if args.discriminator == "teacher" else "decoded",
        guidance_scale=args.guidance_scale,
        adversarial_loss=args.adversarial_loss,
        r1_gamma=0.0 if no_r1 else args.r1_gamma,
        r1_placement="features" if no_r1 else args.r1_placement,
        r1_interval=args.r1_interval,
        student_timesteps=models.schedule.timesteps(args.student_steps),
    )


def _ema(decay: float, trainable: list[nn.Parameter]) -> torch.optim.swa_utils.AveragedModel | None:
    """EMA of the trainable parameters (``AveragedModel``), starting at their values; None if off."""
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


def _loader(args: argparse.Namespace, accelerator: Any, progress: Progress, output_dir: Path) -> Any:
    if args.preset == "tiny" and not args.data:
        with accelerator.main_process_first():  # the SDXL preset's coloured shapes
            args.data = str(add_sdxl_tiny.make_dataset(output_dir / "tiny_data", seed=args.seed))
    dataset = data.load_dataset(args)
    at = {"start": progress.samples, "rank": accelerator.process_index, "world": accelerator.num_processes}
    stream = data.StreamSampler(len(dataset), seed=args.seed, **at)
    return torch.utils.data.DataLoader(  # its own generator: iterating leaves the global RNG alone
        dataset,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        sampler=stream,
        generator=torch.Generator(),
    )


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_latents(
    run: Run, cond: dict[str, Any], uncond: dict[str, Any] | None, shape: tuple[int, ...]
) -> torch.Tensor:
    """LADD's synthetic data: the teacher's sample for each caption (pipeline timesteps, Euler steps)."""
    args, schedule = run.args, run.models.schedule
    spacing = "linspace" if run.models.family == "sd3" else "trailing"  # what each pipeline uses
    noise = torch.randn(shape, device=run.accelerator.device)
    guided = {"guidance_scale": args.synth_guidance_scale, "uncond": uncond} if uncond is not None else {}
    return sample(
        run.teacher,
        noise,
        schedule=schedule,
        timesteps=schedule.timesteps(args.synth_steps, spacing),
        renoise="deterministic",
        **guided,
        **cond,
    )


def _uncond(run: Run, cond: dict[str, Any]) -> dict[str, Any]:
    """The empty caption's conditioning (SD3's negative prompt), same batch."""
    return fm.unconditional(run.prompts, cond)


def micro_step(
    run: Run, batch: dict[str, Any], step: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One micro-batch: generator backward, then discriminator backward."""
    args, acc, models, obj = run.args, run.accelerator, run.models, run.objective
    cond, pooled = run.prompts(batch["caption"])
    feature_cond = cond if args.discriminator == "teacher" else None  # LADD: the text-conditioned teacher
    cfg = args.guidance_scale != 1.0 or args.weighting == "nfsd"
    synth_cfg = args.data_source == "teacher" and args.synth_guidance_scale != 1.0
    uncond = _uncond(run, cond) if cfg or synth_cfg else None
    negative = None
    if args.weighting == "nfsd":  # NFSD: the negative prompt's prediction, same guidance embedding
        negative_text, _ = run.prompts([args.negative_prompt] * len(batch["caption"]))
        negative = {**cond, **negative_text}
    if args.data_source == "real":
        with torch.no_grad():
            x0 = fm.encode_images(models.pipe.vae, batch["pixels"].to(acc.device))
    else:
        side = args.resolution // models.pipe.vae_scale_factor
        shape = (len(batch["caption"]), models.pipe.vae.config.latent_channels, side, side)
        x0 = teacher_latents(run, cond, uncond if synth_cfg else None, shape)
    inp = obj.sample_student_inputs(x0)

    run.discriminator.requires_grad_(False)  # generator step: gradients reach the student only
    with acc.autocast():
        student_x0 = run.denoiser.x0(inp.x_t, inp.t, **cond)
        loss_g, logs_g = obj.generator_loss(
            student_x0,
            teacher_cond=cond,
            teacher_uncond=uncond if cfg else None,
            negative_cond=negative,
            c_text=pooled,
            student_t=inp.t,
            feature_kwargs=feature_cond,
        )
    if step in args.debug_nonfinite_at:
        loss_g = loss_g * float("nan")
    acc.backward(loss_g * scale)

    run.discriminator.requires_grad_(True)
    with acc.autocast():
        with torch.no_grad():
            fake = obj.discriminator_input(student_x0.detach())
            if args.discriminator == "teacher":  # LADD: latents
                real = x0
            elif args.data_source == "real":  # ADD: the images themselves
                real = batch["pixels"].to(acc.device)
            else:  # ADD on teacher data: its decoded samples
                real = obj.discriminator_input(x0)
        loss_d, logs_d = obj.discriminator_loss(
            real, fake, c_text=pooled, student_t=inp.t, step=step, feature_kwargs=feature_cond
        )
    acc.backward(loss_d * scale)
    return loss_g.detach(), loss_d.detach(), {**logs_g, **logs_d}


def _average_grads(accelerator: Any, params: list[torch.nn.Parameter]) -> None:
    """Average the discriminator's gradients over processes (it is not wrapped by DDP)."""
    grads = [p.grad for p in params if p.grad is not None]
    if accelerator.num_processes == 1 or not grads:
        return
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def _any_process(accelerator: Any, flag: bool) -> bool:
    return bool(accelerator.gather(torch.tensor([float(flag)], device=accelerator.device)).max() > 0)


def train_step(run: Run, step: int) -> StepResult:
    """One optimiser step over ``--gradient-accumulation`` micro-batches; skipped on every process
    when any loss or gradient norm is non-finite."""
    args, acc = run.args, run.accelerator
    opt_g, opt_d, sched_g, sched_d = run.opt_g, run.opt_d, run.sched_g, run.sched_d
    started, bad, logs = time.perf_counter(), False, {}
    for micro in range(args.gradient_accumulation):
        last = micro == args.gradient_accumulation - 1
        with contextlib.nullcontext() if last else acc.no_sync(run.student):
            loss_g, loss_d, logs = micro_step(run, next(run.batches), step, 1.0 / args.gradient_accumulation)
        bad |= not (bool(torch.isfinite(loss_g)) and bool(torch.isfinite(loss_d)))
    samples = args.batch_size * acc.num_processes * args.gradient_accumulation
    run.progress.samples += samples
    _average_grads(acc, list(run.discriminator.parameters()))
    norm_g = acc.clip_grad_norm_(run.trainable, args.max_grad_norm)
    norm_d = torch.nn.utils.clip_grad_norm_(list(run.discriminator.parameters()), float("inf"))
    bad |= not (bool(torch.isfinite(norm_g)) and bool(torch.isfinite(norm_d)))
    skipped = _any_process(acc, bad)  # every process skips together
    if skipped:
        run.progress.nonfinite_total += 1
        run.progress.nonfinite_in_row += 1
    else:
        opt_g.step()
        opt_d.step()
        run.progress.nonfinite_in_row = 0
        if run.ema is not None:
            run.ema.update_parameters(nn.ParameterList(run.trainable))
    opt_g.zero_grad(set_to_none=True)
    opt_d.zero_grad(set_to_none=True)
    sched_g.step()
    sched_d.step()
    run.progress.step = step
    out = {k: float(v) for k, v in logs.items()}
    out.update(
        {
            "lr/student": sched_g.get_last_lr()[0],
            "lr/discriminator": sched_d.get_last_lr()[0],
            "grad_norm/student": float(norm_g),
            "nonfinite/total": run.progress.nonfinite_total,
            "images_per_second": samples / (time.perf_counter() - started),
        }
    )
    return StepResult(skipped=skipped, logs=out)


def dmd_step(run: Run) -> StepResult:
    """One DMD2 optimiser step (``add_sdxl_dmd.train_step``), its logs as floats."""
    started = time.perf_counter()
    batches = [next(run.batches) for _ in range(dmd.micro_batches_per_step(run.args))]
    result = dmd.train_step(run, batches, flow_dmd.inputs)
    logs = {k: float(v) for k, v in result.logs.items()}
    logs.update({
        "lr/student": run.sched_g.get_last_lr()[0],
        "lr/fake_score": run.fake.scheduler.get_last_lr()[0],
        "nonfinite/total": run.progress.nonfinite_total,
        "images_per_second": len(batches) * run.args.batch_size * run.accelerator.num_processes
        / (time.perf_counter() - started),
    })  # fmt: skip
    return StepResult(skipped=result.skipped, logs=logs)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the recipe; returns a summary (final step, skipped steps, paths, trained modules)."""
    from tqdm.auto import tqdm

    run = setup(args)
    acc, progress = run.accelerator, run.progress
    acc.init_trackers(
        "add_flow", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    )
    bar = tqdm(total=args.max_steps, initial=progress.step, disable=not acc.is_main_process, desc=args.model)
    last_checkpoint = None
    watch = addkit.losses.ChanceWatch(patience=200)
    while progress.step < args.max_steps:
        step = progress.step + 1
        result = dmd_step(run) if run.fake is not None else train_step(run, step)
        if args.log_every and step % args.log_every == 0:
            acc.log(result.logs, step=step)
            rank = result.logs.get("d/rank", result.logs.get("f/gan_rank"))
            message = watch.update(step, float(rank)) if rank is not None else None
            if message and acc.is_main_process:
                warnings.warn(f"add_flow: {message}", stacklevel=1)
        bar.update(1)
        if progress.nonfinite_in_row >= args.max_nonfinite_in_row:
            bar.close()
            acc.end_training()
            raise NonFiniteLossError(
                f"stopping: {progress.nonfinite_in_row} steps in a row (up to step {step}) had a non-finite "
                f"loss or gradient and were skipped; the last checkpoint ({last_checkpoint or 'none yet'}) "
                "is intact. Lower --lr / --lr-d, keep --max-grad-norm, check the data and --mixed-precision"
            )
        if args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):
            if acc.is_main_process:
                report.report(run, step)
            acc.wait_for_everyone()
        if step % args.checkpoint_every == 0 or step == args.max_steps:
            last_checkpoint = save_checkpoint(run, run.output_dir, args.checkpoints_keep, last_checkpoint)
    bar.close()
    acc.wait_for_everyone()
    exported = report.export(run) if acc.is_main_process else None
    acc.wait_for_everyone()
    acc.end_training()
    return {
        "step": progress.step,
        "nonfinite_total": progress.nonfinite_total,
        "export": exported,
        "checkpoint": last_checkpoint,
        "student": acc.unwrap_model(run.student),
        "discriminator": run.discriminator,
        "ema": run.ema,
        "models": run.models,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and train; the entry point of ``python examples/add_flow.py``."""
    return train(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, data.DataError) as err:
        print(f"add_flow: error: {err}", file=sys.stderr)
        sys.exit(1)
