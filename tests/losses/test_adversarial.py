"""Tests for addkit.losses.adversarial: hinge and non-saturating GAN losses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from addkit.checks import value_checks
from addkit.losses import (
    HingeDLoss,
    HingeGLoss,
    NonSaturatingDLoss,
    NonSaturatingGLoss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)

D_LOSSES = [(hinge_d_loss, HingeDLoss), (non_saturating_d_loss, NonSaturatingDLoss)]
G_LOSSES = [(hinge_g_loss, HingeGLoss), (non_saturating_g_loss, NonSaturatingGLoss)]
ALL_FUNCTIONS = [f for f, _ in D_LOSSES + G_LOSSES]

REAL = torch.tensor([[2.0, 0.5], [0.0, -1.0]])
FAKE = torch.tensor([[-1.0, 0.0], [3.0, -2.0]])


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def _call(fn, real, fake, **kwargs):
    """Call a D loss with (real, fake) or a G loss with fake only."""
    if fn in (hinge_d_loss, non_saturating_d_loss):
        return fn(real, fake, **kwargs)
    return fn(fake, **kwargs)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- known values -------------------------------------------------------------------------


def test_hinge_hand_computed():
    # sample 0: real relu(1-2)=0, relu(1-.5)=.5 -> .25; fake relu(0)=0, relu(1)=1 -> .5
    # sample 1: real 1, 2 -> 1.5; fake relu(4)=4, relu(-1)=0 -> 2
    torch.testing.assert_close(
        hinge_d_loss(REAL, FAKE, reduction="none"), torch.tensor([0.75, 3.5])
    )
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(2.125)
    assert hinge_d_loss(REAL, FAKE, reduction="sum").item() == pytest.approx(4.25)
    torch.testing.assert_close(hinge_g_loss(FAKE, reduction="none"), torch.tensor([0.5, -0.5]))


def test_non_saturating_hand_computed():
    d = [
        sum(_softplus(-r) for r in REAL[b].tolist()) / 2
        + sum(_softplus(f) for f in FAKE[b].tolist()) / 2
        for b in range(2)
    ]
    g = [sum(_softplus(-f) for f in FAKE[b].tolist()) / 2 for b in range(2)]
    torch.testing.assert_close(non_saturating_d_loss(REAL, FAKE, reduction="none"), torch.tensor(d))
    torch.testing.assert_close(non_saturating_g_loss(FAKE, reduction="none"), torch.tensor(g))


def test_hinge_is_zero_once_margins_hold():
    real = (1 + _randn(4, 6).abs()).requires_grad_(True)
    fake = (-1 - _randn(4, 6, seed=1).abs()).requires_grad_(True)
    loss = hinge_d_loss(real, fake)
    assert loss.item() == 0.0
    loss.backward()
    assert real.grad.abs().sum() == 0 and fake.grad.abs().sum() == 0


def test_weight_multiplies_per_sample_loss():
    w = torch.tensor([2.0, 0.0])
    for fn in ALL_FUNCTIONS:
        torch.testing.assert_close(
            _call(fn, REAL, FAKE, reduction="none", weight=w),
            w * _call(fn, REAL, FAKE, reduction="none"),
        )


# --- heads: list vs concatenated ----------------------------------------------------------


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_one_head_list_equals_tensor(fn):
    real, fake = _randn(3, 5), _randn(3, 5, seed=1)
    torch.testing.assert_close(_call(fn, [real], [fake]), _call(fn, real, fake))


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_list_sums_heads_concatenation_averages_them(fn):
    # equal token counts: the sum over H heads is H times the concatenated (StyleGAN-T) mean
    real = [_randn(3, 4, seed=s) for s in range(3)]
    fake = [_randn(3, 4, seed=10 + s) for s in range(3)]
    as_list = _call(fn, real, fake, reduction="none")
    concatenated = _call(fn, torch.cat(real, 1), torch.cat(fake, 1), reduction="none")
    torch.testing.assert_close(as_list, 3 * concatenated)


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_concatenation_weights_heads_by_token_count(fn):
    sizes = (1, 3, 6)
    real = [_randn(2, k, seed=k) for k in sizes]
    fake = [_randn(2, k, seed=10 + k) for k in sizes]
    per_head = [_call(fn, r, f, reduction="none") for r, f in zip(real, fake, strict=True)]
    expected = sum(k / sum(sizes) * h for k, h in zip(sizes, per_head, strict=True))
    concatenated = _call(fn, torch.cat(real, 1), torch.cat(fake, 1), reduction="none")
    torch.testing.assert_close(concatenated, expected)
    torch.testing.assert_close(_call(fn, real, fake, reduction="none"), sum(per_head))


# --- module == function, gradcheck, reductions --------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_equals_function(reduction):
    real, fake, w = (
        [_randn(3, 4), _randn(3, 2)],
        [_randn(3, 4, seed=1), _randn(3, 2, seed=2)],
        _randn(3),
    )
    for fn, module in D_LOSSES:
        torch.testing.assert_close(
            module(reduction=reduction)(real, fake, w),
            fn(real, fake, reduction=reduction, weight=w),
        )
    for fn, module in G_LOSSES:
        torch.testing.assert_close(
            module(reduction)(fake, w), fn(fake, reduction=reduction, weight=w)
        )
    assert repr(HingeDLoss("sum")) == "HingeDLoss(reduction='sum')"


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_gradcheck(fn):
    real = [
        _randn(2, 3, seed=1, dtype=torch.float64).requires_grad_(True),
        _randn(2, 2, seed=2, dtype=torch.float64).requires_grad_(True),
    ]
    fake = [
        _randn(2, 3, seed=3, dtype=torch.float64).requires_grad_(True),
        _randn(2, 2, seed=4, dtype=torch.float64).requires_grad_(True),
    ]
    weight = torch.tensor([0.5, 2.0], dtype=torch.float64)
    if fn in (hinge_d_loss, non_saturating_d_loss):
        assert torch.autograd.gradcheck(lambda *t: fn(t[:2], t[2:], weight=weight), (*real, *fake))
    else:
        assert torch.autograd.gradcheck(lambda *t: fn(t, weight=weight), tuple(fake))


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
def test_output_shapes(fn):
    real, fake = _randn(5, 3), _randn(5, 3, seed=1)
    assert _call(fn, real, fake).shape == ()
    assert _call(fn, real, fake, reduction="sum").shape == ()
    assert _call(fn, real, fake, reduction="none").shape == (5,)


@settings(deadline=None, max_examples=25)
@given(
    batch=st.integers(1, 6),
    tokens=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_reductions_and_batch_permutation_invariance(batch, tokens, seed):
    real = [_randn(batch, k, seed=seed + i) * 3 for i, k in enumerate(tokens)]
    fake = [_randn(batch, k, seed=seed + 100 + i) * 3 for i, k in enumerate(tokens)]
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    for fn in ALL_FUNCTIONS:
        none = _call(fn, real, fake, reduction="none")
        torch.testing.assert_close(_call(fn, real, fake), none.mean())
        torch.testing.assert_close(_call(fn, real, fake, reduction="sum"), none.sum())
        permuted = _call(fn, [r[perm] for r in real], [f[perm] for f in fake], reduction="none")
        torch.testing.assert_close(permuted, none[perm])
        torch.testing.assert_close(permuted.mean(), none.mean())


# --- bad inputs ---------------------------------------------------------------------------


def test_mismatched_real_fake_shapes():
    with pytest.raises(
        ValueError,
        match=r"hinge_d_loss: real_logits and fake_logits must have the same shape, "
        r"got \(8, 1\) and \(8, 5\)",
    ):
        hinge_d_loss(torch.zeros(8, 1), torch.zeros(8, 5))
    with pytest.raises(
        ValueError, match=r"real_logits\[1\] and fake_logits\[1\] must have the same shape"
    ):
        non_saturating_d_loss(
            [torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2, 3), torch.zeros(2, 5)]
        )
    with pytest.raises(ValueError, match="same number of heads, got 2 and 1"):
        hinge_d_loss([torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)])


def test_heads_with_different_batch_sizes():
    with pytest.raises(
        ValueError,
        match="every head of fake_logits must have the same batch size, "
        "got 2 for head 0 and 3 for head 1",
    ):
        hinge_g_loss([torch.zeros(2, 3), torch.zeros(3, 3)])


def test_nan_logits():
    bad = torch.tensor([[0.0, float("nan")]])
    # by default a NaN flows into the loss (no device read); a trainer skips the step
    assert torch.isnan(hinge_d_loss(torch.zeros(1, 2), bad))
    assert torch.isnan(non_saturating_g_loss([torch.zeros(1, 2), bad]))
    with value_checks():
        with pytest.raises(ValueError, match=r"hinge_d_loss: fake_logits must be finite, got 1 NaN"):
            hinge_d_loss(torch.zeros(1, 2), bad)
        with pytest.raises(ValueError, match=r"non_saturating_g_loss: fake_logits\[1\] must be finite"):
            non_saturating_g_loss([torch.zeros(1, 2), bad])


def test_bad_reduction_and_weight():
    with pytest.raises(
        ValueError, match="hinge_g_loss: reduction must be one of 'mean', 'sum', 'none'; got 'avg'"
    ):
        hinge_g_loss(torch.zeros(2, 3), reduction="avg")
    with pytest.raises(ValueError, match="HingeDLoss: reduction must be one of"):
        HingeDLoss(reduction="avg")
    with pytest.raises(
        ValueError,
        match=r"hinge_d_loss: weight must have shape \(2,\) \(one value per sample\), got \(3,\)",
    ):
        hinge_d_loss(torch.zeros(2, 3), torch.zeros(2, 3), weight=torch.ones(3))


def test_bad_logit_types_and_ranks():
    with pytest.raises(
        ValueError,
        match=r"hinge_g_loss: fake_logits must have 2 dimensions "
        r"\(\[batch, tokens\]; pass several heads as a list\), got shape \(4,\)",
    ):
        hinge_g_loss(torch.zeros(4))
    with pytest.raises(TypeError, match=r"must be a floating-point tensor, got dtype torch\.int64"):
        hinge_g_loss(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(
        TypeError,
        match=r"fake_logits must be a \[B, K\] tensor or a non-empty sequence of them, "
        r"got list \(empty\)",
    ):
        hinge_g_loss([])
    with pytest.raises(TypeError, match="got ndarray"):
        hinge_g_loss(torch.zeros(2, 3).numpy())
