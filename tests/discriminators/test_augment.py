"""DiffAugment: determinism, differentiability, each operation's effect, bad input."""

from __future__ import annotations

import pytest
import torch

from addkit.discriminators import DiffAugment, diff_augment


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout", ""])
def test_shape_dtype_preserved(policy: str) -> None:
    x = torch.rand(3, 3, 16, 12, dtype=torch.float64) * 2 - 1
    y = diff_augment(x, policy, generator=_gen())
    assert y.shape == x.shape and y.dtype == x.dtype


def test_deterministic_given_generator() -> None:
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    a = diff_augment(x, generator=_gen(1))
    b = diff_augment(x, generator=_gen(1))
    c = diff_augment(x, generator=_gen(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_gradcheck_float64() -> None:
    x = (torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: diff_augment(t, generator=_gen(3)), (x,))


def test_empty_policy_and_zero_ratios_are_identity() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(diff_augment(x, ""), x)
    y = diff_augment(x, "translation,cutout", generator=_gen(), translation_ratio=0.0, cutout_ratio=0.0)
    assert torch.equal(y, x)


def test_translation_is_a_zero_padded_shift() -> None:
    x = torch.arange(1.0, 1.0 + 2 * 16 * 16).reshape(2, 1, 16, 16).repeat(1, 3, 1, 1)
    y = diff_augment(x, "translation", generator=_gen(5))
    for b in range(2):
        kept = y[b, 0][y[b, 0] != 0]
        # every non-zero output pixel is an input pixel of the same sample, kept in order
        assert set(kept.tolist()) <= set(x[b, 0].flatten().tolist())
        assert torch.all(kept.diff() > 0)
        # shift of at most 16 / 8 = 2 pixels per direction
        assert kept.numel() >= (16 - 2) ** 2


def test_cutout_zeroes_at_most_a_square() -> None:
    x = torch.ones(8, 3, 20, 20)
    y = diff_augment(x, "cutout", generator=_gen(0))
    zeros = (y[:, 0] == 0).flatten(1).sum(1)
    assert torch.all(zeros <= 4 * 4) and torch.all(zeros > 0)
    assert torch.equal(y[:, 0], y[:, 1])  # same mask for all channels


def test_color_on_constant_image_shifts_brightness_only() -> None:
    x = torch.full((6, 3, 4, 4), 0.25)
    y = diff_augment(x, "color", generator=_gen(0))
    shift = y - x
    assert torch.allclose(shift, shift[:, :1, :1, :1].expand_as(shift), atol=1e-6)
    assert torch.all(shift.abs() <= 0.5)


def test_module_equals_function() -> None:
    x = torch.randn(2, 3, 8, 8)
    aug = DiffAugment("color,cutout", cutout_ratio=0.3)
    torch.testing.assert_close(
        aug(x, _gen(4)), diff_augment(x, "color,cutout", generator=_gen(4), cutout_ratio=0.3)
    )


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"diff_augment: policy entry must be one of .*'colour'"):
        diff_augment(torch.zeros(1, 3, 4, 4), "colour")
    with pytest.raises(ValueError, match=r"diff_augment: x must have 4 dimensions .* got shape \(3, 4, 4\)"):
        diff_augment(torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="diff_augment: x must be a floating-point tensor"):
        diff_augment(torch.zeros(1, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="DiffAugment: policy entry must be one of"):
        DiffAugment(["blur"])
