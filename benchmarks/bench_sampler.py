"""Few-step sampling: eager loop vs CUDA graph vs torch.compile vs the diffusers pipeline.

One call samples a batch with an SDXL-architecture UNet (random weights) at 1, 2 and 4 steps,
optionally followed by the VAE decode. Variants, for each step count ``n`` (and ``_decode``):

- ``eager_{n}step``: ``addkit.sampling.sample`` under ``torch.no_grad()``, the naive way;
- ``cuda_graph_{n}step``: ``CUDAGraphSampler``, the loop (and decode) captured and replayed
  (CUDA only: on a CPU it would run the eager loop);
- ``compile_{n}step``: ``CUDAGraphSampler(compile=...)``: ``torch.compile`` of the loop,
  ``"reduce-overhead"`` on CUDA (inductor's own CUDA graphs), ``"default"`` on a CPU;
- ``diffusers_{n}step``: ``StableDiffusionXLPipeline`` with ``EulerAncestralDiscreteScheduler``
  (trailing), ``guidance_scale=0``, precomputed prompt embeddings, ``output_type="latent"``
  (or ``"pt"`` with decode).

Each row's ``speedup_vs_naive`` is relative to the eager loop with the same step count and
decode setting (the payload's ``naive`` names the eager loop with the most steps); ``vs_diffusers`` to the pipeline. Times are per call; ``ms_per_image`` divides
by the batch. On CUDA the memory column counts the private memory pool a captured graph keeps
(``_memory.peak_memory``); the compiled variants share inductor's one pool, counted in each.
Compilation and capture happen in the warm-up and are not timed
(``first_call_s`` records the first call). Under ``torch.no_grad()`` autograd saves nothing, so the
CPU memory column is 0 by construction.

Run: ``python benchmarks/bench_sampler.py --quick`` (tiny UNet and VAE, CPU; only the 1-step
loop is compiled, since inductor needs minutes per step count on a small CPU) or without
``--quick`` on a GPU (SDXL UNet and VAE architectures, 512x512, bf16, batch 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import _runner
from _common import finish, time_fn
from _memory import peak_memory, private_pools
from addkit.denoisers import wrap
from addkit.sampling import CUDAGraphSampler, sample
from addkit.schedules import VPSchedule
from addkit.testing import tiny_sdxl_unet, tiny_vae

NAME = "sampler"
VARIANTS = ("eager", "cuda_graph", "compile", "diffusers")

SDXL_UNET: dict[str, Any] = {  # SDXL's architecture: every entry the tiny config sets, at SDXL's value
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}


@dataclass(frozen=True)
class Config:
    """Sizes of one run: UNet and VAE, latent side, batch, what to time.

    ``unet`` and ``vae`` override the configs of ``addkit.testing.tiny_sdxl_unet`` and
    ``tiny_vae`` (empty: those tiny models).
    """

    batch: int
    latent: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    pooled_dim: int
    text_len: int = 77
    dtype: str = "fp32"
    steps: tuple[int, ...] = (1, 2, 4)
    decode: tuple[bool, ...] = (False, True)
    compile_steps: tuple[int, ...] = (1, 2, 4)
    min_run_time: float = 1.0


FULL = Config(
    batch=1, latent=64, unet=SDXL_UNET, vae=SDXL_VAE, pooled_dim=1280, dtype="bf16", compile_steps=(1, 4)
)
QUICK = Config(  # addkit.testing's tiny SDXL UNet and VAE: text width 2 x 16, pooled 16
    batch=2,
    latent=8,
    unet={},
    vae={},
    pooled_dim=16,
    text_len=8,
    compile_steps=(1,),
    min_run_time=0.5,
)
TINY = dataclasses.replace(QUICK, batch=1, steps=(1, 2), decode=(False,), compile_steps=(), min_run_time=0.05)


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules constructed inside are made on ``device`` in ``dtype`` (no CPU copy, no cast)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _models(cfg: Config, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    with building_on(device, dtype):  # SDXL's 2.6 B UNet straight on the GPU in bf16
        unet = tiny_sdxl_unet(sample_size=cfg.latent, **cfg.unet)
        vae = tiny_vae(**cfg.vae)
    return tuple(m.eval().requires_grad_(False) for m in (unet, vae))  # type: ignore[return-value]


def _pipeline(unet: Any, vae: Any) -> Any:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_steps(
    cfg: Config, device: torch.device, *, graphs: bool | None = None
) -> tuple[dict[str, Callable[[], object]], dict[str, Any]]:
    """Every variant as a closure over one UNet, one VAE and one batch of inputs.

    ``graphs``: include the ``cuda_graph`` variants (default: on CUDA only; elsewhere they run
    the eager loop). The second value holds ``mem_kw`` for `peak_memory` and ``pools``: per
    variant, what returns the ids of the CUDA-graph memory pools it replays.
    """
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    unet, vae = _models(cfg, device, dtype)
    schedule = VPSchedule.scaled_linear()
    denoiser = wrap(unet, schedule, "eps")
    g = torch.Generator(device).manual_seed(0)
    b, side = cfg.batch, cfg.latent * 2 ** (len(vae.config.block_out_channels) - 1)
    noise = torch.randn(b, 4, cfg.latent, cfg.latent, generator=g, device=device, dtype=dtype)
    width = unet.config.cross_attention_dim
    text = torch.randn(b, cfg.text_len, width, generator=g, device=device, dtype=dtype)
    pooled = torch.randn(b, cfg.pooled_dim, generator=g, device=device, dtype=dtype)
    time_ids = torch.tensor([[side, side, 0, 0, side, side]] * b, device=device, dtype=dtype)
    cond = {"encoder_hidden_states": text, "text_embeds": pooled, "time_ids": time_ids}
    pipe = _pipeline(unet, vae)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / vae.config.scaling_factor).sample

    steps: dict[str, Callable[[], object]] = {}
    samplers: list[CUDAGraphSampler] = []
    pools: dict[str, Callable[[], Any]] = {}
    for n in cfg.steps:
        ts = schedule.timesteps(n)
        for dec in cfg.decode:
            suffix = f"{n}step" + ("_decode" if dec else "")
            post = decode if dec else None

            def eager(ts: tuple = ts, post: Any = post) -> torch.Tensor:
                with torch.no_grad():
                    x = sample(denoiser, noise, schedule=schedule, timesteps=ts, renoise="ancestral", **cond)
                    return x if post is None else post(x)

            def pipeline(n: int = n, dec: bool = dec) -> torch.Tensor:
                return pipe(
                    prompt_embeds=text,
                    pooled_prompt_embeds=pooled,
                    num_inference_steps=n,
                    guidance_scale=0.0,
                    height=side,
                    width=side,
                    latents=noise,
                    output_type="pt" if dec else "latent",
                ).images

            steps[f"eager_{suffix}"] = eager
            pools[f"eager_{suffix}"] = pools[f"diffusers_{suffix}"] = lambda: ()
            if graphs or (graphs is None and device.type == "cuda"):
                graph = CUDAGraphSampler(
                    denoiser, schedule=schedule, timesteps=ts, renoise="ancestral", decode=post
                )
                samplers.append(graph)
                steps[f"cuda_graph_{suffix}"] = lambda s=graph: s(noise, **cond)
                pools[f"cuda_graph_{suffix}"] = lambda s=graph: s.memory_pools
            if n in cfg.compile_steps:
                mode = "reduce-overhead" if device.type == "cuda" else "default"
                comp = CUDAGraphSampler(
                    denoiser, schedule=schedule, timesteps=ts, renoise="ancestral", decode=post, compile=mode
                )
                steps[f"compile_{suffix}"] = lambda s=comp: s(noise, **cond)
                pools[f"compile_{suffix}"] = lambda: _inductor_pools(device, samplers)
            steps[f"diffusers_{suffix}"] = pipeline
    mem_kw = {"modules": [unet, vae], "inputs": [noise, *cond.values()]}
    return steps, {"mem_kw": mem_kw, "pools": pools}


def _inductor_pools(device: torch.device, samplers: list[CUDAGraphSampler]) -> list[Any]:
    """The private pools not held by ``samplers``: inductor's, shared by every compiled variant."""
    ours = {tuple(p) for s in samplers for p in s.memory_pools}
    return [p for p in private_pools(device) if p not in ours]


def _setting(name: str) -> str:
    """``"4step_decode"`` from ``"cuda_graph_4step_decode"``."""
    variant = next(v for v in VARIANTS if name.startswith(f"{v}_"))
    return name[len(variant) + 1 :]


def _ratios(rows: list[dict[str, Any]]) -> None:
    by = {r["name"]: r for r in rows}
    for r in rows:
        setting = _setting(r["name"])
        r["speedup_vs_naive"] = by[f"eager_{setting}"]["median_s"] / r["median_s"]
        r["vs_diffusers"] = by[f"diffusers_{setting}"]["median_s"] / r["median_s"]


def headline(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Graph, compile and eager against the eager loop and the pipeline, where measured."""
    by = {r["name"]: r for r in rows}
    figures = []
    for name, text in (
        ("cuda_graph_1step", "CUDA graph vs eager loop, 1 step"),
        ("cuda_graph_4step", "CUDA graph vs eager loop, 4 steps"),
        ("cuda_graph_4step_decode", "CUDA graph vs eager loop, 4 steps + VAE decode"),
        ("compile_1step", "torch.compile vs eager loop, 1 step"),
        ("compile_4step", "torch.compile vs eager loop, 4 steps"),
    ):
        if name in by:
            figures.append({"figure": text, "value": by[name]["speedup_vs_naive"], "unit": "x"})
    most = max(int(_setting(r["name"]).split("step")[0]) for r in rows)
    if f"diffusers_{most}step" in by:
        text = f"eager loop vs diffusers pipeline, {most} steps"
        figures.append({"figure": text, "value": by[f"eager_{most}step"]["vs_diffusers"], "unit": "x"})
    return figures


def run(cfg: Config, device: torch.device, *, out_dir: Path | None = None) -> dict[str, Any]:
    """Warm up (capture, compile) and time every variant, write the JSON and return its payload."""
    steps, extra = make_steps(cfg, device)
    first: dict[str, float] = {}
    for name, fn in steps.items():  # warm up every path (capture, compile) before timing any
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first[name] = time.perf_counter() - start
        fn()
    rows = []
    for name, fn in steps.items():
        timing = time_fn(fn, cfg.min_run_time, device=device)
        mem = peak_memory(fn, device, **extra["mem_kw"], pools=extra["pools"][name])
        ms = timing["median_s"] * 1e3 / cfg.batch
        rows.append(
            {"name": name, **timing, "peak_bytes": mem, "ms_per_image": ms, "first_call_s": first[name]}
        )
    _ratios(rows)
    return finish(
        NAME,
        description="few-step sampling (SDXL UNet architecture): eager, CUDA graph, torch.compile, diffusers",
        naive=f"eager_{max(cfg.steps)}step",
        headline=headline(rows),
        config=cfg,
        device=device,
        rows=rows,
        out_dir=out_dir,
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--quick`` for the tiny CPU configuration."""
    _runner.main(run, quick=QUICK, full=FULL, description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    main()
