"""Does a discriminator learn? Train one alone on real tiny-world images against changed copies.

The changes are faults a distilled student makes across its whole batch: a brightness shift, a
contrast change, a blur (``CHANGES``). Fake ``b`` is real ``b`` changed, with the same text and
image conditioning, as in ADD's step. The discriminator trains through
``addkit.ADDObjective.discriminator_loss`` (hinge + R1 on the head inputs, Adam lr 1e-3,
β = (0, 0.99): the recipe's settings), then is scored (in eval mode: no augmentation) on 64
fresh pairs with
``addkit.losses.discriminator_stats``: token sign accuracy (the mean of the real and fake
accuracies), paired ranking and logit gap.

``python -m tiny_world.probe`` (from ``examples/``) compares the heads' normalisations (the
numbers in ``docs/discriminators.md``):

- ``batch``: StyleGAN-T's ``BatchNormLocal`` with real and fake scored in separate calls;
- ``batch, mixed``: the same heads with real and fake interleaved in one call, so every group of
  8 holds both;
- ``sample``: addkit's default ``SampleNorm``, real and fake in separate calls.

``tests/discriminators/test_learns.py`` uses the same training function.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import addkit

from . import models as M
from .world import sample_batch


def blur(images: Tensor, sigma: float = 1.0) -> Tensor:
    """A separable Gaussian blur (5 taps, edges replicated) of images ``[B, 3, H, W]``."""
    k = torch.exp(-torch.arange(-2.0, 3.0).square() / (2 * sigma**2))
    k = (k / k.sum()).to(images)
    rows, cols = k.view(1, 1, 1, 5).expand(3, 1, 1, 5), k.view(1, 1, 5, 1).expand(3, 1, 5, 1)
    x = F.conv2d(F.pad(images, (2, 2, 0, 0), mode="replicate"), rows, groups=3)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), cols, groups=3)


def contrast(images: Tensor, factor: float = 0.6) -> Tensor:
    """Each image's deviation from its own mean scaled by ``factor``."""
    mean = images.mean((1, 2, 3), keepdim=True)
    return (images - mean) * factor + mean


CHANGES: dict[str, Callable[[Tensor], Tensor]] = {
    "shift": lambda x: (x + 0.3).clamp(-1, 1),
    "contrast": contrast,
    "blur": blur,
}
"""The visible changes: brightness +0.3 (of 2), contrast × 0.6, Gaussian blur σ = 1 pixel (of 32)."""


class World:
    """The shipped parts a probe conditions on: text encoders (``c_text``) and the ViT's CLS (``c_image``)."""

    def __init__(self, weights: Path | str = M.WEIGHTS) -> None:
        self.weights = Path(weights)
        self.parts = M.load_parts(weights)
        self.encoder = M.image_encoder(weights)

    def condition(self, captions: list[str], images: Tensor) -> dict[str, Tensor]:
        """``c_text`` (pooled text ``[B, 32]``) and ``c_image`` (CLS ``[B, 48]``) of a batch."""
        from recipe.sdxl.models import embed_images

        with torch.no_grad():
            return {
                "c_text": M.encode_text(self.parts, captions)["text_embeds"],
                "c_image": embed_images(self.encoder, images),
            }

    def latents(self, images: Tensor) -> Tensor:
        """VAE latents ``[B, 4, 8, 8]`` of images (what a teacher-feature discriminator reads)."""
        from recipe.sdxl.models import vae_encode

        with torch.no_grad():
            return vae_encode(self.parts.vae, images)

    def teacher(self, *, c_noise_dim: int | None = None, **kwargs: Any) -> addkit.ProjectedDiscriminator:
        """LADD's discriminator: the frozen teacher UNet's last down block and mid block on re-noised
        latents (``addkit.TeacherFeatures``; ``kwargs`` such as ``t=`` or ``logit_mean=`` go to it),
        2-D heads on the feature maps, text conditioning (and the noise level with ``c_noise_dim``);
        the UNet runs on the zero (empty-prompt) embedding, as the recipe's."""
        unet = self.parts.unet
        config = unet.config

        def call(x_t: Tensor, t: Tensor) -> Tensor:
            b = x_t.shape[0]
            time_ids = x_t.new_tensor([[M.RESOLUTION, M.RESOLUTION, 0, 0, M.RESOLUTION, M.RESOLUTION]])
            added = {"text_embeds": x_t.new_zeros(b, 32), "time_ids": time_ids.expand(b, 6)}
            hidden = x_t.new_zeros(b, 1, config.cross_attention_dim)
            return unet(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

        taps = [f"down_blocks.{len(unet.down_blocks) - 1}", "mid_block"]
        channels = [config.block_out_channels[-1]] * 2
        features = addkit.TeacherFeatures(
            unet, addkit.VPSchedule.scaled_linear(), taps, channels=channels, call=call, **kwargs
        )
        return addkit.ProjectedDiscriminator(features, c_text_dim=32, c_noise_dim=c_noise_dim)

    def dinov2(self, **kwargs: Any) -> addkit.ProjectedDiscriminator:
        """The recipe's discriminator: ``from_dinov2`` on the shipped ViT, text + image conditioning."""
        return addkit.ProjectedDiscriminator.from_dinov2(
            **M.dinov2_kwargs(self.weights), c_text_dim=32, c_image_dim=48, **kwargs
        )


def train_discriminator(
    D: Any, world: World, change: Callable[[Tensor], Tensor], *, steps: int = 60, batch_size: int = 16,
    seed: int = 0, lr: float = 1e-3, mixed: bool = False, view: Callable[[Tensor], Tensor] | None = None,
    image_cond: bool = True,
) -> dict[str, float]:  # fmt: skip
    """Train ``D`` on real vs ``change(real)``; its statistics on 64 fresh pairs.

    Args:
        D: a discriminator (``D(x, c_text=, c_image=, per_head=True)``), trained in place.
        world: the conditioning.
        change: real images -> fake images.
        steps: discriminator steps.
        batch_size: pairs per step.
        seed: seeds the heads' updates' data and the evaluation pairs.
        lr: Adam's learning rate (β = (0, 0.99)).
        mixed: score real and fake in one call, interleaved (for batch-coupled heads); else
            through ``ADDObjective.discriminator_loss`` (separate calls, R1 on the head inputs).
        view: maps images to what ``D`` reads (e.g. VAE latents for teacher features).
        image_cond: pass ``c_image``.

    Returns:
        ``accuracy`` (mean of real and fake token sign accuracy) and every
        ``discriminator_stats`` value, as floats.
    """
    view = view or (lambda x: x)
    objective = addkit.ADDObjective(None, D, addkit.VPSchedule.scaled_linear(), lambda_distill=0.0)
    opt = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.0, 0.99))
    g = torch.Generator().manual_seed(seed)

    def pair(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        batch = sample_batch(n, generator)
        cond = world.condition(batch.captions, batch.images)
        if not image_cond:
            cond.pop("c_image")
        return view(batch.images), view(change(batch.images)), cond

    def logits(real: Tensor, fake: Tensor, cond: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if not mixed:
            return D(real, per_head=True, generator=g, **cond), D(fake, per_head=True, generator=g, **cond)
        both = D(torch.stack([real, fake], 1).flatten(0, 1), per_head=True, generator=g,
                 **{k: v.repeat_interleave(2, 0) for k, v in cond.items()})  # fmt: skip
        return [h[0::2] for h in both], [h[1::2] for h in both]

    for _ in range(steps):
        real, fake, cond = pair(batch_size, g)
        if mixed:
            loss = addkit.losses.hinge_d_loss(*logits(real, fake, cond))
        else:
            loss, _ = objective.discriminator_loss(real, fake, **cond, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    real, fake, cond = pair(64, torch.Generator().manual_seed(1000 + seed))
    training = D.training
    D.eval()  # scored without augmentation
    with torch.no_grad():
        stats = {k: float(v) for k, v in addkit.losses.discriminator_stats(*logits(real, fake, cond)).items()}
    D.train(training)
    return {"accuracy": 0.5 * (stats["real_acc"] + stats["fake_acc"]), **stats}


SETTINGS: dict[str, dict[str, Any]] = {
    "batch": {"norm": "batch", "mixed": False},
    "batch, mixed": {"norm": "batch", "mixed": True},
    "sample": {"norm": "sample", "mixed": False},
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--weights", type=Path, default=M.WEIGHTS)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    world = World(args.weights)
    results: dict = {}
    for name, setting in SETTINGS.items():
        for change_name, change in CHANGES.items():
            runs = []
            for seed in args.seeds:
                started = time.perf_counter()
                torch.manual_seed(seed)
                D = world.dinov2(norm=setting["norm"])
                runs.append(train_discriminator(D, world, change, seed=seed, mixed=setting["mixed"]))
                runs[-1]["seconds"] = time.perf_counter() - started
            acc = [r["accuracy"] for r in runs]
            rank = [r["rank"] for r in runs]
            results.setdefault(name, {})[change_name] = runs
            spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
            print(f"{name:<14} {change_name:<9} accuracy {statistics.fmean(acc):.3f} ± {spread:.3f}  "
                  f"rank {statistics.fmean(rank):.3f}", flush=True)  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"seeds": args.seeds, "torch": torch.__version__, **results}
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
