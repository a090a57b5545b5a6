"""bench_sampler at a tiny size on the CPU: its JSON follows the benchmarks' schema and its ratios are
relative to the eager loop with the same step count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from test_benchmarks import validate  # the sibling test module

import bench_sampler  # benchmarks/ is on pytest's pythonpath


def test_tiny_run_follows_schema(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        payload = bench_sampler.run(bench_sampler.TINY, torch.device("cpu"), out_dir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    validate(payload)
    names = {r["name"] for r in payload["results"]}
    assert names == {"eager_1step", "diffusers_1step", "eager_2step", "diffusers_2step"}
    by = {r["name"]: r for r in payload["results"]}
    assert payload["naive"] == "eager_2step" and by["eager_1step"]["speedup_vs_naive"] == pytest.approx(1.0)
    assert (tmp_path / "sampler.json").exists()
