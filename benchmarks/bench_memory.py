"""Peak GPU memory of one ADD training step, estimated on a CPU without allocating it.

Each configuration builds its models at their real sizes on ``meta``, assembles and places them
with the recipes' own family adapters, turns them into fake tensors and runs one whole training
step, the recipes' own ``recipe.step.train_step`` (``examples/add_sdxl.py`` for SDXL,
``examples/add_flow.py``'s LADD for SD3.5 medium and Flux.1 [dev]; ``_recipe_step.py``), under
``FakeTensorMode`` with a storage tracker (``_estimate.py``; CUDA's autocast policy from
``_cuda_autocast.py``). The figure is the peak of live tensor
bytes, what ``torch.cuda.max_memory_allocated`` reports on a GPU, broken down into parameters,
gradients, AdamW state, activations, temporaries and inputs, and by the part (student, teacher,
VAE, discriminator, backward, optimiser step) that made what is alive at the peak. A full SDXL
student also gets the per-device figure of ``--fsdp`` across 8 GPUs: the student's weights,
gradients and AdamW state divided by 8, everything else whole, plus the unsharded blocks FSDP
gathers (the flow recipe does not offer ``--fsdp``).

Beside each estimate stands the analytic floor from the parameter counts alone: frozen
networks at 2 bytes a parameter (bf16; the DINOv2 feature network of the discriminator at 4,
the recipe keeps the discriminator in float32), trained weights at 4 + 4 (float32 weights and
gradients) + 8 (AdamW's two moments) = 16 bytes, LoRA weights likewise; the student's divided by 8
for ``--fsdp``.
A configuration fits a GPU of ``G`` GiB when its estimate is at most 90 % of it (the CUDA
context, cuDNN/cuBLAS workspaces and the allocator's fragmentation are not in the estimate).

Run: ``PYTHONPATH=examples python benchmarks/bench_memory.py`` (every configuration: about 45 s each on one core,
two at a time by default) or ``--quick`` (two of them, what ``run_all.py --quick`` runs); ``--only
NAME ...`` for some. Results are merged by
configuration name into ``benchmarks/results/estimate/memory.json``; ``run_all.py`` and
``_report.py`` put the table into ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from _recipe_step import StepConfig, setup_for
from _common import RESULTS, metadata
from _estimate import Setup, estimate_step_memory

NAME = "memory"
OUT = RESULTS / "estimate"
GPUS_GIB = (24, 48, 80)
HEADROOM = 0.9
METHOD = (
    "peak of live tensor bytes over one training step (G + D forward and backward, gradient clipping, "
    "both AdamW steps, optimiser state in place), fake tensors under FakeTensorMode with CUDA's autocast "
    "policy, storages followed by a torch.distributed._tools MemTracker; compares with "
    "torch.cuda.max_memory_allocated"
)


@dataclass(frozen=True)
class Entry:
    """A step configuration and the FSDP world size its per-device figure assumes (1: none)."""

    step: StepConfig
    world: int = 1

    @property
    def name(self) -> str:
        return self.step.name


def _sdxl(res: int, batch: int, train: str, d: str = "dinov2", gc: bool = True) -> Entry:
    """An ``add_sdxl.py`` configuration; a full student also gets ``--fsdp``'s figure on 8 GPUs."""
    return Entry(StepConfig("sdxl", res, batch, train, checkpointing=gc, discriminator=d), world=8 if train == "full" else 1)


def _flow(model: str, batch: int, train: str) -> Entry:
    """An ``add_flow.py`` LADD configuration (``--fsdp`` is not offered for flow: no FSDP figure)."""
    return Entry(StepConfig(model, 1024, batch, train, checkpointing=True, discriminator="teacher"))


CONFIGS: tuple[Entry, ...] = (
    _sdxl(1024, 1, "full", gc=False),  # examples/add_sdxl.py with --mixed-precision bf16
    _sdxl(1024, 1, "full"),
    _sdxl(1024, 1, "lora"),
    _sdxl(1024, 4, "lora"),
    _sdxl(1024, 4, "full", "teacher"),
    _sdxl(1024, 4, "lora", "teacher"),
    _sdxl(1024, 1, "lora", "teacher", gc=False),
    _sdxl(512, 4, "full", gc=False),
    _sdxl(512, 4, "full"),
    _sdxl(512, 4, "lora"),
    _sdxl(512, 4, "lora", "teacher"),
    _flow("sd35_medium", 1, "lora"),
    _flow("sd35_medium", 4, "lora"),
    _flow("sd35_medium", 4, "full"),
    _flow("flux_dev", 1, "lora"),
    _flow("flux_dev", 4, "lora"),
    _flow("flux_dev", 4, "full"),
)
QUICK = (CONFIGS[1].name, CONFIGS[14].name)  # run_all.py --quick: one SDXL and one Flux configuration


def parameter_counts(setup: Setup) -> dict[str, dict[str, int]]:
    """Parameters by part and role (trained, LoRA, frozen) and buffer elements; shared tensors once."""
    seen: set[int] = set()
    counts: dict[str, dict[str, int]] = {}
    for part, module in setup.parts.items():
        c = {"trained": 0, "lora": 0, "frozen": 0, "buffers": 0}
        for name, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            role = "lora" if "lora_" in name else "trained" if p.requires_grad else "frozen"
            c[role] += p.numel()
        for b in module.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                c["buffers"] += b.numel()
        if any(c.values()):
            counts[part] = c
    return counts


def floor_bytes(step: StepConfig, counts: dict[str, dict[str, int]]) -> int:
    """Weights + gradients + AdamW state from parameter counts (activations excluded).

    Trained and LoRA parameters: 16 bytes (float32 weight, gradient, two moments). Frozen
    parameters and buffers: 2 bytes in bf16 runs (4 in float32 runs); 4 for the discriminator's
    own buffers and its DINOv2 feature network (the recipes keep the discriminator in float32).
    """
    low = 2 if step.precision == "bf16" else 4
    total = 0
    for part, c in counts.items():
        frozen = (
            4 if part == "discriminator" or (part == "features" and step.discriminator == "dinov2") else low
        )
        total += 16 * (c["trained"] + c["lora"]) + frozen * (c["frozen"] + c["buffers"])
    return total


def run_entry(entry: Entry) -> dict[str, Any]:
    """Estimate one configuration; the row written to the JSON."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    est = estimate_step_memory(setup_for(entry.step), world=entry.world, describe=parameter_counts)
    counts = est["described"]
    floor = floor_bytes(entry.step, counts)
    row = {
        "name": entry.name,
        "config": dataclasses.asdict(entry.step),
        "world": entry.world,
        "params": counts,
        "peak": est["peak"],
        "at_peak_by_part": est["at_peak_by_part"],
        "peak_phase": est["peak_phase"],
        "floor_bytes": floor,
        "seconds": time.perf_counter() - start,
    }
    if entry.world > 1:
        row["per_device"] = est["per_device"]
        student = 16 * counts["student"]["trained"]  # what --fsdp shards: the student's weights, grads, AdamW
        row["floor_bytes_per_device"] = floor - student + -(-student // entry.world)
    return row


def fits(nbytes: int) -> dict[str, bool]:
    """Whether ``nbytes`` fits each GPU size with 10 % headroom."""
    return {f"{g}GiB": nbytes <= HEADROOM * g * 2**30 for g in GPUS_GIB}


def merge(rows: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """Replace the rows of these configurations in ``path`` (others are kept), in ``CONFIGS`` order."""
    old = json.loads(path.read_text()) if path.exists() else {}
    by_name = {r["name"]: r for r in old.get("results", [])}
    sha = metadata(torch.device("cpu"))["git_sha"]
    for r in rows:
        by_name[r["name"]] = {**r, "git_sha": sha}
    order = {e.name: i for i, e in enumerate(CONFIGS)}
    results = sorted(by_name.values(), key=lambda r: order.get(r["name"], len(order)))
    payload = {
        "benchmark": NAME,
        "description": "peak GPU memory of one ADD training step, estimated with fake tensors",
        "memory_method": METHOD,
        "gpus_gib": list(GPUS_GIB),
        "headroom": HEADROOM,
        "results": results,
        "metadata": {**metadata(torch.device("cpu")), "device": "estimate"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return payload


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} configurations")
    p.add_argument("--only", nargs="*", default=None, help="configuration names")
    p.add_argument("--jobs", type=int, default=2, help="configurations estimated at once (processes)")
    p.add_argument("--out", type=Path, default=OUT, help="results folder")
    args = p.parse_args(argv)
    names = args.only or (QUICK if args.quick else [e.name for e in CONFIGS])
    entries = [e for e in CONFIGS if e.name in names]
    unknown = set(names) - {e.name for e in entries}
    if unknown:
        p.error(f"unknown configurations {sorted(unknown)}; known: {[e.name for e in CONFIGS]}")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = []
        for row in pool.map(run_entry, entries):
            gib = row["peak"]["total"] / 2**30
            print(
                f"{row['name']}: {gib:.1f} GiB (floor {row['floor_bytes'] / 2**30:.1f}) in {row['seconds']:.0f} s",
                flush=True,
            )
            rows.append(row)
    merge(rows, args.out / f"{NAME}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
