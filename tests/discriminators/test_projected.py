"""ProjectedDiscriminator: shapes, conditioning, gradient and memory policy, state, precision, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from addkit.discriminators import DiffAugment, ProjectedDiscriminator, TappedFeatures

TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2}
N_TOKENS = (224 // 14) ** 2  # 256 patch tokens per tap at 224


@pytest.fixture(scope="module")
def base() -> ProjectedDiscriminator:
    torch.manual_seed(0)
    return ProjectedDiscriminator.from_dinov2(
        "vit_small_patch14_dinov2", pretrained=False, c_text_dim=8, c_image_dim=6, model_kwargs=TINY
    )


@pytest.fixture
def D(base: ProjectedDiscriminator) -> ProjectedDiscriminator:
    return copy.deepcopy(base)


def _images(batch: int = 2, size: int = 64, **kw: object) -> torch.Tensor:
    return (torch.rand(batch, 3, size, size) * 2 - 1).requires_grad_(bool(kw.get("grad", False)))


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("size", [224, 256, 512])
@pytest.mark.parametrize("cond", ["none", "text", "image", "both"])
def test_output_shapes(size: int, cond: str, base: ProjectedDiscriminator) -> None:
    dims = {"none": (None, None), "text": (8, None), "image": (None, 6), "both": (8, 6)}[cond]
    D = ProjectedDiscriminator(base.features, c_text_dim=dims[0], c_image_dim=dims[1])
    c_text = torch.randn(2, 8) if dims[0] else None
    c_image = torch.randn(2, 6) if dims[1] else None
    with torch.no_grad():
        logits = D(_images(2, size), c_text, c_image)
    assert logits.shape == (2, 5 * N_TOKENS) and logits.dtype == torch.float32
    assert len(D.heads) == len(D.features.taps) == 5


def test_per_head_logits(D: ProjectedDiscriminator) -> None:
    D.eval()
    feats = D.extract(_images())
    c = (torch.randn(2, 8), torch.randn(2, 6))
    heads = D.classify(feats, *c, per_head=True)
    assert [tuple(h.shape) for h in heads] == [(2, N_TOKENS)] * 5
    torch.testing.assert_close(torch.cat(heads, dim=1), D.classify(feats, *c))


def test_conditioning_changes_logits(D: ProjectedDiscriminator) -> None:
    D.eval()
    x = _images()
    feats = D.extract(x)
    a = D.classify(feats, torch.randn(2, 8), torch.randn(2, 6))
    b = D.classify(feats, torch.randn(2, 8), torch.randn(2, 6))
    c = D.classify(feats, torch.randn(2, 8), b.new_zeros(2, 6))
    assert not torch.allclose(a, b) and not torch.allclose(b, c)


def test_generator_step_gradients(D: ProjectedDiscriminator) -> None:
    fake = _images(grad=True)
    D(fake, torch.randn(2, 8), torch.randn(2, 6)).mean().neg().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in D.features.parameters())


def test_discriminator_step_gradients_only_heads(D: ProjectedDiscriminator) -> None:
    fake = _images(grad=True)
    real = _images()
    c = (torch.randn(2, 8), torch.randn(2, 6))
    loss = torch.relu(1 - D(real, *c)).mean() + torch.relu(1 + D(fake.detach(), *c)).mean()
    loss.backward()
    assert fake.grad is None
    assert all(p.grad is None for p in D.features.parameters())
    assert all(p.grad is not None for p in D.heads.parameters())
    assert {n.split(".")[0] for n, _ in D.named_parameters()} == {"heads"}


def test_r1_on_head_inputs(D: ProjectedDiscriminator) -> None:
    feats = [f.requires_grad_() for f in D.extract(_images())]
    logits = D.classify(feats, torch.randn(2, 8), torch.randn(2, 6))
    grads = torch.autograd.grad(logits.sum(), feats, create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    assert all(p.grad is None for p in D.features.parameters())
    assert sum(p.grad is not None for p in D.heads.parameters()) > 0


def test_discriminator_step_with_addkit_losses(D: ProjectedDiscriminator) -> None:
    """ADD's D step: hinge on per-head logits + gamma * R1 on the head inputs (features)."""
    from addkit.losses import hinge_d_loss, r1_penalty

    c = (torch.randn(2, 8), torch.randn(2, 6))
    real_feats = [f.requires_grad_() for f in D.extract(_images())]
    real = D.classify(real_feats, *c, per_head=True)
    fake = D(_images(grad=True).detach(), *c, per_head=True)
    loss = hinge_d_loss(real, fake) + 1e-5 * r1_penalty(real, real_feats)
    loss.backward()
    assert all(p.grad is None for p in D.features.parameters())
    assert all(p.grad is not None for p in D.heads.parameters())


def test_real_path_keeps_no_graph(D: ProjectedDiscriminator) -> None:
    real = _images()
    feats = D.extract(real)
    assert all(f.grad_fn is None and not f.requires_grad for f in feats)
    real_graph = _graph_names(D.classify(feats, torch.randn(2, 8), torch.randn(2, 6)))
    fake_graph = _graph_names(D(_images(grad=True), torch.randn(2, 8), torch.randn(2, 6)))
    assert "GeluBackward0" in fake_graph and "GeluBackward0" not in real_graph  # no ViT in the real graph


def test_train_keeps_features_frozen(D: ProjectedDiscriminator) -> None:
    D.train()
    assert D.training and D.heads.training and not D.features.training
    D.requires_grad_(True)
    assert not any(p.requires_grad for p in D.features.parameters())


def test_state_dict_holds_heads_only(D: ProjectedDiscriminator, base: ProjectedDiscriminator) -> None:
    keys = D.state_dict().keys()
    assert keys and all(k.startswith("heads.") for k in keys)
    full = D.state_dict(include_features=True)
    assert any(k.startswith("features.model.") for k in full)
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
        next(other.features.parameters()).add_(1.0)
    other.load_state_dict(full)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            D.state_dict(include_features=True).values(), other.state_dict(include_features=True).values()
        )
    )


def test_to_moves_the_feature_network(D: ProjectedDiscriminator) -> None:
    D.to(torch.float64)
    assert next(D.features.parameters()).dtype == torch.float64
    assert next(D.heads.parameters()).dtype == torch.float64
    assert (
        D(_images().double(), torch.randn(2, 8).double(), torch.randn(2, 6).double()).dtype == torch.float32
    )


def test_bf16_autocast_and_channels_last(D: ProjectedDiscriminator) -> None:
    x = _images(2, 256).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = D(x, torch.randn(2, 8), torch.randn(2, 6))
    assert (
        logits.shape == (2, 5 * N_TOKENS) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    )
    D.features.to(torch.bfloat16)  # bf16 backbone, float32 heads, no autocast
    assert torch.isfinite(D(x.bfloat16(), torch.randn(2, 8), torch.randn(2, 6))).all()


def test_augmentation_train_only_and_reproducible(D: ProjectedDiscriminator) -> None:
    D.augment = DiffAugment()
    x = _images()
    a = D.extract(x, generator=torch.Generator().manual_seed(0))
    b = D.extract(x, generator=torch.Generator().manual_seed(0))
    c = D.extract(x, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not torch.equal(a[0], c[0])
    D.eval()
    assert all(torch.equal(p, q) for p, q in zip(D.extract(x), ProjectedDiscriminator(D.features).extract(x)))


def test_user_feature_network_plugs_in() -> None:
    class Mine(nn.Module):
        """A user's own FeatureNetwork: two taps of a tiny CNN, no addkit base class."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 4, stride=4)
            self.b = nn.Conv2d(8, 12, 2, stride=2)

        @property
        def channels(self) -> list[int]:
            return [8, 12]

        def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
            h = self.a(images)
            return [h.flatten(2), self.b(h).flatten(2)]

    mine = Mine()
    D = ProjectedDiscriminator(mine, c_image_dim=4)
    assert not any(p.requires_grad for p in mine.parameters()) and not mine.training
    assert D(_images(3, 32), c_image=torch.randn(3, 4)).shape == (3, 64 + 16)
    tapped = ProjectedDiscriminator(
        TappedFeatures(nn.Sequential(mine.a, nn.ReLU(), mine.b), ["1", "2"], resolution=32)
    )
    assert tapped(_images(3, 32)).shape == (3, 64 + 16)


def test_bad_inputs(D: ProjectedDiscriminator) -> None:
    x, ct, ci = _images(), torch.randn(2, 8), torch.randn(2, 6)
    with pytest.raises(
        ValueError, match=r"ProjectedDiscriminator.classify: c_text must have shape \(2, 8\), got \(2, 5\)"
    ):
        D(x, torch.randn(2, 5), ci)
    with pytest.raises(
        ValueError, match=r"ProjectedDiscriminator.classify: c_image must have shape \(2, 6\), got \(3, 6\)"
    ):
        D(x, ct, torch.randn(3, 6))
    with pytest.raises(
        ValueError, match=r"ProjectedDiscriminator.classify: c_image is required \(built with c_image_dim=6\)"
    ):
        D(x, ct)
    with pytest.raises(
        ValueError,
        match="ProjectedDiscriminator.classify: got c_text but the discriminator was built with c_text_dim",
    ):
        ProjectedDiscriminator(D.features)(x, ct)
    with pytest.raises(
        ValueError, match=r"DINOv2Features: images must have 3 channels .* got shape \(2, 4, 64, 64\)"
    ):
        D(torch.zeros(2, 4, 64, 64), ct, ci)
    with pytest.raises(
        ValueError, match=r"DINOv2Features: images must have 4 dimensions .* got shape \(3, 64, 64\)"
    ):
        D(torch.zeros(3, 64, 64), ct, ci)
    with pytest.raises(
        TypeError, match="ProjectedDiscriminator.extract: images must be a floating-point tensor"
    ):
        D(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), ct, ci)
    with pytest.raises(
        ValueError,
        match=r"ProjectedDiscriminator.classify: expected 5 feature tensors \(one per head\), got 4",
    ):
        D.classify(D.extract(x)[:4], ct, ci)
    with pytest.raises(TypeError, match="ProjectedDiscriminator: features must be a FeatureNetwork"):
        ProjectedDiscriminator(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"DINOv2Features: taps\[0\]=9 is not a tap of this ViT"):
        ProjectedDiscriminator.from_dinov2(
            "vit_small_patch14_dinov2", pretrained=False, taps=[9], model_kwargs=TINY
        )
