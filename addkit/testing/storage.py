"""Where weights are held: count the storages that hold copies of a model's weights.

For tests that a run keeps one copy of a base model (a LoRA student, its teacher with the
adapters disabled and a discriminator reading the same base): collect every tensor a run can
reach, then ask how many distinct storages hold each base weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


def storage_counts(weights: Mapping[str, Tensor], tensors: Iterable[Tensor]) -> dict[str, int]:
    """For each randomly initialised weight: how many distinct storages among ``tensors`` hold an equal tensor.

    Constant weights (a norm's ones, a zero bias) are skipped: they equal unrelated tensors of
    the same shape.

    Args:
        weights: name -> weight of the reference model (e.g. a freshly built base's ``state_dict()``).
        tensors: every tensor to search (parameters, buffers, optimiser state, ...).

    Returns:
        name -> number of storages (1: held once; 2: a second copy exists; 0: not held).

    Examples:
        >>> w = torch.arange(4.0)
        >>> storage_counts({"w": w}, [w, w.view(2, 2).flatten(), w.clone()])
        {'w': 2}
    """
    reachable = list(tensors)
    counts = {}
    for name, weight in weights.items():
        if weight.numel() < 2 or not bool(weight.float().std() > 0):
            continue
        counts[name] = len({
            t.untyped_storage().data_ptr()
            for t in reachable
            if t.shape == weight.shape and torch.equal(t, weight)
        })  # fmt: skip
    return counts


def randomize_lora(module: nn.Module, *, seed: int = 1, std: float = 0.5) -> int:
    """Draw every LoRA weight (``lora_`` in its name) from N(0, std²); returns how many.

    A fresh LoRA's B matrix is zero, which leaves the adapted model equal to its base: tests
    that must tell the two apart randomise the adapter first.
    """
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        params = [p for n, p in module.named_parameters() if "lora_" in n]
        for p in params:
            p.normal_(0, std)
    return len(params)
