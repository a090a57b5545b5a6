"""DINOv2Features (timm) and CLIPFeatures (open_clip) built with random weights, offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from einops import rearrange

from addkit.discriminators import CLIPFeatures, DINOv2Features, default_taps

TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2}


def _tiny_dinov2(**kwargs: object) -> DINOv2Features:
    return DINOv2Features.from_timm(
        "vit_small_patch14_dinov2", pretrained=False, resolution=56, **TINY, **kwargs
    )


def test_import_loads_no_optional_package() -> None:
    code = (
        "import sys, addkit.discriminators; "
        "print(sorted({'timm', 'open_clip', 'diffusers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_default_taps() -> None:
    assert default_taps(12) == ("embed", 2, 5, 8, 11)
    assert default_taps(24) == ("embed", 5, 11, 17, 23)
    assert default_taps(2) == ("embed", 0, 1)


def test_dinov2_vit_s14_default_layout() -> None:
    """The real ViT-S/14 architecture (random weights): five taps of 384 x 256 tokens at 224."""
    feats = DINOv2Features.from_timm("vit_small_patch14_dinov2", pretrained=False)
    assert feats.taps == ["embed", 2, 5, 8, 11] and feats.channels == [384] * 5
    assert feats.resolution == 224
    with torch.no_grad():
        out = feats(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert [tuple(f.shape) for f in out] == [(1, 384, 256)] * 5


def test_dinov2_taps_match_timm_reference() -> None:
    feats = _tiny_dinov2(taps=[3, "embed", 1])
    m = feats.model
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    out = feats(x)
    # independent reference: run the timm blocks by hand on the normalised input
    mean, std = torch.tensor(m.pretrained_cfg["mean"]), torch.tensor(m.pretrained_cfg["std"])
    h = m._pos_embed(m.patch_embed(((x + 1) / 2 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)))
    ref = {"embed": h}
    for i, blk in enumerate(m.blocks):
        h = blk(h)
        ref[i] = h
    for tap, got in zip([3, "embed", 1], out):
        tokens = ref[tap][:, 1:] + ref[tap][:, :1]  # "add" readout
        torch.testing.assert_close(got, rearrange(tokens, "b n c -> b c n"))


def test_dinov2_drop_readout_and_registers() -> None:
    x = torch.rand(1, 3, 56, 56) * 2 - 1
    add = _tiny_dinov2(taps=[0])
    drop = DINOv2Features(add.model, taps=[0], readout="drop")
    assert not torch.allclose(add(x)[0], drop(x)[0])
    reg = DINOv2Features.from_timm("vit_small_patch14_reg4_dinov2", pretrained=False, resolution=56, **TINY)
    assert [tuple(f.shape) for f in reg(x)] == [(1, 32, 16)] * 5  # 4 registers + CLS dropped


def test_dinov2_frozen_and_gradient_to_images() -> None:
    feats = _tiny_dinov2()
    feats.train()
    assert not feats.training and not feats.model.training
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    sum(f.sum() for f in feats(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in feats.parameters())


def test_dinov2_local_weights_file(tmp_path: Path) -> None:
    src = _tiny_dinov2()
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(src.model.state_dict(), path)
    loaded = DINOv2Features.from_timm("vit_small_patch14_dinov2", pretrained=str(path), resolution=56, **TINY)
    for (name, a), (_, b) in zip(src.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_dinov2_bad_inputs() -> None:
    with pytest.raises(
        ValueError, match=r"DINOv2Features: taps\[1\]=4 is not a tap of this ViT; .* 0\.\.3 \(depth 4\)"
    ):
        _tiny_dinov2(taps=["embed", 4])
    with pytest.raises(ValueError, match=r"DINOv2Features: taps\[0\]='cls' is not a tap"):
        _tiny_dinov2(taps=["cls"])
    feats = _tiny_dinov2()
    with pytest.raises(
        ValueError, match="DINOv2Features: resolution=112 differs from the model's img_size 56"
    ):
        DINOv2Features(feats.model, resolution=112)
    with pytest.raises(TypeError, match="DINOv2Features: model must be a timm VisionTransformer, got Linear"):
        DINOv2Features(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="DINOv2Features: readout must be one of 'add', 'drop'; got 'mean'"):
        DINOv2Features(feats.model, readout="mean")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"DINOv2Features: images must have 3 channels .* got shape \(1, 1, 56, 56\)"
    ):
        feats(torch.zeros(1, 1, 56, 56))
    with pytest.raises(ValueError, match="DINOv2Features: images must have 4 dimensions"):
        feats(torch.zeros(3, 56, 56))


def _tiny_visual() -> torch.nn.Module:
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=4, heads=2, mlp_ratio=2.0, output_dim=16
    )


def test_clip_tiny_tower_taps() -> None:
    visual = _tiny_visual()
    feats = CLIPFeatures(visual)
    assert feats.taps == ["embed", 0, 1, 2, 3] and feats.channels == [32] * 5 and feats.resolution == 32
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = feats(x)
    assert [tuple(f.shape) for f in out] == [(2, 32, 16)] * 5
    # the embedding tap is the input of the first block, with the class token added
    x_in = (x + 1) / 2
    x_in = torch.nn.functional.interpolate(x_in, size=(32, 32), mode="area")
    mean, std = feats.mean, feats.std  # OpenAI CLIP statistics (no image_mean on a bare tower)
    h = visual._embeds((x_in - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    torch.testing.assert_close(out[0], rearrange(h[:, 1:] + h[:, :1], "b n c -> b c n"))
    with pytest.raises(ValueError, match=r"CLIPFeatures: taps\[0\]=7 is not a tap"):
        CLIPFeatures(visual, taps=[7])
    with pytest.raises(TypeError, match="CLIPFeatures: visual must be an open_clip VisionTransformer"):
        CLIPFeatures(torch.nn.Linear(2, 2))


def test_clip_from_open_clip_random_weights() -> None:
    feats = CLIPFeatures.from_open_clip("ViT-B-32", pretrained=False)
    assert feats.taps == ["embed", 2, 5, 8, 11] and feats.channels == [768] * 5
    with torch.no_grad():
        out = feats(torch.rand(1, 3, 512, 512) * 2 - 1)
    assert [tuple(f.shape) for f in out] == [(1, 768, 49)] * 5


def test_dinov2_without_class_token() -> None:
    kwargs = {"class_token": False, "global_pool": "avg", **TINY}
    with pytest.raises(ValueError, match="DINOv2Features: readout='add' needs a class token"):
        DINOv2Features.from_timm("vit_small_patch14_dinov2", pretrained=False, resolution=56, **kwargs)
    feats = DINOv2Features.from_timm(
        "vit_small_patch14_dinov2", pretrained=False, resolution=56, readout="drop", **kwargs
    )
    assert [tuple(f.shape) for f in feats(torch.zeros(1, 3, 56, 56))] == [(1, 32, 16)] * 5
