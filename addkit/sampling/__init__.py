"""Few-step sampling: [`sample`][addkit.sampling.sampler.sample],
[`FewStepSampler`][addkit.sampling.sampler.FewStepSampler] and the CUDA-graph
[`CUDAGraphSampler`][addkit.sampling.cuda_graph.CUDAGraphSampler]."""

from addkit.sampling.cuda_graph import COMPILE_MODES, CUDAGraphSampler, EagerFallbackWarning
from addkit.sampling.renoise import Renoise, renoise_coefficients, renoise_step
from addkit.sampling.sampler import DEFAULT_TIMESTEPS, FewStepSampler, sample

__all__ = [
    "COMPILE_MODES",
    "DEFAULT_TIMESTEPS",
    "CUDAGraphSampler",
    "EagerFallbackWarning",
    "FewStepSampler",
    "Renoise",
    "renoise_coefficients",
    "renoise_step",
    "sample",
]
