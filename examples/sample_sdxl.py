"""Sample from a student exported by ``add_sdxl.py`` with addkit's few-step sampler.

    python examples/sample_sdxl.py outputs/add_sdxl/export "a cat on a windowsill" --steps 1 --out cat.png

``MODEL`` is a pipeline folder (``--export-pipeline``), or, with ``--base``, a UNet folder
(``export/unet``) used in the base checkpoint's pipeline. The sampler starts from pure noise at
t = 999, predicts x0 at each of the first ``--steps`` student timesteps and re-noises with fresh
noise in between (ADD, no classifier-free guidance); the VAE decodes the last x0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import addkit
from recipe.args import count, looks_local
from recipe.sdxl.models import square_time_ids, vae_decode
from recipe.sdxl.report import save_grid
from addkit.sampling import sample


def main(argv: list[str] | None = None) -> Path:
    """Parse ``argv``, sample one image per seed and save a row of them as ``--out``."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    p = argparse.ArgumentParser(description="Few-step sampling of an ADD student with addkit.sampling.sample")
    p.add_argument("model", help="exported pipeline folder, or a UNet folder together with --base")
    p.add_argument("prompt")
    p.add_argument(
        "--base", default=None, help="base pipeline (hub id or folder) when MODEL is a UNet folder"
    )
    p.add_argument("--steps", type=count(1), default=1, help="the first STEPS of --timesteps")
    p.add_argument("--timesteps", type=count(0), nargs="+", default=[999, 749, 499, 249])
    p.add_argument("--seeds", type=count(0), nargs="+", default=[0])
    p.add_argument(
        "--resolution", type=count(8), default=None, help="default: the UNet's sample size x VAE factor"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="sample.png")
    args = p.parse_args(argv)
    if args.steps > len(args.timesteps):
        p.error(f"--steps {args.steps}: only {len(args.timesteps)} --timesteps are given")
    for what, name in (("MODEL", args.model), ("--base", args.base)):
        if name and looks_local(name) and not Path(name).expanduser().is_dir():
            p.error(f"{what} {name}: no such folder")

    if args.base:
        unet = UNet2DConditionModel.from_pretrained(args.model)
        pipe = DiffusionPipeline.from_pretrained(args.base, unet=unet)
    else:
        pipe = DiffusionPipeline.from_pretrained(args.model)
    pipe.to(args.device)
    schedule = addkit.VPSchedule.from_diffusers(pipe.scheduler)
    student = addkit.wrap(pipe.unet, schedule, pipe.scheduler.config.prediction_type)
    side = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    n = len(args.seeds)
    cond: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):  # SDXL: both encoders, pooled text, size conditioning
            embeds, _, pooled, _ = pipe.encode_prompt(
                args.prompt, device=args.device, num_images_per_prompt=n, do_classifier_free_guidance=False
            )
            cond = {
                "encoder_hidden_states": embeds,
                "text_embeds": pooled,
                "time_ids": square_time_ids(side, n, args.device),
            }
        else:
            embeds, _ = pipe.encode_prompt(args.prompt, args.device, n, False)
            cond = {"encoder_hidden_states": embeds}
        shape = (pipe.unet.config.in_channels, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor)
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in args.seeds]
        )
        x0 = sample(
            student,
            noise.to(args.device, pipe.unet.dtype),
            schedule=schedule,
            timesteps=args.timesteps[: args.steps],
            generator=torch.Generator(args.device).manual_seed(0),
            **cond,
        )
        images = vae_decode(pipe.vae, x0)
    out = save_grid(Path(args.out), images.float(), columns=n)  # one row, a column per seed
    print(f"wrote {out} ({n} image(s), {args.steps} step(s))")
    return out


if __name__ == "__main__":
    main()
