"""addkit: Adversarial Diffusion Distillation parts for your own trainer.

Importing addkit loads only torch and einops; parts that need an optional library import
it when used and name the extra to install.
"""

from addkit.checks import value_checks
from addkit.denoisers import WrappedDenoiser, apply_cfg, wrap
from addkit.discriminators import (
    CLIPFeatures,
    DiffAugment,
    DINOv2Features,
    ProjectedDiscriminator,
    TappedFeatures,
    TeacherFeatures,
    diff_augment,
)
from addkit.dmd import DMDObjective
from addkit.losses import (
    LazyRegularizer,
    approximate_r1,
    distillation_loss,
    distribution_matching_loss,
    fake_score_loss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
    r1_penalty,
    sample_distillation_timesteps,
)
from addkit.objective import ADDObjective, StudentInputs
from addkit.parameterization import convert, to_eps, to_flow, to_v, to_x0
from addkit.sampling import CUDAGraphSampler, FewStepSampler, sample
from addkit.schedules import FlowSchedule, VPSchedule

__version__ = "0.1.0"

__all__ = [
    "ADDObjective",
    "CLIPFeatures",
    "CUDAGraphSampler",
    "DINOv2Features",
    "DMDObjective",
    "DiffAugment",
    "FewStepSampler",
    "FlowSchedule",
    "LazyRegularizer",
    "ProjectedDiscriminator",
    "StudentInputs",
    "TappedFeatures",
    "TeacherFeatures",
    "VPSchedule",
    "WrappedDenoiser",
    "__version__",
    "apply_cfg",
    "approximate_r1",
    "convert",
    "diff_augment",
    "distillation_loss",
    "distribution_matching_loss",
    "fake_score_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
    "r1_penalty",
    "sample",
    "sample_distillation_timesteps",
    "to_eps",
    "to_flow",
    "to_v",
    "to_x0",
    "value_checks",
    "wrap",
]
