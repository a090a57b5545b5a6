"""Losses and regularisers: adversarial (hinge, non-saturating), R1 penalties, distillation."""

from addkit.losses.adversarial import (
    HeadLogits,
    HingeDLoss,
    HingeGLoss,
    NonSaturatingDLoss,
    NonSaturatingGLoss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from addkit.losses.distillation import (
    Distance,
    Weighting,
    WeightFn,
    distillation_loss,
    distillation_weight,
    sample_distillation_timesteps,
)
from addkit.losses.regularizers import (
    LazyRegularizer,
    approximate_r1,
    r1_context,
    r1_penalty,
    r1_penalty_images,
)

__all__ = [
    "Distance",
    "Weighting",
    "WeightFn",
    "distillation_loss",
    "distillation_weight",
    "sample_distillation_timesteps",
    "HeadLogits",
    "HingeDLoss",
    "HingeGLoss",
    "LazyRegularizer",
    "NonSaturatingDLoss",
    "NonSaturatingGLoss",
    "approximate_r1",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
    "r1_context",
    "r1_penalty",
    "r1_penalty_images",
]
