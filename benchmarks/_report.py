"""Markdown tables from the benchmark JSON: benchmarks/README.md and docs/performance.md.

Reads every ``benchmarks/results/<device>/*.json``. Each file holds one benchmark's payload:
``benchmark``, ``results`` (rows with ``name`` and ``median_s``; optional ``iqr_s``,
``peak_bytes`` and a ratio such as ``speedup_vs_naive``), ``metadata`` (git SHA, torch
version, device name) and optionally ``headline`` (the figures worth a summary line) and
``memory_method``. Two kinds are rendered apart: the memory estimate
(``results/estimate/memory.json`` from ``bench_memory.py``: which configuration fits which GPU,
its breakdown and analytic floor) and the GPU check (``results/cuda/gpu_check_summary.json`` from
``gpu_check.py``, with how to run it; until one exists the page says the CUDA figures are missing). Only the text
between the markers in benchmarks/README.md is replaced; docs/performance.md is written whole.

Run ``python benchmarks/_report.py`` to regenerate both without re-running anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
PERFORMANCE = ROOT / "docs" / "performance.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
RATIO_KEYS = ("speedup_vs_naive", "vs_fp32", "vs_contiguous", "speedup", "ratio")

CAVEAT = (
    "CPU figures come from `run_all.py --quick` (shrunken models, tiny inputs) on a machine "
    "whose 2 cores are shared with other jobs: absolute times are noisy and small-model "
    "ratios understate what the full sizes show. GPU figures (full sizes) are the ones to "
    "quote. Ratios are measured within one run; `x` > 1 means faster than the reference."
)


def load_results(root: Path = RESULTS) -> list[dict[str, Any]]:
    """Every result payload under ``root``, sorted by device folder and benchmark name."""
    payloads = []
    for path in sorted(root.glob("*/*.json")):
        payload = json.loads(path.read_text())
        if "benchmark" not in payload:  # results of studies (tiny_world/), not benchmark payloads
            continue
        payload["_device_dir"] = path.parent.name
        payloads.append(payload)
    return sorted(payloads, key=lambda p: (p["_device_dir"], str(p.get("benchmark", ""))))


def _ms(seconds: Any) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def _mib(nbytes: Any) -> str:
    return "" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ratio(row: dict[str, Any]) -> str:
    for key in RATIO_KEYS:
        if row.get(key) is not None:
            return f"{row[key]:.2f}x"
    return ""


def _device_line(payload: dict[str, Any]) -> str:
    meta = payload.get("metadata", {})
    name = meta.get("device_name") or meta.get("device") or payload["_device_dir"]
    sha = str(meta.get("git_sha", "?"))[:10]
    return f"{name}, torch {meta.get('torch', meta.get('torch_version', '?'))}, git `{sha}`"


def table(payload: dict[str, Any]) -> str:
    """One benchmark's rows: variant, median and IQR time, peak memory, its ratio."""
    rows = payload.get("results", [])
    has_mem = any(r.get("peak_bytes") is not None for r in rows)
    head = "| variant | median (ms) | IQR (ms) |" + (" peak memory (MiB) |" if has_mem else "") + " ratio |"
    sep = "|---|---:|---:|" + ("---:|" if has_mem else "") + "---:|"
    lines = [head, sep]
    for r in rows:
        mem = f" {_mib(r.get('peak_bytes'))} |" if has_mem else ""
        times = f"{_ms(r.get('median_s'))} | {_ms(r.get('iqr_s'))}"
        lines.append(f"| `{r['name']}` | {times} |{mem} {_ratio(r)} |")
    return "\n".join(lines)


def summary(payloads: list[dict[str, Any]]) -> str:
    """The headline figures of every benchmark on every device, one line each."""
    lines = ["| device | benchmark | figure | value |", "|---|---|---|---:|"]
    for p in payloads:
        for h in p.get("headline", []):
            value = f"{h['value']:.2f}{h.get('unit', '')}" if isinstance(h["value"], float) else h["value"]
            lines.append(f"| {p['_device_dir']} | {p.get('benchmark')} | {h['figure']} | {value} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _gib(nbytes: Any) -> str:
    return "" if nbytes is None else f"{nbytes / 2**30:.1f}"


def _setting(cfg: dict[str, Any]) -> str:
    bits = [cfg["train"] if cfg["train"] == "full" else f"LoRA r{cfg['lora_rank']}"]
    bits += ["GC"] if cfg.get("checkpointing") else []
    bits += ["DINOv2 D on pixels" if cfg["discriminator"] == "dinov2" else "teacher-feature D"]
    return ", ".join(bits)


MODEL_NAMES = {"sdxl": "SDXL", "sd35_medium": "SD3.5 medium", "flux_dev": "Flux.1 dev"}


def _fits(nbytes: int, gpus: list[int], headroom: float) -> list[str]:
    return ["yes" if nbytes <= headroom * g * 2**30 else "no" for g in gpus]


def _phase(row: dict[str, Any]) -> str:
    """The step's phase at the peak; a forward pass after gradients exist is the discriminator step's."""
    phase = row.get("peak_phase", "")
    if phase == "forward":
        return "D step forward" if row["peak"].get("gradients") else "G step forward"
    return phase


def memory_table(payload: dict[str, Any]) -> str:
    """The estimate: configuration, peak and breakdown (GiB), analytic floor, fits 24 / 48 / 80 GiB."""
    gpus, headroom = payload.get("gpus_gib", [24, 48, 80]), payload.get("headroom", 0.9)
    head = ["model", "px", "batch", "setting", "GPUs", "peak", "weights", "grads", "AdamW", "activations"]
    head += ["temporaries", "floor", "at the peak: phase, largest part"] + [f"fits {g}" for g in gpus]
    lines = [
        "| " + " | ".join(head) + " |",
        "|---|---:|---:|---|---|" + "---:|" * 7 + "---|" * (1 + len(gpus)),
    ]
    for r in payload.get("results", []):
        cfg = r["config"]
        views = [("1", r["peak"], r["floor_bytes"])]
        if r.get("per_device"):
            views.append((f"FSDP x{r['world']} (per GPU)", r["per_device"], r["floor_bytes_per_device"]))
        part, nbytes = max(r.get("at_peak_by_part", {"": 0}).items(), key=lambda kv: kv[1])
        where = _phase(r)
        where = f"{where}; {part} {_gib(nbytes)}" if part else where
        for gpus_label, p, floor in views:
            weights = p.get("parameters", 0) + p.get("buffers", 0) + p.get("fsdp_gather", 0)
            temps = p.get("temporaries", 0) + p.get("optimizer_step", 0)
            cells = [MODEL_NAMES.get(cfg["model"], cfg["model"]), str(cfg["resolution"]), str(cfg["batch"])]
            cells += [_setting(cfg), gpus_label, f"**{_gib(p['total'])}**", _gib(weights)]
            cells += [
                _gib(p.get("gradients")),
                _gib(p.get("optimizer")),
                _gib(p.get("activations")),
                _gib(temps),
            ]
            cells += [_gib(floor), where, *_fits(p["total"], gpus, headroom)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MEMORY_INTRO = """Peak GPU memory of one ADD training step, **estimated on a CPU** by `benchmarks/bench_memory.py`:
the step runs on fake tensors (`FakeTensorMode`, nothing allocated) with the real architectures and
the recipes' code, and a storage tracker (`torch.distributed._tools` `MemTracker`) keeps the peak of
live tensor bytes, the figure `torch.cuda.max_memory_allocated` reports. GiB throughout. *weights*
counts parameters and buffers of every resident network (teacher, VAE, text encoders, discriminator;
for FSDP the two gathered blocks too), *grads* and *AdamW* the trained ones; *activations* are saved
in forward, *temporaries* made in backward or the optimiser step. *floor* is weights + gradients +
AdamW state from the parameter counts alone (frozen: 2 bytes a parameter in bf16; trained and LoRA:
4 + 4 + 8 = 16 bytes; divided by the GPUs for FSDP): the estimate can only be above it. *At the
peak*: the phase of the step (the generator's or the discriminator's forward, a backward, the
optimiser step) and the part whose tensors, made
during the step, weigh most then (GC: the student's gradient checkpointing; the teacher's feature
pass keeps a graph in the generator step, and with LoRA `adapters_disabled` suspends its
checkpointing). A configuration fits when
its peak is at most {headroom:.0%} of the GPU (CUDA context, workspaces and fragmentation are not in the
estimate). FSDP x{world} (`--fsdp`, a full SDXL student; the flow recipe does not offer it) is an
estimate per GPU: the student's weights, gradients and AdamW state divided by {world}, frozen networks,
the discriminator and activations whole. Every row runs the recipes' own training step
(`recipe.step.train_step`) on the models their family adapters build: SDXL rows
`examples/add_sdxl.py`'s, flow rows `examples/add_flow.py`'s (LADD; the LoRA teacher is the student
with its adapters disabled, one copy of the weights). {method}."""


def render_memory(payload: dict[str, Any] | None, heading: str) -> str:
    """The memory estimate section."""
    title = f"{heading} Memory: which configuration fits which GPU"
    if payload is None:
        return f"{title}\n\nNo estimate yet: run `python benchmarks/bench_memory.py`."
    worlds = [r["world"] for r in payload.get("results", []) if r.get("world", 1) > 1] or [8]
    intro = MEMORY_INTRO.format(
        headroom=payload.get("headroom", 0.9),
        world=worlds[0],
        method=f"Method: {payload.get('memory_method', '')}",
    )
    meta = payload.get("metadata", {})
    where = f"Estimated with torch {meta.get('torch', '?')}, git `{str(meta.get('git_sha', '?'))[:10]}`."
    return "\n\n".join([title, intro, where, memory_table(payload)])


GPU_CHECK_HOWTO = """**Run it.** On a machine with one CUDA GPU, from the repository root, with addkit and its
benchmark dependencies installed (`diffusers`, `peft`, `timm`; nothing is downloaded, every model has
random weights):

```bash
python benchmarks/gpu_check.py          # --budget 480 (seconds for the whole check), --out benchmarks/results/cuda
```

It is planned to fit one 8-minute call on one H100 (stage budgets: sampler 150 s, training 120 s,
tests 150 s, the compile stages what is left; no GPU run has confirmed the timing yet). Each stage runs in its own process under its own budget and
writes its file into `benchmarks/results/cuda/` as soon as it ends, so a run stopped early keeps what
it measured; one line per stage is printed as it ends, then the tables below. In order:

| file | stage | fields in `results` |
|---|---|---|
| `gpu_check_sampler.json` | 1- and 4-step generation at 512x512 (SDXL-architecture UNet + VAE decode, bf16, batch 1, built on the GPU) with diffusers' `StableDiffusionXLPipeline`, addkit's eager loop and `CUDAGraphSampler`; rewritten after each variant | one row per `variant` and `steps`: `gpu_ms_per_image` (CUDA events, median of 10 calls), `iqr_s`, `cpu_ms_per_call` (host time until the call returns), `first_call_s` (capture included), `peak_bytes` (`max_memory_allocated` above the baseline plus the graph's private memory pool) |
| `gpu_check_training.json` | one ADD training step, SDXL LoRA r64 at 512x512, batch 4 | `images_per_s`, `max_memory_allocated_bytes` (above what was allocated before the setup was built), `max_memory_reserved_bytes`, `memory_reserved_bytes`, `estimate_bytes` and `estimate_source` (the committed `results/estimate/memory.json`), `ratio` (measured / estimate), `within_10pct` |
| `gpu_check_tests.json` | `pytest -m cuda` | `tests`: `passed`, `failed` (test ids), `skipped`, `tail` (the output's end) |
| `gpu_check_compile_1step.json`, `gpu_check_compile_4step.json` | `CUDAGraphSampler(compile="reduce-overhead")`, cold, with what time is left | a row as the sampler's, or `status` `skipped` and the `reason` |
| `gpu_check_summary.json` | made from the files that exist | `stages`, `sampler` (per step count: `gpu_ms_per_image` by variant and the ratios), `training`, `tests`, `passed`, `markdown` (the tables below) |

Every stage file also holds `status` (`ok`, `failed`, `timeout`, `skipped` with a `reason`, or
`running` when the run stopped inside the stage), `seconds`, `budget_s` and `metadata` (`device_name`,
torch, CUDA, git SHA). The exit status is 0 when the tests, the training step, its estimate
comparison and the sampler passed; the compile stages may be skipped. After a stopped run,
`python benchmarks/gpu_check.py --summary` makes the summary from the files there and
`python benchmarks/_report.py` this page. Without a GPU, `python benchmarks/gpu_check.py --self-check`
runs the same plan at tiny size on the CPU (about two minutes) into a temporary folder.

**Read it.** A ratio `a vs b` is the time of `b` over the time of `a`: above 1, `a` is faster.
`cuda_graph vs diffusers` is what `CUDAGraphSampler` gains over diffusers' own pipeline with the same
UNet, VAE and steps; `cuda_graph vs eager` what the captured loop saves over addkit's eager loop
(Python and kernel-launch overhead); `eager vs diffusers` near 1 means addkit's loop costs what the
pipeline's does. Training: `measured / estimate` within 0.90-1.10 confirms the CPU estimate
of the memory table above; `memory_reserved` above `max_memory_allocated` is the allocator's cache
and fragmentation, which the 90 % headroom of the "fits" columns allows for."""


def render_gpu_check(payloads: list[dict[str, Any]], heading: str) -> str:
    """The GPU check section: how to run it, then its summary (or the note that the figures are missing)."""
    title = f"{heading} GPU check"
    by = {p.get("benchmark"): p for p in payloads}
    summary = by.get("gpu_check_summary")
    if summary:
        result = summary["markdown"]
    elif by:
        result = (
            "Stage files of a GPU check exist without a summary (the run stopped early): run "
            "`python benchmarks/gpu_check.py --summary`, then `python benchmarks/_report.py`."
        )
    else:
        result = (
            "**The CUDA figures are missing**: no GPU run of `python benchmarks/gpu_check.py` exists yet."
        )
    return f"{title}\n\n{result}\n\n{GPU_CHECK_HOWTO}"


def _split(
    payloads: list[dict[str, Any]],
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
    memory = next((p for p in payloads if p.get("benchmark") == "memory"), None)
    gpu = [p for p in payloads if str(p.get("benchmark", "")).startswith("gpu_check_")]
    rest = [p for p in payloads if p is not memory and p not in gpu]
    return memory, gpu, rest


def render(payloads: list[dict[str, Any]], *, heading: str = "###") -> str:
    """Summary, per device and benchmark (context line, method notes, table), memory, GPU check."""
    memory, gpu, payloads = _split(payloads)
    head = [render_memory(memory, heading), render_gpu_check(gpu, heading)]
    if not payloads:
        return "\n\n".join(
            [*head, "No microbenchmark results yet: run `python benchmarks/run_all.py --quick`."]
        )
    parts = [*head, f"{heading} Microbenchmarks", CAVEAT]
    if s := summary(payloads):
        parts.append(s)
    for p in payloads:
        parts.append(f"{heading}# `{p.get('benchmark')}` on {p['_device_dir']}")
        notes = [_device_line(p)]
        if p.get("description"):
            notes.append(str(p["description"]))
        if p.get("naive"):
            notes.append(f"reference (naive way): `{p['naive']}`")
        if p.get("memory_method"):
            notes.append(f"peak memory: {p['memory_method']}")
        parts.append("; ".join(notes) + ".")
        parts.append(table(p))
    return "\n\n".join(parts)


def update_readme(text: str, path: Path = README) -> None:
    """Replace the text between the result markers of ``path``."""
    content = path.read_text()
    if START not in content or END not in content:
        raise ValueError(f"update_readme: {path} lacks the markers {START} ... {END}")
    before, rest = content.split(START, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{START}\n{text}\n{END}{after}")


PAGE = """# Performance

Which training configuration fits which GPU is in [Memory](#memory-which-configuration-fits-which-gpu):
an estimate made on a CPU, beside the analytic floor. Measurements on a GPU are in
[GPU check](#gpu-check) (missing until a GPU run exists).

Microbenchmarks of addkit's hot paths, each timed against the naive way of doing the same thing
in the same run (`torch.utils.benchmark.Timer.blocked_autorange`: warm-up, device sync, median
and interquartile range, fixed seeds). The scripts, what each variant does and how to run them
are in the repository's `benchmarks/` folder and its README (`python benchmarks/run_all.py
--quick` on a CPU, without `--quick` on a GPU). This page is
generated from their JSON by `benchmarks/run_all.py`; do not edit it by hand.

Peak memory is `torch.cuda.max_memory_allocated` on a GPU. A CPU has no allocator peak to read,
so there the column is the size of the tensors autograd saves for backward during one call, a
deterministic lower bound of the activation memory; each table names its method.

{body}
"""


def write_all(root: Path = RESULTS, readme: Path = README, page: Path = PERFORMANCE) -> None:
    """Regenerate the README section and the performance page from the JSON under ``root``."""
    payloads = load_results(root)
    update_readme(render(payloads, heading="###"), readme)
    page.write_text(PAGE.format(body=render(payloads, heading="##")))


if __name__ == "__main__":
    write_all()
