"""The ``--preset tiny`` parts of ``add_sdxl.py``: the tiny world's data and the closing evaluation.

The preset distils the tiny world's shipped teacher (``examples/tiny_world/weights``, an
SDXL-architecture UNet, VAE and two CLIP text encoders trained on 32×32 coloured shapes) through
the same code as an SDXL run: the checkpoint is read with ``from_pretrained``, the data is a folder
of image + caption files, the discriminator is ``ProjectedDiscriminator.from_dinov2`` on the
world's trained ViT. What this file adds is what only the tiny world can have: a data folder
drawn on the fly, and a score of the result on held-out captions (``report.json``,
``comparison.png``) by the world's evaluation classifier. See ``docs/tiny_world.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import tiny_world

DATASET_SIZE = 4096  # training images drawn into the data folder (a 300-step run reads 4800)
PER_CAPTION = 16  # samples per held-out caption in the evaluation (24 captions)


def make_dataset(folder: Path, seed: int) -> Path:
    """The training captions' images as ``k.png`` + ``k.txt`` (held-out captions never appear)."""
    return tiny_world.make_dataset(folder, DATASET_SIZE, seed=seed)


def evaluate(models: Any, student_unet: torch.nn.Module, output_dir: Path, *, seed: int = 0) -> dict:
    """Score teacher (1, 4, 25 steps) and student (1, 4 steps) on the held-out captions.

    Writes ``report.json`` (``{"teacher": {"1", "4", "25"}, "student": {"1", "4"}, "real": ...}``,
    each with ``prompt_accuracy``, ``fd`` and ``diversity``) and ``comparison.png`` (one row per
    caption; columns teacher 1 / 4 / 25 steps, student 1 / 4 steps, the same noise in a row).
    The frozen teacher's scores come from ``teacher_scores.json`` beside the shipped weights
    when it was made with the same weights and settings (``python -m tiny_world.train scores``),
    else they are computed here.

    Args:
        models: the recipe's ``Models`` (teacher, VAE, text encoders, tokenizers).
        student_unet: the student as a plain diffusers UNet (the EMA weights when EMA is on).
        output_dir: where the two files go.
        seed: seed of the evaluation's noise and real images.

    Returns:
        The report's metrics.
    """
    for module in (models.teacher, models.vae, *models.text_encoders, student_unet):
        if module.dtype != torch.float32 or module.device.type != "cpu":  # the run is over: score on the CPU
            module.to("cpu", torch.float32)
    parts = tiny_world.TinyParts(
        unet=models.teacher, vae=models.vae, text_encoder=models.text_encoders[0],
        text_encoder_2=models.text_encoders[1], tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1],
    )  # fmt: skip
    evaluator = tiny_world.Evaluator(parts, tiny_world.load_classifier(), per_caption=PER_CAPTION, seed=seed)
    stored = tiny_world.stored_teacher_scores(evaluator)  # the shipped teacher's, scored once
    result = tiny_world.report(models.teacher, student_unet, evaluator, teacher=stored)
    metrics = result["metrics"]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(metrics, indent=2) + "\n")
    tiny_world.save_grid(result["images"], output_dir / "comparison.png")
    return metrics


def table(metrics: dict) -> str:
    """The report as the lines printed at the end of a run."""
    lines = [f"  {'held-out captions':<20} {'prompt_accuracy':>16} {'fd':>8} {'diversity':>10}"]
    rows = [(f"teacher {n} step{'s' * (n != '1')}", metrics["teacher"][n]) for n in ("1", "4", "25")]
    rows += [(f"student {n} step{'s' * (n != '1')}", metrics["student"][n]) for n in ("1", "4")]
    rows.append(("real images", metrics["real"]))
    for name, m in rows:
        lines.append(f"  {name:<20} {m['prompt_accuracy']:>16.3f} {m['fd']:>8.2f} {m['diversity']:>10.2f}")
    return "\n".join(lines)
