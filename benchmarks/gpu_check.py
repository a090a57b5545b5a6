"""One command that proves addkit's CUDA paths on one GPU, in at most 8 minutes.

``python benchmarks/gpu_check.py`` on a machine with a GPU:

a. runs every CUDA-marked test (``pytest -m cuda``);
b. times the few-step sampler at 512x512, bf16, batch 1, on an SDXL-architecture UNet and VAE
   with random weights (decode included): diffusers' ``StableDiffusionXLPipeline``, addkit's
   eager ``sample``, ``CUDAGraphSampler`` and ``CUDAGraphSampler(compile="reduce-overhead")``,
   at 1 and 4 steps; GPU time per image (CUDA events) and CPU time per call (until the call
   returns);
c. runs ADD training steps at 512x512 (full fine-tune, LoRA, teacher-feature discriminator;
   ``_add_setups.py``, the recipe's step): images per second and the allocator's peak;
d. compares each peak of (c) with the fake-tensor estimate of ``bench_memory.py`` for the same
   configuration (computed on the host CPU while the GPU works; within 10 % passes);

then writes ``benchmarks/results/cuda/gpu_check_*.json`` (with the device name) and regenerates
``benchmarks/README.md`` and ``docs/performance.md``. Stages run in the order a, c, b (the
``torch.compile`` variants last); a stage that would overrun the budget is skipped and says so.
The exit status is 1 when a test, a step or a comparison failed.

Without a GPU (or with ``--self-check``) it says so, checks its own plan on the CPU (imports
resolve, every sampler variant and training configuration builds at tiny size and runs, the
estimate side runs at tiny size, the CUDA-marked tests are found) and exits 0 without writing
anything. ``tests/benchmarks/test_gpu_check.py`` runs that.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

import addkit
import bench_sampler
from _add_setups import StepConfig, setup_for
from _common import RESULTS, ROOT, metadata, write_result
from _estimate import estimate_step_memory, warm_optimizers
from _materialize import Materializer

BUDGET_S = 480
TOLERANCE = 0.10
SAMPLER = dataclasses.replace(bench_sampler.FULL, steps=(1, 4), decode=(True,), compile_steps=(1, 4))
SAMPLER_TINY = dataclasses.replace(bench_sampler.TINY, steps=(1, 4), decode=(True,), compile_steps=())
TRAINING = (
    StepConfig("sdxl", 512, 4, "full", checkpointing=True),
    StepConfig("sdxl", 512, 4, "lora", checkpointing=True),
    StepConfig("sdxl", 512, 4, "lora", checkpointing=True, discriminator="teacher"),
)
RESERVE_S = {"training": 150, "sampler": 45, "compile": 120}  # seconds a stage leaves for what follows


class Clock:
    """The remaining budget; a stage starts only when it leaves the reserve for the ones after it."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, reserve_s: float) -> bool:
        return self.left() > reserve_s


# ------------------------------------------------------------------------------------------------
# (a) CUDA-marked tests
# ------------------------------------------------------------------------------------------------
def cuda_test_files() -> dict[str, int]:
    """Test files with CUDA-marked tests and how many markers each holds (a static count)."""
    found = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        n = len(re.findall(r"pytest\.mark\.cuda\b", path.read_text()))
        if n:
            found[str(path.relative_to(ROOT))] = n
    return found


def run_cuda_tests(timeout_s: float) -> dict[str, Any]:
    """``pytest -m cuda``: counts of passed / failed / skipped tests and the failures' names."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "cuda.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "cuda",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
        ]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "timeout_s": timeout_s}
        cases = ET.parse(xml).getroot().iter("testcase") if xml.exists() else []
        result: dict[str, Any] = {
            "passed": 0,
            "failed": [],
            "skipped": 0,
            "seconds": time.perf_counter() - start,
        }
        for case in cases:
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                result["failed"].append(name)
            elif case.find("skipped") is not None:
                result["skipped"] += 1
            else:
                result["passed"] += 1
    result["status"] = "ok" if done.returncode == 0 and not result["failed"] else "failed"
    result["tail"] = done.stdout[-2000:]
    return result


# ------------------------------------------------------------------------------------------------
# (b) sampler: GPU time per image, CPU time per call
# ------------------------------------------------------------------------------------------------
def time_call(fn: Callable[[], object], *, calls: int, device: torch.device) -> dict[str, float]:
    """Median GPU time (CUDA events; wall time on a CPU) and host time until ``fn`` returns, per call."""
    gpu, host = [], []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize(device)
            gpu.append(start.elapsed_time(end) / 1e3)
        else:
            gpu.append(t1 - t0)
        host.append(t1 - t0)
    q = statistics.quantiles(gpu, n=4) if len(gpu) > 1 else [gpu[0]] * 3
    return {
        "median_s": statistics.median(gpu),
        "iqr_s": q[2] - q[0],
        "cpu_s_per_call": statistics.median(host),
    }


def run_sampler(cfg: Any, device: torch.device, clock: Clock, *, calls: int = 10) -> dict[str, Any]:
    """Warm up and time each variant (compile last); variants the budget cannot afford are skipped."""
    from _memory import peak_memory

    steps, extra = bench_sampler.make_steps(cfg, device)
    order = sorted(steps, key=lambda n: (n.startswith("compile"), n))
    rows, skipped = [], {}
    for name in order:
        stage = "compile" if name.startswith("compile") else "sampler"
        if not clock.allows(RESERVE_S[stage]):
            skipped[name] = f"budget: {clock.left():.0f} s left"
            continue
        fn = steps[name]
        try:
            start = time.perf_counter()
            fn()  # capture, compile
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - start
            fn()
            row = {"name": name, **time_call(fn, calls=calls, device=device), "first_call_s": first}
            row["peak_bytes"] = peak_memory(fn, device, **extra["mem_kw"])
        except (RuntimeError, ValueError, TypeError) as err:  # a compile or capture failure: recorded
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            continue
        row["gpu_ms_per_image"] = row["median_s"] * 1e3 / cfg.batch
        row["cpu_ms_per_call"] = row["cpu_s_per_call"] * 1e3
        rows.append(row)
    by = {r["name"]: r for r in rows}
    for r in rows:
        eager = by.get("eager_" + bench_sampler._setting(r["name"]))
        r["speedup_vs_naive"] = eager["median_s"] / r["median_s"] if eager else 1.0
    return {"rows": rows, "skipped": skipped}


# ------------------------------------------------------------------------------------------------
# (c) training steps, (d) estimates
# ------------------------------------------------------------------------------------------------
def run_training(cfg: StepConfig, device: torch.device, *, steps: int = 3) -> dict[str, Any]:
    """Peak of one steady-state step (optimiser state in place) and the median time of ``steps`` more."""
    setup = None
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        setup = setup_for(cfg)(Materializer(None, device))
        warm_optimizers(setup)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        setup.step()
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
        timing = time_call(setup.step, calls=steps, device=device)
    except (RuntimeError, ValueError, TypeError) as err:  # out of memory (a RuntimeError): recorded
        return {"name": cfg.name, "status": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    finally:
        del setup
        gc.collect()  # the models sit in reference cycles (closures, hooks)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    images = cfg.batch / timing["median_s"]
    return {"name": cfg.name, "status": "ok", **timing, "peak_bytes": int(peak), "images_per_s": images}


def estimate(cfg: StepConfig) -> int:
    """The fake-tensor estimate of ``cfg``'s peak (runs in a worker process on the host CPU)."""
    torch.set_num_threads(1)
    return int(estimate_step_memory(setup_for(cfg))["peak"]["total"])


def compare(row: dict[str, Any], estimated: int | None) -> None:
    """Add the estimate, the ratio measured / estimate and whether it is within the tolerance."""
    row["estimate_bytes"] = estimated
    if estimated and row.get("peak_bytes"):
        row["ratio"] = row["peak_bytes"] / estimated
        row["within_10pct"] = abs(row["ratio"] - 1) <= TOLERANCE


# ------------------------------------------------------------------------------------------------
# The run on a GPU, and the plan check without one
# ------------------------------------------------------------------------------------------------
def _payload(name: str, description: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    device = torch.device("cuda")
    return {
        "benchmark": name,
        "description": description,
        "results": rows,
        "metadata": metadata(device),
        **extra,
    }


def run_gpu(budget_s: float, out: Path) -> int:
    """Stages a, c, b, d on the GPU; write the JSON and the tables; 0 when everything passed."""
    import multiprocessing

    from _report import write_all

    clock = Clock(budget_s)
    # (d) on the host CPU while the GPU works; spawned before CUDA is initialised here
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        estimates: dict[str, Future[int]] = {c.name: pool.submit(estimate, c) for c in TRAINING}
        device = torch.device("cuda")
        print(f"gpu_check: {torch.cuda.get_device_name(device)}, budget {budget_s:.0f} s", flush=True)
        tests = run_cuda_tests(timeout_s=max(30.0, min(240.0, clock.left() - 240)))
        print(f"(a) cuda tests: {tests.get('passed', 0)} passed, failed: {tests.get('failed')}", flush=True)
        training = []
        for cfg in TRAINING:
            fits = clock.allows(RESERVE_S["training"])
            row = run_training(cfg, device) if fits else {"name": cfg.name, "status": "skipped: budget"}
            training.append(row)
            print(
                f"(c) {cfg.name}: {row['status']}, {row.get('images_per_s', 0):.2f} images/s, "
                f"peak {row.get('peak_bytes', 0) / 2**30:.2f} GiB",
                flush=True,
            )
        sampler = run_sampler(SAMPLER, device, clock)
        for r in sampler["rows"]:
            print(
                f"(b) {r['name']}: {r['gpu_ms_per_image']:.1f} ms/image GPU, {r['cpu_ms_per_call']:.1f} ms/call CPU"
            )
        for name, why in sampler["skipped"].items():
            print(f"(b) {name}: skipped ({why})")
        for row in training:
            try:
                got = estimates[row["name"]].result(timeout=max(60.0, clock.left()))
            except (RuntimeError, ValueError, TypeError, TimeoutError) as err:  # the comparison fails below
                got, row["estimate_error"] = None, f"{type(err).__name__}: {err}"
            compare(row, got if row.get("peak_bytes") else None)
            print(f"(d) {row['name']}: measured / estimate = {row.get('ratio', float('nan')):.3f}")
    files = cuda_test_files()
    write_result(
        "gpu_check_tests",
        _payload("gpu_check_tests", "pytest -m cuda", [], tests=tests, files=files),
        out_dir=out,
    )
    write_result(
        "gpu_check_sampler",
        _payload(
            "gpu_check_sampler",
            "few-step sampling at 512x512, bf16, batch 1, SDXL-architecture UNet + VAE decode",
            sampler["rows"],
            skipped=sampler["skipped"],
            naive="eager_4step_decode",
            config=dataclasses.asdict(SAMPLER),
        ),
        out_dir=out,
    )
    write_result(
        "gpu_check_training",
        _payload(
            "gpu_check_training",
            "ADD training step at 512x512 (the recipe's step): measured peak vs fake-tensor estimate",
            training,
            tolerance=TOLERANCE,
        ),
        out_dir=out,
    )
    write_all()
    failed = tests.get("status") != "ok" or any(
        r.get("status") != "ok" or not r.get("within_10pct", False) for r in training
    )
    print(f"gpu_check: {'FAILED' if failed else 'ok'} in {budget_s - clock.left():.0f} s; results in {out}")
    return 1 if failed else 0


def self_check() -> int:
    """Without a GPU: check the plan on the CPU at tiny size; write nothing; 0 when it holds."""
    from addkit.sampling import CUDAGraphSampler

    cpu = torch.device("cpu")
    files = cuda_test_files()
    print(f"(a) plan: pytest -m cuda ({sum(files.values())} CUDA markers in {len(files)} files)")
    steps, _ = bench_sampler.make_steps(SAMPLER_TINY, cpu)
    for fn in steps.values():
        fn()
    vp = addkit.VPSchedule.scaled_linear()
    denoiser = addkit.wrap(lambda x_t, t: x_t, vp, "eps")
    for n in SAMPLER.compile_steps:  # the compiled variants are built as on the GPU (not compiled here)
        CUDAGraphSampler(
            denoiser, schedule=vp, timesteps=vp.timesteps(n), renoise="ancestral", compile="reduce-overhead"
        )
    kinds = sorted({n.split("_")[0] for n in steps})
    print(f"(b) plan: steps {SAMPLER.steps} x eager, CUDA graph, compile, diffusers; tiny CPU run: {kinds}")
    tiny = [dataclasses.replace(c, model="tiny_sdxl", resolution=16, batch=2) for c in TRAINING]
    for full, cfg in zip(TRAINING, tiny):
        row = run_training(cfg, cpu, steps=1)
        print(f"(c) plan: {full.name}; its tiny twin: {row['status']}")
        if row["status"] != "ok":
            return 1
    got = estimate(tiny[-1])
    print(
        f"(d) plan: estimate vs torch.cuda.max_memory_allocated within {TOLERANCE:.0%}; tiny estimate {got} bytes"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    p.add_argument("--out", type=Path, default=RESULTS / "cuda", help="results folder")
    p.add_argument("--self-check", action="store_true", help="check the plan on the CPU even with a GPU")
    args = p.parse_args(argv)
    if args.self_check or not torch.cuda.is_available():
        if not args.self_check:
            print(
                "gpu_check: no CUDA device here; checking the plan on the CPU (nothing is measured or written)"
            )
        return self_check()
    return run_gpu(args.budget, args.out)


if __name__ == "__main__":
    sys.exit(main())
