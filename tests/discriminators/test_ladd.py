"""LADD's discriminator parts: teacher taps on their grid, 2-D heads, noise levels drawn in σ or in
time, heads conditioned on the noise level (Sauer et al., arXiv 2403.12015, §3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from addkit.discriminators import DiscHead, ProjectedDiscriminator, TeacherFeatures
from addkit.discriminators.heads import noise_level_embedding
from addkit.discriminators.teacher import noise_fraction, time_at_noise_fraction, to_grid
from addkit.losses.regularizers import R1Features, r1_penalty
from addkit.schedules import FlowSchedule, VPSchedule


class _PatchNet(nn.Module):
    """A DiT-like teacher: p x p patches of the latents -> tokens [B, N, C] -> blocks."""

    def __init__(self, in_channels: int = 4, width: int = 16, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(in_channels * patch * patch, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = self.patch
        tokens = F.unfold(x, p, stride=p).transpose(1, 2)  # row-major patches [B, N, C p p]
        h = self.embed(tokens) + t.reshape(-1, 1, 1).to(x.dtype)
        for blk in self.blocks:
            h = h + torch.tanh(blk(h))
        return h


def test_tokens_go_back_to_their_patch_grid() -> None:
    """Brute force: token k of a row-major patchify is patch (k // w, k % w)."""
    B, C, N, h, w = 2, 3, 12, 3, 4
    tokens = torch.randn(B, N, C)
    grid = to_grid(tokens, (B, 4, 2 * h, 2 * w))
    for k in range(N):
        assert torch.equal(grid[:, :, k // w, k % w], tokens[:, k])
    fmap = torch.randn(B, C, 5, 5)
    assert to_grid(fmap, (B, 4, 10, 10)) is fmap
    with pytest.raises(ValueError, match=r"has 10 tokens, which is not a patch grid of latents 6x8"):
        to_grid(torch.randn(B, 10, C), (B, 4, 6, 8))
    with pytest.raises(ValueError, match="latents must be \\[B, C, H, W\\]"):
        to_grid(tokens, (B, 4, 2, 6, 8))


def test_teacher_taps_of_a_patch_transformer_on_the_grid() -> None:
    net = _PatchNet()
    feats = TeacherFeatures(net, FlowSchedule(), ["blocks.0", "blocks.1"], channels=[16, 16], t=0.5)
    x = torch.randn(2, 4, 6, 10)
    grid = feats(x, noise=torch.zeros_like(x))
    assert [tuple(f.shape) for f in grid] == [(2, 16, 3, 5)] * 2
    # the map at (i, j) is the tapped layer's output on the token of patch (i, j)
    hidden = net.embed(F.unfold(0.5 * x, 2, stride=2).transpose(1, 2)) + 0.5
    with torch.no_grad():
        torch.testing.assert_close(grid[0][:, :, 1, 3], net.blocks[0](hidden)[:, 1 * 5 + 3])


def _reference_head(head: DiscHead, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The 2-D head written out with functional ops (eval mode: spectral norm's stored sigma)."""

    def block(seq: nn.Sequential, h: torch.Tensor, pad: int) -> torch.Tensor:
        conv, norm = seq[0], seq[1]
        h = F.conv2d(h, conv.weight, conv.bias, padding=pad)
        h = F.group_norm(h, 1, norm.weight, norm.bias, norm.eps)
        return F.leaky_relu(h, 0.2)

    h = block(head.main[0], x, 0)
    h = (block(head.main[1].fn, h, head.kernel_size // 2) + h) / math.sqrt(2)
    h = F.conv2d(h, head.out.weight, head.out.bias).flatten(2)
    cmap = F.linear(c, head.cmapper.weight * head.cmapper.gain, head.cmapper.bias)
    return (h * cmap[:, :, None]).sum(1) / math.sqrt(head.cmap_dim)


def test_grid_head_is_a_2d_convolution_with_zero_padding() -> None:
    torch.manual_seed(0)
    head = DiscHead(8, c_dim=5, cmap_dim=6, dims=2).eval()
    assert head.kernel_size == 3 and isinstance(head.main[1].fn[0], nn.Conv2d)
    assert head.main[1].fn[0].padding_mode == "zeros"
    x, c = torch.randn(3, 8, 4, 7), torch.randn(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(head(x, c), _reference_head(head, x, c))
    with pytest.raises(ValueError, match=r"DiscHead: x must have 4 dimensions \(\[B, C, H, W\]\), got shape \(3, 8, 28\)"):
        head(torch.randn(3, 8, 28), c)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_levels_drawn_in_sigma_or_in_time(shift: float) -> None:
    """In σ the logit of the noise level the teacher sees is N(m, s); in time a shift adds ln(shift)."""
    sched = FlowSchedule(shift=shift)
    net = _PatchNet()
    g = torch.Generator().manual_seed(0)
    for space, mean in (("sigma", 1.0), ("time", 1.0 + math.log(shift))):
        feats = TeacherFeatures(net, sched, ["blocks.0"], channels=[16], noise_space=space)
        sigma = sched.sigma(feats.sample_t(40_000, generator=g)).clamp(1e-6, 1 - 1e-6)
        logit = torch.logit(sigma)
        assert abs(float(logit.mean()) - mean) < 0.03 and abs(float(logit.std()) - 1.0) < 0.03, (space, logit)


def test_noise_fraction_inverted_on_a_discrete_schedule() -> None:
    """Brute force over all 1000 timesteps: the nearest noise fraction."""
    vp = VPSchedule.scaled_linear()
    all_t = torch.arange(1000)
    table = noise_fraction(vp, all_t)
    torch.testing.assert_close(table, (vp.sigma(all_t) / (vp.alpha(all_t) + vp.sigma(all_t))).to(table.dtype))
    r = torch.rand(200, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    t = time_at_noise_fraction(vp, r)
    brute = (table[None, :].double() - r[:, None].double()).abs().argmin(1)
    assert t.dtype == torch.long and torch.equal(t, brute)


def test_noise_fraction_inverted_on_a_continuous_schedule() -> None:
    sched = FlowSchedule(shift=3.0)
    r = torch.linspace(0.001, 0.999, 101)
    t = time_at_noise_fraction(sched, r)
    exact = r / (3.0 - 2.0 * r)  # σ = 3t / (1 + 2t)  <=>  t = σ / (3 - 2σ)
    torch.testing.assert_close(t, exact, atol=2e-6, rtol=0)


def test_noise_level_embedding_matches_its_formula() -> None:
    r = torch.tensor([0.0, 0.3, 1.0])
    emb = noise_level_embedding(r, 6)
    for b in range(3):
        for k in range(3):
            angle = 1000 * float(r[b]) * 10000 ** (-k / 3)
            assert math.isclose(float(emb[b, k]), math.cos(angle), abs_tol=1e-4)
            assert math.isclose(float(emb[b, 3 + k]), math.sin(angle), abs_tol=1e-4)


class _Recording(TeacherFeatures):
    """TeacherFeatures that keeps the noise levels it was called with."""

    seen: list[torch.Tensor]

    def forward(self, latents, *, t=None, generator=None, **kw):  # type: ignore[override]
        self.seen.append(t)
        return super().forward(latents, t=t, generator=generator, **kw)


def _ladd_discriminator(**kw) -> ProjectedDiscriminator:
    torch.manual_seed(0)
    feats = _Recording(_PatchNet(), FlowSchedule(shift=3.0), ["blocks.0", "blocks.1"], channels=[16, 16], **kw)
    feats.seen = []
    # eval: spectral norm's power iteration would change the heads between the calls compared
    return ProjectedDiscriminator(feats, c_text_dim=4, c_noise_dim=8).eval()


def test_one_noise_level_reaches_the_features_and_the_heads() -> None:
    D = _ladd_discriminator()
    assert [h.dims for h in D.heads] == [2, 2] and D.noise_conditioned
    x, c = torch.randn(3, 4, 4, 6), torch.randn(3, 4)
    logits = D(x, c_text=c, per_head=True, generator=torch.Generator().manual_seed(0))
    (t,) = D.features.seen
    assert t is not None and t.shape == (3,)
    # the same draw, by hand: t from sample_t, then the features' noise from the same generator
    g = torch.Generator().manual_seed(0)
    t_again = D.sample_t(3, generator=g)
    assert torch.equal(t, t_again)
    feats = D.extract(x, t=t_again, generator=g)
    for a, b in zip(logits, D.classify(feats, c, t=t_again, per_head=True)):
        torch.testing.assert_close(a, b)
    other = D.classify(feats, c, t=torch.full((3,), 0.01), per_head=True)
    assert not torch.allclose(logits[0], other[0])  # the heads read t
    with pytest.raises(ValueError, match=r"t \(the noise level the features were drawn at\) is required"):
        D.classify(feats, c)


def test_r1_on_features_uses_the_features_noise_level() -> None:
    D = _ladd_discriminator()
    x, c = torch.randn(2, 4, 4, 6), torch.randn(2, 4)
    logits, r1 = R1Features()(D, x, generator=torch.Generator().manual_seed(5), c_text=c)
    (t,) = D.features.seen
    g = torch.Generator().manual_seed(5)
    t_again = D.sample_t(2, generator=g)
    assert torch.equal(t, t_again)
    feats = [f.requires_grad_() for f in D.extract(x, t=t_again, generator=g)]
    expect = D(features=feats, c_text=c, t=t_again, per_head=True)
    torch.testing.assert_close(r1, r1_penalty(expect, feats))
    for a, b in zip(logits, expect):
        torch.testing.assert_close(a, b)


def test_noise_conditioning_needs_a_feature_network_that_draws_t() -> None:
    class Plain(nn.Module):
        channels = [4]

        def forward(self, x):
            return [x.flatten(2)]

    with pytest.raises(TypeError, match="c_noise_dim conditions the heads on the noise level"):
        ProjectedDiscriminator(Plain(), c_noise_dim=8)
    with pytest.raises(ValueError, match="c_noise_dim must be even"):
        _ladd_discriminator().__class__(_ladd_discriminator().features, c_noise_dim=7)
    with pytest.raises(ValueError, match="got t but the heads were built with c_noise_dim=None"):
        ProjectedDiscriminator(Plain()).classify([torch.randn(2, 4, 9)], t=0.5)


def test_built_inside_a_meta_device_context() -> None:
    """The memory plan builds models under ``torch.device("meta")``: the noise-level table stays real."""
    with torch.device("meta"):
        feats = TeacherFeatures(_PatchNet(), FlowSchedule(shift=3.0), ["blocks.0"], channels=[16])
    t = feats.sample_t(4, generator=torch.Generator().manual_seed(0))
    assert t.device.type == "cpu" and bool(((t > 0) & (t < 1)).all())


def test_a_scalar_noise_level_without_text_conditioning() -> None:
    torch.manual_seed(0)
    feats = TeacherFeatures(_PatchNet(), FlowSchedule(), ["blocks.0"], channels=[16])
    D = ProjectedDiscriminator(feats, c_noise_dim=4).eval()
    maps = D.extract(torch.randn(2, 4, 4, 4), t=torch.full((2,), 0.5))
    torch.testing.assert_close(D.classify(maps, t=0.5), D.classify(maps, t=torch.tensor([0.5, 0.5])))
