"""The networks: a small diffusers UNet for teacher and student, two small classifiers.

The classifiers play the roles of ADD's two frozen image networks:

- ``"disc"``: the discriminator's feature network (DINOv2 in ADD), tapped at three depths
  through addkit's ``TappedFeatures``; its pooled features also give ``c_image``;
- ``"eval"``: the metric network (Inception in FID), a different width and seed, so that the
  student is never scored in the features it was trained against.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import (
    NUM_CLASSES,
    NUM_LABELS,
    SIZE,
    Digits,
    load_digits_split,
    paint,
    random_colours,
    sample_batch,
)

UNET_CONFIG = {
    "sample_size": SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "num_class_embeds": NUM_LABELS,
    "norm_num_groups": 8,
    "add_attention": False,
}


def make_unet(seed: int = 0) -> nn.Module:
    """A small ``UNet2DModel`` (8×8 → 4×4, no attention) with a class embedding (digits, null, negative)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**UNET_CONFIG)


class Classifier(nn.Module):
    """Three conv blocks (8×8, 4×4, 2×2), global average pooling, a linear head.

    ``features(x)`` is the pooled ``[B, 4w]`` vector (metric space / ``c_image``); the
    submodules ``block1``..``block3`` are the discriminator taps (64, 16 and 4 tokens).
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            )

        self.block1 = block(3, width, 1)
        self.block2 = block(width, 2 * width, 2)
        self.block3 = block(2 * width, 4 * width, 2)
        self.head = nn.Linear(4 * width, NUM_CLASSES)
        self.feature_dim = 4 * width

    def features(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, 4w]`` of images ``[B, 3, 8, 8]`` in ``[-1, 1]``."""
        return self.block3(self.block2(self.block1(x))).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, 10]``."""
        return self.head(self.features(x))


def train_classifier(
    width: int, seed: int, steps: int, *, batch_size: int = 128, log=print
) -> tuple[Classifier, float]:
    """Train a classifier on the train split (fresh colours each batch, small shifts).

    Returns:
        The classifier in eval mode, frozen, and its accuracy on the test split.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, test = load_digits_split("train"), load_digits_split("test")
    net = Classifier(width)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(steps):
        x, y = sample_batch(train, batch_size, g)
        x = _shift(x, g)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval().requires_grad_(False)
    acc = accuracy_on(net, test, seed=seed + 1)
    log(f"classifier width={width} seed={seed}: test accuracy {acc:.3f}")
    return net, acc


def load_or_train(
    path: Path, make: Callable[[], nn.Module], train: Callable[[], tuple[nn.Module, dict]], *, log=print
) -> tuple[nn.Module, dict]:
    """Load ``{"model": state_dict, **extra}`` from ``path``, or call ``train()`` and save it.

    Returns:
        The model (eval mode, frozen) and the extra entries (e.g. accuracy, losses).
    """
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = make()
        model.load_state_dict(state.pop("model"))
        log(f"loaded {path}")
        return model.eval().requires_grad_(False), state
    model, extra = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), **extra}, path)
    log(f"saved {path}")
    return model.eval().requires_grad_(False), extra


def cached_classifier(
    out_dir: Path, width: int, seed: int, steps: int, *, log=print
) -> tuple[Classifier, float]:
    """The classifier for these settings, from ``out_dir`` or trained; and its test accuracy."""

    def train() -> tuple[nn.Module, dict]:
        net, acc = train_classifier(width, seed, steps, log=log)
        return net, {"acc": acc}

    path = Path(out_dir) / f"classifier-w{width}-s{seed}-n{steps}.pt"
    net, extra = load_or_train(path, lambda: Classifier(width), train, log=log)
    return net, float(extra["acc"])


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Random integer translation by up to one pixel (robustness of the metric features)."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def accuracy_on(net: Classifier, data: Digits, *, seed: int) -> float:
    """Accuracy on ``data`` painted with colours from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = paint(data.strokes, random_colours(len(data), g))
    return float((net(x).argmax(1) == data.labels).float().mean())
