"""The flow rows of the study: a rectified-flow teacher, its ADD and LADD students at 1 and 4 steps.

``python examples/add_toy.py --flow`` (``--quick`` for the test's size). Same data, classifiers,
metrics and seeds policy as the VP rows (teacher: three sampling seeds; the ADD and LADD rows:
the study's main seeds; the LADD ablation with lower noise levels: its ablation seeds), with the
classifiers from the same cache, so the rows compare with the VP table. Writes
``results_flow.json``, ``table_flow.md``, ``samples_flow.png`` and ``curves_flow.png`` into ``--out``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from addkit import wrap

from .data import NUM_CLASSES, load_digits_split, reference_set
from .distill import RunConfig, config_dict
from .flow import (
    PREDICTION,
    STUDENT_STEPS,
    cached_flow_student,
    cached_flow_teacher,
    euler_sample,
    flow_runs,
    schedule,
)
from .metrics import Evaluator
from .nets import cached_classifier
from .plots import labelled_grids, loss_curves, to_pil_grid
from .sampling import student_sample
from .study import _aggregate, _eval_labels, markdown_table


def run_flow_study(cfg: object, out: Path, *, only: tuple[str, ...] | None = None, log=print) -> dict:
    """Teacher rows (Euler, ``cfg.teacher_step_counts``) and the flow ADD / LADD rows; see the module docs.

    ``only``: run names (``flow_runs``) to train and score; the others are left out of the table.
    """
    out, start = Path(out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    disc_net, _ = cached_classifier(out, 16, 0, cfg.classifier_steps, log=log)
    eval_net, _ = cached_classifier(out, 24, 1, cfg.classifier_steps, log=log)
    teacher_net, teacher_losses = cached_flow_teacher(out, cfg.teacher_steps, log=log)
    real, real_labels = reference_set(load_digits_split("train"), cfg.n_real, seed=7)
    evaluate = Evaluator(eval_net, real, real_labels)
    labels, grid_labels = _eval_labels(cfg.per_class), _eval_labels(8)
    teacher = wrap(teacher_net, schedule(), PREDICTION)
    rows: list[dict] = []
    grids = []
    for n in cfg.teacher_step_counts:
        per_seed = [
            evaluate(euler_sample(teacher, labels, n, torch.Generator().manual_seed(1000 + s)), labels)
            for s in cfg.teacher_sample_seeds
        ]
        rows.append({"row": "flow teacher (Euler)", "steps": n, "metrics": _aggregate(per_seed)})
        img = euler_sample(teacher, grid_labels, n, torch.Generator().manual_seed(0))
        grids.append((f"flow teacher, {n} steps", to_pil_grid(img, NUM_CLASSES)))
        log(
            f"flow teacher {n} steps: {rows[-1]['metrics']['fd']['mean']:.3f} FD ({time.time() - start:.0f}s)"
        )
    curves = {"flow teacher: velocity loss": {"loss": teacher_losses}}
    runs = flow_runs(RunConfig(steps=cfg.distill_steps), cfg.main_seeds, cfg.ablation_seeds)
    for label, run, ladd, seeds in runs:
        if not seeds or (only is not None and run.name not in only):
            continue
        per_steps: dict[int, list[dict[str, float]]] = {1: [], 4: []}
        for seed in seeds:
            student_net, logs = cached_flow_student(
                out,
                teacher_net,
                disc_net,
                replace(run, seed=seed),
                ladd=ladd,
                teacher_steps=cfg.teacher_steps,
                log=log,
            )
            student = wrap(student_net, schedule(), PREDICTION)
            for n in (1, 4):
                gen = torch.Generator().manual_seed(2000 + seed)
                per_steps[n].append(evaluate(student_sample(student, labels, STUDENT_STEPS[n], gen), labels))
                if seed == seeds[0]:
                    img = student_sample(
                        student, grid_labels, STUDENT_STEPS[n], torch.Generator().manual_seed(0)
                    )
                    grids.append((f"{run.name}, {n} step{'s' * (n > 1)}", to_pil_grid(img, NUM_CLASSES)))
            if seed == seeds[0]:
                curves[f"{run.name}: D hinge loss"] = {"d/adv": logs["d/adv"]}
        for n in (1, 4):
            rows.append(
                {
                    "row": label,
                    "run": run.name,
                    "steps": n,
                    "config": {**config_dict(run), "ladd": None if ladd is None else asdict(ladd)},
                    "metrics": _aggregate(per_steps[n]),
                }
            )
            log(
                f"{label}, {n} steps: {rows[-1]['metrics']['fd']['mean']:.3f} FD ({time.time() - start:.0f}s)"
            )
    labelled_grids(grids, out / "samples_flow.png")
    loss_curves(curves, out / "curves_flow.png", smooth=20)
    results = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "rows": rows,
        "seconds": time.time() - start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "results_flow.json").write_text(json.dumps(results, indent=1))
    (out / "table_flow.md").write_text(markdown_table(rows))
    log(f"done in {results['seconds']:.0f}s; table:\n{markdown_table(rows)}")
    return results
