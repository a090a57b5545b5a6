"""The stages of ``gpu_check.py``: each runs in its own process and writes its own JSON file.

A stage file ``gpu_check_<stage>.json`` holds ``status`` (``ok``, ``failed``, ``running`` while
a stage that writes as it goes is still at work, ``timeout`` or ``skipped`` with ``reason``),
``seconds`` and ``budget_s``, ``metadata`` (the device's name among it) and ``results``. The
file is replaced atomically, so a run stopped at any moment leaves whole files.

- ``sampler``: 1- and 4-step generation at 512x512 (UNet + VAE decode, bf16, batch 1) with
  diffusers' ``StableDiffusionXLPipeline``, addkit's eager ``sample`` and ``CUDAGraphSampler``;
  the file is rewritten after each variant.
- ``compile_<n>step``: ``CUDAGraphSampler(compile="reduce-overhead")`` at ``n`` steps, alone in
  its process (a cold compile takes minutes; ``gpu_check.py`` stops it at its budget).
- ``training``: one ADD training step (SDXL, LoRA, 512x512): images per second,
  ``max_memory_allocated`` and ``memory_reserved`` beside the committed CPU estimate.
- ``tests``: the outcome of ``pytest -m cuda``, parsed from its verbose output
  (`parse_pytest`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import bench_sampler
from _recipe_step import StepConfig
from _common import ROOT, metadata
from _estimate import Setup, warm_optimizers

ESTIMATES = ROOT / "benchmarks" / "results" / "estimate" / "memory.json"
SAMPLER = dataclasses.replace(bench_sampler.FULL, steps=(1, 4), decode=(True,), compile_steps=())
SAMPLER_TINY = dataclasses.replace(bench_sampler.TINY, steps=(1, 4), decode=(True,), compile_steps=())
TRAINING = StepConfig("sdxl", 512, 4, "lora", checkpointing=True)
TRAINING_TINY = dataclasses.replace(TRAINING, model="tiny_sdxl", resolution=16, batch=2)
TOLERANCE = 0.10


class StageFile:
    """The result file of one stage, rewritten whole (write, then rename) at each `write`."""

    def __init__(self, out: Path, stage: str, device: torch.device, budget_s: float) -> None:
        self.path = out / f"gpu_check_{stage}.json"
        self.stage, self.device, self.budget_s = stage, device, budget_s
        self.start = time.monotonic()

    def write(self, status: str, results: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        payload = {
            "benchmark": f"gpu_check_{self.stage}",
            "stage": self.stage,
            "status": status,
            "seconds": round(time.monotonic() - self.start, 1),
            "budget_s": self.budget_s,
            "results": results,
            "metadata": metadata(self.device),
            **extra,
        }
        write_json(self.path, payload)
        return payload


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def time_call(fn: Callable[[], object], *, calls: int, device: torch.device) -> dict[str, float]:
    """Median and IQR of the GPU time per call (CUDA events; wall time on a CPU) and the host time."""
    gpu, host = [], []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize(device)
            gpu.append(start.elapsed_time(end) / 1e3)
        else:
            gpu.append(host[-1])
    q = statistics.quantiles(gpu, n=4) if len(gpu) > 1 else [gpu[0]] * 3
    return {
        "median_s": statistics.median(gpu),
        "iqr_s": q[2] - q[0],
        "cpu_s_per_call": statistics.median(host),
    }


# ------------------------------------------------------------------------------------------------
# sampler and compile
# ------------------------------------------------------------------------------------------------
def step_count(name: str) -> int:
    """``4`` from ``"cuda_graph_4step_decode"``."""
    found = re.search(r"_(\d+)step", name)
    if found is None:
        raise ValueError(f"step_count: no step count in variant name {name!r}")
    return int(found.group(1))


def measure_variant(
    name: str, fn: Callable[[], object], extra: dict[str, Any], device: torch.device, *, calls: int
) -> dict[str, Any]:
    """First call (capture or compile), the timing of ``calls`` more, and the peak of one."""
    from _memory import peak_memory

    variant = next(v for v in bench_sampler.VARIANTS if name.startswith(f"{v}_"))
    row: dict[str, Any] = {"name": name, "variant": variant, "steps": step_count(name)}
    try:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["first_call_s"] = time.perf_counter() - start
        fn()
        row.update(time_call(fn, calls=calls, device=device))
        row["peak_bytes"] = peak_memory(fn, device, **extra["mem_kw"], pools=extra["pools"][name])
    except (RuntimeError, ValueError, TypeError) as err:  # capture, compile or memory failures: recorded
        return {**row, "status": _error(err)}
    row["gpu_ms_per_image"] = row["median_s"] * 1e3  # batch 1
    row["cpu_ms_per_call"] = row["cpu_s_per_call"] * 1e3
    return {**row, "status": "ok"}


def sampler_stage(file: StageFile, *, tiny: bool, calls: int = 10) -> dict[str, Any]:
    """diffusers, eager and CUDA-graph generation at 1 and 4 steps; the file grows per variant."""
    cfg = SAMPLER_TINY if tiny else SAMPLER
    steps, extra = bench_sampler.make_steps(cfg, file.device, graphs=True)
    order = sorted(steps, key=lambda n: (step_count(n), n))
    rows: list[dict[str, Any]] = []
    described = {"config": dataclasses.asdict(cfg), "description": _describe(cfg)}
    with warnings.catch_warnings():  # on a CPU the graph variants run eagerly, by design
        warnings.simplefilter("ignore", category=RuntimeWarning)
        for name in order:
            rows.append(measure_variant(name, steps[name], extra, file.device, calls=2 if tiny else calls))
            file.write("running", rows, **described)
    status = "ok" if all(r["status"] == "ok" for r in rows) else "failed"
    return file.write(status, rows, **described)


def compile_stage(file: StageFile, n: int, *, tiny: bool, calls: int = 10) -> dict[str, Any]:
    """``CUDAGraphSampler(compile="reduce-overhead")`` at ``n`` steps with decode, cold."""
    base = SAMPLER_TINY if tiny else SAMPLER
    cfg = dataclasses.replace(base, steps=(n,), compile_steps=(n,))
    steps, extra = bench_sampler.make_steps(cfg, file.device, graphs=False)
    name = f"compile_{n}step_decode"
    row = measure_variant(name, steps[name], extra, file.device, calls=2 if tiny else calls)
    described = {"config": dataclasses.asdict(cfg), "description": f"{_describe(cfg)}; torch.compile"}
    return file.write("ok" if row["status"] == "ok" else "failed", [row], **described)


def _describe(cfg: bench_sampler.Config) -> str:
    if not cfg.unet:
        return f"tiny UNet + VAE decode (self-check), latents {cfg.latent}x{cfg.latent}, {cfg.dtype}, batch {cfg.batch}"
    side = cfg.latent * 8
    return (
        f"{side}x{side}, SDXL-architecture UNet + VAE decode, random weights, {cfg.dtype}, batch {cfg.batch}"
    )


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def build_training(cfg: StepConfig, device: torch.device) -> Setup:
    """The training step measured: the one place that says which step that is (the recipe's step)."""
    from _recipe_step import setup_for
    from _materialize import Materializer

    return setup_for(cfg)(Materializer(None, device))


def committed_estimate(name: str, path: Path = ESTIMATES) -> dict[str, Any] | None:
    """The committed CPU estimate of configuration ``name`` (``peak.total`` bytes and its git SHA)."""
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    row = next((r for r in payload.get("results", []) if r.get("name") == name), None)
    if row is None:
        return None
    return {
        "bytes": int(row["peak"]["total"]),
        "source": f"{path.relative_to(ROOT)} @ {row.get('git_sha', '?')}",
    }


def training_stage(file: StageFile, *, tiny: bool, steps: int = 3) -> dict[str, Any]:
    """One ADD training step: images per second and the allocator's figures against the estimate."""
    cfg, device = (TRAINING_TINY if tiny else TRAINING), file.device
    row: dict[str, Any] = {"name": cfg.name, "batch": cfg.batch}
    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated(device) if cuda else 0
    try:
        setup = build_training(cfg, device)
        warm_optimizers(setup)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        setup.step()
        if cuda:
            torch.cuda.synchronize(device)
            row["max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
            row["max_memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
            row["memory_reserved_bytes"] = int(torch.cuda.memory_reserved(device))
        row.update(time_call(setup.step, calls=1 if tiny else steps, device=device))
    except (RuntimeError, ValueError, TypeError) as err:  # out of memory is a RuntimeError: recorded
        return file.write("failed", [{**row, "status": _error(err)}], tolerance=TOLERANCE)
    finally:
        gc.collect()  # the models sit in reference cycles (closures, hooks)
    row["images_per_s"] = cfg.batch / row["median_s"]
    estimate = committed_estimate(TRAINING.name)
    compare(row, None if tiny else estimate)
    if tiny:  # no estimate of the tiny twin; check that the GPU run will find its own
        found = f"{estimate['bytes'] / 2**30:.2f} GiB, {estimate['source']}" if estimate else "MISSING"
        row["estimate_source"] = f"self-check; the estimate of {TRAINING.name}: {found}"
    ok = row.get("within_10pct", False) if cuda else estimate is not None  # a CPU has no allocator peak
    return file.write("ok" if ok else "failed", [{**row, "status": "ok"}], tolerance=TOLERANCE)


def compare(row: dict[str, Any], estimate: dict[str, Any] | None) -> None:
    """Add the estimate, measured / estimate and whether that is within `TOLERANCE`."""
    row["estimate_bytes"] = estimate["bytes"] if estimate else None
    row["estimate_source"] = estimate["source"] if estimate else f"not in {ESTIMATES.relative_to(ROOT)}"
    if estimate and row.get("max_memory_allocated_bytes"):
        row["ratio"] = row["max_memory_allocated_bytes"] / estimate["bytes"]
        row["within_10pct"] = abs(row["ratio"] - 1) <= TOLERANCE


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
_OUTCOME = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.MULTILINE)


def parse_pytest(output: str) -> dict[str, Any]:
    """Counts and failing test ids from ``pytest -v`` output (complete or cut off at a timeout)."""
    outcomes = dict(_OUTCOME.findall(output))
    failed = sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR"))
    return {
        "passed": sum(o in ("PASSED", "XFAIL", "XPASS") for o in outcomes.values()),
        "failed": failed,
        "skipped": sum(o == "SKIPPED" for o in outcomes.values()),
        "tail": output[-2000:],
    }


def cuda_test_files() -> dict[str, int]:
    """Test files with CUDA-marked tests and how many markers each holds (a static count)."""
    found = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        n = len(re.findall(r"pytest\.mark\.cuda\b", path.read_text()))
        if n:
            found[str(path.relative_to(ROOT))] = n
    return found
