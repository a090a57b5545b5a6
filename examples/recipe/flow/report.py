"""Grid, diversity and export of ``add_flow.py`` (main process; EMA weights when enabled).

- ``report``: a PNG grid (rows: 1 step and ``--student-steps`` steps for each prompt; columns:
  seeds) sampled with ``addkit.sampling.sample`` (ADD's fresh re-noising, no guidance), and the
  mean pairwise distance of samples of one prompt in the discriminator's features (a collapse
  of diversity drives it towards 0), logged to TensorBoard.
- ``export``: ``export/lora`` (diffusers LoRA format, for ``pipe.load_lora_weights``) or
  ``export/transformer`` (a full fine-tune), and with ``--export-pipeline`` a complete
  ``StableDiffusion3Pipeline`` / ``FluxPipeline`` folder with the student's transformer (LoRA
  fused) and a scheduler set to sample as the student was trained: ``stochastic_sampling=True``
  is ADD's fresh re-noising; pass the student's times as ``sigmas=[1.0, 0.75, 0.5, 0.25]`` to
  the SD3 pipeline (Flux's default sigmas are those already). ``export/README.md`` (`card`) gives
  the whole call (steps, sigmas, guidance, size): the pipeline's own defaults are 28 steps.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

import recipe.flow.models as fm
import recipe.flow.tiny as tiny
from recipe.flow import card
import addkit
from recipe.report import feature_distance, save_grid
from addkit.sampling import sample

PROMPTS = ("a photo of a cat sitting on a windowsill", "a watercolor painting of a lighthouse at dawn")


def prompts(args: Any) -> list[str]:
    """The grid's prompts: ``--grid-prompts``, else the preset's."""
    return list(args.grid_prompts or (tiny.PROMPTS if args.preset == "tiny" else PROMPTS))


@torch.no_grad()
def generate(state: Any, transformer: Any, prompts: list[str], seeds: list[int], steps: int) -> torch.Tensor:
    """Latents ``[len(prompts) * len(seeds), C, h, w]`` (prompt-major), ``steps`` student steps."""
    models, device = state.models, state.accelerator.device
    student = addkit.wrap(transformer, models.schedule, "flow")
    side = state.args.resolution // models.pipe.vae_scale_factor
    shape = (models.pipe.vae.config.latent_channels, side, side)
    out = []
    for prompt in prompts:
        cond, _ = state.text([prompt] * len(seeds))
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        gen = torch.Generator(device).manual_seed(10_000 + seeds[0])  # re-noising between steps
        out.append(
            sample(
                student, noise.to(device), schedule=models.schedule, timesteps=models.schedule.timesteps(steps),
                renoise="fresh", generator=gen, **cond,
            )  # fmt: skip
        )
    return torch.cat(out)


def report(state: Any, transformer: Any, step: int) -> Path:
    """Write ``samples/step-N.png`` (rows: 1 step and ``--student-steps`` x prompts) and log diversity."""
    args = state.args
    shown = prompts(args)
    rows = [generate(state, transformer, shown, list(args.grid_seeds), n) for n in sorted({1, args.student_steps})]
    path = Path(args.output_dir) / "samples" / f"step-{step:07d}.png"
    save_grid(path, fm.decode_latents(state.models.pipe.vae, torch.cat(rows)), len(args.grid_seeds))
    if args.diversity_seeds:
        state.accelerator.log(diversity(state, transformer, shown[0]), step=step)
    return path


@torch.no_grad()
def diversity(state: Any, transformer: Any, prompt: str) -> dict[str, float]:
    """Mean pairwise feature distance over ``--diversity-seeds`` samples (`recipe.report.feature_distance`)."""
    args, out = state.args, {}
    seeds = list(range(args.diversity_seeds))
    cond, _ = state.text([prompt] * len(seeds))
    for n in sorted({1, args.student_steps}):
        latents = generate(state, transformer, [prompt], seeds, n)
        if args.discriminator == "teacher" or args.method == "dmd2":  # teacher-feature heads: latents
            x, kwargs = latents, {**cond, "t": 0.5}  # the features at a fixed noise level
        else:
            x, kwargs = fm.decode_latents(state.models.pipe.vae, latents).clamp(-1, 1), {}
        out[f"diversity/feature_distance_{n}step"] = feature_distance(state.discriminator, x, **kwargs)
    return out


def export(state: Any, student: Any) -> Path:
    """Write the student (see the module docs); returns ``<output-dir>/export``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    args, models = state.args, state.models
    out = Path(args.output_dir) / "export"
    pipeline_cls = type(models.pipe)
    if args.lora_rank:
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(student)  # peft's keys, as diffusers' SD3 / Flux scripts save
        pipeline_cls.save_lora_weights(str(out / "lora"), transformer_lora_layers=layers)
    else:
        student.save_pretrained(out / "transformer")
    if args.export_pipeline:
        transformer = copy.deepcopy(student).eval()
        if args.lora_rank:
            transformer.fuse_lora()
            transformer.unload_lora()
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            models.pipe.scheduler.config, stochastic_sampling=True
        )
        parts = {**models.pipe.components, "transformer": transformer, "scheduler": scheduler}
        pipeline_cls(**parts).save_pretrained(out)
    card.write(args, models, out)  # the call that suits the student: the pipeline's defaults are not stored
    return out
