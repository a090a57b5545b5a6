"""DMD2 in the recipes (``--method dmd2``): the fake score, its optimiser, and one DMD2 optimiser step.

The student trains with ``addkit.DMDObjective`` instead of ``ADDObjective``:

- **fake score**: initialised from the teacher. A full run trains a copy of it; with
  ``--lora-rank`` it is a LoRA adapter named ``fake_score`` on the teacher's own network, and
  the real score is that network seen through ``addkit.denoisers.AdaptersDisabled``, so the
  teacher's weights are held once for both scores (the LoRA student sits on a copy of them:
  two copies in all, where ADD with LoRA holds one; see ``recipe.sdxl.models.make_student``);
- **two time-scale rule**: one optimiser step makes ``--fake-steps`` fake-score updates (DMD2:
  5), each on its own micro-batches, then one generator update;
- **GAN head** (``--gan-weight > 0``): a projected discriminator on the fake score's bottleneck
  features; real images reach the run only through it;
- **backward simulation** (``DMDObjective``'s default): a multi-step student trains on inputs
  made by its own earlier steps.

One host read per step, as ADD's ``train_step``: every update's non-finite flag (a loss or a
gradient norm) is all-reduced on the device and gates the fake score's and the heads' fused
AdamW on the device (``found_inf``: a gated update leaves weights, moments and step count as
they were), so a non-finite value stops every later update of the step; the one read at the
end decides the generator update, the EMA and the counters. Fake-score updates made before a
non-finite value in the same step (all finite) stand.
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import addkit
from recipe.step import (
    StepResult,
    _any_process,
    _average_gradients,
    _full,
    _gradient_sync,
    _samples_per_step,
    _update_ema,
    poisoned,
)
from addkit.denoisers import AdaptersDisabled, adapters_disabled
from recipe.lora import UNET_TARGETS, add_lora

FAKE_ADAPTER = "fake_score"


@dataclass
class FakeScore:
    """The trained fake score, the teacher as the real score, and the fake score's optimiser.

    ``state_dict`` holds the trained weights only (the whole copy, or the LoRA adapter), by name.
    """

    network: nn.Module  # what runs as the fake score (a copy, or the teacher with its adapter on)
    real: nn.Module  # the teacher as the real score reads it (AdaptersDisabled with LoRA)
    names: list[str]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None

    def state_dict(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in zip(self.names, self.params)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            raise ValueError(
                f"the fake score's saved weights name {len(state)} tensors, {len(self.names)} expected"
            )
        for name, p in zip(self.names, self.params):
            p.copy_(state[name])


def build_fake_score(
    teacher: nn.Module, *, lora_rank: int = 0, lora_targets: Sequence[str] = UNET_TARGETS, seed: int = 0
) -> FakeScore:
    """DMD2's fake score, initialised from ``teacher`` (a frozen diffusers network, before placement).

    Args:
        teacher: the frozen teacher network.
        lora_rank: 0 trains a full copy; otherwise a LoRA of this rank on ``teacher`` itself
            (zero-initialised output, so the fake score starts equal to the teacher).
        lora_targets: the LoRA's target modules.
        seed: seeds the LoRA's initialisation.
    """
    if not lora_rank:
        network = copy.deepcopy(teacher).requires_grad_(True).train()
        real = teacher
    else:
        add_lora(teacher, lora_rank, lora_targets, seed=seed + 1, name=FAKE_ADAPTER)
        network, real = teacher, AdaptersDisabled(teacher)
    named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    return FakeScore(network, real, [n for n, _ in named], [p for _, p in named])


def place_fake_score(fake: FakeScore, device: torch.device) -> None:
    """A copy to ``device`` in float32; a LoRA's weights in float32 on its (placed) base."""
    if isinstance(fake.real, AdaptersDisabled):
        from diffusers.training_utils import cast_training_params

        cast_training_params(fake.network, dtype=torch.float32)
    else:
        fake.network.to(device)


def attach_optimiser(fake: FakeScore, *, lr: float, weight_decay: float, warmup_steps: int) -> None:
    """Fused AdamW (its ``found_inf`` gates an update on the device) with the recipe's linear warm-up."""
    fake.optimizer = torch.optim.AdamW(fake.params, lr=lr, weight_decay=weight_decay, fused=True)
    warmup = max(1, warmup_steps)
    fake.scheduler = torch.optim.lr_scheduler.LambdaLR(fake.optimizer, lambda s: min(1.0, (s + 1) / warmup))


def build_objective(
    args: Any, fake: FakeScore, schedule: Any, prediction: str, head: Any, student_timesteps: Any
) -> addkit.DMDObjective:
    """DMD2's losses: real score = the teacher with ``--guidance-scale``; the head only with ``--gan-weight > 0``."""
    return addkit.DMDObjective(
        addkit.wrap(fake.real, schedule, prediction),
        addkit.wrap(fake.network, schedule, prediction),
        schedule,
        guidance_scale=args.guidance_scale,
        fake_prediction=prediction,
        gan_head=head if args.gan_weight > 0 else None,
        gan_weight=args.gan_weight,
        gan_d_weight=args.gan_d_weight,
        student_timesteps=student_timesteps,
    )


def teacher_alone(fake: FakeScore | None) -> contextlib.AbstractContextManager:
    """Inside the block the teacher's network runs as the teacher (a LoRA fake score's adapter off)."""
    if fake is None or not isinstance(fake.real, AdaptersDisabled):
        return contextlib.nullcontext()
    return adapters_disabled(fake.network)


def micro_batches_per_step(args: Any) -> int:
    """Micro-batches one optimiser step reads: each update (fake-score and generator) takes its own."""
    updates = args.fake_steps + 1 if getattr(args, "method", "add") == "dmd2" else 1
    return updates * args.gradient_accumulation


# ---------------------------------------------------------------------------------------------
# One DMD2 optimiser step
# ---------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """One micro-batch as the DMD2 losses read it (made by the recipe's ``prepare``)."""

    noise: Tensor  # the student's pure noise [B, C, h, w]
    cond: dict[str, Any]  # the networks' conditioning
    uncond: dict[str, Any] | None  # the real score's unconditional branch (with guidance)
    gan: dict[str, Any]  # the GAN head's keyword arguments (c_text, feature kwargs)
    real: Tensor | None  # real latents for the GAN head (None without a head)


Prepare = Callable[[Any, Any], Inputs]


def train_step(state: Any, batches: Sequence[Any], prepare: Prepare) -> StepResult:
    """``--fake-steps`` fake-score updates, then one generator update; one host read.

    Args:
        state: the run (`recipe.step.RunState`) with ``fake`` set.
        batches: `micro_batches_per_step` micro-batches.
        prepare: ``prepare(state, batch) -> Inputs`` (the family's ``dmd_inputs``).
    """
    args, acc = state.args, state.accelerator
    step, n = state.progress.step + 1, args.gradient_accumulation
    groups = [batches[i : i + n] for i in range(0, len(batches), n)]
    bad = torch.zeros((), dtype=torch.bool, device=acc.device)
    logs: list[dict[str, Tensor]] = []
    for group in groups[:-1]:
        bad, fake_logs = _fake_update(state, group, step, bad, prepare)
        logs.append(fake_logs)
    bad_g, gen_logs = _generator_update(state, groups[-1], step, prepare)
    skipped = _any_process(acc, bad | bad_g)  # the one host read
    if not skipped:
        state.opt_g.step()
        if state.ema is not None:
            _update_ema(state.ema, state.trainable)
    state.opt_g.zero_grad(set_to_none=True)
    _step_schedulers(state.sched_g, state.sched_d, state.fake.scheduler)
    p = state.progress
    p.step, p.samples = step, p.samples + _samples_per_step(state, len(batches))
    p.nonfinite_total += skipped
    p.nonfinite_in_row = p.nonfinite_in_row + 1 if skipped else 0
    out = _mean(logs)
    out.update(gen_logs)
    return StepResult(step, skipped, out)


def _fake_update(
    state: Any, group: Sequence[Any], step: int, bad: Tensor, prepare: Prepare
) -> tuple[Tensor, dict[str, Tensor]]:
    """One fake-score (and head) update, gated on the device by the step's running non-finite flag."""
    fake, heads, obj = state.fake, list(state.discriminator.parameters()), state.objective
    flags, out = _backward(
        state, group, step, prepare, grad=False,
        loss=lambda x0, i: obj.fake_score_loss(x0, real=i.real, cond=i.cond, gan_kwargs=i.gan),
    )  # fmt: skip
    _average_gradients(state.accelerator, fake.params + heads)
    norm_f = _full(torch.nn.utils.clip_grad_norm_(fake.params, state.args.max_grad_norm))
    norm_h = torch.nn.utils.clip_grad_norm_(heads, float("inf")) if heads else torch.zeros_like(norm_f)
    local = torch.stack([*flags, ~torch.isfinite(norm_f), ~torch.isfinite(norm_h)]).any()
    bad = bad | (state.accelerator.reduce(local.float().reshape(1), reduction="sum")[0] > 0)  # on the device
    for optimizer in (fake.optimizer, state.opt_d):
        optimizer.found_inf = bad.float()  # fused AdamW: no update (weights, moments, step) when 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out.update({"grad_norm/fake_score": norm_f.detach(), "grad_norm/discriminator": norm_h.detach()})
    return bad, out


def _generator_update(
    state: Any, group: Sequence[Any], step: int, prepare: Prepare
) -> tuple[Tensor, dict[str, Tensor]]:
    """The generator's backward on ``group`` (fake score and heads frozen): (non-finite flag, logs)."""
    frozen, obj = state.fake.params + list(state.discriminator.parameters()), state.objective
    for p in frozen:  # the head's generator term reaches the student only
        p.requires_grad_(False)
    try:
        flags, out = _backward(
            state, group, step, prepare, grad=True,
            loss=lambda x0, i: obj.generator_loss(x0, cond=i.cond, uncond=i.uncond, gan_kwargs=i.gan),
        )  # fmt: skip
    finally:
        for p in frozen:
            p.requires_grad_(True)
    norm_g = _full(torch.nn.utils.clip_grad_norm_(state.trainable, state.args.max_grad_norm))
    out["grad_norm/student"] = norm_g.detach()
    return torch.stack([*flags, ~torch.isfinite(norm_g)]).any(), out


def _backward(
    state: Any, group: Sequence[Any], step: int, prepare: Prepare, *, grad: bool, loss: Callable
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """``loss(student_x0, inputs)`` backward on each micro-batch of ``group``: (non-finite flags, mean logs)."""
    flags, logs = [], []
    for i, batch in enumerate(group):
        with _gradient_sync(state, i == len(group) - 1):
            inputs = prepare(state, batch)
            with state.accelerator.autocast():
                value, micro_logs = loss(_student_sample(state, inputs, step, grad=grad), inputs)
            (value / len(group)).backward()
        flags.append(~torch.isfinite(value.detach()))
        logs.append(micro_logs)
    return flags, _mean(logs)


def _mean(logs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([m[k] for m in logs]).float().mean() for k in logs[0]} if logs else {}


def _student_sample(state: Any, inputs: Inputs, step: int, *, grad: bool) -> Tensor:
    """The student's x0 at a student step drawn uniformly (backward simulation below it).

    The step is drawn with Python's ``random`` (seeded, and saved in checkpoints, by
    accelerate), so drawing it reads nothing from a tensor.
    """
    k = random.randrange(len(state.objective.student_timesteps))
    inp = state.objective.sample_student_inputs(inputs.noise, student=state.denoiser, step=k, **inputs.cond)
    with torch.set_grad_enabled(grad):
        x0 = state.denoiser.x0(inp.x_t, inp.t, **inputs.cond)
    if poisoned(state.args.debug_nonfinite_at, step, state.accelerator.process_index):
        x0 = x0 * float("nan")  # (testing) a forward pass gone non-finite
    return x0


def _step_schedulers(*schedulers: Any) -> None:
    with warnings.catch_warnings():  # the schedules count attempted steps, skipped ones too
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
        for scheduler in schedulers:
            scheduler.step()
