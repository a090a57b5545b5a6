"""Denoiser wrapper and diffusers adapters: x0 by hand from the raw UNet output, CFG."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from addkit.denoisers import DiffusersTransformerAdapter, DiffusersUNetAdapter, apply_cfg, wrap
from addkit.schedules import FlowSchedule, VPSchedule
from addkit.testing import tiny_sd3_transformer, tiny_sd_unet, tiny_sdxl_unet

VP = VPSchedule.scaled_linear()


def _unet(sdxl: bool) -> torch.nn.Module:
    return tiny_sdxl_unet() if sdxl else tiny_sd_unet()  # cross-attention width 32; SDXL: pooled 16


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_unet_adapter_x0_by_hand(sdxl: bool, prediction: str) -> None:
    unet = _unet(sdxl)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 250])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32)}
    extra = {}
    if sdxl:
        extra = {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}
    d = wrap(unet, VP, prediction)
    assert isinstance(d.model, DiffusersUNetAdapter)
    with torch.no_grad():
        added = {"added_cond_kwargs": extra} if sdxl else {}
        raw = unet(x_t, t, cond["encoder_hidden_states"], **added).sample
        ours = d.x0(x_t, t, **cond, **extra)
    a = VP.alphas_cumprod[t].sqrt().view(2, 1, 1, 1).float()
    s = (1 - VP.alphas_cumprod[t]).sqrt().view(2, 1, 1, 1).float()
    want = (x_t - s * raw) / a if prediction == "epsilon" else a * x_t - s * raw
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_cfg_equals_two_pass_formula() -> None:
    unet = _unet(True)
    d = wrap(unet, VP, "eps")
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 100])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32), "text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    with torch.no_grad():
        guided = d.x0(x_t, t, guidance_scale=5.0, uncond=uncond, **cond)
        c = d.x0(x_t, t, **cond)
        u = d.x0(x_t, t, **uncond)
        torch.testing.assert_close(guided, u + 5.0 * (c - u), rtol=1e-4, atol=1e-4)
        # per-sample scales, and rescale against diffusers' rescale_noise_cfg
        eps_c, eps_u = d.eps(x_t, t, **cond), d.eps(x_t, t, **uncond)
        ref = rescale_noise_cfg(eps_u + 3.0 * (eps_c - eps_u), eps_c, guidance_rescale=0.7)
        ours = d.eps(x_t, t, guidance_scale=3.0, guidance_rescale=0.7, uncond=uncond, **cond)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        per = d.x0(x_t, t, guidance_scale=torch.tensor([1.0, 5.0]), uncond=uncond, **cond)
        torch.testing.assert_close(per[0], c[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(per[1], guided[1], rtol=1e-4, atol=1e-4)


def test_apply_cfg_scale_one_is_cond() -> None:
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(apply_cfg(c, u, 1.0), c)


def test_sd3_transformer_adapter_flow() -> None:
    tr = tiny_sd3_transformer()  # text width 16, pooled 8
    sched = FlowSchedule(shift=3.0)
    d = wrap(tr, sched, "flow")
    assert isinstance(d.model, DiffusersTransformerAdapter)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9])
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16), "pooled_projections": torch.randn(2, 8)}
    with torch.no_grad():
        sig = sched.sigma(t).float()
        raw = tr(hidden_states=x_t, timestep=sig * 1000, **cond).sample
        want = x_t - sig.view(2, 1, 1, 1) * raw
        torch.testing.assert_close(d.x0(x_t, t, **cond), want, rtol=1e-4, atol=1e-4)


def test_any_callable_and_errors() -> None:
    d = wrap(lambda x, t, scale: x * scale, FlowSchedule(), "x0")
    x = torch.randn(2, 3)
    torch.testing.assert_close(d.x0(x, 0.5, scale=2.0), 2 * x)
    with pytest.raises(ValueError, match=r"guidance_scale=3.0 needs uncond"):
        d.x0(x, 0.5, guidance_scale=3.0, scale=2.0)
    with pytest.raises(ValueError, match=r"uncond keys \['s'\] must equal cond keys \['scale'\]"):
        d.x0(x, 0.5, guidance_scale=3.0, uncond={"s": 1.0}, scale=2.0)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\) .*got \(3,\)"):
        d.x0(x, torch.rand(3), scale=1.0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        wrap(lambda x, t: x, VP, "noise")
    with pytest.raises(TypeError, match="model must be callable"):
        wrap(3, VP, "eps")  # type: ignore[arg-type]
    bad = wrap(lambda x, t: x[:, :2], VP, "eps")
    with pytest.raises(ValueError, match=r"the model returned shape \(2, 2\) for x_t of shape \(2, 3\)"):
        bad.x0(x, 10)
