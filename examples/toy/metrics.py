"""Metrics in the features of the evaluation classifier (the toy's Inception).

- Fréchet distance between Gaussians fitted to generated and real features (FID's formula);
- accuracy: the classifier's prediction equals the class the sample was asked for;
- diversity: mean pairwise feature distance between samples of the same class (different
  noise seeds), averaged over classes; real data gives the reference value.

References:
    Heusel et al., *GANs Trained by a Two Time-Scale Update Rule*, 2017 (FID).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .data import NUM_CLASSES
from .nets import Classifier


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """$\\lVert\\mu_a - \\mu_b\\rVert^2 + \\operatorname{tr}(\\Sigma_a + \\Sigma_b - 2(\\Sigma_a^{1/2}\\Sigma_b\\Sigma_a^{1/2})^{1/2})$.

    Computed in float64 with symmetric eigendecompositions (exact for PSD covariances).

    Args:
        a: features ``[N, D]``.
        b: features ``[M, D]``.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def diversity(features: Tensor, labels: Tensor) -> float:
    """Mean pairwise L2 distance between features of the same class, averaged over classes."""
    per_class = []
    for c in range(NUM_CLASSES):
        f = features[labels == c].double()
        if f.shape[0] < 2:
            continue
        d = torch.cdist(f, f)
        n = f.shape[0]
        per_class.append(d.sum() / (n * (n - 1)))
    return float(torch.stack(per_class).mean())


class Evaluator:
    """Scores sets of images against a fixed real reference set.

    Args:
        classifier: the evaluation classifier (frozen).
        real: real images ``[M, 3, 8, 8]`` in ``[-1, 1]``.
        real_labels: their classes ``[M]``.
    """

    def __init__(self, classifier: Classifier, real: Tensor, real_labels: Tensor) -> None:
        self.classifier = classifier
        self.real_features = self.features(real)
        self.real_labels = real_labels

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Pooled classifier features ``[N, D]``, computed in chunks."""
        return torch.cat([self.classifier.features(x) for x in images.split(500)])

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """``{"fd", "acc", "div"}`` for generated ``images`` asked to show ``labels``."""
        f = self.features(images)
        logits = self.classifier.head(f)
        return {
            "fd": frechet_distance(f, self.real_features),
            "acc": float((logits.argmax(1) == labels).float().mean()),
            "div": diversity(f, labels),
        }

    def reference(self) -> dict[str, float]:
        """The real set scored against itself split in two halves (the metric's floor)."""
        half = self.real_features.shape[0] // 2
        f, y = self.real_features, self.real_labels
        logits = self.classifier.head(f)
        return {
            "fd": frechet_distance(f[:half], f[half:]),
            "acc": float((logits.argmax(1) == y).float().mean()),
            "div": diversity(f, y),
        }
