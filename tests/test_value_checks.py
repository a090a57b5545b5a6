"""`addkit.value_checks()` covers every public entry point that takes tensors.

Every public name of ``addkit`` and its subpackages (their ``__all__``) is either in `PROBES`:
a call with one NaN input (or a NaN number) that must raise a ``ValueError`` naming that
argument while value checks are on; or in `EXEMPT`, with the reason it takes no tensor
values. A new public name that is in neither fails `test_every_public_name_is_probed_or_exempt`.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import addkit
from addkit import FlowSchedule, VPSchedule, value_checks, wrap
from addkit import discriminators as disc
from addkit import losses
from addkit import sampling as smp

PACKAGES = ("addkit", "addkit.discriminators", "addkit.losses", "addkit.sampling", "addkit.testing")
VP = VPSchedule.scaled_linear()
FLOW = FlowSchedule(shift=3.0)
NAN = float("nan")

EXEMPT: dict[str, str] = {
    "__version__": "a string",
    "value_checks": "the switch itself (a bool)",
    "LazyRegularizer": "takes an interval and a step (ints, checked always)",
    "StudentInputs": "a record the objectives return; it computes nothing",
    "FrozenFeatures": "an abstract base; its subclasses' forward is probed",
    "FeatureNetwork": "a Protocol (a type, not called)",
    "R1Regularizer": "a Protocol (a type, not called)",
    "Distance": "a type alias",
    "HeadLogits": "a type alias",
    "HeadNorm": "a type alias",
    "R1Placement": "a type alias",
    "Renoise": "a type alias",
    "WeightFn": "a type alias",
    "Weighting": "a type alias",
    "COMPILE_MODES": "a constant",
    "ADVERSARIAL_LOSSES": "a constant (name -> the hinge / non-saturating functions, each probed)",
    "AdversarialLoss": "a record of two loss callables, checked at construction (not values)",
    "AdversarialLossName": "a type alias",
    "adversarial_loss": "resolves a name or a pair (no tensor)",
    "DEFAULT_TIMESTEPS": "a constant",
    "EagerFallbackWarning": "a warning class",
    "r1_context": "a context manager without arguments",
    "default_taps": "an int depth to tap indices (checked always)",
    # addkit.testing: builders of tiny test models and the host-read counter (no tensor values)
    "HostRead": "addkit.testing: a record",
    "HostReads": "addkit.testing: a record",
    "count_host_reads": "addkit.testing: a context manager without arguments",
    "randomize_lora": "addkit.testing: fills a module's LoRA weights (a module, not values)",
    "sdxl_condition": "addkit.testing: runs a pipeline's encoders on a prompt string",
    "storage_counts": "addkit.testing: counts storages (identity, not values)",
    "tiny_clip_text_encoder": "addkit.testing: a model builder",
    "tiny_clip_tokenizer": "addkit.testing: a tokenizer builder",
    "tiny_clip_visual": "addkit.testing: a model builder",
    "tiny_dinov2": "addkit.testing: a model builder",
    "tiny_dinov2_kwargs": "addkit.testing: a dict of builder arguments",
    "tiny_flux_transformer": "addkit.testing: a model builder",
    "tiny_sd3_transformer": "addkit.testing: a model builder",
    "tiny_sd_unet": "addkit.testing: a model builder",
    "tiny_sdxl_components": "addkit.testing: a model builder",
    "tiny_sdxl_pipeline": "addkit.testing: a model builder",
    "tiny_sdxl_unet": "addkit.testing: a model builder",
    "tiny_vae": "addkit.testing: a model builder",
}


def nan(*shape: int) -> Tensor:
    """A tensor of ones with one NaN."""
    x = torch.ones(*shape)
    x.view(-1)[0] = NAN
    return x


def ones(*shape: int) -> Tensor:
    return torch.ones(*shape)


def denoiser() -> Any:
    return wrap(lambda x, t: torch.zeros_like(x), VP, "eps")


def discriminator() -> disc.ProjectedDiscriminator:
    net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU())
    return disc.ProjectedDiscriminator(disc.TappedFeatures(net, ["0"], resolution=16), c_text_dim=4).eval()


def add_objective() -> addkit.ADDObjective:
    return addkit.ADDObjective(denoiser(), discriminator(), VP, discriminator_sees="latents")


def dmd_objective() -> addkit.DMDObjective:
    return addkit.DMDObjective(denoiser(), denoiser(), VP)


def teacher_features() -> disc.TeacherFeatures:
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU())
    return disc.TeacherFeatures(net, FLOW, ["0"], channels=[8], call=lambda x_t, t: net(x_t), t=0.5)


def r1_inputs() -> tuple[Tensor, Tensor]:
    x = nan(2, 3).requires_grad_(True)
    return x.nan_to_num().sum(1, keepdim=True), x  # finite logits of a NaN input


def dinov2() -> disc.DINOv2Features:
    pytest.importorskip("timm")
    from addkit.testing import tiny_dinov2_kwargs

    features = disc.ProjectedDiscriminator.from_dinov2(**tiny_dinov2_kwargs()).features
    return features  # type: ignore[return-value]


def clip() -> disc.CLIPFeatures:
    pytest.importorskip("open_clip")
    from addkit.testing import tiny_clip_visual

    return disc.CLIPFeatures(tiny_clip_visual())


def cuda_graph_sampler(noise: Tensor) -> Tensor:
    sampler = smp.CUDAGraphSampler(denoiser(), schedule=VP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", smp.EagerFallbackWarning)  # on the CPU the loop runs eagerly
        return sampler(noise)


# name -> (the argument the error names, a call with a NaN in it)
PROBES: dict[str, tuple[str, Callable[[], Any]]] = {
    "ADDObjective": ("x0", lambda: add_objective().sample_student_inputs(nan(2, 4, 8, 8))),
    "ADDObjective.generator_loss": ("student_x0", lambda: add_objective().generator_loss(nan(2, 3, 16, 16))),
    "ADDObjective.discriminator_loss": (
        "fake",
        lambda: add_objective().discriminator_loss(ones(2, 3, 16, 16), nan(2, 3, 16, 16), c_text=ones(2, 4)),
    ),
    "CLIPFeatures": ("images", lambda: clip()(nan(1, 3, 16, 16))),
    "CUDAGraphSampler": ("noise", lambda: cuda_graph_sampler(nan(2, 3))),
    "DINOv2Features": ("images", lambda: dinov2()(nan(1, 3, 16, 16))),
    "DMDObjective": ("noise", lambda: dmd_objective().sample_student_inputs(nan(2, 3), step=0)),
    "DMDObjective.generator_loss": ("student_x0", lambda: dmd_objective().generator_loss(nan(2, 3))),
    "DMDObjective.fake_score_loss": ("student_x0", lambda: dmd_objective().fake_score_loss(nan(2, 3))),
    "DiffAugment": ("x", lambda: disc.DiffAugment()(nan(1, 3, 8, 8))),
    "FewStepSampler": ("noise", lambda: smp.FewStepSampler(denoiser(), schedule=VP)(nan(2, 3))),
    "FlowSchedule": ("noise", lambda: FLOW.add_noise(ones(2, 3), nan(2, 3), 0.5)),
    "FlowSchedule.sigma": ("t", lambda: FLOW.sigma(torch.tensor([0.5, NAN]))),
    "ProjectedDiscriminator": ("images", lambda: discriminator()(nan(2, 3, 16, 16), c_text=ones(2, 4))),
    "ProjectedDiscriminator.classify": (
        "c_text",
        lambda: discriminator().classify([ones(2, 8, 16)], c_text=nan(2, 4)),
    ),
    "TappedFeatures": ("images", lambda: discriminator().features(nan(2, 3, 16, 16))),
    "TeacherFeatures": ("latents", lambda: teacher_features()(nan(2, 4, 6, 6))),
    "VPSchedule": ("x0", lambda: VP.add_noise(nan(2, 3), ones(2, 3), 500)),
    "WrappedDenoiser": ("x_t", lambda: denoiser().x0(nan(2, 3), 500)),
    "WrappedDenoiser.guidance_scale": (
        "guidance_scale",
        lambda: denoiser().x0(ones(2, 3), 500, guidance_scale=NAN, uncond={}),
    ),
    "apply_cfg": (
        "guidance_scale",
        lambda: addkit.apply_cfg(ones(2, 3), ones(2, 3), torch.tensor([1.0, NAN])),
    ),
    "approximate_r1": ("real", lambda: losses.approximate_r1(lambda x: x.flatten(1), nan(2, 3))),
    "convert": (
        "alpha",
        lambda: addkit.convert(ones(2, 3), ones(2, 3), nan(2, 1), ones(2, 1), source="eps", target="x0"),
    ),
    "diff_augment": ("x", lambda: disc.diff_augment(nan(1, 3, 8, 8))),
    "distillation_loss": (
        "noise",
        lambda: losses.distillation_loss(ones(2, 3), denoiser(), torch.tensor([10, 20]), nan(2, 3)),
    ),
    "distribution_matching_loss": (
        "student_x0",
        lambda: losses.distribution_matching_loss(nan(2, 3), denoiser(), denoiser(), schedule=VP),
    ),
    "hinge_d_loss": ("real_logits", lambda: losses.hinge_d_loss(nan(2, 1), ones(2, 1))),
    "hinge_g_loss": ("fake_logits", lambda: losses.hinge_g_loss(nan(2, 1))),
    "non_saturating_d_loss": ("fake_logits", lambda: losses.non_saturating_d_loss(ones(2, 1), nan(2, 1))),
    "non_saturating_g_loss": ("fake_logits", lambda: losses.non_saturating_g_loss(nan(2, 1))),
    "r1_penalty": ("real_inputs", lambda: losses.r1_penalty(*r1_inputs())),
    "sample": ("noise", lambda: addkit.sample(denoiser(), nan(2, 3), schedule=VP)),
    "sample.noises": (
        "noises[1]",
        lambda: addkit.sample(
            denoiser(), ones(2, 3), schedule=VP, noises=[ones(2, 3), nan(2, 3), ones(2, 3)]
        ),
    ),
    "sample_distillation_timesteps": (
        "t_range",
        lambda: losses.sample_distillation_timesteps(2, FLOW, t_range=(NAN, 0.5)),
    ),
    "to_eps": ("pred", lambda: addkit.to_eps(nan(2, 3), ones(2, 3), 500, schedule=VP, prediction="v")),
    "to_flow": ("x_t", lambda: addkit.to_flow(ones(2, 3), nan(2, 3), 500, schedule=VP, prediction="v")),
    "to_v": ("pred", lambda: addkit.to_v(nan(2, 3), ones(2, 3), 500, schedule=VP, prediction="eps")),
    "to_x0": ("x_t", lambda: addkit.to_x0(ones(2, 3), nan(2, 3), 500, schedule=VP, prediction="eps")),
    "wrap": ("x_t", lambda: wrap(nn.Identity(), VP, "x0").x0(nan(2, 3), 500)),
    # addkit.discriminators
    "BatchNormLocal": ("x", lambda: disc.BatchNormLocal(4)(nan(2, 4, 3))),
    "DiscHead": ("c", lambda: disc.DiscHead(4, c_dim=2)(ones(2, 4, 8), nan(2, 2))),
    "EqualizedLinear": ("x", lambda: disc.EqualizedLinear(3, 2)(nan(2, 3))),
    "SampleNorm": ("x", lambda: disc.SampleNorm(4)(nan(2, 4, 3))),
    "projection_logits": ("cmap", lambda: disc.projection_logits(ones(2, 4, 3), nan(2, 4))),
    "sample_logit_normal": ("mean", lambda: disc.sample_logit_normal(4, mean=NAN)),
    # addkit.losses
    "ApproximateR1": ("real", lambda: losses.ApproximateR1()(lambda x, **k: x.flatten(1), nan(2, 3))),
    "ChanceWatch": ("rank", lambda: losses.ChanceWatch().update(0, NAN)),
    "HingeDLoss": ("fake_logits", lambda: losses.HingeDLoss()(ones(2, 1), nan(2, 1))),
    "HingeGLoss": ("weight", lambda: losses.HingeGLoss()(ones(2, 1), weight=torch.tensor([1.0, NAN]))),
    "NonSaturatingDLoss": ("real_logits", lambda: losses.NonSaturatingDLoss()(nan(2, 1), ones(2, 1))),
    "NonSaturatingGLoss": ("fake_logits", lambda: losses.NonSaturatingGLoss()(nan(2, 1))),
    "R1Features": (
        "images",
        lambda: losses.R1Features()(discriminator(), nan(2, 3, 16, 16), c_text=ones(2, 4)),
    ),
    "R1Images": (
        "real_inputs",
        lambda: losses.R1Images()(lambda x, **k: x.nan_to_num().flatten(1), nan(2, 3)),
    ),
    "discriminator_stats": ("real_logits", lambda: losses.discriminator_stats(nan(2, 1), ones(2, 1))),
    "distillation_weight": (
        "sigma",
        lambda: losses.distillation_weight("sds", torch.tensor([1]), ones(2), torch.tensor([1.0, NAN])),
    ),
    "fake_score_loss": ("student_x0", lambda: losses.fake_score_loss(nan(2, 3), denoiser(), schedule=VP)),
    "prediction_target": (
        "alpha",
        lambda: losses.prediction_target("v", ones(2, 3), ones(2, 3), nan(2, 1), ones(2, 1)),
    ),
    "r1_penalty_images": ("real_images", lambda: losses.r1_penalty_images(lambda x: x.flatten(1), nan(2, 3))),
    "regression_loss": ("teacher_x0", lambda: losses.regression_loss(ones(2, 3), nan(2, 3))),
    "r1_regularizer": ("sigma", lambda: losses.r1_regularizer("approximate", sigma=NAN)),
    # addkit.sampling
    "renoise_coefficients": (
        "timesteps",
        lambda: smp.renoise_coefficients(FLOW, (1.0, NAN), renoise="ancestral"),
    ),
    "renoise_step": (
        "z",
        lambda: smp.renoise_step(ones(2, 3), ones(2, 3), nan(2, 3), torch.tensor([0.6, 0.0, 0.8])),
    ),
}


def public_names() -> set[str]:
    return {name for pkg in PACKAGES for name in importlib.import_module(pkg).__all__}


def test_every_public_name_is_probed_or_exempt() -> None:
    probed = {key.partition(".")[0] for key in PROBES}
    missing = sorted(public_names() - probed - set(EXEMPT))
    assert not missing, f"public names without a value-check probe or an exemption: {missing}"
    stale = sorted((probed | set(EXEMPT)) - public_names())
    assert not stale, f"probes or exemptions for names that are not public: {stale}"
    assert not probed & set(EXEMPT)


@pytest.mark.parametrize("key", sorted(PROBES))
def test_a_nan_input_raises_naming_the_argument_under_value_checks(key: str) -> None:
    name, call = PROBES[key]
    with value_checks(), pytest.raises(ValueError, match=rf"{_escape(name)} must (be|lie|have)") as caught:
        call()
    assert "finite" in str(caught.value) or "lie in" in str(caught.value), str(caught.value)


def _escape(name: str) -> str:
    return name.replace("[", r"\[").replace("]", r"\]")
