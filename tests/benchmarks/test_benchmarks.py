"""The benchmarks' JSON schema, on one benchmark at a tiny size (the benchmarks themselves never
run in the test job), and the generated tables."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("timm")
import _report  # benchmarks/ is on pytest's pythonpath
import bench_adversarial

METADATA_KEYS = {"git_sha": str, "torch": str, "device_name": str}
ROW_KEYS = {"name": str, "median_s": float, "iqr_s": float, "peak_bytes": int, "speedup_vs_naive": float}


def _check_types(where: str, mapping: dict[str, Any], required: dict[str, type]) -> None:
    for key, kind in required.items():
        assert key in mapping, f"{where}: missing key {key!r}"
        value = mapping[key]
        assert isinstance(value, kind), f"{where}[{key!r}]: expected {kind.__name__}, got {value!r}"


def validate(payload: dict[str, Any]) -> None:
    """The schema every result file of addkit's own benchmarks follows."""
    _check_types(
        "payload",
        payload,
        {"benchmark": str, "description": str, "naive": str, "config": dict, "memory_method": str,
         "results": list, "metadata": dict, "headline": list},
    )
    _check_types("metadata", payload["metadata"], METADATA_KEYS)
    names = [r["name"] for r in payload["results"]]
    assert payload["naive"] in names and len(set(names)) == len(names)
    for row in payload["results"]:
        _check_types(f"results[{row.get('name')}]", row, ROW_KEYS)
        assert row["median_s"] > 0 and row["iqr_s"] >= 0 and row["peak_bytes"] >= 0
        assert math.isfinite(row["speedup_vs_naive"]) and row["speedup_vs_naive"] > 0
    for h in payload["headline"]:
        _check_types("headline", h, {"figure": str, "value": float, "unit": str})


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("results") / "cpu"
    payload = bench_adversarial.run(bench_adversarial.TINY, torch.device("cpu"), out_dir=out)
    return payload, out


def test_written_json_follows_schema(result: tuple[dict[str, Any], Path]) -> None:
    payload, out = result
    (path,) = out.glob("*.json")
    written = json.loads(path.read_text())
    validate(written)
    assert written["benchmark"] == payload["benchmark"] == "adversarial"
    assert {r["name"] for r in written["results"]} == {
        "hinge", "r1_images", "r1_features", "approx_r1", "lazy16_r1_images", "lazy16_r1_features"
    }
    naive = next(r for r in written["results"] if r["name"] == written["naive"])
    assert naive["speedup_vs_naive"] == pytest.approx(1.0)


def test_tables_regenerate_between_markers(result: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    _, out = result
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\nintro\n\n{_report.START}\nold table\n{_report.END}\n\nafter\n")
    page = tmp_path / "performance.md"
    _report.write_all(out.parent, readme, page)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# B\n\nintro") and text.endswith("after\n")
    assert "| `r1_features` |" in text and "| `r1_features` |" in page.read_text()
    _report.write_all(out.parent, readme, page)  # idempotent
    assert readme.read_text() == text


def test_distillation_benchmark_follows_schema(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    import bench_distillation

    payload = bench_distillation.run(bench_distillation.TINY, torch.device("cpu"), out_dir=tmp_path)
    validate(json.loads((tmp_path / "distillation.json").read_text()))
    assert {r["name"] for r in payload["results"]} == {"teacher_forward", "addkit", "naive"}
    share = payload["headline"][0]["value"]
    assert share < 1.0  # the teacher forward is part of the addkit step


def test_objective_benchmark_counts_no_host_reads_by_default(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    import bench_objective

    payload = bench_objective.run(bench_objective.TINY, torch.device("cpu"), out_dir=tmp_path)
    validate(json.loads((tmp_path / "objective.json").read_text()))
    reads = {r["name"]: r["host_reads"] for r in payload["results"]}
    assert reads["add"] == 0 and reads["dmd2"] == 0 and reads["value_checks"] > 0
