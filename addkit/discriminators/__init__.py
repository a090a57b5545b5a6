"""Projected discriminators: frozen feature networks, trainable heads, augmentation.

- [`features`][addkit.discriminators.features]: the feature-network contract and
  [`TappedFeatures`][addkit.discriminators.features.TappedFeatures] for any ``nn.Module``;
- [`vit`][addkit.discriminators.vit]: [`DINOv2Features`][addkit.discriminators.vit.DINOv2Features]
  (timm); [`clip`][addkit.discriminators.clip]:
  [`CLIPFeatures`][addkit.discriminators.clip.CLIPFeatures] (open_clip);
- [`teacher`][addkit.discriminators.teacher]:
  [`TeacherFeatures`][addkit.discriminators.teacher.TeacherFeatures], a frozen denoiser on
  re-noised latents (LADD);
- [`heads`][addkit.discriminators.heads]: StyleGAN-T heads with projection conditioning;
- [`augment`][addkit.discriminators.augment]: DiffAugment;
- [`projected`][addkit.discriminators.projected]:
  [`ProjectedDiscriminator`][addkit.discriminators.projected.ProjectedDiscriminator].

Importing this package never imports timm, open_clip or diffusers.
"""

from addkit.discriminators.augment import DiffAugment, diff_augment
from addkit.discriminators.clip import CLIPFeatures
from addkit.discriminators.features import FeatureNetwork, FrozenFeatures, TappedFeatures
from addkit.discriminators.heads import (
    BatchNormLocal,
    DiscHead,
    EqualizedLinear,
    HeadNorm,
    SampleNorm,
    projection_logits,
)
from addkit.discriminators.projected import ProjectedDiscriminator
from addkit.discriminators.teacher import TeacherFeatures, sample_logit_normal
from addkit.discriminators.vit import DINOv2Features, default_taps

__all__ = [
    "BatchNormLocal",
    "CLIPFeatures",
    "DINOv2Features",
    "DiffAugment",
    "DiscHead",
    "EqualizedLinear",
    "FeatureNetwork",
    "FrozenFeatures",
    "HeadNorm",
    "ProjectedDiscriminator",
    "SampleNorm",
    "TappedFeatures",
    "TeacherFeatures",
    "default_taps",
    "diff_augment",
    "projection_logits",
    "sample_logit_normal",
]
