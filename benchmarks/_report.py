"""Markdown tables from the benchmark JSON: benchmarks/README.md and docs/performance.md.

Reads every ``benchmarks/results/<device>/*.json``. Each file holds one benchmark's payload:
``benchmark``, ``results`` (rows with ``name`` and ``median_s``; optional ``iqr_s``,
``peak_bytes`` and a ratio such as ``speedup_vs_naive``), ``metadata`` (git SHA, torch
version, device name) and optionally ``headline`` (the figures worth a summary line) and
``memory_method``. Only the text between the markers in benchmarks/README.md is replaced;
docs/performance.md is written whole.

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


def render(payloads: list[dict[str, Any]], *, heading: str = "###") -> str:
    """Summary, then per device and benchmark: context line, method notes and the table."""
    if not payloads:
        return "No results yet: run `python benchmarks/run_all.py --quick`."
    parts = [CAVEAT]
    if s := summary(payloads):
        parts.append(s)
    for p in payloads:
        parts.append(f"{heading} `{p.get('benchmark')}` on {p['_device_dir']}")
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
