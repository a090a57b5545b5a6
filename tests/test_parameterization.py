"""Prediction conversions: round trips on every schedule, hand-derived values, zero-SNR safety."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from addkit.checks import value_checks
from addkit.parameterization import PREDICTIONS, convert, normalize_prediction, to_eps, to_flow, to_v, to_x0
from addkit.schedules import FlowSchedule, VPSchedule

VP = VPSchedule.scaled_linear()
ZSNR = VP.rescale_zero_terminal_snr()
FLOW = FlowSchedule(shift=3.0)


def _truth(schedule, t, seed: int):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    a, s = schedule.coefficients(t, x0)
    x_t = a * x0 + s * eps
    # targets from their definitions (not from addkit's conversions)
    preds = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "flow": eps - x0}
    return x_t, preds


@given(st.integers(0, 10_000), st.sampled_from(list(itertools.product(PREDICTIONS, PREDICTIONS))))
def test_conversions_vp(seed: int, pair: tuple[str, str]) -> None:
    t = torch.randint(0, 999, (2,), generator=torch.Generator().manual_seed(seed))
    x_t, preds = _truth(VP, t, seed)
    src, dst = pair
    fns = {"x0": to_x0, "eps": to_eps, "v": to_v, "flow": to_flow}
    out = fns[dst](preds[src], x_t, t, schedule=VP, prediction=src)
    torch.testing.assert_close(out, preds[dst], rtol=1e-9, atol=1e-9)


@given(st.integers(0, 10_000), st.sampled_from(list(itertools.product(PREDICTIONS, PREDICTIONS))))
def test_conversions_flow(seed: int, pair: tuple[str, str]) -> None:
    t = torch.rand(2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.98 + 0.01
    x_t, preds = _truth(FLOW, t, seed)
    src, dst = pair
    a, s = FLOW.coefficients(t, x_t)
    out = convert(preds[src], x_t, a, s, source=src, target=dst)
    torch.testing.assert_close(out, preds[dst], rtol=1e-9, atol=1e-9)


def test_hand_derived_values() -> None:
    # alpha = 0.6, sigma = 0.8, x0 = 1, eps = 0 -> x_t = 0.6, v = -0.8, u = -1
    a, s = torch.tensor([[0.6]], dtype=torch.float64), torch.tensor([[0.8]], dtype=torch.float64)
    x_t = torch.tensor([[0.6]], dtype=torch.float64)
    assert float(convert(torch.tensor([[-0.8]], dtype=torch.float64), x_t, a, s, source="v", target="x0")) == pytest.approx(1.0)
    assert float(convert(torch.tensor([[0.0]], dtype=torch.float64), x_t, a, s, source="eps", target="v")) == pytest.approx(-0.8)
    assert float(convert(torch.tensor([[1.0]], dtype=torch.float64), x_t, a, s, source="x0", target="flow")) == pytest.approx(-1.0)


def test_zero_terminal_snr_safe_forms() -> None:
    x_t = torch.randn(2, 4)
    t = torch.tensor([999, 999])
    v = torch.randn(2, 4)
    # at alpha = 0, sigma = 1: x0 = -v, eps = x_t
    torch.testing.assert_close(to_x0(v, x_t, t, schedule=ZSNR, prediction="v"), -v)
    torch.testing.assert_close(to_eps(v, x_t, t, schedule=ZSNR, prediction="v"), x_t)
    torch.testing.assert_close(to_eps(v, x_t, t, schedule=ZSNR, prediction="x0"), x_t)
    # by default the division by zero flows on as non-finite values (no device read)
    assert not torch.isfinite(to_x0(v, x_t, t, schedule=ZSNR, prediction="eps")).any()
    with value_checks():
        with pytest.raises(ValueError, match=r"convert: an eps prediction cannot give x0 where alpha_t = 0"):
            to_x0(v, x_t, t, schedule=ZSNR, prediction="eps")
        # flow at t = 0: sigma = 0, x0 prediction cannot give eps
        with pytest.raises(ValueError, match="an x0 prediction cannot give eps where sigma_t = 0"):
            to_eps(v, x_t, torch.tensor([0.0, 0.0]), schedule=FLOW, prediction="x0")


def test_dtypes_and_names() -> None:
    x_t = torch.randn(2, 4, dtype=torch.bfloat16)
    out = to_x0(torch.randn_like(x_t), x_t, 500, schedule=VP, prediction="epsilon")
    assert out.dtype == torch.bfloat16
    assert normalize_prediction("sample") == "x0"
    with pytest.raises(ValueError, match="prediction must be one of 'eps', 'v', 'x0', 'flow'"):
        to_x0(x_t, x_t, 5, schedule=VP, prediction="score")
    with pytest.raises(ValueError, match=r"pred and x_t must have the same shape, got \(2, 3\) and \(2, 4\)"):
        to_x0(torch.zeros(2, 3), torch.zeros(2, 4), 5, schedule=VP, prediction="eps")
