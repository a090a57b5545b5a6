"""Sample from a student exported by ``add_flow.py`` with addkit's few-step sampler.

    python examples/sample_flow.py outputs/add_flow_sd3/export "a cat on a windowsill" --steps 1 --out cat.png
    python examples/sample_flow.py stabilityai/stable-diffusion-3.5-medium "a cat" \\
        --lora outputs/add_flow_sd3/export/lora --steps 4

``MODEL`` is a pipeline folder or hub id (``StableDiffusion3Pipeline`` or ``FluxPipeline``);
``--transformer`` swaps in an exported transformer folder, ``--lora`` loads exported LoRA
weights (``pipe.load_lora_weights``). The sampler starts from pure noise at t = 1, predicts x0
at each of the student times ``FlowSchedule.timesteps(steps)`` (the model's shift; Flux's for
the resolution) and re-noises in between, with fresh noise (``--renoise fresh``, ADD, the
default) or deterministically (``deterministic``: FlowMatchEuler's step); no classifier-free
guidance (a guidance-distilled Flux gets its ``--guidance`` embedding); the VAE decodes the
last x0. The pipeline loads in ``--dtype`` (bf16 by default, as SD3 and Flux are released:
FLUX.1-dev with its T5 takes about 67 GB in float32, half that in bf16); float16 is refused,
as the recipe refuses it: their activations overflow it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import recipe.flow.models as fm
import addkit
from addkit.sampling import sample


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docs); ``--dtype fp16`` is refused with the reason."""
    p = argparse.ArgumentParser(description="Few-step sampling of an ADD/LADD flow student")
    p.add_argument("model", help="pipeline folder or hub id")
    p.add_argument("prompt")
    p.add_argument("--transformer", default=None, help="exported transformer folder to use instead")
    p.add_argument("--lora", default=None, help="exported LoRA folder (export/lora)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--renoise", choices=("fresh", "deterministic"), default="fresh")
    p.add_argument("--guidance", type=float, default=None, help="Flux guidance embedding (default 3.5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--resolution", type=int, default=None, help="default: the pipeline's default size")
    p.add_argument("--max-sequence-length", type=int, default=256)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="weights of every pipeline part")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="sample.png")
    args = p.parse_args(argv)
    if args.dtype == "fp16":
        p.error("--dtype fp16: SD3 and Flux are trained and released in bf16 and their activations "
                "overflow float16; use bf16 (or fp32)")  # fmt: skip
    return args


def load_pipeline(args: argparse.Namespace) -> Any:
    """The pipeline in ``--dtype`` on ``--device``, with ``--transformer`` or ``--lora`` if given."""
    from diffusers import DiffusionPipeline

    dtype = DTYPES[args.dtype]
    parts = {}
    if args.transformer:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        config = FluxTransformer2DModel.load_config(args.transformer)
        cls = FluxTransformer2DModel if config["_class_name"].startswith("Flux") else SD3Transformer2DModel
        parts["transformer"] = cls.from_pretrained(args.transformer, torch_dtype=dtype)
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, **parts)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    return pipe.to(args.device)


def main(argv: list[str] | None = None) -> Path:
    """Parse ``argv``, sample one image per seed and save a row of them as ``--out``."""
    from PIL import Image

    args = parse_args(argv)
    pipe = load_pipeline(args)
    transformer = pipe.transformer
    guidance = None
    if transformer.config.get("guidance_embeds", False):
        guidance = fm.DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    side = args.resolution or pipe.default_sample_size * pipe.vae_scale_factor
    if problem := fm.resolution_problem(side, fm.family(pipe), pipe.vae_scale_factor):
        raise SystemExit(f"sample_flow.py: error: {problem}")
    schedule = fm.flow_schedule(pipe, side)
    student = addkit.wrap(transformer, schedule, "flow")
    encode = fm.PromptEncoder(pipe, guidance, torch.device(args.device), args.max_sequence_length)
    n = len(args.seeds)
    with torch.no_grad():
        cond, _ = encode([args.prompt] * n)
        shape = (
            pipe.vae.config.latent_channels,
            side // pipe.vae_scale_factor,
            side // pipe.vae_scale_factor,
        )
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in args.seeds]
        )
        x0 = sample(
            student,
            noise.to(args.device),
            schedule=schedule,
            timesteps=schedule.timesteps(args.steps),
            renoise=args.renoise,
            generator=torch.Generator(args.device).manual_seed(0),
            **cond,
        )
        images = fm.decode_latents(pipe.vae, x0)
    row = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    out = Path(args.out)
    Image.fromarray(torch.cat(list(row), dim=1).numpy()).save(out)
    print(f"wrote {out} ({n} image(s), {args.steps} step(s), shift {schedule.shift:.3g})")
    return out


if __name__ == "__main__":
    main()
