"""Tests for addkit.losses.adversarial_registry: adversarial losses by name or as a pair."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from addkit.losses import (
    ADVERSARIAL_LOSSES,
    AdversarialLoss,
    AdversarialLossName,
    HingeDLoss,
    HingeGLoss,
    adversarial_loss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)


def _d(real, fake):
    return torch.stack([f.mean() - r.mean() for r, f in zip(real, fake, strict=True)]).sum()


def _g(fake):
    return -torch.stack([f.mean() for f in fake]).sum()


def test_names_resolve_to_the_loss_functions() -> None:
    assert set(ADVERSARIAL_LOSSES) == set(get_args(AdversarialLossName)) == {"hinge", "non_saturating"}
    hinge, ns = adversarial_loss("hinge"), adversarial_loss("non_saturating")
    assert (hinge.d_loss, hinge.g_loss, hinge.name) == (hinge_d_loss, hinge_g_loss, "hinge")
    assert (ns.d_loss, ns.g_loss, ns.name) == (non_saturating_d_loss, non_saturating_g_loss, "non_saturating")
    assert hinge is ADVERSARIAL_LOSSES["hinge"]
    with pytest.raises(TypeError):
        ADVERSARIAL_LOSSES["wgan"] = AdversarialLoss(_d, _g)  # type: ignore[index]


def test_a_pair_is_returned_as_it_is() -> None:
    pair = AdversarialLoss(_d, _g, name="wasserstein")
    assert adversarial_loss(pair) is pair
    assert repr(pair) == "AdversarialLoss(_d, _g, name='wasserstein')"
    assert AdversarialLoss(_d, _g).name == "custom"


def test_module_instances_work_as_members() -> None:
    pair = AdversarialLoss(HingeDLoss(), HingeGLoss())
    real, fake = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(pair.d_loss(real, fake), hinge_d_loss(real, fake))
    torch.testing.assert_close(pair.g_loss(fake), hinge_g_loss(fake))


def test_bad_losses_raise_clear_errors() -> None:
    unknown = "adversarial_loss: loss must be one of 'hinge', 'non_saturating'; got 'wgan'"
    with pytest.raises(ValueError, match=unknown):
        adversarial_loss("wgan")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got tuple: wrap the pair as AdversarialLoss\(d_loss, g_loss\)"):
        adversarial_loss((_d, _g))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss must be one of .* or an AdversarialLoss, got NoneType"):
        adversarial_loss(None)  # type: ignore[arg-type]
    usage = r"d_loss must be callable as d_loss\(real_logits, fake_logits\)"
    with pytest.raises(TypeError, match=usage + ", got int"):
        AdversarialLoss(1, _g)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"g_loss is the class HingeGLoss: pass an instance, e.g. HingeGLoss\("):
        AdversarialLoss(_d, HingeGLoss)
    with pytest.raises(TypeError, match=usage + r", but _g has signature \(fake\)"):
        AdversarialLoss(_g, _d)  # swapped
    with pytest.raises(TypeError, match="name must be a str, got int"):
        AdversarialLoss(_d, _g, name=3)  # type: ignore[arg-type]
