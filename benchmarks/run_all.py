"""Run every benchmark, then regenerate benchmarks/README.md's table and docs/performance.md.

``python benchmarks/run_all.py --quick`` runs everything at tiny sizes on the CPU (a few
minutes); without ``--quick`` on a machine with CUDA, the full sizes run on the GPU (DINOv2
ViT-S at 224 and 518, bf16, SDXL sizes for the sampler). Without ``--quick`` and without a GPU
it falls back to the quick sizes and says so. Each benchmark runs in its own process, so a
failure or a memory peak in one does not touch the others; results go to
``benchmarks/results/<device>/<benchmark>.json``. ``bench_memory`` is an estimate made on the
CPU whatever the machine (real sizes on fake tensors): ``--quick`` estimates two
configurations (a minute or two), the full run all of them; its rows are merged into
``benchmarks/results/estimate/memory.json``. ``gpu_check.py`` is not run from here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from _report import write_all  # a sibling module: the script's folder is on sys.path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"  # the recipe core, which bench_memory runs
BENCHMARKS = (
    "bench_adversarial",
    "bench_discriminator",
    "bench_distillation",
    "bench_memory",
    "bench_objective",
    "bench_sampler",
)


def run_one(name: str, quick: bool) -> tuple[bool, float]:
    """Run ``benchmarks/<name>.py`` in a subprocess; return (success, seconds)."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if quick else [])]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, cwd=HERE.parent, check=False, env=env)  # the recipe's modules: examples/
    return done.returncode == 0, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status (1 if any benchmark failed)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--only", nargs="*", default=None, help="benchmark names, e.g. bench_adversarial")
    p.add_argument("--report-only", action="store_true", help="only regenerate the tables from the JSON")
    args = p.parse_args(argv)
    quick = args.quick or not torch.cuda.is_available()
    if quick and not args.quick:
        print("run_all: no CUDA device, running the quick (CPU, tiny) sizes")
    failed = []
    total = time.perf_counter()
    for name in [] if args.report_only else (args.only or BENCHMARKS):
        if not (HERE / f"{name}.py").exists():
            print(f"== {name}: not present, skipped")
            continue
        ok, seconds = run_one(name, quick)
        print(f"== {name}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
        if not ok:
            failed.append(name)
    write_all()
    elapsed = time.perf_counter() - total
    print(f"run_all: {elapsed:.0f} s; tables written to benchmarks/README.md and docs/performance.md")
    if failed:
        print(f"run_all: failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
