"""The summary of a ``gpu_check.py`` run, made from whatever stage files exist.

``gpu_check_summary.json`` holds ``stages`` (each stage's status, seconds, budget and reason),
``sampler`` (per step count: GPU ms per image of each way to generate and the ratios),
``training`` (the training row), ``tests`` (``pytest -m cuda``'s counts), ``passed`` and
``markdown``, the tables ``_report.py`` puts on the performance page.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _gpu_stages import write_json

BAD = ("failed", "timeout", "running")
VARIANTS = (  # name in the files, column heading
    ("diffusers", "diffusers pipeline"),
    ("eager", "addkit eager"),
    ("cuda_graph", "CUDAGraphSampler"),
    ("compile", "torch.compile"),
)
RATIOS = (
    ("eager", "diffusers"),
    ("cuda_graph", "diffusers"),
    ("cuda_graph", "eager"),
    ("compile", "diffusers"),
)


def load_stages(out: Path) -> dict[str, dict[str, Any]]:
    """Every stage file in ``out`` by stage name (the summary excluded)."""
    found = {}
    for path in sorted(out.glob("gpu_check_*.json")):
        payload = json.loads(path.read_text())
        if payload.get("stage"):
            found[payload["stage"]] = payload
    return found


def sampler_table(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step count: GPU ms per image of each variant measured, and ratios ``reference / variant``."""
    rows = [
        r
        for name, p in stages.items()
        if name == "sampler" or name.startswith("compile_")
        for r in p["results"]
    ]
    table = []
    for steps in sorted({r["steps"] for r in rows}):
        ms = {
            r["variant"]: r["gpu_ms_per_image"] for r in rows if r["steps"] == steps and r["status"] == "ok"
        }
        entry: dict[str, Any] = {"steps": steps, "gpu_ms_per_image": ms}
        for a, b in RATIOS:
            if a in ms and b in ms:
                entry[f"{a}_vs_{b}"] = ms[b] / ms[a]
        table.append(entry)
    return table


def _gib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def _training_line(r: dict[str, Any]) -> str:
    """The training row as a table when it was measured on a GPU, else a sentence."""
    if "ratio" not in r:
        return (
            f"Training `{r['name']}`: {r.get('status')}; {r.get('images_per_s', 0):.2f} images / s; "
            f"estimate: {r.get('estimate_source', '')}."
        )
    return (
        "| configuration | images / s | max_memory_allocated (GiB) | memory_reserved (GiB) | estimate (GiB) "
        "| measured / estimate |\n|---|---:|---:|---:|---:|---:|\n"
        f"| `{r['name']}` | {r['images_per_s']:.2f} | {_gib(r['max_memory_allocated_bytes'])} | "
        f"{_gib(r['memory_reserved_bytes'])} | {_gib(r['estimate_bytes'])} | {r['ratio']:.3f} |"
    )


def _markdown(
    stages: dict[str, dict[str, Any]], sampler: list[dict[str, Any]], expected: Sequence[str]
) -> str:
    meta = next(iter(stages.values()), {}).get("metadata", {})
    parts = [
        (
            f"{meta.get('device_name', 'no device')}, torch {meta.get('torch', '?')}, git "
            f"`{str(meta.get('git_sha', '?'))[:10]}`."
        ),
        "| stage | status | seconds | budget (s) | note |\n|---|---|---:|---:|---|",
    ]
    for name in expected:
        p = stages.get(name, {"status": "missing", "reason": "no file: the run stopped before this stage"})
        budget = f"{p['budget_s']:.0f}" if "budget_s" in p else ""
        parts[-1] += (
            f"\n| {name} | {p['status']} | {p.get('seconds', '')} | {budget} | {p.get('reason', '')} |"
        )
    if sampler:
        head = " | ".join(h for _, h in VARIANTS)
        ratio_head = " | ".join(f"{a} vs {b}" for a, b in RATIOS)
        lines = [f"| steps | {head} | {ratio_head} |", "|---:" * (1 + len(VARIANTS) + len(RATIOS)) + "|"]
        for e in sampler:
            ms = [
                f"{e['gpu_ms_per_image'][v]:.1f}" if v in e["gpu_ms_per_image"] else "—" for v, _ in VARIANTS
            ]
            ratios = [f"{e[f'{a}_vs_{b}']:.2f}x" if f"{a}_vs_{b}" in e else "—" for a, b in RATIOS]
            lines.append(f"| {e['steps']} | {' | '.join(ms)} | {' | '.join(ratios)} |")
        description = stages.get("sampler", {}).get("description", "")
        clock = (
            "GPU ms per image (CUDA events)" if meta.get("device") == "cuda" else "ms per image (wall time)"
        )
        parts += [
            f"Generation, {clock}: {description}. A ratio `a vs b` is b's time / a's time (above 1: a is faster).",
            "\n".join(lines),
        ]
    for r in stages.get("training", {}).get("results") or []:
        parts.append(_training_line(r))
    tests = stages.get("tests", {}).get("tests")
    if tests:
        failed = ", ".join(tests["failed"]) or "none"
        parts.append(
            f"`pytest -m cuda`: {tests['passed']} passed, {len(tests['failed'])} failed ({failed}), {tests['skipped']} skipped."
        )
    return "\n\n".join(parts)


def write_summary(out: Path, *, expected: Sequence[str], optional: Sequence[str]) -> dict[str, Any]:
    """Summarise the stage files in ``out`` into ``gpu_check_summary.json``; return the payload."""
    stages = load_stages(out)
    sampler = sampler_table(stages)
    on_cpu = all(p.get("metadata", {}).get("device") == "cpu" for p in stages.values())
    passed = all(
        name in stages
        and stages[name]["status"] not in BAD
        and (stages[name]["status"] == "ok" or name in optional or on_cpu)
        for name in expected
    )
    payload = {
        "benchmark": "gpu_check_summary",
        "description": "gpu_check.py: the stages and their figures side by side",
        "stages": [
            {k: stages[n].get(k) for k in ("stage", "status", "seconds", "budget_s", "reason")}
            for n in expected
            if n in stages
        ],
        "sampler": sampler,
        "training": (stages.get("training", {}).get("results") or [None])[0],
        "tests": stages.get("tests", {}).get("tests"),
        "passed": passed,
        "metadata": next(iter(stages.values()), {}).get("metadata", {}),
        "markdown": _markdown(stages, sampler, expected),
    }
    write_json(out / "gpu_check_summary.json", payload)
    return payload
