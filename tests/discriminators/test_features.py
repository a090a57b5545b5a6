"""TappedFeatures and the shared helpers: taps, scoped hooks, freezing, pre-processing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from addkit.discriminators import FeatureNetwork, ProjectedDiscriminator, TappedFeatures
from addkit.discriminators.features import preprocess_images, to_tokens


class _Net(nn.Module):
    """A small CNN whose last stage can be made to fail, counting stage calls."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.5)
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.last = nn.Conv2d(16, 4, 1)
        self.fail = fail
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage(self.drop(self.stem(x)))
        self.calls += 1
        if self.fail:
            raise RuntimeError("boom")
        return self.last(x)


def _no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_tapped_shapes_order_and_inferred_channels() -> None:
    feats = TappedFeatures(_Net(), ["stage", "stem"], resolution=32)
    assert isinstance(feats, FeatureNetwork)
    assert feats.channels == [16, 8]
    out = feats(torch.rand(2, 3, 48, 48) * 2 - 1)
    assert [tuple(f.shape) for f in out] == [(2, 16, 64), (2, 8, 256)]
    assert _no_hooks(feats.module)


def test_stop_early_skips_the_rest_of_the_forward() -> None:
    net = _Net()
    feats = TappedFeatures(net, ["stem"], channels=[8], resolution=16)
    feats(torch.zeros(1, 3, 16, 16))
    assert net.calls == 0  # stopped after the stem, before the counter
    TappedFeatures(net, ["stem"], channels=[8], resolution=16, stop_early=False)(torch.zeros(1, 3, 16, 16))
    assert net.calls == 1


def test_hooks_removed_on_error() -> None:
    net = _Net(fail=True)
    feats = TappedFeatures(net, ["stage"], channels=[16], resolution=16, stop_early=False)
    with pytest.raises(RuntimeError, match="boom"):
        feats(torch.zeros(1, 3, 16, 16))
    assert _no_hooks(net)


def test_frozen_eval_and_gradient_to_images() -> None:
    feats = TappedFeatures(_Net(), ["stage"], resolution=16)
    feats.train()
    assert not feats.training and not feats.module.drop.training
    assert not any(p.requires_grad for p in feats.parameters())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    feats(x)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in feats.parameters())


def test_preprocess_resizes_and_normalises() -> None:
    mean, std = torch.tensor([0.5, 0.25, 0.75]), torch.tensor([0.5, 0.25, 0.25])
    x = (2 * mean - 1).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    y = preprocess_images(x, 4, mean, std)
    assert y.shape == (2, 3, 4, 4) and torch.allclose(y, torch.zeros_like(y), atol=1e-6)
    assert preprocess_images(torch.zeros(1, 3, 4, 4), 8).shape == (1, 3, 8, 8)  # upsampling
    ones = torch.ones(1, 3, 4, 4)
    assert torch.allclose(preprocess_images(ones, None, mean, std), ((1 - mean) / std).view(1, 3, 1, 1))


def test_to_tokens_layouts() -> None:
    assert to_tokens(torch.zeros(2, 5, 3, 4)).shape == (2, 5, 12)
    seq = torch.randn(2, 7, 5)
    assert torch.equal(to_tokens(seq), seq.transpose(1, 2))
    with pytest.raises(
        ValueError, match=r"to_tokens: feature must be a token sequence .* got shape \(2, 5\)"
    ):
        to_tokens(torch.zeros(2, 5))


def test_select_for_tuple_outputs() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x[:, :1], x

    net = nn.Sequential(nn.Conv2d(3, 6, 1), Pair())
    first = TappedFeatures(net, ["1"], resolution=8)
    second = TappedFeatures(net, ["1"], resolution=8, select=lambda out: out[1])
    assert first.channels == [1] and second.channels == [6]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"TappedFeatures: taps\[1\]='nope' is not a submodule of _Net"):
        TappedFeatures(_Net(), ["stem", "nope"])
    with pytest.raises(ValueError, match="TappedFeatures: taps must be distinct"):
        TappedFeatures(_Net(), ["stem", "stem"])
    with pytest.raises(ValueError, match="TappedFeatures: pass both mean and std"):
        TappedFeatures(_Net(), ["stem"], mean=[0.5] * 3)
    with pytest.raises(TypeError, match="TappedFeatures: module must be an nn.Module"):
        TappedFeatures(lambda x: x, ["stem"])  # type: ignore[arg-type]
    feats = TappedFeatures(_Net(), ["stem"], channels=[8], resolution=16)
    with pytest.raises(
        ValueError, match=r"TappedFeatures: images must have 3 channels .* got shape \(2, 4, 16, 16\)"
    ):
        feats(torch.zeros(2, 4, 16, 16))
    with pytest.raises(
        ValueError, match=r"TappedFeatures: images must have 4 dimensions .* got shape \(3, 16, 16\)"
    ):
        feats(torch.zeros(3, 16, 16))


def test_channels_probe_follows_module_dtype() -> None:
    feats = TappedFeatures(_Net().to(torch.float64), ["stage"], resolution=16)
    assert feats.channels == [16]
    assert feats(torch.zeros(1, 3, 16, 16, dtype=torch.float64))[0].dtype == torch.float64


def test_in_channels_latent_network_plugs_into_the_discriminator() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    mean, std = [0.5, 0.4, 0.6, 0.5], [0.25, 0.5, 0.2, 0.3]
    feats = TappedFeatures(net, ["1", "2"], resolution=None, mean=mean, std=std, in_channels=4)
    assert feats.channels == [8, 8]  # read from a 4-channel probe
    x = torch.rand(2, 4, 16, 16) * 2 - 1
    normalised = ((x + 1) / 2 - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(feats(x)[0], net[1](net[0](normalised)).flatten(2))
    logits = ProjectedDiscriminator(feats, c_text_dim=None)(x)
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    wrong = r"TappedFeatures: images must have 4 channels .* got shape \(2, 3, 16, 16\)"
    with pytest.raises(ValueError, match=wrong):
        feats(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"TappedFeatures: mean must have one value per input channel \(4\)"):
        TappedFeatures(net, ["1"], mean=[0.5] * 3, std=[0.5] * 3, in_channels=4)
    with pytest.raises(ValueError, match=r"TappedFeatures: in_channels must be a positive integer, got 0"):
        TappedFeatures(net, ["1"], in_channels=0)
