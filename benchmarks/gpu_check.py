"""One command that measures addkit's CUDA paths on one GPU within one 8-minute call.

``python benchmarks/gpu_check.py`` on a machine with a GPU runs these stages, each in its own
process under its own time budget, in this order (``_gpu_stages.py`` holds their bodies):

1. ``sampler``: 1- and 4-step 512x512 generation (SDXL-architecture UNet + VAE decode, random
   weights, bf16, batch 1, built on the GPU): diffusers' ``StableDiffusionXLPipeline``, addkit's
   eager loop, ``CUDAGraphSampler``: GPU ms per image (CUDA events), host ms per call, peak memory;
2. ``training``: one ADD training step, SDXL LoRA 512x512 batch 4: images per second,
   ``max_memory_allocated`` and ``memory_reserved`` against the committed CPU estimate
   (``results/estimate/memory.json``; within 10 % passes);
3. ``tests``: ``pytest -m cuda``;
4. ``compile_1step``, ``compile_4step``: ``CUDAGraphSampler(compile="reduce-overhead")``, cold,
   each stopped at its budget and then recorded as skipped with the reason.

Each stage writes ``<out>/gpu_check_<stage>.json`` as soon as it finishes (the sampler after each
variant), so a run stopped at any point keeps what it measured; ``gpu_check_summary.json`` (and
its table, printed) is made from whatever stage files exist, at the end or with ``--summary``.
With the default ``--out`` (``benchmarks/results/cuda``) the README and ``docs/performance.md``
tables are regenerated. The exit status is 1 when a test, the training step, the estimate
comparison or a non-compile stage failed.

Without a GPU (or with ``--self-check``) the same plan runs on the CPU at tiny size (tiny UNet
and VAE, the tiny SDXL training setup and its computed estimate; the CUDA tests are only
counted; the compile stages get budgets a CPU cannot meet, so both ways of being skipped are
shown) into ``--out`` (default: a new temporary folder). ``tests/benchmarks/test_gpu_check.py``
runs it, and kills it midway to check that finished stages keep their files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from _common import RESULTS, ROOT

BUDGET_S = 480


@dataclass(frozen=True)
class Stage:
    """One stage: the most it may take, what it must leave for the stages after it, the least worth starting."""

    name: str
    budget_s: float
    leave_s: float
    min_s: float = 20.0


PLAN = (  # measured against an 8-minute call: ~75 s, ~60 s, ~90 s, then compile gets what is left
    Stage("sampler", 150, 160),
    Stage("training", 120, 70),
    Stage("tests", 150, 15),
    Stage("compile_1step", 300, 10),
    Stage("compile_4step", 300, 10),
)
PLAN_TINY = (  # the same stages on a CPU; the compile budgets are meant to be missed
    Stage("sampler", 150, 0),
    Stage("training", 150, 0),
    Stage("tests", 10, 0, min_s=0),
    Stage("compile_1step", 5, 0, min_s=1),
    Stage("compile_4step", 0.5, 0, min_s=1),
)
OPTIONAL = ("compile_1step", "compile_4step")  # skipping these is no failure


class Clock:
    """Seconds left of the whole check."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


# ------------------------------------------------------------------------------------------------
# one stage, in this process (``--stage``)
# ------------------------------------------------------------------------------------------------
def run_stage_here(name: str, out: Path, *, tiny: bool, budget_s: float) -> int:
    """Run stage ``name`` in this process and write its file; 0 when it passed."""
    import _gpu_stages as st

    if tiny:
        torch.set_num_threads(1)
    device = torch.device("cpu" if tiny else "cuda")
    file = st.StageFile(out, name, device, budget_s)
    if name == "sampler":
        payload = st.sampler_stage(file, tiny=tiny)
    elif name == "training":
        payload = st.training_stage(file, tiny=tiny)
    elif name.startswith("compile_"):
        payload = st.compile_stage(file, st.step_count(name), tiny=tiny)
    else:
        raise ValueError(f"gpu_check: unknown stage {name!r}; stages: {[s.name for s in PLAN]}")
    return 0 if payload["status"] == "ok" else 1


# ------------------------------------------------------------------------------------------------
# the plan: every stage in a child process with a timeout
# ------------------------------------------------------------------------------------------------
def _command(stage: Stage, out: Path, *, tiny: bool, timeout: float) -> list[str]:
    if stage.name == "tests":
        return [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider"]
    cmd = [sys.executable, str(Path(__file__)), "--stage", stage.name, "--out", str(out)]
    return cmd + ["--stage-budget", f"{timeout:.0f}"] + (["--tiny"] if tiny else [])


def _child(cmd: list[str], timeout: float) -> tuple[str, int | None]:
    """Run ``cmd`` from the repository root; its output and exit status (``None``: stopped at ``timeout``)."""
    paths = [str(ROOT), str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")]  # the recipe's core: examples/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:  # its output is bytes whatever text= says
        text = b"".join(x for x in (err.stdout, err.stderr) if isinstance(x, bytes))
        return text.decode(errors="replace"), None
    return done.stdout + done.stderr, done.returncode


def run_stage(stage: Stage, out: Path, device: torch.device, *, tiny: bool, timeout: float) -> dict[str, Any]:
    """Run ``stage`` in a child process; make sure its file exists and says how it ended."""
    import _gpu_stages as st

    file = st.StageFile(out, stage.name, device, timeout)
    if stage.name == "tests" and tiny:
        files = st.cuda_test_files()
        why = f"CPU self-check: `pytest -m cuda` needs a GPU ({sum(files.values())} markers in {len(files)} files)"
        return file.write("skipped", [], reason=why, files=files)
    output, rc = _child(_command(stage, out, tiny=tiny, timeout=timeout), timeout)
    if stage.name == "tests":
        tests = st.parse_pytest(output)
        status = "timeout" if rc is None else ("ok" if rc == 0 and not tests["failed"] else "failed")
        return file.write(status, [], tests=tests, files=st.cuda_test_files(), returncode=rc)
    written = json.loads(file.path.read_text()) if file.path.exists() else None
    if rc is None:  # stopped at its budget: keep what it wrote
        why = f"stopped at its budget of {timeout:.0f} s" + (
            " (a cold torch.compile)" if "compile" in stage.name else ""
        )
        payload = {**(written or {}), "status": "timeout" if stage.name not in OPTIONAL else "skipped"}
        return _rewrite(file, payload, reason=why, tail=output[-2000:])
    if written is None or written.get("status") == "running":
        return _rewrite(
            file, {**(written or {}), "status": "failed"}, reason=f"exit status {rc}", tail=output[-2000:]
        )
    return _rewrite(file, written, seconds_in_stage=written["seconds"])  # seconds: with the process start


def _rewrite(file: Any, payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Rewrite a stage's payload through the orchestrator's `StageFile` (its seconds, its metadata)."""
    results = payload.pop("results", [])
    status = payload.pop("status")
    keep = {
        k: v for k, v in payload.items() if k not in ("benchmark", "stage", "seconds", "budget_s", "metadata")
    }
    return file.write(status, results, **{**keep, **extra})


def run_plan(out: Path, budget_s: float, *, tiny: bool) -> int:
    """Every stage of the plan in order, within ``budget_s``; then the summary. 0 when all passed."""
    import _gpu_summary

    clock = Clock(budget_s)
    device = torch.device("cpu" if tiny else "cuda")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("gpu_check_*.json"):  # this run's files only
        old.unlink()
    print(
        f"gpu_check: {'CPU self-check' if tiny else 'GPU run'}, budget {budget_s:.0f} s, files in {out}",
        flush=True,
    )
    plan = PLAN_TINY if tiny else PLAN
    for stage in plan:
        timeout = min(stage.budget_s, clock.left() - stage.leave_s)
        if timeout < stage.min_s:
            import _gpu_stages as st

            why = (
                f"not started: {max(timeout, 0):.1f} s available to it (budget {stage.budget_s:g} s, "
                f"{clock.left():.0f} s left, {stage.leave_s:g} s kept for later stages), under its {stage.min_s:g} s"
            )
            payload = st.StageFile(out, stage.name, device, max(timeout, 0.0)).write(
                "skipped", [], reason=why
            )
        else:
            payload = run_stage(stage, out, device, tiny=tiny, timeout=timeout)
        reason = f" ({payload['reason']})" if payload.get("reason") else ""
        print(f"[{stage.name}] {payload['status']} in {payload['seconds']:.1f} s{reason}", flush=True)
    summary = _gpu_summary.write_summary(out, expected=[s.name for s in plan], optional=OPTIONAL)
    print(summary["markdown"], flush=True)
    if not tiny and out == RESULTS / "cuda":
        from _report import write_all

        write_all()
    print(
        f"gpu_check: {'ok' if summary['passed'] else 'FAILED'} in {budget_s - clock.left():.0f} s", flush=True
    )
    return 0 if summary["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results/cuda)")
    p.add_argument("--self-check", action="store_true", help="run the plan on the CPU at tiny size")
    p.add_argument("--summary", action="store_true", help="only (re)make the summary from the stage files")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # one stage in this process (what the plan runs)
    p.add_argument("--stage-budget", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tiny = args.self_check or args.tiny or not torch.cuda.is_available()
    if args.stage:
        return run_stage_here(args.stage, args.out, tiny=args.tiny, budget_s=args.stage_budget)
    if args.summary:
        import _gpu_summary

        out = args.out or RESULTS / "cuda"
        summary = _gpu_summary.write_summary(out, expected=[s.name for s in PLAN], optional=OPTIONAL)
        print(summary["markdown"])
        return 0 if summary["passed"] else 1
    if tiny and not args.self_check:
        print("gpu_check: no CUDA device here; running the plan on the CPU at tiny size (a self-check)")
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if tiny else RESULTS / "cuda")
    return run_plan(out, args.budget, tiny=tiny)


if __name__ == "__main__":
    sys.exit(main())
