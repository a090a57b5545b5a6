"""One ADD / LADD optimiser step of the recipes: the run state and ``train_step``.

Per micro-batch: the family turns the batch into tensors (`recipe.family.AddInputs`); draw the student inputs at the student timesteps
(pure noise at the first); generator step (student x0 -> adversarial + distillation loss, the
discriminator frozen); discriminator step on real images and the detached student sample.
Then, once per optimiser step: average the discriminator's gradients over processes, unscale
(fp16), clip, and decide with **one** all-reduced flag whether anything in the step was
non-finite (a loss or a gradient norm, on any process); every process then steps or skips
alike. That flag is the step's only read from the device: logs stay tensors until written.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from recipe.family import Family



@dataclass
class Progress:
    """Counters saved with every checkpoint."""

    step: int = 0  # optimiser steps attempted (skipped ones included)
    samples: int = 0  # global data-stream position
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update(state)


class LossScaling:
    """fp16 loss scaling for the two optimisers: one ``GradScaler``, one ``update()`` per step.

    accelerate steps its one scaler inside each prepared optimiser (``scaler.step`` then
    ``update``) and unscales every optimiser in ``clip_grad_norm_``: with two optimisers the
    second one's gradients are unscaled twice, and a skipped step never reaches ``update()``,
    so the next ``unscale_`` raises. Here the scaler is used as torch documents for several
    optimisers: scale each loss, ``unscale_`` each optimiser once, step, one ``update()``.
    The recipe's all-reduced flag decides the step, so ``scaler.step`` (one host read per
    optimiser) is not called; ``update()`` backs the scale off when an unscaled gradient was
    inf/NaN. The gradients it checks are already averaged over processes, so every process
    keeps the same scale.

    Args:
        scaler: the ``GradScaler`` (accelerate's for fp16 on a GPU), or None for no scaling.
    """

    def __init__(self, scaler: torch.amp.GradScaler | None) -> None:
        self.scaler = scaler

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_(self, *optimizers: torch.optim.Optimizer) -> None:
        for optimizer in optimizers if self.scaler is not None else ():
            self.scaler.unscale_(optimizer)

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.update()


@dataclass
class RunState:
    """Everything one optimiser step reads and changes (built by `recipe.loop.setup`)."""

    args: argparse.Namespace
    accelerator: Any
    family: Family  # the model family's adapter (recipe.family)
    models: Any  # what the family loaded
    student: nn.Module  # as trained: plain, DDP-wrapped or FSDP-sharded
    denoiser: Any  # the student as an x0-predictor (addkit.wrap), calling `student`
    discriminator: Any  # addkit.ProjectedDiscriminator, replicated on every process
    objective: Any  # addkit.ADDObjective
    text: Any  # the family's caption encoder
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LRScheduler
    sched_d: torch.optim.lr_scheduler.LRScheduler
    scaling: LossScaling
    ema: torch.optim.swa_utils.AveragedModel | None = None  # over the trainable parameters
    fake: Any = None  # --method dmd2: recipe.dmd.FakeScore (objective: addkit.DMDObjective)
    progress: Progress = field(default_factory=Progress)
    data: Iterator[Any] | None = None
    resumed_from: Path | None = None  # the checkpoint the run continues

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for group in self.opt_g.param_groups for p in group["params"]]

    @property
    def fsdp(self) -> bool:
        return bool(self.args.fsdp)


@dataclass
class StepResult:
    """What ``train_step`` did: the step number, whether it was skipped, and its logs (tensors)."""

    step: int
    skipped: bool
    logs: dict[str, Tensor]


def train_step(state: RunState, batches: Sequence[Any]) -> StepResult:
    """One optimiser step over ``batches`` (the micro-batches of gradient accumulation).

    Reads one value from the device: the all-reduced non-finite flag. A non-finite loss or
    gradient norm on any process skips the step on every process (no optimiser, EMA or
    scaler-growth update; the gradients are dropped) and counts it in ``state.progress``.
    """
    step = state.progress.step + 1
    flags, logs = [], []
    for i, batch in enumerate(batches):
        with _gradient_sync(state, i == len(batches) - 1):
            bad, micro_logs = _micro_step(state, batch, step, 1.0 / len(batches))
        flags.append(bad)
        logs.append(micro_logs)
    disc_params = list(state.discriminator.parameters())
    _average_gradients(state.accelerator, disc_params)
    state.scaling.unscale_(state.opt_g, state.opt_d)
    norm_g = _full(torch.nn.utils.clip_grad_norm_(state.trainable, state.args.max_grad_norm))
    norm_d = torch.nn.utils.clip_grad_norm_(disc_params, float("inf"))  # the norm only
    flags += [~torch.isfinite(norm_g), ~torch.isfinite(norm_d)]
    skipped = _any_process(state.accelerator, torch.stack(flags).any())  # the one host read
    if not skipped:
        state.opt_g.step()
        state.opt_d.step()
        if state.ema is not None:
            _update_ema(state.ema, state.trainable)
    state.scaling.update()
    for optimizer, scheduler in ((state.opt_g, state.sched_g), (state.opt_d, state.sched_d)):
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the schedule counts attempted steps, skipped ones too
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
            scheduler.step()
    p = state.progress
    p.step, p.samples = step, p.samples + _samples_per_step(state, len(batches))
    p.nonfinite_total += skipped
    p.nonfinite_in_row = p.nonfinite_in_row + 1 if skipped else 0
    out = {k: torch.stack([m[k] for m in logs]).float().mean() for k in logs[0]}
    out.update({"grad_norm/student": norm_g.detach(), "grad_norm/discriminator": norm_d.detach()})
    return StepResult(step, skipped, out)


def _micro_step(state: RunState, batch: Any, step: int, scale: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Generator then discriminator backward (losses times ``scale``) on one micro-batch: (non-finite flag, logs)."""
    acc, objective = state.accelerator, state.objective
    i = state.family.add_inputs(state, batch)
    inp = objective.sample_student_inputs(i.x0)  # the objective zeroes c_image at the pure-noise step
    heads = {"c_text": i.c_text, "c_image": i.c_image, "student_t": inp.t, "feature_kwargs": i.feature_kwargs}

    state.discriminator.requires_grad_(False)  # generator step: gradients reach the student only
    with acc.autocast():
        student_x0 = state.denoiser.x0(inp.x_t, inp.t, **i.cond)
        if poisoned(state.args.debug_nonfinite_at, step, acc.process_index):
            student_x0 = student_x0 * float("nan")  # (testing) a forward pass gone non-finite
        loss_g, logs_g = objective.generator_loss(
            student_x0, teacher_cond=i.cond, teacher_uncond=i.uncond, negative_cond=i.negative, **heads
        )
    state.scaling.backward(loss_g * scale)

    state.discriminator.requires_grad_(True)
    with acc.autocast():
        with torch.no_grad():
            fake = objective.discriminator_input(student_x0.detach())
            real = objective.discriminator_input(i.x0) if i.real is None else i.real
        loss_d, logs_d = objective.discriminator_loss(real, fake, step=step, **heads)
    state.scaling.backward(loss_d * scale)
    bad = ~(torch.isfinite(loss_g.detach()) & torch.isfinite(loss_d.detach()))
    return bad, {**logs_g, **logs_d}


def poisoned(injections: Sequence[Any], step: int, rank: int) -> bool:
    """``--debug-nonfinite-at``: is ``step`` (on process ``rank``) one of its ``(STEP, RANK | None)`` entries?"""
    return any(i == step or i in ((step, None), (step, rank)) for i in injections)


def _gradient_sync(state: RunState, sync: bool) -> contextlib.AbstractContextManager:
    """No gradient all-reduce on the micro-batches before the last one."""
    if sync or state.accelerator.num_processes == 1:
        return contextlib.nullcontext()
    if state.fsdp:
        return _fsdp_no_sync(state.student)
    return state.accelerator.no_sync(state.student)


@contextlib.contextmanager
def _fsdp_no_sync(module: Any) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _average_gradients(accelerator: Any, params: list[nn.Parameter]) -> None:
    """Average the discriminator's gradients over processes.

    It is not wrapped by DDP: the objective calls its ``extract`` / ``classify`` directly,
    which would bypass a wrapper's gradient hooks.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if accelerator.num_processes == 1 or not grads:
        return
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def _update_ema(ema: torch.optim.swa_utils.AveragedModel, params: list[nn.Parameter]) -> None:
    """``ema.update_parameters`` without its ``n_averaged > 0`` test, a host read per step.

    The average holds a value from the start (``setup`` takes the initial student), so the
    EMA update (``get_ema_multi_avg_fn``) always applies.
    """
    averaged = [p.detach() for p in ema.module.parameters()]
    ema.multi_avg_fn(averaged, [p.detach() for p in params], ema.n_averaged)
    ema.n_averaged += 1


def _full(norm: Tensor) -> Tensor:
    """A gradient norm as a plain tensor (FSDP returns a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _any_process(accelerator: Any, flag: Tensor) -> bool:
    return bool(accelerator.reduce(flag.float().reshape(1), reduction="sum") > 0)


def _samples_per_step(state: RunState, micro_batches: int) -> int:
    return state.args.batch_size * state.accelerator.num_processes * micro_batches
