"""addkit: Adversarial Diffusion Distillation parts for your own trainer.

Importing addkit loads only torch and einops; parts that need an optional library import
it when used and name the extra to install.
"""

from addkit.denoisers import WrappedDenoiser, apply_cfg, wrap
from addkit.parameterization import convert, to_eps, to_flow, to_v, to_x0
from addkit.schedules import FlowSchedule, VPSchedule

__version__ = "0.1.0"

__all__ = [
    "FlowSchedule",
    "VPSchedule",
    "WrappedDenoiser",
    "__version__",
    "apply_cfg",
    "convert",
    "to_eps",
    "to_flow",
    "to_v",
    "to_x0",
    "wrap",
]
