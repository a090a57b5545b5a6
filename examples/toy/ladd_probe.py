"""Can LADD's discriminator see the flow student's faults? Discriminator-only probes on the toy teacher.

The student starts as the flow teacher, so its first fakes are the teacher's single Euler step (a
blurry conditional mean). Each probe trains only the discriminator, through
``ADDObjective.discriminator_loss`` (hinge + R1 on the head inputs, the study's optimiser), to
tell real digits from those fakes, then scores 512 fresh pairs at noise levels drawn as in
training: the hinge loss (sum over the three heads; 6 = chance, 0 = every token beyond the
margin) and the token sign accuracy (mean of real and fake; 0.5 = chance).

Rows: the old heads (1-D, circular kernel 9 over the flattened maps, local batch norm, not told
the noise level) and LADD's heads on the grid (2-D, per-sample norm, told the noise level), at
logit-normal means m = 1 (LADD), 0 and −1 and at a fixed low noise level. Writes
``ladd_probe.json`` and ``ladd_probe.md`` into ``--out`` (the flow study's folder: it reuses the
cached flow teacher): ``python examples/add_toy.py --ladd-probe --out outputs/add_toy_flow``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from addkit import wrap
from addkit.losses import discriminator_stats, hinge_d_loss
from addkit.objective import ADDObjective

from .data import NUM_CLASSES, load_digits_split, sample_batch
from .distill import RunConfig
from .flow import PREDICTION, cached_flow_teacher, euler_sample, ladd_discriminator, schedule

PROBES: tuple[tuple[str, str, float, float | None], ...] = (
    ("old heads, m = 1", "tokens", 1.0, None),
    ("old heads, m = −1", "tokens", -1.0, None),
    ("grid heads, m = 1", "grid", 1.0, None),
    ("grid heads, m = 0", "grid", 0.0, None),
    ("grid heads, m = −1", "grid", -1.0, None),
    ("grid heads, fixed t̂ = 0.25", "grid", 0.0, 0.25),
)
"""(row, heads, logit-normal mean, fixed t̂ or None)."""


def probe(teacher_net: torch.nn.Module, heads: str, mean: float, t: float | None, *, seed: int,
          steps: int, log=print) -> dict[str, float]:  # fmt: skip
    """Train one discriminator for ``steps`` and score it; see the module docs."""
    cfg = RunConfig(seed=seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data, sched = load_digits_split("train"), schedule()
    teacher = wrap(teacher_net, sched, PREDICTION)
    D = ladd_discriminator(teacher_net, mean, heads=heads, t=t)  # type: ignore[arg-type]
    objective = ADDObjective(None, D, sched, lambda_distill=0.0, space="latent", discriminator_sees="latents",
                             r1_gamma=cfg.r1_gamma)  # fmt: skip
    opt = torch.optim.Adam(D.parameters(), lr=cfg.lr_disc, betas=(0.0, 0.99))

    def pair(n: int, gen: torch.Generator):
        x0, y = sample_batch(data, n, gen)
        fake = euler_sample(teacher, y, 1, gen)
        return x0, fake, {"class_labels": y}, F.one_hot(y, NUM_CLASSES).float()

    for step in range(steps):
        real, fake, cond, c = pair(cfg.batch_size, g)
        loss, _ = objective.discriminator_loss(real, fake, c_text=c, step=step, generator=g, feature_kwargs=cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    real, fake, cond, c = pair(512, torch.Generator().manual_seed(10_000 + seed))
    D.eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(20_000 + seed)
        lr = D(real, c_text=c, per_head=True, generator=gen, **cond)
        lf = D(fake, c_text=c, per_head=True, generator=gen, **cond)
        stats = {k: float(v) for k, v in discriminator_stats(lr, lf).items()}
        stats["hinge"] = float(hinge_d_loss(lr, lf))
    stats["accuracy"] = 0.5 * (stats["real_acc"] + stats["fake_acc"])
    return stats


def run_probes(out: Path, *, seeds: tuple[int, ...] = (0, 1, 2), steps: int = 200, teacher_steps: int = 1500,
               log=print) -> dict:  # fmt: skip
    """Every probe of ``PROBES`` over ``seeds``; writes the JSON and the markdown table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_net, _ = cached_flow_teacher(out, teacher_steps, log=log)
    rows, start = [], time.time()
    for name, heads, mean, t in PROBES:
        per_seed = [probe(teacher_net, heads, mean, t, seed=s, steps=steps) for s in seeds]
        row = {"row": name, "heads": heads, "logit_mean": mean, "t": t}
        for key in ("hinge", "accuracy", "rank"):
            values = [p[key] for p in per_seed]
            row[key] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "values": values}
        rows.append(row)
        log(f"{name}: hinge {row['hinge']['mean']:.2f}, accuracy {row['accuracy']['mean']:.3f} "
            f"({time.time() - start:.0f}s)")  # fmt: skip
    result = {"rows": rows, "seeds": list(seeds), "steps": steps, "seconds": time.time() - start,
              "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    (out / "ladd_probe.json").write_text(json.dumps(result, indent=1))
    lines = ["| discriminator | hinge ↓ (6 = chance) | token accuracy ↑ | ranking ↑ |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['hinge']['mean']:.2f} ± {r['hinge']['std']:.2f} | "
                     f"{r['accuracy']['mean']:.3f} ± {r['accuracy']['std']:.3f} | "
                     f"{r['rank']['mean']:.3f} ± {r['rank']['std']:.3f} |")  # fmt: skip
    (out / "ladd_probe.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    return result

