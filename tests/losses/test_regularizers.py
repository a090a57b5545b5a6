"""Tests for addkit.losses.regularizers: R1, approximated R1, lazy regularisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from addkit.checks import value_checks
from addkit.losses import (
    ApproximateR1,
    R1Features,
    R1Images,
    r1_regularizer,
    LazyRegularizer,
    approximate_r1,
    r1_context,
    r1_penalty,
    r1_penalty_images,
)

f64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TokenHead(nn.Module):
    """Per-token linear head on features [B, C, N]: logit_j = <w, f_j> -> [B, N]."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bcn,c->bn", f, self.w)


class SmoothTokenD(nn.Module):
    """Smooth per-token discriminator on [B, N, C]: each token's logit reads only that token."""

    def __init__(self, channels: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class TinyAttentionD(nn.Module):
    """A one-block ViT discriminator using F.scaled_dot_product_attention: images -> [B, N]."""

    def __init__(self, patch: int = 2, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.patch, self.heads = patch, heads
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(F.unfold(x, self.patch, stride=self.patch).transpose(1, 2))
        b, n, d = tokens.shape
        q, k, v = self.qkv(tokens).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.out(torch.tanh(tokens + attn)).squeeze(-1)


# --- exact R1: analytic values ------------------------------------------------------------


def test_r1_of_linear_discriminator_is_weight_norm():
    w = torch.randn(3, 4, 4, generator=_gen(), dtype=f64)
    x = torch.randn(5, 3, 4, 4, generator=_gen(1), dtype=f64, requires_grad=True)
    logits = (x * w).flatten(1).sum(1, keepdim=True)
    expected = w.square().sum().expand(5)
    torch.testing.assert_close(r1_penalty(logits, x, reduction="none"), expected)
    torch.testing.assert_close(r1_penalty(logits, x), expected.mean())
    torch.testing.assert_close(r1_penalty(logits, x, reduction="sum"), expected.sum())


def test_r1_of_per_token_head_is_tokens_times_weight_norm():
    heads = [TokenHead(torch.randn(c, generator=_gen(c), dtype=f64)) for c in (3, 5)]
    feats = [
        torch.randn(2, c, n, generator=_gen(n), dtype=f64, requires_grad=True)
        for c, n in ((3, 7), (5, 4))
    ]
    logits = [h(f) for h, f in zip(heads, feats, strict=True)]
    expected = 7 * heads[0].w.square().sum() + 4 * heads[1].w.square().sum()
    torch.testing.assert_close(
        r1_penalty(logits, feats, reduction="none"), expected.detach().expand(2)
    )


def test_r1_is_zero_for_constant_discriminator():
    x = torch.randn(3, 6, requires_grad=True)
    logits = x @ torch.zeros(6, 2) + 1.5
    torch.testing.assert_close(r1_penalty(logits, x, reduction="none"), torch.zeros(3))


def test_r1_trains_the_discriminator():
    head = TokenHead(torch.randn(4, generator=_gen(), dtype=f64))
    f = torch.randn(3, 4, 6, generator=_gen(1), dtype=f64, requires_grad=True)
    r1 = r1_penalty(head(f), f)
    (grad,) = torch.autograd.grad(r1, head.w)
    torch.testing.assert_close(grad, 2 * 6 * head.w.detach())  # d(N |w|^2)/dw


def test_r1_on_features_leaves_frozen_feature_network_alone():
    features = nn.Sequential(nn.Conv1d(3, 4, 1), nn.GELU()).requires_grad_(False)
    head = TokenHead(torch.randn(4, generator=_gen()))
    images = torch.randn(2, 3, 5, generator=_gen(1))
    f = features(images).detach().requires_grad_(True)
    r1 = r1_penalty(head(f), f)
    torch.testing.assert_close(r1, 5 * head.w.detach().square().sum())
    r1.backward()
    assert head.w.grad is not None and head.w.grad.abs().sum() > 0
    assert all(p.grad is None for p in features.parameters())


# --- exact R1 on images through attention -------------------------------------------------


def test_r1_on_images_through_attention_matches_finite_differences():
    torch.manual_seed(0)
    d = TinyAttentionD().to(f64)
    x = torch.randn(2, 3, 4, 4, generator=_gen(1), dtype=f64)
    r1 = r1_penalty_images(d, x, reduction="none")
    # central differences of the token-summed logit, one perturbed copy per pixel
    eps, dim = 1e-6, x[0].numel()
    basis = torch.eye(dim, dtype=f64).view(dim, *x.shape[1:])
    with torch.no_grad():
        for b in range(2):
            up = d(x[b] + eps * basis).sum(1)
            down = d(x[b] - eps * basis).sum(1)
            fd = ((up - down) / (2 * eps)).square().sum()
            torch.testing.assert_close(r1[b].detach(), fd, rtol=1e-6, atol=1e-9)
    r1.sum().backward()  # the double backward works under the math backend
    assert d.qkv.weight.grad is not None and d.qkv.weight.grad.abs().sum() > 0


def test_fused_attention_has_no_double_backward():
    d = TinyAttentionD()
    x = torch.randn(2, 3, 4, 4, generator=_gen(1)).requires_grad_(True)
    r1 = r1_penalty(d(x), x)  # forward outside r1_context: fused kernel
    with pytest.raises(
        RuntimeError, match=r"derivative for .*scaled_dot_product.* is not implemented"
    ):
        r1.backward()
    with r1_context():
        logits = d(x)
    r1_penalty(logits, x).backward()  # the forward alone decides


# --- approximated R1 ----------------------------------------------------------------------


def test_approximate_r1_tends_to_sigma_squared_r1():
    d = SmoothTokenD().to(f64)
    real = torch.randn(3, 16, 4, generator=_gen(), dtype=f64)
    x = real.clone().requires_grad_(True)
    exact = r1_penalty(d(x), x, reduction="none").detach()
    draws, sigma = 2000, 1e-3
    approx = approximate_r1(
        d, real.repeat(draws, 1, 1), sigma=sigma, generator=_gen(1), reduction="none"
    )
    mc_mean = approx.detach().view(draws, 3).mean(0)
    torch.testing.assert_close(mc_mean, sigma**2 * exact, rtol=0.05, atol=0)


def test_approximate_r1_reuses_logits_and_is_reproducible():
    d = SmoothTokenD()
    real = torch.randn(4, 5, 4, generator=_gen())
    a = approximate_r1(d, real, generator=_gen(3), reduction="none")
    b = approximate_r1(d, real, generator=_gen(3), reduction="none", real_logits=d(real))
    torch.testing.assert_close(a, b)
    assert a.shape == (4,)
    torch.testing.assert_close(approximate_r1(d, real, generator=_gen(3)), a.mean())
    a.sum().backward()
    assert all(p.grad is not None for p in d.parameters())


def test_approximate_r1_passes_conditioning():
    def d(x, *, scale):
        return x.flatten(1) * scale

    real = torch.zeros(2, 3)
    one = approximate_r1(d, real, sigma=0.1, generator=_gen(), scale=1.0, reduction="none")
    two = approximate_r1(d, real, sigma=0.1, generator=_gen(), scale=2.0, reduction="none")
    torch.testing.assert_close(two, 4 * one)


def test_approximate_r1_draws_on_the_generators_device():
    # Data on another device than the generator: the noise is drawn with the generator (which
    # advances exactly as one draw of that shape) and moved. On "meta" data a draw made on the
    # data's device would leave the CPU generator untouched.
    d = lambda x: x.flatten(1)[:, :2]  # noqa: E731
    g, ref = _gen(5), _gen(5)
    approximate_r1(d, torch.empty(2, 3, 4, device="meta"), generator=g)
    torch.randn(2, 3, 4, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


@pytest.mark.cuda
def test_approximate_r1_cpu_generator_with_cuda_data():
    d = lambda x: x.flatten(1)[:, :2] * 3  # noqa: E731
    real = torch.randn(2, 3, 4, device="cuda")
    got = approximate_r1(d, real, sigma=0.1, generator=_gen(7), reduction="none")
    noise = torch.randn(2, 3, 4, generator=_gen(7)).cuda()
    want = (d(real) - d(real + 0.1 * noise)).square().sum(1)
    torch.testing.assert_close(got, want)


def test_approximate_r1_object_same_augmentation_then_fresh_noise():
    seen: list[torch.Tensor] = []

    def d(x, per_head=True, generator=None):
        shift = torch.rand(x.shape[0], 1, generator=generator)  # the "augmentation"
        seen.append(shift)
        return [x.flatten(1)[:, :2] + shift]

    real = torch.randn(3, 4)
    g = _gen(11)
    logits, r1 = ApproximateR1(sigma=0.01)(d, real, generator=g)
    assert torch.equal(seen[0], seen[1])  # clean and perturbed calls: same augmentation
    # the caller's generator moved past the augmentation draw, then drew the perturbation
    ref = _gen(11)
    torch.rand(3, 1, generator=ref)
    noise = torch.randn(3, 4, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
    torch.testing.assert_close(r1, (0.01 * noise[:, :2]).square().sum(1).mean())
    # and next time the augmentation differs
    ApproximateR1()(d, real, generator=g)
    assert not torch.equal(seen[2], seen[0])


def test_r1_objects_match_the_functions():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    d = lambda x, per_head=True, generator=None: [net(x)]  # noqa: E731
    real = torch.randn(2, 3, 2, 2)
    _, r1 = R1Images()(d, real)
    torch.testing.assert_close(r1, r1_penalty_images(lambda x: net(x), real))
    assert r1_regularizer("features").default_gamma == 1e-5
    assert r1_regularizer("approximate", sigma=0.2).sigma == 0.2
    reg = R1Images()
    assert r1_regularizer(reg) is reg
    with pytest.raises(ValueError, match="r1_regularizer: placement must be one of 'features'"):
        r1_regularizer("pixels")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="R1Features: the discriminator must have extract"):
        R1Features()(d, real)


# --- lazy regularisation ------------------------------------------------------------------


def test_lazy_regularizer_fires_every_interval_with_scale():
    lazy = LazyRegularizer(16)
    assert [s for s in range(50) if lazy.due(s)] == [0, 16, 32, 48]
    assert lazy.scale == 16.0
    every = LazyRegularizer(1)
    assert all(every.due(s) for s in range(5)) and every.scale == 1.0
    assert repr(lazy) == "LazyRegularizer(interval=16)"


def test_lazy_regularizer_bad_arguments():
    with pytest.raises(
        ValueError, match="LazyRegularizer: interval must be an integer >= 1, got 0"
    ):
        LazyRegularizer(0)
    with pytest.raises(TypeError, match="LazyRegularizer: interval must be an int, got float"):
        LazyRegularizer(16.0)
    with pytest.raises(
        ValueError, match=r"LazyRegularizer\.due: step must be an integer >= 0, got -1"
    ):
        LazyRegularizer().due(-1)
    with pytest.raises(ValueError, match=r"LazyRegularizer\.due: step is required with interval=16"):
        LazyRegularizer(16).due(None)
    assert LazyRegularizer(1).due(None)


# --- bad inputs ---------------------------------------------------------------------------


def test_r1_input_must_require_grad():
    x = torch.randn(2, 3)
    with pytest.raises(
        ValueError,
        match=r"r1_penalty: real_inputs does not require grad: call \.requires_grad_\(True\)",
    ):
        r1_penalty(torch.zeros(2, 1, requires_grad=True), x)
    f = [torch.randn(2, 3, requires_grad=True), torch.randn(2, 3)]
    with pytest.raises(ValueError, match=r"r1_penalty: real_inputs\[1\] does not require grad"):
        r1_penalty(torch.zeros(2, 1, requires_grad=True), f)


def test_r1_input_must_be_in_graph():
    x, other = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    with pytest.raises(
        ValueError, match="r1_penalty: real_inputs is not part of the graph of real_logits"
    ):
        r1_penalty(x.sum(1, keepdim=True), other)


def test_r1_logits_must_require_grad():
    x = torch.randn(2, 3, requires_grad=True)
    with torch.no_grad():
        logits = x.sum(1, keepdim=True)
    with pytest.raises(
        ValueError, match=r"r1_penalty: real_logits do not require grad.*torch.no_grad"
    ):
        r1_penalty(logits, x)


def test_r1_bad_shapes_values_and_reduction():
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(
        ValueError,
        match=r"r1_penalty: real_inputs must have batch size 2 like real_logits, "
        r"got shape \(3, 4\)",
    ):
        r1_penalty(x[:2].sum(1, keepdim=True), x)
    assert torch.isnan(r1_penalty(x.sum(1, keepdim=True) * float("nan"), x))
    with value_checks(), pytest.raises(ValueError, match="r1_penalty: real_logits must be finite, got 3 NaN"):
        r1_penalty(x.sum(1, keepdim=True) * float("nan"), x)
    with pytest.raises(ValueError, match="r1_penalty: reduction must be one of"):
        r1_penalty(x.sum(1, keepdim=True), x, reduction="batchmean")
    with pytest.raises(
        TypeError, match="r1_penalty_images: real_images must be a floating-point tensor"
    ):
        r1_penalty_images(nn.Identity(), torch.zeros(2, 3, dtype=torch.long))


def test_approximate_r1_bad_arguments():
    d = SmoothTokenD()
    real = torch.randn(2, 5, 4)
    with pytest.raises(
        ValueError, match="approximate_r1: sigma must be a finite positive number, got 0"
    ):
        approximate_r1(d, real, sigma=0)
    with pytest.raises(
        ValueError,
        match=r"approximate_r1: real_logits must match .* got shapes \[\(2, 3\)\] and \[\(2, 5\)\]",
    ):
        approximate_r1(d, real, real_logits=torch.zeros(2, 3))
