"""Scores and grids for a text-to-image denoiser of the tiny world, on held-out captions.

In the features of the evaluation classifier (never seen by a discriminator or a teacher):

- ``prompt_accuracy``: share of samples whose shape, colour and background the classifier
  reads as the caption says (all three right);
- ``fd``: Fréchet distance between Gaussians fitted to the samples' features and to real
  images of the same captions (FID's formula, Heusel et al. 2017);
- ``diversity``: mean pairwise feature distance between samples of one caption (different
  noise), averaged over captions; real images give the reference value.

Sampling uses ``addkit.sampling.sample`` from pure noise at ``schedule.timesteps(n, "trailing")``
(``(999,)`` for one step, ADD's ``(999, 749, 499, 249)`` for four): ``renoise="fresh"`` is ADD's
student sampler, ``renoise="ancestral"`` the DDPM posterior step (DDIM with η = 1, diffusers'
Euler ancestral), the ordinary sampler for the teacher at 4 or 25 steps. Samples of one call
start from the same noise for every denoiser and step count: the same seed, the same picture.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from addkit import VPSchedule
from addkit.sampling import sample

from . import models as M
from .world import HELD_OUT_CAPTIONS, captions_batch, parse_caption

METRICS = ("prompt_accuracy", "fd", "diversity")


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """$\\lVert\\mu_a - \\mu_b\\rVert^2 + \\operatorname{tr}(\\Sigma_a + \\Sigma_b - 2(\\Sigma_a^{1/2}\\Sigma_b\\Sigma_a^{1/2})^{1/2})$.

    In float64, with symmetric eigendecompositions (exact for the PSD covariances).

    Args:
        a: features ``[N, D]`` (N ≥ 2).
        b: features ``[M, D]`` (M ≥ 2).

    Examples:
        >>> x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
        >>> round(frechet_distance(x, x), 6), round(frechet_distance(x, x + 2), 6)
        (0.0, 12.0)
    """
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(value.clamp_min(0))


def diversity(features: Tensor, groups: Tensor) -> float:
    """Mean pairwise L2 distance between features of the same group, averaged over groups.

    Args:
        features: ``[N, D]``.
        groups: ``[N]`` integer group (caption) of each row; groups of one row are skipped.

    Examples:
        >>> f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
        >>> diversity(f, torch.tensor([0, 0, 1, 1]))
        2.5
    """
    values = []
    for g in groups.unique():
        f = features[groups == g].double()
        if len(f) > 1:
            values.append(torch.pdist(f).mean())
    return float(torch.stack(values).mean())


def prompt_accuracy(logits: dict[str, Tensor], captions: Sequence[str]) -> float:
    """Share of rows whose argmax shape, colour and background all match their caption."""
    right = torch.ones(len(captions), dtype=torch.bool)
    for key in ("shape", "colour", "background"):
        wanted = torch.tensor([getattr(parse_caption(c), key) for c in captions])
        right &= logits[key].argmax(1) == wanted
    return float(right.float().mean())


@dataclass
class Evaluator:
    """Held-out scoring with fixed noise: ``evaluator(denoiser, steps) -> {"prompt_accuracy", "fd", "diversity"}``.

    Args:
        parts: the world's VAE, text encoders and tokenizers (``load_parts()``; the UNet is unused).
        classifier: the evaluation classifier (``load_classifier()``).
        captions: the captions to sample (default: the 24 held-out ones).
        per_caption: samples per caption (different noise).
        real_per_caption: real images per caption for the Fréchet reference.
        seed: seed of the noise and of the real images.
    """

    parts: M.TinyParts
    classifier: torch.nn.Module
    captions: Sequence[str] = HELD_OUT_CAPTIONS
    per_caption: int = 16
    real_per_caption: int = 32
    seed: int = 0
    schedule: VPSchedule = field(default_factory=VPSchedule.scaled_linear)

    def __post_init__(self) -> None:
        self.prompts = [c for c in self.captions for _ in range(self.per_caption)]
        self.groups = torch.arange(len(self.captions)).repeat_interleave(self.per_caption)
        g = torch.Generator().manual_seed(self.seed)
        shape = (len(self.prompts), self.parts.vae.config.latent_channels, M.LATENT_SIDE, M.LATENT_SIDE)
        self.noise = torch.randn(shape, generator=g)
        real = captions_batch([c for c in self.captions for _ in range(self.real_per_caption)], g).images
        self.real_features = self.features(real)
        with torch.no_grad():
            self.cond = M.encode_text(self.parts, self.prompts)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return torch.cat([self.classifier.features(x) for x in images.split(512)])

    @torch.no_grad()
    def samples(self, denoiser: Any, steps: int, *, renoise: str = "fresh", rows: Sequence[int] | None = None,
                chunk: int = 256) -> Tensor:  # fmt: skip
        """Decoded samples ``[N, 3, 32, 32]`` in ``[-1, 1]`` for ``self.prompts`` (caption-major).

        ``rows``: only these entries of ``self.prompts`` (their own noise; a grid's rows).
        """
        timesteps = self.schedule.timesteps(steps, "trailing")
        g = torch.Generator().manual_seed(self.seed + 1)
        index = torch.arange(len(self.prompts)) if rows is None else torch.as_tensor(list(rows))
        out = []
        for part in index.split(chunk):
            cond = {k: v[part] for k, v in self.cond.items()}
            x0 = sample(denoiser, self.noise[part], schedule=self.schedule, timesteps=timesteps,
                        renoise=renoise, generator=g, **cond)  # fmt: skip
            out.append(decode(self.parts.vae, x0))
        return torch.cat(out).clamp(-1, 1)

    def grid_rows(self, every: int = 3) -> list[int]:
        """The first sample of every ``every``-th caption: the rows of a comparison grid."""
        return [i * self.per_caption for i in range(0, len(self.captions), every)]

    def key(self) -> dict[str, Any]:
        """What the scores depend on besides the model: captions, sample counts, seed."""
        return {"captions": list(self.captions), "per_caption": self.per_caption,
                "real_per_caption": self.real_per_caption, "seed": self.seed}  # fmt: skip

    @torch.no_grad()
    def score(self, images: Tensor) -> dict[str, float]:
        """The three metrics of ``images`` (one per entry of ``self.prompts``)."""
        f = self.features(images)
        logits = {k: head(f) for k, head in self.classifier.heads.items()}
        return {
            "prompt_accuracy": prompt_accuracy(logits, self.prompts),
            "fd": frechet_distance(f, self.real_features),
            "diversity": diversity(f, self.groups),
        }

    def __call__(self, denoiser: Any, steps: int, *, renoise: str = "fresh") -> dict[str, float]:
        return self.score(self.samples(denoiser, steps, renoise=renoise))

    @torch.no_grad()
    def reference(self) -> dict[str, float]:
        """Real images of the captions (fresh ones), scored like samples: the metrics' floor/ceiling."""
        g = torch.Generator().manual_seed(self.seed + 2)
        return self.score(captions_batch(self.prompts, g).images)


def decode(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """Scaled latents to images in about ``[-1, 1]``."""
    return vae.decode(latents / vae.config.scaling_factor).sample


def teacher_denoiser(unet: torch.nn.Module, schedule: VPSchedule | None = None) -> Any:
    """``addkit.wrap`` of an eps-prediction UNet: ``.x0(x_t, t, encoder_hidden_states=, text_embeds=, time_ids=)``."""
    from addkit import wrap

    return wrap(unet, schedule or VPSchedule.scaled_linear(), "eps")


def grid(columns: dict[str, Tensor], *, rows: int | None = None, scale: int = 3) -> Tensor:
    """A ``torchvision.utils.make_grid`` image: one column per entry of ``columns``, rows aligned.

    Args:
        columns: name -> images ``[N, 3, H, W]`` in ``[-1, 1]``, the same ``N`` and order
            (same captions and noise) in each; names are the caller's to print as a legend.
        rows: the first ``rows`` images of each (all by default).
        scale: nearest-neighbour upscaling (32-pixel images are small on screen).

    Returns:
        ``[3, H', W']`` float image in ``[0, 1]`` (``torchvision.utils.save_image`` writes it).
    """
    from torchvision.utils import make_grid

    n = rows or min(len(x) for x in columns.values())
    stacked = torch.stack([x[:n] for x in columns.values()], dim=1).flatten(0, 1)  # row-major
    stacked = torch.nn.functional.interpolate(
        (stacked.clamp(-1, 1) + 1) / 2, scale_factor=scale, mode="nearest"
    )
    return make_grid(stacked, nrow=len(columns), padding=2, pad_value=1.0)


TEACHER_STEPS = (1, 4, 25)
STUDENT_STEPS = (1, 4)


def teacher_scores(teacher_unet: torch.nn.Module, evaluator: Evaluator) -> dict[str, dict[str, float]]:
    """The teacher's scores at 1, 4 and 25 steps (ancestral), keyed ``"1"``, ``"4"``, ``"25"``."""
    teacher = teacher_denoiser(teacher_unet)
    return {str(n): evaluator(teacher, n, renoise="ancestral") for n in TEACHER_STEPS}


def report(teacher_unet: torch.nn.Module, student_unet: torch.nn.Module | None, evaluator: Evaluator,
           *, teacher: dict | None = None, every: int = 3) -> dict:  # fmt: skip
    """Teacher 1 / 4 / 25 steps (ancestral) and student 1 / 4 steps (ADD's fresh re-noising).

    Args:
        teacher_unet: the eps-prediction teacher ``UNet2DConditionModel``.
        student_unet: the student (same class and prediction), or ``None`` for the teacher only.
        evaluator: held-out captions, noise and classifier.
        teacher: the teacher's scores when already known (``teacher_scores`` with this
            evaluator): the teacher is frozen, so a run need not sample it 25 steps again.
        every: the comparison grid shows every ``every``-th caption.

    Returns:
        ``{"metrics": {"teacher": {"1", "4", "25"}, "student": {"1", "4"}, "real": {...}},
        "images": {"teacher 1": ..., ..., "student 4": ...}}``: metric dicts as
        ``Evaluator.score`` returns them (``real``: fresh real images of the captions), and the
        grid's samples (``evaluator.grid_rows(every)``), the same noise in every entry.
    """
    rows = evaluator.grid_rows(every)
    out: dict = {"teacher": teacher or teacher_scores(teacher_unet, evaluator), "student": {},
                 "real": evaluator.reference()}  # fmt: skip
    t = teacher_denoiser(teacher_unet)
    images = {f"teacher {n}": evaluator.samples(t, n, renoise="ancestral", rows=rows) for n in TEACHER_STEPS}
    if student_unet is not None:
        student = teacher_denoiser(student_unet)
        for n in STUDENT_STEPS:
            out["student"][str(n)] = evaluator(student, n)
            images[f"student {n}"] = evaluator.samples(student, n, rows=rows)
    return {"metrics": out, "images": images}


def save_grid(images: dict[str, Tensor], path: Any) -> None:
    """Write ``grid(images)`` (``report``'s images: one row per caption, one column per model) to ``path`` (PNG)."""
    from torchvision.utils import save_image

    save_image(grid(images), path)


SCORES_FILE = "teacher_scores.json"


def weights_digest(weights: Path | str = M.WEIGHTS) -> str:
    """SHA-256 over the weights folder's safetensors files (names and bytes): what the scores are of."""
    h = hashlib.sha256()
    for path in sorted(Path(weights).rglob("*.safetensors")):
        h.update(str(path.relative_to(weights)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def stored_teacher_scores(evaluator: Evaluator, weights: Path | str = M.WEIGHTS) -> dict | None:
    """The teacher's scores saved beside the weights (``teacher_scores.json``), if they were made
    with these weights and this evaluator's settings; else None."""
    path = Path(weights) / SCORES_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("evaluator") != evaluator.key() or saved.get("weights_sha256") != weights_digest(weights):
        return None
    return saved["teacher"]


def store_teacher_scores(evaluator: Evaluator, weights: Path | str = M.WEIGHTS) -> dict:
    """Score the teacher in ``weights`` with ``evaluator`` and save it as ``teacher_scores.json``."""
    scores = teacher_scores(evaluator.parts.unet, evaluator)
    record = {"evaluator": evaluator.key(), "weights_sha256": weights_digest(weights), "teacher": scores,
              "torch": torch.__version__}  # fmt: skip
    (Path(weights) / SCORES_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return scores
