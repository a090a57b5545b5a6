"""Tiny models and tokenizers for tests, benchmarks and presets: random weights, offline.

Every builder constructs its network from a small config with seeded random weights on the
CPU in float32: nothing is downloaded. The heavy libraries are imported when a builder is
called; a missing one raises ``ModuleNotFoundError`` naming the extra to install
(``pip install 'addkit[diffusers]'``, ``'addkit[timm]'``). ``import addkit`` does not import
this package.

- [`models`][addkit.testing.models]: SD and SDXL UNets, a VAE, SD3 and Flux transformers, a
  DINOv2-architecture ViT and the ``ProjectedDiscriminator.from_dinov2`` arguments for it;
- [`text`][addkit.testing.text]: an offline character-level CLIP tokenizer and CLIP text
  encoders;
- [`pipelines`][addkit.testing.pipelines]: a tiny ``StableDiffusionXLPipeline`` and the
  conditioning it builds for a prompt;
- [`host_reads`][addkit.testing.host_reads]: count the tensor-to-host reads (device
  synchronisations) a block of code makes;
- [`storage`][addkit.testing.storage]: count the storages holding a model's weights (one
  copy or two), randomise a LoRA adapter.
"""

from addkit.testing.host_reads import HostRead, HostReads, count_host_reads
from addkit.testing.models import (
    tiny_clip_visual,
    tiny_dinov2,
    tiny_dinov2_kwargs,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_sd_unet,
    tiny_sdxl_unet,
    tiny_vae,
)
from addkit.testing.pipelines import sdxl_condition, tiny_sdxl_components, tiny_sdxl_pipeline
from addkit.testing.storage import randomize_lora, storage_counts
from addkit.testing.text import tiny_clip_text_encoder, tiny_clip_tokenizer

__all__ = [
    "HostRead",
    "HostReads",
    "count_host_reads",
    "randomize_lora",
    "sdxl_condition",
    "storage_counts",
    "tiny_clip_text_encoder",
    "tiny_clip_tokenizer",
    "tiny_clip_visual",
    "tiny_dinov2",
    "tiny_dinov2_kwargs",
    "tiny_flux_transformer",
    "tiny_sd3_transformer",
    "tiny_sd_unet",
    "tiny_sdxl_components",
    "tiny_sdxl_pipeline",
    "tiny_sdxl_unet",
    "tiny_vae",
]
