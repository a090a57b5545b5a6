"""TeacherFeatures (LADD): a tiny diffusers UNet and a token transformer as frozen feature networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from addkit.discriminators import ProjectedDiscriminator, TeacherFeatures, sample_logit_normal
from addkit.schedules import FlowSchedule, VPSchedule
from addkit.testing import tiny_sd_unet

TAPS = ["down_blocks.0", "down_blocks.1", "mid_block"]


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    """An SD-style UNet: block widths 32 and 64, cross-attention width 32, latents 4 x 16 x 16."""
    pytest.importorskip("diffusers")
    return tiny_sd_unet(sample_size=16)


def _no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks for m in module.modules())


class _TokenNet(nn.Module):
    """A transformer-like teacher: latents -> tokens [B, N, C] -> blocks -> latents."""

    def __init__(self, in_channels: int, width: int = 24) -> None:
        super().__init__()
        self.embed = nn.Linear(in_channels, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(3)
        )
        self.out = nn.Linear(width, in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.embed(x.flatten(2).transpose(1, 2)) + t.view(B, 1, 1).to(x.dtype)
        for blk in self.blocks:
            h = h + blk(h)
        return self.out(h).transpose(1, 2).reshape(B, C, H, W)


def test_unet_features_and_no_hooks_left(unet: nn.Module) -> None:
    feats = TeacherFeatures(unet, VPSchedule.scaled_linear(), TAPS, channels=[32, 64, 64])
    g = torch.Generator().manual_seed(0)
    out = feats(torch.randn(2, 4, 16, 16), generator=g, encoder_hidden_states=torch.randn(2, 7, 32))
    assert [tuple(f.shape) for f in out] == [(2, 32, 8, 8), (2, 64, 8, 8), (2, 64, 8, 8)]  # on their grid
    tokens = TeacherFeatures(unet, VPSchedule.scaled_linear(), TAPS, channels=[32, 64, 64], layout="tokens")
    again = tokens(torch.randn(2, 4, 16, 16), generator=torch.Generator().manual_seed(0),
                   encoder_hidden_states=torch.randn(2, 7, 32))  # fmt: skip
    assert [tuple(f.shape) for f in again] == [(2, 32, 64), (2, 64, 64), (2, 64, 64)]
    assert _no_hooks(unet)
    assert not feats.training and not unet.training


def test_unet_stop_early_skips_decoder(unet: nn.Module) -> None:
    ran = []
    handle = unet.up_blocks[0].register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        feats = TeacherFeatures(unet, VPSchedule.scaled_linear(), TAPS, channels=[32, 64, 64], t=500)
        feats(torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 7, 32))
        assert ran == []
        TeacherFeatures(
            unet, VPSchedule.scaled_linear(), TAPS, channels=[32, 64, 64], t=500, stop_early=False
        )(torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 7, 32))
        assert ran == [1]
    finally:
        handle.remove()


def test_hooks_removed_when_the_teacher_fails(unet: nn.Module) -> None:
    feats = TeacherFeatures(unet, VPSchedule.scaled_linear(), TAPS, channels=[32, 64, 64])
    with pytest.raises(TypeError):
        feats(torch.randn(1, 4, 16, 16))  # encoder_hidden_states missing: the UNet raises
    assert _no_hooks(unet)


def test_gradients_reach_latents_not_teacher(unet: nn.Module) -> None:
    feats = TeacherFeatures(unet, VPSchedule.scaled_linear(), TAPS, channels=[32, 64, 64], t=300)
    lat = torch.randn(2, 4, 16, 16, requires_grad=True)
    sum(f.sum() for f in feats(lat, encoder_hidden_states=torch.randn(2, 7, 32))).backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())


def test_in_discriminator_real_path_graph_free(unet: nn.Module) -> None:
    D = ProjectedDiscriminator(
        TeacherFeatures(unet, VPSchedule.scaled_linear(), TAPS, channels=[32, 64, 64]), c_text_dim=8
    )
    kw = {"encoder_hidden_states": torch.randn(2, 7, 32), "generator": torch.Generator().manual_seed(1)}
    feats = D.extract(torch.randn(2, 4, 16, 16), **kw)
    assert all(f.grad_fn is None and not f.requires_grad for f in feats)
    assert D.classify(feats, torch.randn(2, 8)).shape == (2, 3 * 64)
    assert D.state_dict().keys() == {k for k in D.state_dict() if k.startswith("heads.")}


def test_fixed_noise_is_deterministic_and_generator_reproducible(unet: nn.Module) -> None:
    feats = TeacherFeatures(unet, VPSchedule.scaled_linear(), TAPS, channels=[32, 64, 64])
    lat, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    a = feats(lat, generator=torch.Generator().manual_seed(3), encoder_hidden_states=ehs)
    b = feats(lat, generator=torch.Generator().manual_seed(3), encoder_hidden_states=ehs)
    c = feats(lat, generator=torch.Generator().manual_seed(4), encoder_hidden_states=ehs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0])


def test_transformer_tokens_any_channel_count_flow_schedule() -> None:
    net = _TokenNet(in_channels=16)
    feats = TeacherFeatures(net, FlowSchedule(), ["blocks.0", "blocks.2"], channels=[24, 24])
    out = feats(torch.randn(3, 16, 4, 6))
    assert [tuple(f.shape) for f in out] == [(3, 24, 4, 6), (3, 24, 4, 6)]  # [B, N, C] -> [B, C, h, w]
    feats = TeacherFeatures(net, FlowSchedule(), ["blocks.0"], channels=[24], layout="tokens")
    assert tuple(feats(torch.randn(3, 16, 4, 6))[0].shape) == (3, 24, 24)  # [B, N, C] -> [B, C, N]
    assert _no_hooks(net)


def test_sample_t_discrete_and_continuous() -> None:
    net = _TokenNet(4)
    vp = TeacherFeatures(net, VPSchedule.scaled_linear(), ["blocks.0"], channels=[24], noise_space="time")
    t = vp.sample_t(1000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
    assert 650 < float(t.float().mean()) < 750  # logit-normal(1, 1) in time leans to high noise
    flow = TeacherFeatures(net, FlowSchedule(), ["blocks.0"], channels=[24], t=0.25)
    assert torch.equal(flow.sample_t(3), torch.full((3,), 0.25))
    u = sample_logit_normal(20_000, mean=0.0, std=1.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(u.median()) - 0.5) < 0.02 and float(u.min()) > 0 and float(u.max()) < 1


def test_bad_inputs() -> None:
    net = _TokenNet(4)
    with pytest.raises(TypeError, match="TeacherFeatures: schedule must satisfy addkit.typing.Schedule"):
        TeacherFeatures(net, object(), ["blocks.0"], channels=[24])
    with pytest.raises(
        ValueError, match=r"TeacherFeatures: taps\[1\]='blocks.9' is not a submodule of _TokenNet"
    ):
        TeacherFeatures(net, FlowSchedule(), ["blocks.0", "blocks.9"], channels=[24, 24])
    with pytest.raises(
        ValueError, match=r"TeacherFeatures: channels must give one count per tap \(2\), got \[24\]"
    ):
        TeacherFeatures(net, FlowSchedule(), ["blocks.0", "blocks.1"], channels=[24])
    with pytest.raises(
        TypeError, match="TeacherFeatures: t must be integers for a discrete schedule"
    ):
        TeacherFeatures(net, VPSchedule.scaled_linear(), ["blocks.0"], channels=[24], t=0.5)
    feats = TeacherFeatures(net, FlowSchedule(), ["blocks.0"], channels=[24])
    with pytest.raises(ValueError, match=r"TeacherFeatures: latents must have 3 or 4 or 5 dimensions"):
        feats(torch.randn(2, 4))
