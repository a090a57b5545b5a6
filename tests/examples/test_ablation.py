"""examples/add_sdxl_ablation.py: rows, the table's statistics, cached runs (no training here)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import add_sdxl_ablation as ablation
from add_sdxl import parse_args


def _report(acc1: float, fd1: float) -> dict:
    cell = lambda a, f: {"prompt_accuracy": a, "fd": f, "diversity": 1.0}  # noqa: E731
    return {
        "teacher": {"1": cell(0.3, 22.0), "4": cell(0.87, 3.1), "25": cell(0.9, 2.6)},
        "student": {"1": cell(acc1, fd1), "4": cell(0.9, 2.5)},
        "real": cell(1.0, 0.05),
    }


def test_rows_are_recipe_flags_that_parse() -> None:
    for row, flags in ablation.ROWS.items():
        args = parse_args(["--preset", "tiny", *flags])
        if row == "adversarial only":
            assert args.lambda_distill == 0
        if row == "distillation only":
            assert args.adversarial_weight == 0
    assert parse_args(["--preset", "random"]).adversarial_weight == 1.0  # ADD's; the tiny preset: 3


def test_summary_is_mean_and_sample_std_over_seeds_and_cached_runs_are_read(tmp_path: Path) -> None:
    values = {"both": [(0.6, 9.0), (0.62, 10.0), (0.58, 9.5)], "dmd2": [(0.5, 12.0), (0.52, 11.0), (0.5, 13.0)]}
    for row, runs in values.items():
        for seed, (a, f) in enumerate(runs):
            folder = tmp_path / f"{row}_seed{seed}"
            folder.mkdir()
            (folder / "report.json").write_text(json.dumps(_report(a, f)))
    reports = {row: [ablation.run_one(tmp_path, row, s, []) for s in range(3)] for row in values}  # cached
    table = ablation.summarise(reports)
    fd = [f for _, f in values["both"]]
    assert table["both"]["1"]["fd"]["mean"] == pytest.approx(statistics.fmean(fd))
    assert table["both"]["1"]["fd"]["std"] == pytest.approx(statistics.stdev(fd))
    assert table["teacher"]["1"]["fd"] == 22.0
    text = ablation.markdown(table)
    assert "| both | 3 | 0.600 ± 0.020 | 9.50 ± 0.50 | 1.00 ± 0.00 |" in text
    assert "| teacher (frozen) | – | 0.300 | 22.00 | 1.00 |" in text
