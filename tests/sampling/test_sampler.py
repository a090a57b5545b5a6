"""sample / FewStepSampler: parity with diffusers' SDXL pipeline (Euler ancestral, trailing), a reference
loop written with diffusers' add_noise, the oracle property, and clear errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from addkit.denoisers import wrap
from addkit.sampling import FewStepSampler, renoise_coefficients, renoise_step, sample
from addkit.schedules import FlowSchedule, VPSchedule
from addkit.testing import sdxl_condition, tiny_sdxl_pipeline

PROMPT = "a cat"
SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def pipe() -> Any:
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def student(pipe: Any) -> tuple[Any, VPSchedule, dict[str, torch.Tensor]]:
    schedule = VPSchedule.from_diffusers(pipe.scheduler)
    return wrap(pipe.unet, schedule, "eps"), schedule, sdxl_condition(pipe, PROMPT, batch=SHAPE[0])


def _pipeline_latents(pipe: Any, latents: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    out = pipe(
        [PROMPT] * latents.shape[0],
        num_inference_steps=steps,
        guidance_scale=0.0,
        output_type="latent",
        latents=latents,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(seed),
    )
    return out.images


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_ancestral_equals_sdxl_pipeline(pipe: Any, student: Any, steps: int) -> None:
    denoiser, schedule, cond = student
    latents = torch.randn(SHAPE)
    want = _pipeline_latents(pipe, latents, steps, seed=steps)
    timesteps = schedule.timesteps(steps)
    assert [int(t) for t in pipe.scheduler.timesteps] == list(timesteps)
    # the pipeline draws one re-noising tensor per step from its generator (the last is scaled by 0)
    g = torch.Generator().manual_seed(steps)
    noises = [torch.randn(SHAPE, generator=g) for _ in range(steps)][:-1]
    # diffusers feeds sigma_VE_max * latents / sqrt(sigma_VE_max^2 + 1) = sigma_999 * latents
    noise = schedule.sigma(timesteps[0]).float() * latents
    got = sample(
        denoiser, noise, schedule=schedule, timesteps=timesteps, renoise="ancestral", noises=noises, **cond
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("steps", [2, 4])
def test_fresh_equals_add_noise_reference_loop(pipe: Any, student: Any, steps: int) -> None:
    from diffusers import DDPMScheduler

    denoiser, schedule, cond = student
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ac = ddpm.alphas_cumprod
    timesteps = schedule.timesteps(steps)
    noise, noises = torch.randn(SHAPE), torch.randn(steps - 1, *SHAPE)
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    x = noise
    for i, t in enumerate(timesteps):  # the reference: UNet eps -> x0 by hand, diffusers' add_noise
        eps = pipe.unet(
            x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added
        ).sample
        x0 = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
        if i + 1 < steps:
            x = ddpm.add_noise(x0, noises[i], torch.tensor([timesteps[i + 1]] * SHAPE[0]))
    got = sample(denoiser, noise, schedule=schedule, timesteps=timesteps, noises=noises, **cond)
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)


def test_ancestral_coefficients_are_euler_ancestral_sigmas(pipe: Any) -> None:
    scheduler = pipe.scheduler
    scheduler.set_timesteps(4)
    schedule = VPSchedule.from_diffusers(scheduler)
    k = renoise_coefficients(schedule, schedule.timesteps(4), renoise="ancestral")
    ve = scheduler.sigmas.double()  # VE sigmas, with the final 0
    for i in range(3):
        s_from, s_to = ve[i], ve[i + 1]
        up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2).sqrt()
        alpha_next = 1 / (1 + s_to**2).sqrt()  # VP alpha of the next step
        torch.testing.assert_close(k[i, 2], alpha_next * up, rtol=1e-5, atol=0)  # k_z = alpha * sigma_up


def _oracle(x0: torch.Tensor, schedule: Any, prediction: str) -> Any:
    """A network whose prediction always converts to the true x0."""

    def net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = schedule.coefficients(t, x_t)
        a, s = a.double(), s.double()
        eps = (x_t.double() - a * x0.double()) / s
        return (eps if prediction == "eps" else eps - x0.double()).to(x_t.dtype)

    return wrap(net, schedule, prediction)


@given(
    data=st.data(),
    flow=st.booleans(),
    renoise=st.sampled_from(["fresh", "ancestral"]),
    seed=st.integers(0, 2**16),
)
def test_oracle_denoiser_returns_x0(data: st.DataObject, flow: bool, renoise: str, seed: int) -> None:
    if flow:
        grid = st.lists(st.integers(1, 100), min_size=1, max_size=4, unique=True)
        timesteps = tuple(k / 100 for k in sorted(data.draw(grid), reverse=True))
        schedule, prediction = FlowSchedule(shift=3.0), "flow"
    else:
        grid = st.lists(st.integers(0, 999), min_size=1, max_size=4, unique=True)
        timesteps = tuple(sorted(data.draw(grid), reverse=True))
        schedule, prediction = VPSchedule.scaled_linear(), "eps"
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    got = sample(
        _oracle(x0, schedule, prediction),
        noise,
        schedule=schedule,
        timesteps=timesteps,
        renoise=renoise,
        generator=g,
    )
    torch.testing.assert_close(got, x0, rtol=1e-6, atol=1e-6)


def test_flow_ancestral_from_pure_noise_is_fresh() -> None:
    k_a = renoise_coefficients(FlowSchedule(), (1.0, 0.5), renoise="ancestral")
    k_f = renoise_coefficients(FlowSchedule(), (1.0, 0.5), renoise="fresh")
    torch.testing.assert_close(k_a, k_f)  # alpha = 0 at t = 1: nothing of eps-hat to keep
    assert renoise_coefficients(FlowSchedule(), (0.5, 0.25), renoise="ancestral")[0, 1] > 0


def test_module_equals_function_callback_and_decode() -> None:
    schedule = VPSchedule.scaled_linear()
    net = torch.nn.Conv2d(4, 4, 1)
    denoiser = wrap(lambda x, t: net(x), schedule, "v")
    noise = torch.randn(2, 4, 8, 8)
    seen: list[tuple[int, int]] = []
    with torch.no_grad():
        want = sample(denoiser, noise, schedule=schedule, generator=torch.Generator().manual_seed(1))
        sampler = FewStepSampler(denoiser, schedule=schedule, decode=lambda x: 2 * x)
        got = sampler(
            noise,
            generator=torch.Generator().manual_seed(1),
            callback=lambda i, t, x, x0: seen.append((i, t)),
        )
    torch.testing.assert_close(got, 2 * want)
    assert seen == [(0, 999), (1, 749), (2, 499), (3, 249)]
    assert "renoise='fresh'" in repr(sampler)


def test_renoise_step_keeps_dtype_and_computes_in_float32() -> None:
    x = torch.full((1, 4), 3.0, dtype=torch.bfloat16)
    out = renoise_step(x, x, x, torch.tensor([0.1, 0.2, 0.3]))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.full((1, 4), 1.8), rtol=1e-2, atol=0)


def test_bad_inputs_raise_clear_errors() -> None:
    vp = VPSchedule.scaled_linear()
    d = wrap(lambda x, t: x, vp, "x0")
    noise = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"sample: denoiser must have a method x0\(x_t, t, \*\*cond\)"):
        sample(lambda x, t: x, noise, schedule=vp)
    with pytest.raises(TypeError, match="sample: schedule must satisfy addkit.typing.Schedule"):
        sample(d, noise, schedule=None)
    with pytest.raises(
        TypeError, match="sample: noise must be a floating-point tensor, got dtype torch.int64"
    ):
        sample(d, torch.ones(2, 4, dtype=torch.long), schedule=vp)
    with pytest.raises(
        ValueError, match="sample: renoise must be one of 'fresh', 'ancestral', 'deterministic'; got 'ddim'"
    ):
        sample(d, noise, schedule=vp, renoise="ddim")
    with pytest.raises(ValueError, match=r"timesteps must be strictly decreasing .*got \(249, 999\)"):
        sample(d, noise, schedule=vp, timesteps=(249, 999))
    with pytest.raises(ValueError, match=r"timesteps must hold at least one timestep"):
        sample(d, noise, schedule=vp, timesteps=())
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\], got \(1000,\)"):
        sample(d, noise, schedule=vp, timesteps=(1000,))
    with pytest.raises(
        TypeError, match="timesteps must be integers for a discrete schedule .*got \\(999.0,\\)"
    ):
        sample(d, noise, schedule=vp, timesteps=(999.0,))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0.0, 1.0\], got \(2.0,\)"):
        sample(d, noise, schedule=FlowSchedule(), timesteps=(2.0,))
    with pytest.raises(ValueError, match="noises must hold 3 tensors .*got 2"):
        sample(d, noise, schedule=vp, noises=[noise, noise])
    with pytest.raises(ValueError, match=r"noises must have shape \(3, 2, 4\) .*got \(3, 2, 5\)"):
        sample(d, noise, schedule=vp, noises=torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match=r"noise and noises\[1\] must have the same shape"):
        sample(d, noise, schedule=vp, noises=[noise, noise[:1], noise])
    with pytest.raises(ValueError, match="renoise='ancestral' needs sigma > 0"):
        renoise_coefficients(VPSchedule(torch.zeros(10)), (5, 2), renoise="ancestral")
    with pytest.raises(TypeError, match="FewStepSampler: denoiser must have"):
        FewStepSampler(object(), schedule=vp)


def test_noise_is_not_touched(tmp_path: Path) -> None:
    vp = VPSchedule.scaled_linear()
    d = wrap(lambda x, t: 0.5 * x, vp, "x0")
    noise = torch.randn(2, 4)
    before = noise.clone()
    sample(d, noise, schedule=vp, renoise="ancestral")
    torch.testing.assert_close(noise, before)


class _Zero:
    def x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)


def test_renoising_noise_is_drawn_on_the_generator_device_and_moved() -> None:
    # meta stands in for CUDA: a CPU generator cannot fill a meta (or CUDA) buffer in place; the draw
    # must happen on the CPU (advancing the generator by exactly one [n-1, *shape] draw) and be moved.
    vp = VPSchedule.scaled_linear()
    g, ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    noise = torch.empty(SHAPE, device="meta")
    out = sample(_Zero(), noise, schedule=vp, timesteps=(999, 499, 249), generator=g)
    torch.randn(2, *SHAPE, generator=ref)
    assert out.device.type == "meta" and out.shape == SHAPE
    assert torch.equal(g.get_state(), ref.get_state())


@pytest.mark.cuda
@torch.no_grad()
def test_cpu_generator_with_cuda_samples_gives_the_cpu_numbers(pipe: Any, student: Any) -> None:
    denoiser, schedule, cond = student
    noise = torch.randn(SHAPE)
    want = sample(denoiser, noise, schedule=schedule, generator=torch.Generator().manual_seed(5), **cond)
    on_gpu = wrap(copy.deepcopy(pipe.unet).cuda(), schedule, "eps")
    got = sample(
        on_gpu,
        noise.cuda(),
        schedule=schedule,
        generator=torch.Generator().manual_seed(5),
        **{k: v.cuda() for k, v in cond.items()},
    )
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
