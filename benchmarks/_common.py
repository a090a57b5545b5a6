"""What every benchmark shares: timing with torch.utils.benchmark, run metadata, JSON output."""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def time_fn(fn: Callable[[], object], min_run_time: float, *, device: torch.device) -> dict[str, float]:
    """Median, interquartile range and mean seconds of one call of ``fn``.

    ``torch.utils.benchmark.Timer.blocked_autorange`` repeats ``fn`` in blocks for at least
    ``min_run_time`` seconds and synchronises CUDA around each block. The caller warms up.
    """
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"median_s": float(m.median), "iqr_s": float(m.iqr), "mean_s": float(m.mean), "runs": len(m.times)}


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(device: torch.device) -> dict[str, Any]:
    """Git SHA, versions and the device's name, recorded with every result."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
        name = f"CPU {name} ({torch.get_num_threads()} threads)"
    return {
        "git_sha": _git_sha(),
        "torch": torch.__version__,
        "device": device.type,
        "device_name": name,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "",
    }


def finish(
    name: str,
    *,
    description: str,
    naive: str,
    headline: list[dict[str, Any]],
    config: Any,
    device: torch.device,
    rows: list[dict[str, Any]],
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Assemble the payload every benchmark writes (the schema the tests check), write it, return it."""
    from _memory import METHODS, memory_method

    payload = {
        "benchmark": name,
        "description": description,
        "naive": naive,
        "headline": headline,
        "config": dataclasses.asdict(config),
        "memory_method": METHODS[memory_method(device)],
        "results": rows,
        "metadata": metadata(device),
    }
    write_result(name, payload, out_dir=out_dir)
    return payload


def write_result(name: str, payload: dict[str, Any], *, out_dir: Path | None = None) -> Path:
    """Write ``payload`` to ``<out_dir>/<name>.json`` (default ``results/<device type>/``)."""
    device = payload.get("metadata", {}).get("device", "cpu")
    folder = out_dir if out_dir is not None else RESULTS / device
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path
