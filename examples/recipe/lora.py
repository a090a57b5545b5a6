"""LoRA adapters as the recipes add them: peft's ``LoraConfig`` through diffusers' ``add_adapter``, seeded."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # attention projections (diffusers' LoRA scripts)


def add_lora(
    network: nn.Module, rank: int, targets: Sequence[str], *, seed: int, name: str | None = None
) -> None:
    """Add a LoRA of ``rank`` (alpha = rank, Gaussian ``A``, zero ``B``: the network starts unchanged).

    Args:
        network: a diffusers model (``add_adapter``).
        rank: the LoRA rank.
        targets: the module names it adapts.
        seed: seeds ``A``'s initialisation without touching the global RNG's state.
        name: the adapter's name (None: peft's default).
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network.add_adapter(config, **({"adapter_name": name} if name else {}))
