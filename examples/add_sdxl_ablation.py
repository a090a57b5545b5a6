"""ADD's ablation (Table 1 of the paper, in miniature) on the tiny world: which half of ADD does what.

Rows, each the recipe's default run (``python examples/add_sdxl.py``) with one change, over
seeds (mean ± standard deviation over seeds), scored on the 24 held-out captions at 1 and 4
student steps:

- ``both``: the default (adversarial + distillation loss);
- ``adversarial only``: ``--lambda-distill 0``;
- ``distillation only``: ``--adversarial-weight 0`` (the discriminator still trains and logs);
- ``both, hinge x1``: ADD's own adversarial loss and weight (hinge, 1) instead of the preset's
  (non-saturating, 3);
- ``dmd2``: ``--method dmd2`` (distribution matching + its GAN head), the successor for reference.

Each run writes its own folder under ``--output-dir`` and is skipped when its ``report.json``
exists, so a stopped study resumes. The table goes to ``ablation.json`` and ``ablation.md``
there (``docs/tiny_world.md`` quotes it) and is printed. Runs go ``--jobs`` at a time, one torch
thread each.

    python examples/add_sdxl_ablation.py --output-dir outputs/ablation   # 4 ADD rows x 3 seeds, DMD2 x 1
    python examples/add_sdxl_ablation.py --rows both "distillation only" --seeds 0

See ``docs/tiny_world.md`` for the numbers and how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROWS: dict[str, list[str]] = {
    "both": [],
    "adversarial only": ["--lambda-distill", "0"],
    "distillation only": ["--adversarial-weight", "0"],
    "both, hinge x1": ["--adversarial-loss", "hinge", "--adversarial-weight", "1"],
    "dmd2": ["--method", "dmd2"],
}
"""The flags of each row, added to the recipe's default command."""

METRICS = ("prompt_accuracy", "fd", "diversity")
LOGGED = ("d/adv", "d/real_acc", "d/fake_acc", "d/rank", "d/gap", "g/adv", "g/distill", "f/gan_rank")
"""Scalars summarised from each run's TensorBoard log (means over each sixth of the run)."""


def log_summary(folder: Path, parts: int = 6) -> dict[str, list[float]]:
    """Means of ``LOGGED`` scalars over ``parts`` equal spans of the run, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(folder.glob("logs/**/events.out.tfevents.*"))
    if not events:
        return {}
    acc = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in (t for t in LOGGED if t in acc.Tags()["scalars"]):
        values = [e.value for e in acc.Scalars(tag)]
        n = len(values)
        spans = [values[i * n // parts : (i + 1) * n // parts] for i in range(parts)]
        out[tag] = [statistics.fmean(v) for v in spans if v]
    return out


def _folder(root: Path, row: str, seed: int) -> Path:
    return root / f"{row.replace(', ', '_').replace(' ', '_')}_seed{seed}"


def run_one(root: Path, row: str, seed: int, extra: list[str]) -> dict:
    """The recipe's default with ``ROWS[row]`` and ``--seed``; its report (cached in its folder)."""
    out = _folder(root, row, seed)
    report = out / "report.json"
    if not report.is_file():
        cmd = [sys.executable, str(Path(__file__).with_name("add_sdxl.py")), "--output-dir", str(out), "--seed",
               str(seed), "--sample-every", "0", "--checkpoint-every", "0", *ROWS[row], *extra]  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        with open(out / "log.txt", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"  {row} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return {**json.loads(report.read_text()), "logs": log_summary(out)}


def _cell(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}  # fmt: skip


def summarise(reports: dict[str, list[dict]]) -> dict:
    """Mean, standard deviation and values per row, student steps and metric; the teacher's rows."""
    first = next(iter(reports.values()))[0]
    table: dict = {"teacher": {n: {m: first["teacher"][n][m] for m in METRICS} for n in ("1", "4", "25")}}
    table["logs"] = {row: [r["logs"] for r in runs] for row, runs in reports.items()}
    for row, runs in reports.items():
        table[row] = {n: {m: _stats([r["student"][n][m] for r in runs]) for m in METRICS} for n in ("1", "4")}
    return table


def markdown(table: dict) -> str:
    """The table as Markdown: one row per method, accuracy and FD at 1 and 4 steps (mean ± std over seeds)."""
    lines = [
        "| held-out captions | seeds | 1 step accuracy ↑ | 1 step FD ↓ | 1 step diversity "
        "| 4 steps accuracy ↑ | 4 steps FD ↓ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    t = table["teacher"]
    lines.append(f"| teacher (frozen) | – | {t['1']['prompt_accuracy']:.3f} | {t['1']['fd']:.2f} "
                 f"| {t['1']['diversity']:.2f} | {t['4']['prompt_accuracy']:.3f} | {t['4']['fd']:.2f} |")  # fmt: skip
    for row, cells in table.items():
        if row in ("teacher", "logs"):
            continue
        parts = []
        for n in ("1", "4"):
            parts += [_cell(cells[n]["prompt_accuracy"]["values"], 3), _cell(cells[n]["fd"]["values"], 2)]
            if n == "1":
                parts.append(_cell(cells[n]["diversity"]["values"], 2))
        seeds = len(cells["1"]["fd"]["values"])
        lines.append(f"| {row} | {seeds} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", type=Path, default=Path("outputs/ablation"))
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dmd2-seeds", type=int, nargs="+", default=[0],
                   help="seeds of the dmd2 row (a DMD2 step, with its 5 fake-score updates, costs more than an ADD step)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for every run")
    args = p.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    jobs = [(row, seed) for row in args.rows for seed in (args.dmd2_seeds if row == "dmd2" else args.seeds)]
    print(f"add_sdxl_ablation: {len(jobs)} runs, {args.jobs} at a time, into {args.output_dir}", flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = list(pool.map(lambda job: run_one(args.output_dir, *job, extra), jobs))
    reports: dict[str, list[dict]] = {row: [] for row in args.rows}
    for (row, _), report in zip(jobs, done):
        reports[row].append(report)
    table = summarise(reports)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    record = {"seeds": args.seeds, "dmd2_seeds": args.dmd2_seeds, **table}
    (args.output_dir / "ablation.json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(table)
    (args.output_dir / "ablation.md").write_text(text + "\n")
    print(text)
    return table


if __name__ == "__main__":
    main()
