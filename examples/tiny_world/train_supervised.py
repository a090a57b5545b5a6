"""Supervised training of the two networks that read images: the ViT and the evaluation classifier.

Both learn shape, colour, background and size from rendered images (cross-entropy per
attribute); the ViT also regresses the shape's centre from its class token, so that its tokens
keep where things are. Each trains in two phases: ``steps`` at the full learning rate, then
``finetune_steps`` at a lower one on a fresh data stream. Run through ``tiny_world.train``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from . import models as M
from .world import ALL_ATTRIBUTES, TRAIN, Batch, render


def _lr(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to 10 %."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * (1 - step / steps))


def _attribute_loss(logits: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    return sum(F.cross_entropy(logits[k], getattr(batch, k)) for k in M.HEADS)


@torch.no_grad()
def attribute_accuracy(predict, n: int = 1024, seed: int = 12345) -> dict[str, float]:
    """Accuracy per attribute of ``predict(images) -> logits dict`` on fresh images of all captions."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(len(ALL_ATTRIBUTES), (n,), generator=g)
    batch = render([ALL_ATTRIBUTES[i] for i in index.tolist()], g)
    logits = predict(batch.images)
    return {k: float((logits[k].argmax(1) == getattr(batch, k)).float().mean()) for k in M.HEADS}


def _supervised(net: nn.Module, heads: nn.Module, forward, steps: int, seed: int, lr: float, batch_size: int,
                pool, name: str, log) -> float:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    params = list(net.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    start, recent = time.time(), []
    for i in range(steps):
        index = torch.randint(len(pool), (batch_size,), generator=g)
        batch = render([pool[k] for k in index.tolist()], g)
        loss = forward(batch)
        for group in opt.param_groups:
            group["lr"] = lr * _lr(i, steps, max(1, steps // 20))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if (i + 1) % max(1, steps // 10) == 0:
            log(f"{name} {i + 1}/{steps}: loss {sum(recent) / len(recent):.4f} ({time.time() - start:.0f}s)")
    return time.time() - start


def _patches(images: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping ``size × size`` patches ``[B, N, 3 size²]``, row-major as the ViT's tokens."""
    return F.unfold(images, size, stride=size).transpose(1, 2)


def train_image_encoder(steps: int, *, finetune_steps: int = 1000, seed: int = 2, lr: float = 1e-3,
                        batch_size: int = 64, recon_weight: float = 1.0, token_weight: float = 1.0,
                        init_values: float = 1.0, phase1: nn.Module | None = None,
                        log=print) -> tuple[nn.Module, dict]:  # fmt: skip
    """The ViT with linear heads on its class token (attributes, the shape's centre) and a linear
    decoder on its patch tokens (each token's own pixels).

    The decoder keeps the patch tokens local, as DINOv2's masked-token objective does: a
    discriminator reading the tokens then sees how a patch looks, not only what the image shows
    (attributes alone leave blotchy and clean images of one caption with the same tokens).
    Phase 1: ``steps`` at ``lr``; phase 2: fresh heads (seed + 100), ``finetune_steps`` at ``lr / 2``.
    ``phase1``: the ViT after phase 1 (skips it).
    """
    vit = phase1 if phase1 is not None else M.vit(seed=seed, init_values=init_values)
    vit.train().requires_grad_(True)
    mean = torch.tensor(vit.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(vit.pretrained_cfg["std"]).view(1, 3, 1, 1)
    patch = M.VIT_KWARGS["patch_size"]
    info: dict = {"steps": [steps, finetune_steps], "seed": seed, "recon_weight": recon_weight,
                  "token_weight": token_weight, "init_values": init_values, "seconds": []}
    for phase, (n, phase_seed, phase_lr) in enumerate(
        ((steps, seed, lr), (finetune_steps, seed + 100, lr / 2))
    ):
        if phase == 0 and phase1 is not None:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(phase_seed)
            heads = nn.ModuleDict(
                {k: nn.Linear(vit.num_features, c) for k, c in {**M.HEADS, "centre": 2}.items()}
            )
            heads["pixels"] = nn.Linear(vit.num_features, 3 * patch * patch)

        def predict(images: torch.Tensor, heads: nn.Module = heads) -> dict[str, torch.Tensor]:
            tokens = vit.forward_features(((images + 1) / 2 - mean) / std)
            cls = vit.forward_head(tokens, pre_logits=True)
            out = {k: h(cls) for k, h in heads.items() if k != "pixels"}
            patches = tokens[:, vit.num_prefix_tokens :]
            out["pixels"] = heads["pixels"](patches)
            out["tokens"] = {k: heads[k](patches) for k in M.HEADS}  # [B, N, classes] each
            return out

        def forward(batch: Batch, predict=predict) -> torch.Tensor:
            out = predict(batch.images)
            recon = F.mse_loss(out["pixels"], _patches(batch.images, patch))
            n = out["pixels"].shape[1]
            per_token = sum(
                F.cross_entropy(out["tokens"][k].flatten(0, 1), getattr(batch, k).repeat_interleave(n))
                for k in M.HEADS
            )
            return (
                _attribute_loss(out, batch)
                + 10 * F.mse_loss(out["centre"], batch.centre)
                + recon_weight * recon
                + token_weight * per_token
            )

        info["seconds"].append(_supervised(vit, heads, forward, n, phase_seed, phase_lr, batch_size, TRAIN,
                                           f"image_encoder[{phase + 1}]", log))  # fmt: skip
    vit.eval().requires_grad_(False)
    with torch.no_grad():
        info["accuracy"] = attribute_accuracy(predict)
        batch = render(list(TRAIN[:: max(1, len(TRAIN) // 256)]), torch.Generator().manual_seed(seed + 7))
        info["patch_mse"] = float(F.mse_loss(predict(batch.images)["pixels"], _patches(batch.images, patch)))
        info["tap_cosine"] = tap_cosine(vit, batch.images)
    if max(info["tap_cosine"][1:]) > MAX_TAP_COSINE:
        raise RuntimeError(
            f"image_encoder: a block tap is a near-copy of the patch embedding (cosine {info['tap_cosine']}, "
            f"limit {MAX_TAP_COSINE}): its blocks barely change the tokens, and a discriminator on them "
            "sees only 4x4-pixel patches; check LayerScale (init_values) and the per-token loss"
        )
    return vit, info


MAX_TAP_COSINE = 0.9
"""A block tap's largest mean cosine to the patch embedding that the ViT stage accepts."""


def tap_cosine(vit: nn.Module, images: torch.Tensor) -> list[float]:
    """Mean cosine, per token, between each discriminator tap of ``vit`` and its patch embedding.

    The taps are ``addkit.DINOv2Features``' defaults (embedding + every block for depth 4); the
    first value is the embedding's own (1).
    """
    from addkit.discriminators import DINOv2Features

    feats = DINOv2Features(vit)(images)
    return [float(F.cosine_similarity(f, feats[0], dim=1).mean()) for f in feats]


def train_classifier(steps: int, *, finetune_steps: int = 400, seed: int = 3, width: int = 24, lr: float = 2e-3,
                     batch_size: int = 64, phase1: nn.Module | None = None, log=print) -> tuple[nn.Module, dict]:  # fmt: skip
    """The evaluation CNN, on all captions (it reads attributes; it generates nothing).

    Phase 1: ``steps`` at ``lr``; phase 2: ``finetune_steps`` at ``lr / 4`` on a fresh data stream.
    ``phase1``: the network after phase 1 (skips it).
    """
    torch.manual_seed(seed)
    net = phase1 if phase1 is not None else M.Classifier(width)
    net.train().requires_grad_(True)
    info: dict = {"steps": [steps, finetune_steps], "seed": seed, "width": width, "seconds": []}
    for phase, (n, phase_seed, phase_lr) in enumerate(
        ((steps, seed, lr), (finetune_steps, seed + 100, lr / 4))
    ):
        if phase == 0 and phase1 is not None:
            continue
        info["seconds"].append(_supervised(net, nn.Module(), lambda b: _attribute_loss(net(b.images), b), n,
                                           phase_seed, phase_lr, batch_size, ALL_ATTRIBUTES,
                                           f"classifier[{phase + 1}]", log))  # fmt: skip
    net.eval().requires_grad_(False)
    info["accuracy"] = attribute_accuracy(net)
    return net, info
