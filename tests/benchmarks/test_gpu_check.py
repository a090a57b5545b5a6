"""gpu_check.py without a GPU: its plan runs on the CPU at tiny size, stage by stage, each stage
writing its file as it finishes; killed midway, the finished stages keep their files and the summary
reads what exists. Its parts (timing, the estimate comparison, pytest parsing) behave."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("timm")
import _gpu_stages  # benchmarks/ is on pytest's pythonpath
import _gpu_summary
import gpu_check
from _common import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STAGES = [s.name for s in gpu_check.PLAN_TINY]


def _start(out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(SCRIPT), "--self-check", "--out", str(out)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def _read(out: Path, stage: str) -> dict:
    return json.loads((out / f"gpu_check_{stage}.json").read_text())


@pytest.mark.slow  # about 100 s on a shared 2-core machine, most of it imports and building the tiny setup
def test_self_check_runs_every_stage_and_summarises(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    output = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    for stage in STAGES:
        assert f"[{stage}] " in output
        payload = _read(tmp_path, stage)
        assert payload["metadata"]["device_name"] and payload["seconds"] >= 0
    sampler = _read(tmp_path, "sampler")
    assert sampler["status"] == "ok"
    assert {(r["variant"], r["steps"]) for r in sampler["results"]} == {
        (v, n) for v in ("diffusers", "eager", "cuda_graph") for n in (1, 4)
    }
    (training,) = _read(tmp_path, "training")["results"]
    assert training["images_per_s"] > 0 and gpu_check_config_estimate() in training["estimate_source"]
    assert _read(tmp_path, "compile_1step")["reason"].startswith("stopped at its budget")  # killed at 5 s
    assert _read(tmp_path, "compile_4step")["reason"].startswith("not started")
    summary = json.loads((tmp_path / "gpu_check_summary.json").read_text())
    assert summary["passed"] and [e["steps"] for e in summary["sampler"]] == [1, 4]
    assert "| 4 |" in summary["markdown"] and "cuda_graph vs diffusers" in summary["markdown"]


def gpu_check_config_estimate() -> str:
    """What the training stage reports of the GPU configuration's committed estimate."""
    found = _gpu_stages.committed_estimate(_gpu_stages.TRAINING.name)
    assert found is not None, "memory.json lacks the GPU configuration: run bench_memory.py for it"
    return f"{found['bytes'] / 2**30:.2f} GiB"


def test_killed_midway_the_finished_stages_keep_their_files(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    first = tmp_path / "gpu_check_sampler.json"
    deadline = time.monotonic() + 300
    try:
        while not (first.exists() and json.loads(first.read_text())["status"] != "running"):
            assert proc.poll() is None and time.monotonic() < deadline, "the sampler stage did not finish"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the check and its stage process, mid-training
        proc.wait()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu_check_sampler.json"], files
    sampler = _read(tmp_path, "sampler")
    assert sampler["status"] == "ok" and len(sampler["results"]) == 6
    summary = _gpu_summary.write_summary(tmp_path, expected=STAGES, optional=gpu_check.OPTIONAL)
    assert not summary["passed"] and "| training | missing |" in summary["markdown"]
    assert len(summary["sampler"]) == 2


def test_pytest_output_is_parsed_complete_or_cut_off() -> None:
    out = (
        "tests/a.py::test_x PASSED                 [ 33%]\n"
        "tests/a.py::test_y[cuda-1] FAILED         [ 66%]\n"
        "tests/b.py::test_z SKIPPED (no GPU)       [100%]\n"
        "tests/b.py::test_w "  # cut off by the timeout
    )
    got = _gpu_stages.parse_pytest(out)
    assert (got["passed"], got["failed"], got["skipped"]) == (1, ["tests/a.py::test_y[cuda-1]"], 1)


def test_cuda_tests_are_found() -> None:
    files = _gpu_stages.cuda_test_files()
    assert "tests/sampling/test_cuda_graph.py" in files
    assert "tests/benchmarks/test_memory_estimate.py" in files


def test_compare_marks_the_tolerance() -> None:
    row = {"max_memory_allocated_bytes": 105}
    _gpu_stages.compare(row, {"bytes": 100, "source": "x"})
    assert row["ratio"] == pytest.approx(1.05) and row["within_10pct"]
    row = {"max_memory_allocated_bytes": 120}
    _gpu_stages.compare(row, {"bytes": 100, "source": "x"})
    assert not row["within_10pct"]
    row = {"max_memory_allocated_bytes": 120}
    _gpu_stages.compare(row, None)
    assert "ratio" not in row and row["estimate_source"].startswith("not in")


def test_sampler_ratios_are_reference_over_variant(tmp_path: Path) -> None:
    rows = [
        {"variant": v, "steps": 4, "status": "ok", "gpu_ms_per_image": ms}
        for v, ms in (("diffusers", 200.0), ("eager", 160.0), ("cuda_graph", 100.0))
    ]
    (entry,) = _gpu_summary.sampler_table({"sampler": {"results": rows}})
    assert entry["cuda_graph_vs_diffusers"] == pytest.approx(2.0)
    assert entry["cuda_graph_vs_eager"] == pytest.approx(1.6) and "compile_vs_diffusers" not in entry


def test_without_cuda_main_runs_the_self_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_plan", lambda out, budget, *, tiny: calls.append((out, tiny)) or 0)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert calls == [(tmp_path, True)]
