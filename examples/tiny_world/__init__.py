"""A tiny pretrained text-to-image world for ADD on a CPU: coloured shapes, captions, an SDXL teacher.

- [`world`](world.py): 32×32 images of one shape (circle, square, triangle; six colours; small or
  large; on another colour), captions, the 24 held-out captions, ``make_dataset``;
- [`models`](models.py): SDXL-architecture VAE, UNet and two CLIP text encoders, a DINOv2-
  architecture ViT, the evaluation classifier; ``load_parts()`` reads the shipped weights offline;
- [`train`](train.py): the seeded script that trained them (``python -m tiny_world.train``);
- [`evaluate`](evaluate.py): ``prompt_accuracy``, ``fd``, ``diversity`` on held-out captions,
  sampling at N steps, the comparison grid;
- [`preset`](preset.py): the ADD settings of ``add_sdxl.py --preset tiny`` (``DEFAULTS``).

The recipe (``examples/add_sdxl.py``, its default preset) reads the weights folder as an SDXL
checkpoint (``from_pretrained``) and uses the rest as::

    import tiny_world
    D = addkit.ProjectedDiscriminator.from_dinov2(**tiny_world.dinov2_kwargs(), c_text_dim=32, c_image_dim=48)
    encoder = tiny_world.image_encoder()              # c_image: the ViT's CLS embedding
    evaluator = tiny_world.Evaluator(parts, tiny_world.load_classifier())
    result = tiny_world.report(teacher_unet, student_unet, evaluator)
    tiny_world.save_grid(result["images"], "comparison.png")

See ``docs/tiny_world.md``.
"""

from .evaluate import (
    METRICS,
    Evaluator,
    decode,
    diversity,
    frechet_distance,
    grid,
    prompt_accuracy,
    report,
    save_grid,
    store_teacher_scores,
    stored_teacher_scores,
    teacher_denoiser,
    teacher_scores,
    weights_digest,
)
from .models import (
    WEIGHTS,
    TinyParts,
    dinov2_kwargs,
    encode_text,
    image_encoder,
    load_classifier,
    load_parts,
    scheduler_config,
)
from .preset import DEFAULTS
from .world import (
    HELD_OUT_CAPTIONS,
    RESOLUTION,
    TRAIN_CAPTIONS,
    make_dataset,
    parse_caption,
    sample_batch,
)

__all__ = [
    "DEFAULTS",
    "HELD_OUT_CAPTIONS",
    "METRICS",
    "RESOLUTION",
    "TRAIN_CAPTIONS",
    "WEIGHTS",
    "Evaluator",
    "TinyParts",
    "decode",
    "dinov2_kwargs",
    "diversity",
    "encode_text",
    "frechet_distance",
    "grid",
    "image_encoder",
    "load_classifier",
    "load_parts",
    "make_dataset",
    "parse_caption",
    "prompt_accuracy",
    "report",
    "sample_batch",
    "save_grid",
    "scheduler_config",
    "store_teacher_scores",
    "stored_teacher_scores",
    "teacher_denoiser",
    "teacher_scores",
    "weights_digest",
]
