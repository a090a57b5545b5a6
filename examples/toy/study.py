"""The study: teacher, classifiers, the ADD ablation in miniature, the table and figures.

``python examples/add_toy.py`` runs the full study (about 25 minutes on 2 CPU cores);
``--quick`` a small version (teacher and one ADD run, under 3 minutes) that the test uses.
Everything is seeded; results go to ``--out`` as ``results.json``, ``table.md`` and PNGs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from addkit import wrap

from .data import NUM_CLASSES, load_digits_split, reference_set
from .distill import RunConfig, config_dict, distill
from .metrics import Evaluator
from .nets import cached_classifier
from .plots import labelled_grids, loss_curves, to_pil_grid
from .sampling import ddim_sample, student_sample
from .teacher import PREDICTION, cached_teacher, schedule

STUDENT_STEPS = {1: (999,), 4: (999, 749, 499, 249)}


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of the study; ``quick()`` is the test's version."""

    teacher_steps: int = 1500
    classifier_steps: int = 300
    distill_steps: int = 300
    main_seeds: tuple[int, ...] = (0, 1, 2)
    ablation_seeds: tuple[int, ...] = (0, 1)
    ablations: bool = True
    per_class: int = 100
    n_real: int = 2000
    teacher_sample_seeds: tuple[int, ...] = (0, 1, 2)
    teacher_step_counts: tuple[int, ...] = (50, 4, 1)

    @classmethod
    def quick(cls) -> StudyConfig:
        return cls(
            teacher_steps=300, classifier_steps=120, distill_steps=100, main_seeds=(0,), ablation_seeds=(),
            ablations=False, per_class=50, n_real=1000, teacher_sample_seeds=(0,), teacher_step_counts=(4, 1),
        )  # fmt: skip


def ablation_runs(cfg: StudyConfig) -> list[tuple[str, RunConfig, tuple[int, ...]]]:
    """(row label, run config, seeds) for every student row of the table."""
    base = RunConfig(steps=cfg.distill_steps)
    rows = [("ADD (exponential, R1, D cond.)", base, cfg.main_seeds)]
    if cfg.ablations:
        rows += [
            ("adversarial only (λ = 0)", replace(base, name="adv_only", lambda_distill=0.0), cfg.ablation_seeds),
            ("distillation only", replace(base, name="distill_only", adversarial_weight=0.0), cfg.ablation_seeds),
            ("SDS weighting", replace(base, name="sds", weighting="sds"), cfg.ablation_seeds),
            ("NFSD weighting (s = 2)", replace(base, name="nfsd", weighting="nfsd", guidance_scale=2.0),
             cfg.ablation_seeds),
            ("without R1 (γ = 0)", replace(base, name="no_r1", r1_gamma=0.0), cfg.ablation_seeds),
            ("D unconditional", replace(base, name="d_uncond", d_conditioning=False), cfg.ablation_seeds),
            ("with DiffAugment (translation, cutout)",
             replace(base, name="diffaug", augment="translation,cutout"), cfg.ablation_seeds),
        ]  # fmt: skip
    return rows


def _eval_labels(per_class: int) -> torch.Tensor:
    return torch.arange(NUM_CLASSES).repeat(per_class)


def _mean_spread(values: list[float]) -> dict[str, float | list[float]]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": list(values),  # per seed, in seed order
    }


def _aggregate(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float | list[float]]]:
    return {k: _mean_spread([m[k] for m in per_seed]) for k in per_seed[0]}


def run_study(cfg: StudyConfig, out: Path, *, log=print) -> dict:
    """Run everything and write ``results.json``, ``table.md`` and the PNGs into ``out``."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    disc_net, disc_acc = cached_classifier(out, 16, 0, cfg.classifier_steps, log=log)
    eval_net, eval_acc = cached_classifier(out, 24, 1, cfg.classifier_steps, log=log)
    teacher_unet, teacher_losses = cached_teacher(out, cfg.teacher_steps, log=log)
    real, real_labels = reference_set(load_digits_split("train"), cfg.n_real, seed=7)
    evaluate = Evaluator(eval_net, real, real_labels)
    labels = _eval_labels(cfg.per_class)
    grid_labels = _eval_labels(8)
    teacher = wrap(teacher_unet, schedule(), PREDICTION)
    rows: list[dict] = [
        {"row": "real data (held-out colours)", "steps": None, "metrics": _aggregate([evaluate.reference()])}
    ]
    grids = []
    for n in cfg.teacher_step_counts:
        per_seed = [evaluate(ddim_sample(teacher, labels, n, torch.Generator().manual_seed(1000 + s)), labels)
                    for s in cfg.teacher_sample_seeds]  # fmt: skip
        rows.append({"row": "teacher (DDIM)", "steps": n, "metrics": _aggregate(per_seed)})
        grids.append(
            (
                f"teacher, {n} steps",
                to_pil_grid(
                    ddim_sample(teacher, grid_labels, n, torch.Generator().manual_seed(0)), NUM_CLASSES
                ),
            )
        )
        log(f"teacher {n} steps: {rows[-1]['metrics']['fd']['mean']:.3f} FD ({time.time() - start:.0f}s)")
    ablation_grids, curves = [], {}
    for label, run, seeds in ablation_runs(cfg):
        step_counts = (1, 4) if run.name == "add" else (1,)
        per_steps: dict[int, list[dict[str, float]]] = {n: [] for n in step_counts}
        for seed in seeds:
            student_unet, logs = distill(teacher_unet, disc_net, replace(run, seed=seed), log=log)
            student = wrap(student_unet, schedule(), PREDICTION)
            for n in step_counts:
                gen = torch.Generator().manual_seed(2000 + seed)
                per_steps[n].append(evaluate(student_sample(student, labels, STUDENT_STEPS[n], gen), labels))
            if seed == seeds[0]:
                curves[run.name] = logs
                for n in step_counts:
                    img = to_pil_grid(
                        student_sample(
                            student, grid_labels, STUDENT_STEPS[n], torch.Generator().manual_seed(0)
                        ),
                        NUM_CLASSES,
                    )
                    (grids if run.name == "add" else ablation_grids).append(
                        (f"{run.name}, {n} step{'s' * (n > 1)}", img)
                    )
        for n in step_counts:
            rows.append({"row": label, "run": run.name, "steps": n, "config": config_dict(run),
                         "metrics": _aggregate(per_steps[n])})  # fmt: skip
            log(
                f"{label}, {n} steps: {rows[-1]['metrics']['fd']['mean']:.3f} FD ({time.time() - start:.0f}s)"
            )
    labelled_grids(grids, out / "samples.png")
    if ablation_grids:
        labelled_grids([grids[-2]] + ablation_grids, out / "samples_ablations.png")
    _write_curves(curves, teacher_losses, out)
    results = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "classifiers": {"disc_test_acc": disc_acc, "eval_test_acc": eval_acc},
        "rows": rows,
        "seconds": time.time() - start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(markdown_table(rows))
    log(f"done in {results['seconds']:.0f}s; table:\n{markdown_table(rows)}")
    return results


def _write_curves(curves: dict, teacher_losses: list[float], out: Path) -> None:
    add = curves.get("add", {})
    loss_curves(
        {
            "teacher: v-loss": {"loss": teacher_losses},
            "ADD: D hinge loss": {"d/adv": add.get("d/adv", [])},
            "ADD: logits (real, fake)": {
                "real": add.get("d/logits_real", []),
                "fake": add.get("d/logits_fake", []),
            },
            "ADD: G losses": {
                "g/adv": add.get("g/adv", []),
                "g/distill x10": [10 * v for v in add.get("g/distill", [])],
            },
        },
        out / "curves_add.png",
        smooth=20,
    )
    if len(curves) > 1:
        loss_curves(
            {
                "distillation loss": {k: v["g/distill"] for k, v in curves.items() if "g/distill" in v},
                "D hinge loss": {k: v["d/adv"] for k, v in curves.items() if "d/adv" in v},
                "D real accuracy": {k: v["d/real_acc"] for k, v in curves.items() if "d/real_acc" in v},
            },
            out / "curves_ablations.png",
            smooth=20,
        )


def _fmt(m: dict, digits: int) -> str:
    if m["n"] > 1:
        return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"
    return f"{m['mean']:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """The table: FD (eval-classifier features) ↓, accuracy ↑, diversity, seeds."""
    lines = [
        "| model | steps | FD ↓ | accuracy ↑ | diversity | seeds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["metrics"]
        steps = "" if r["steps"] is None else str(r["steps"])
        lines.append(
            f"| {r['row']} | {steps} | {_fmt(m['fd'], 3)} | {_fmt(m['acc'], 3)} | {_fmt(m['div'], 3)} | {m['fd']['n']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Command line: ``python examples/add_toy.py [--quick] [--out DIR] [--threads N] [--distill-steps N]``
    with ``--dmd``, ``--flow`` or ``--ladd-probe`` for one part of the study.

    ``--distill-steps`` shortens every student run (the DMD2 rows in docs/results.md used 100).
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small study for tests (< 3 min on CPU)")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/add_toy"), help="output folder (teacher cache too)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)"
    )
    parser.add_argument(
        "--dmd", action="store_true", help="only the teacher and DMD2 rows (results_dmd.json, table_dmd.md)"
    )
    parser.add_argument(
        "--flow",
        action="store_true",
        help="only the rectified-flow teacher and its ADD / LADD rows (results_flow.json, table_flow.md)",
    )
    parser.add_argument(
        "--flow-only", nargs="+", default=None, metavar="RUN",
        help="with --flow: only these student runs (flow_add, flow_ladd_grid, flow_ladd_grid_m1)",
    )
    parser.add_argument(
        "--ladd-probe",
        action="store_true",
        help="only the discriminator-only probes of LADD's heads on the flow teacher (ladd_probe.json, .md)",
    )
    parser.add_argument(
        "--distill-steps", type=int, default=None, help="student training steps (default: the study's 300)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    if args.distill_steps is not None:
        cfg = replace(cfg, distill_steps=args.distill_steps)
    if args.dmd:
        from .dmd import run_dmd_study

        return run_dmd_study(cfg, args.out)
    if args.ladd_probe:
        from .ladd_probe import run_probes

        return run_probes(args.out, seeds=cfg.main_seeds, teacher_steps=cfg.teacher_steps)
    if args.flow:
        from .flow_study import run_flow_study

        return run_flow_study(cfg, args.out, only=None if args.flow_only is None else tuple(args.flow_only))
    return run_study(cfg, args.out)
