"""Heads: BatchNormLocal against a per-group reference, SampleNorm against a per-sample loop, projection,
spectral norm, R1 double backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from addkit.discriminators import BatchNormLocal, DiscHead, EqualizedLinear, SampleNorm, projection_logits


def _reference_bn(x: torch.Tensor, virtual_batch_size: int, eps: float = 1e-5) -> torch.Tensor:
    groups = math.ceil(x.shape[0] / virtual_batch_size)
    out = [F.batch_norm(g, None, None, training=True, eps=eps) for g in torch.tensor_split(x, groups)]
    return torch.cat(out)


@pytest.mark.parametrize("batch", [1, 3, 8, 9, 12, 16, 20])
def test_batchnormlocal_matches_per_group_batch_norm(batch: int) -> None:
    x = torch.randn(batch, 5, 7, dtype=torch.float64) * 3 + 1
    bn = BatchNormLocal(5)
    torch.testing.assert_close(bn(x), _reference_bn(x, 8))


def test_batchnormlocal_groups_are_balanced_and_contiguous() -> None:
    idx = BatchNormLocal(4).group_index(12)
    assert idx.tolist() == [0] * 6 + [1] * 6  # StyleGAN-T: ceil(12 / 8) = 2 groups of 6
    assert torch.bincount(BatchNormLocal(4).group_index(9)).tolist() == [5, 4]


def test_batchnormlocal_affine_no_running_stats_and_dtype() -> None:
    bn = BatchNormLocal(3, virtual_batch_size=4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(8, 3, 6)
    expect = _reference_bn(x, 4) * bn.weight[:, None] + bn.bias[:, None]
    torch.testing.assert_close(bn(x), expect)
    torch.testing.assert_close(bn.eval()(x), expect)
    assert list(bn.buffers()) == []
    assert bn(x.bfloat16()).dtype == torch.bfloat16


def test_projection_scale() -> None:
    h = torch.ones(2, 64, 5)
    assert torch.allclose(projection_logits(h, torch.ones(2, 64)), torch.full((2, 5), 8.0))
    h, c = torch.randn(3, 16, 4), torch.randn(3, 16)
    torch.testing.assert_close(projection_logits(h, c), (h * c[..., None]).sum(1) / 4.0)


def test_equalized_linear_runtime_gain() -> None:
    lin = EqualizedLinear(16, 4)
    x = torch.randn(2, 16)
    torch.testing.assert_close(lin(x), x @ (lin.weight / 4.0).T + lin.bias)
    assert torch.count_nonzero(lin.bias) == 0


@pytest.mark.parametrize("c_dim", [None, 6])
def test_head_shapes(c_dim: int | None) -> None:
    head = DiscHead(12, c_dim=c_dim, cmap_dim=8)
    c = None if c_dim is None else torch.randn(3, c_dim)
    assert head(torch.randn(3, 12, 10), c).shape == (3, 10)
    assert head.out.out_channels == (8 if c_dim else 1)


def test_conditioning_changes_logits() -> None:
    head = DiscHead(12, c_dim=6).eval()
    x = torch.randn(2, 12, 10)
    assert not torch.allclose(head(x, torch.randn(2, 6)), head(x, torch.randn(2, 6)))


def test_spectral_norm_unit_sigma() -> None:
    head = DiscHead(16, kernel_size=9)
    for _ in range(5):
        head(torch.randn(4, 16, 12))
    conv = head.main[1].fn[0]
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert abs(float(sigma) - 1.0) < 1e-2


@pytest.mark.parametrize("train", [True, False])
def test_r1_double_backward_through_head(train: bool) -> None:
    head = DiscHead(8, c_dim=4).train(train)
    f = torch.randn(4, 8, 10, requires_grad=True)
    logits = head(f, torch.randn(4, 4))
    (grad,) = torch.autograd.grad(logits.sum(), f, create_graph=True)
    grad.square().sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert missing == ["out.bias"]  # the output bias does not depend on the features


def test_samplenorm_matches_a_per_sample_loop() -> None:
    x = torch.randn(5, 4, 7, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64)[:, None, None] + 2
    norm = SampleNorm(4).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    rows = []
    for sample in x:  # one mean and one biased variance per sample, over channels and tokens
        mean = sample.sum() / sample.numel()
        var = ((sample - mean) ** 2).sum() / sample.numel()
        rows.append((sample - mean) / torch.sqrt(var + 1e-5) * norm.weight[:, None] + norm.bias[:, None])
    torch.testing.assert_close(norm(x), torch.stack(rows))
    assert list(norm.buffers()) == [] and norm(x.float().bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("norm", ["sample", "batch"])
def test_head_logits_of_a_sample_alone_or_in_a_batch(norm: str) -> None:
    """SampleNorm heads score each sample alone; BatchNormLocal heads depend on the batch."""
    head = DiscHead(8, c_dim=4, norm=norm).eval()
    x, c = torch.randn(6, 8, 12), torch.randn(6, 4)
    with torch.no_grad():
        together = head(x, c)
        alone = torch.cat([head(x[i : i + 1], c[i : i + 1]) for i in range(6)])
    if norm == "sample":
        torch.testing.assert_close(together, alone)
    else:
        assert not torch.allclose(together, alone, atol=1e-3)
    with pytest.raises(ValueError, match="DiscHead: norm must be one of 'sample', 'batch'; got 'layer'"):
        DiscHead(8, norm="layer")


def test_head_under_bf16_autocast() -> None:
    head = DiscHead(8, c_dim=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(2, 8, 10), torch.randn(2, 4))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_head_bad_inputs() -> None:
    head = DiscHead(8, c_dim=4)
    with pytest.raises(ValueError, match=r"DiscHead: x must have 8 channels, got shape \(2, 6, 10\)"):
        head(torch.randn(2, 6, 10), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"DiscHead: c must have shape \(2, 4\), got \(2, 5\)"):
        head(torch.randn(2, 8, 10), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"DiscHead: x must have 3 dimensions"):
        head(torch.randn(2, 8, 10, 1), torch.randn(2, 4))
    with pytest.raises(ValueError, match="DiscHead: x needs at least 4 tokens for kernel_size 9"):
        head(torch.randn(2, 8, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="built with c_dim=None"):
        DiscHead(8)(torch.randn(2, 8, 10), torch.randn(2, 4))
    with pytest.raises(ValueError, match="DiscHead: kernel_size must be a positive odd number, got 4"):
        DiscHead(8, kernel_size=4)
