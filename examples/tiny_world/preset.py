"""The tiny world's ADD settings: what ``add_sdxl.py --preset tiny`` uses for the flags left unset.

Measured on the shipped teacher with the recipe itself (numbers in ``docs/tiny_world.md``).
"""

from __future__ import annotations

DEFAULTS: dict[str, object] = {
    "max_steps": 450,
    "batch_size": 16,
    "lr": 5e-5,
    "lr_d": 1e-3,
    "adam_betas_d": [0.0, 0.99],
    "weight_decay": 1e-2,
    "max_grad_norm": 1.0,
    "lambda_distill": 2.5,
    "adversarial_weight": 3.0,  # measured with the per-sample-normalised discriminator (docs/tiny_world.md)
    "adversarial_loss": "non_saturating",
    "weighting": "exponential",
    "distill_space": "pixel",
    "ema_decay": 0.99,
    "augment": False,  # DiffAugment off: at 32 pixels a translation moves too much of the shape
}
"""The preset, by ``add_sdxl.py`` argument name."""
