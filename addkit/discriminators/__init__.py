"""Projected discriminators: frozen feature networks, trainable heads, augmentation.

- [`heads`][addkit.discriminators.heads]: StyleGAN-T heads with projection conditioning;
- [`augment`][addkit.discriminators.augment]: DiffAugment.
"""

from addkit.discriminators.augment import DiffAugment, diff_augment
from addkit.discriminators.heads import BatchNormLocal, DiscHead, EqualizedLinear, projection_logits

__all__ = [
    "BatchNormLocal",
    "DiffAugment",
    "DiscHead",
    "EqualizedLinear",
    "diff_augment",
    "projection_logits",
]
