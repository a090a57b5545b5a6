"""sample with renoise="deterministic" equals diffusers' flow pipelines; the Flux adapter's conventions.

``StableDiffusion3Pipeline`` and ``FluxPipeline`` (``FlowMatchEulerDiscreteScheduler``, no
classifier-free guidance, the same latents) on the tiny random models of
``examples/recipe/flow/tiny.py``, 1 to 4 steps, to 1e-4: the SD3 pipeline's own timesteps
(``FlowSchedule.timesteps(n, "linspace")``) and ADD's trailing ones passed as ``sigmas``; Flux's
trailing timesteps with its resolution-dependent shift, with and without the guidance
embedding. The Flux adapter is checked against the transformer called by hand on packed
latents (diffusers' own ``_pack_latents`` and ``_prepare_latent_image_ids``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import recipe.flow.tiny as tiny  # examples/ is on pytest's pythonpath
from addkit.denoisers import DiffusersFluxAdapter, wrap
from addkit.sampling import renoise_coefficients, sample
from addkit.schedules import FlowSchedule, VPSchedule

PROMPT = "a red circle"
BATCH, SIDE = 2, tiny.RESOLUTION // 2  # latents [2, 4, 16, 16]
TOL = {"rtol": 1e-4, "atol": 1e-4}
PIPE_SIZE = {"height": tiny.RESOLUTION, "width": tiny.RESOLUTION, "max_sequence_length": tiny.MAX_TOKENS}


@pytest.fixture(scope="module")
def sd3() -> Any:
    return tiny.pipeline("sd3")


@pytest.fixture(scope="module", params=[True, False], ids=["flux-dev", "flux-schnell"])
def flux(request: pytest.FixtureRequest) -> Any:
    return tiny.pipeline("flux", guidance_embeds=request.param)


def _sd3_cond(pipe: Any) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPT,
        None,
        None,
        num_images_per_prompt=BATCH,
        do_classifier_free_guidance=False,
        max_sequence_length=tiny.MAX_TOKENS,
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _flux_cond(pipe: Any) -> dict[str, Any]:
    embeds, pooled, _ = pipe.encode_prompt(
        PROMPT, None, num_images_per_prompt=BATCH, max_sequence_length=tiny.MAX_TOKENS
    )
    cond: dict[str, Any] = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if pipe.transformer.config.guidance_embeds:
        cond["guidance"] = 3.5
    return cond


def _flux_schedule(pipe: Any) -> FlowSchedule:
    """The pipeline's shift for 64 tokens: e^mu with diffusers' own ``calculate_shift``."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = pipe.scheduler.config
    if not cfg.use_dynamic_shifting:
        return FlowSchedule.from_diffusers(pipe.scheduler)
    tokens = (SIDE // 2) ** 2
    mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    return FlowSchedule.from_diffusers(pipe.scheduler, mu=mu)


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    print(f"{name}: max |addkit - diffusers| = {(got - want).abs().max().item():.2e}")


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_deterministic_equals_sd3_pipeline(sd3: Any, steps: int, spacing: str) -> None:
    schedule = FlowSchedule.from_diffusers(sd3.scheduler)
    timesteps = schedule.timesteps(steps, spacing)
    latents = torch.randn(BATCH, 4, SIDE, SIDE)
    # the pipeline's default timesteps are FlowSchedule's "linspace"; trailing ones go in as sigmas
    sigmas = None if spacing == "linspace" else list(timesteps)
    want = sd3(
        [PROMPT] * BATCH,
        num_inference_steps=steps,
        sigmas=sigmas,
        guidance_scale=1.0,
        latents=latents,
        output_type="latent",
        **PIPE_SIZE,
    ).images
    sigma = schedule.sigma(torch.tensor(timesteps))
    torch.testing.assert_close(sd3.scheduler.sigmas[:-1].double(), sigma, **TOL)
    denoiser = wrap(sd3.transformer, schedule, "flow")
    cond = _sd3_cond(sd3)
    got = sample(denoiser, latents, schedule=schedule, timesteps=timesteps, renoise="deterministic", **cond)
    _report(f"SD3 {spacing} {steps} steps", got, want)
    torch.testing.assert_close(got, want, **TOL)


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_deterministic_equals_flux_pipeline(flux: Any, steps: int) -> None:
    from diffusers import FluxPipeline

    schedule = _flux_schedule(flux)
    latents = torch.randn(BATCH, 4, SIDE, SIDE)
    packed = FluxPipeline._pack_latents(latents, BATCH, 4, SIDE, SIDE)
    cond = _flux_cond(flux)
    want = flux(
        [PROMPT] * BATCH,
        num_inference_steps=steps,
        guidance_scale=cond.get("guidance", 3.5),
        latents=packed,
        output_type="latent",
        **PIPE_SIZE,
    ).images
    want = FluxPipeline._unpack_latents(want, tiny.RESOLUTION, tiny.RESOLUTION, flux.vae_scale_factor)
    timesteps = schedule.timesteps(steps)  # FluxPipeline: sigmas linspace(1, 1/n, n), i.e. trailing
    sigma = schedule.sigma(torch.tensor(timesteps))
    torch.testing.assert_close(flux.scheduler.sigmas[:-1].double(), sigma, **TOL)
    got = sample(
        wrap(flux.transformer, schedule, "flow"),
        latents,
        schedule=schedule,
        timesteps=timesteps,
        renoise="deterministic",
        **cond,
    )
    name = "dev" if "guidance" in cond else "schnell"
    _report(f"Flux-{name} {steps} steps (shift {schedule.shift:.3f})", got, want)
    torch.testing.assert_close(got, want, **TOL)


@torch.no_grad()
def test_flux_adapter_packs_like_the_pipeline(flux: Any) -> None:
    from diffusers import FluxPipeline

    schedule = FlowSchedule(shift=2.0)
    x_t, t = torch.randn(BATCH, 4, SIDE, SIDE), torch.tensor([0.9, 0.3])
    cond = _flux_cond(flux)
    guidance = cond.pop("guidance", None)
    tokens = FluxPipeline._pack_latents(x_t, BATCH, 4, SIDE, SIDE)
    ids = FluxPipeline._prepare_latent_image_ids(BATCH, SIDE // 2, SIDE // 2, x_t.device, x_t.dtype)
    raw = flux.transformer(
        hidden_states=tokens,
        timestep=schedule.sigma(t).float(),
        img_ids=ids,
        txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3),
        guidance=None if guidance is None else torch.full((BATCH,), guidance),
        **cond,
    ).sample
    want = FluxPipeline._unpack_latents(raw, tiny.RESOLUTION, tiny.RESOLUTION, flux.vae_scale_factor)
    adapter = wrap(flux.transformer, schedule, "flow")
    assert isinstance(adapter.model, DiffusersFluxAdapter)
    got = adapter(x_t, t, **cond, **({} if guidance is None else {"guidance": guidance}))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_flux_adapter_refuses_what_it_would_get_wrong() -> None:
    dev = tiny.pipeline("flux").transformer
    schnell = tiny.pipeline("flux", guidance_embeds=False).transformer
    cond = {"encoder_hidden_states": torch.zeros(1, 3, 16), "pooled_projections": torch.zeros(1, 16)}
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(TypeError, match="DiffusersFluxAdapter: Flux transformers are rectified-flow models"):
        DiffusersFluxAdapter(dev, VPSchedule.scaled_linear())
    with pytest.raises(ValueError, match=r"guidance_embeds=True .*pass guidance=<scale>"):
        wrap(dev, FlowSchedule(), "flow")(x, 0.5, **cond)
    with pytest.raises(ValueError, match=r"guidance=3.5 was given but .*guidance_embeds=False"):
        wrap(schnell, FlowSchedule(), "flow")(x, 0.5, guidance=3.5, **cond)
    with pytest.raises(ValueError, match=r"unpacked latents \[B, C, H, W\] with even H and W.*\(1, 4, 5"):
        wrap(schnell, FlowSchedule(), "flow")(torch.zeros(1, 4, 5, 4), 0.5, **cond)
    with pytest.raises(ValueError, match=r"guidance must be a number or have shape \(1,\), got shape \(2,\)"):
        wrap(dev, FlowSchedule(), "flow")(x, 0.5, guidance=torch.ones(2), **cond)


def test_deterministic_coefficients_are_flow_match_euler_steps() -> None:
    """k_x = sigma'/sigma, k_x0 = 1 - sigma' - k_x (1 - sigma), k_z = 0: x' = x + (sigma' - sigma) u."""
    schedule = FlowSchedule(shift=3.0)
    timesteps = schedule.timesteps(4)
    k = renoise_coefficients(schedule, timesteps, renoise="deterministic")
    x, u = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for i, (t, t_next) in enumerate(itertools.pairwise(timesteps)):
        s, s_next = float(schedule.sigma(t)), float(schedule.sigma(t_next))
        x0 = x - s * u  # flow prediction u = eps - x0 and x = (1 - s) x0 + s eps
        euler = x + (s_next - s) * u
        torch.testing.assert_close(k[i, 0] * x0 + k[i, 1] * x + k[i, 2] * torch.randn(5).double(), euler)
        assert k[i, 2] == 0 and math.isclose(float(k[i, 1]), s_next / s)
