"""gpu_check.py without a GPU: it says so, checks its own plan at tiny size on the CPU and exits 0, writing
nothing; its parts (timing, the estimate comparison, the CUDA-test count) behave."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("timm")
import gpu_check  # benchmarks/ is on pytest's pythonpath


def test_self_check_runs_the_plan_on_the_cpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert gpu_check.main(["--self-check", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for stage in ("(a) plan", "(b) plan", "(c) plan", "(d) plan"):
        assert stage in out
    for cfg in gpu_check.TRAINING:
        assert f"(c) plan: {cfg.name}; its tiny twin: ok" in out
    assert not list(tmp_path.iterdir())  # nothing written


def test_cuda_tests_are_found() -> None:
    files = gpu_check.cuda_test_files()
    assert "tests/sampling/test_cuda_graph.py" in files
    assert "tests/benchmarks/test_memory_estimate.py" in files


def test_compare_marks_the_tolerance() -> None:
    row = {"peak_bytes": 105}
    gpu_check.compare(row, 100)
    assert row["ratio"] == pytest.approx(1.05) and row["within_10pct"]
    row = {"peak_bytes": 120}
    gpu_check.compare(row, 100)
    assert not row["within_10pct"]


def test_clock_keeps_the_reserve() -> None:
    clock = gpu_check.Clock(10.0)
    assert clock.allows(5.0) and not clock.allows(20.0)


def test_without_cuda_main_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "self_check", lambda: 0)
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
