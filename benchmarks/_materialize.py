"""Networks built on ``meta``, then given fake or real storage: what the memory estimate runs on.

Building an SDXL or Flux network on ``torch.device("meta")`` takes seconds and no memory;
`Materializer` then gives each parameter and buffer a ``FakeTensor`` (estimate) or a real
tensor on a device (measurement, ``gpu_check.py``), in the dtype the recipe keeps it in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import nn
from torch._subclasses import FakeTensorMode


class Materializer:
    """Turns meta modules into fake (or real) ones, keeping shared parameters shared.

    Args:
        mode: the ``FakeTensorMode`` fake tensors are made in, or ``None`` for real tensors.
        device: where real tensors go (fake ones are CPU tensors).
    """

    def __init__(self, mode: FakeTensorMode | None, device: torch.device) -> None:
        self.mode = mode
        self.device = device if mode is None else torch.device("cpu")
        self._memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tensor(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx = self.mode if self.mode is not None else nullcontext()
        with ctx:
            out = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=self.device)
            if self.mode is None:  # values do not change memory; keep them finite (and indices valid)
                out.normal_(0.0, 0.02) if out.is_floating_point() else out.zero_()
        return out

    def __call__(
        self, module: nn.Module, dtype: torch.dtype, *, keep_fp32: Callable[[str], bool] = lambda n: False
    ) -> nn.Module:
        """Give every meta parameter and buffer of ``module`` storage (fake or real), in place.

        Floating tensors get ``dtype``, except parameters whose name ``keep_fp32`` accepts
        (LoRA weights next to a bf16 base); tensors already materialized are left alone.
        """
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for table, is_param in ((sub._parameters, True), (sub._buffers, False)):
                for name, t in list(table.items()):
                    if t is not None:
                        table[name] = self._convert(
                            t, f"{prefix}.{name}" if prefix else name, is_param, dtype, keep_fp32
                        )
        return module

    def _convert(
        self, t: torch.Tensor, name: str, is_param: bool, dtype: torch.dtype, keep_fp32: Callable[[str], bool]
    ) -> torch.Tensor:
        if not t.is_meta:
            return t
        if id(t) in self._memo:  # shared by two modules: one tensor
            return self._memo[id(t)][1]
        target = (torch.float32 if keep_fp32(name) else dtype) if t.is_floating_point() else t.dtype
        new = self._tensor(t, target)
        if is_param:
            with self.mode if self.mode is not None else nullcontext():
                new = nn.Parameter(new, requires_grad=t.requires_grad)
        self._memo[id(t)] = (t, new)  # the meta tensor is kept so that its id is not reused
        return new

    def tensor(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """An input made by ``fn`` (fake under the mode, real on the device otherwise)."""
        ctx = self.mode if self.mode is not None else nullcontext()
        with ctx:
            return fn()


def parameter_count(modules: Iterable[nn.Module]) -> int:
    """Distinct parameters of ``modules`` (shared ones once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())
