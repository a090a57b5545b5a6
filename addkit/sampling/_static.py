"""Static inputs of a captured loop: conditioning flattened into buffers, the graph that reads them.

A captured graph reads its inputs from fixed addresses. Conditioning (``encoder_hidden_states``,
SDXL's ``added_cond_kwargs`` dict, ...) is therefore flattened to ``(path, leaf)`` pairs:
tensor leaves get a static buffer each; other leaves (numbers, strings, ``None``) are baked
into the graph and so become part of its cache key, as does the autocast state: a graph
captured under autocast casts the weights inside itself (autocast's weight cache is off during
warm-up and capture, so the graph reads the live parameters, not cached copies that die with
the caller's autocast block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from addkit.sampling._plan import Plan
from addkit.sampling.sampler import Noises, _fill_noise

__all__ = [
    "CapturedLoop",
    "Leaves",
    "autocast_dtype",
    "cond_key",
    "flatten",
    "graph_key",
    "static_copy",
    "uncached_autocast",
    "unflatten",
    "warm_up",
]

Path = tuple[str, ...]
Leaves = list[tuple[Path, Any]]


def flatten(cond: Mapping[str, Any], prefix: Path = ()) -> Leaves:
    """``(path, leaf)`` pairs of a nested mapping, in insertion order."""
    leaves: Leaves = []
    for name, value in cond.items():
        path = (*prefix, str(name))
        if isinstance(value, Mapping):
            leaves += flatten(value, path)
        else:
            leaves.append((path, value))
    return leaves


def unflatten(leaves: Leaves) -> dict[str, Any]:
    """The nested dict that [`flatten`][addkit.sampling._static.flatten] came from."""
    out: dict[str, Any] = {}
    for path, value in leaves:
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return out


def cond_key(fn: str, leaves: Leaves) -> tuple[Hashable, ...]:
    """What a captured graph depends on: tensor shapes, dtypes, devices, and other values."""
    key: list[Hashable] = []
    for path, value in leaves:
        if isinstance(value, Tensor):
            key.append((path, tuple(value.shape), value.dtype, value.device))
            continue
        if not isinstance(value, Hashable):
            name = ".".join(path)
            raise TypeError(
                f"{fn}: conditioning {name!r} must be a tensor, a dict of tensors or a hashable constant "
                f"(it is baked into the captured graph), got {type(value).__name__}"
            )
        key.append((path, type(value), value))
    return tuple(key)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type`` now; ``None`` where autocast is off (or unknown)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def graph_key(fn: str, noise: Tensor, leaves: Leaves) -> tuple[Hashable, ...]:
    """The cache key of a captured loop: noise signature, conditioning, autocast state on noise's device."""
    signature = (tuple(noise.shape), noise.dtype, noise.device)
    return (*signature, cond_key(fn, leaves), autocast_dtype(noise.device.type))


def uncached_autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` without the weight cache (nothing when ``dtype`` is ``None``).

    A graph captured with the cache on would read low-precision weight copies made during
    warm-up: freed when the caller's autocast block ends, blind to in-place weight updates.
    Without it the casts are kernels in the graph that read the parameters themselves
    (``torch.cuda.make_graphed_callables`` demands ``cache_enabled=False`` for this reason).
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=True, cache_enabled=False)


def static_copy(leaves: Leaves) -> Leaves:
    """Fresh buffers (same device and dtype) holding copies of the tensor leaves; other leaves kept."""
    return [(p, v.detach().clone() if isinstance(v, Tensor) else v) for p, v in leaves]


@dataclass
class CapturedLoop:
    """One captured loop and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    noise: Tensor
    noises: Tensor
    cond: Leaves
    out: Tensor
    plan: Plan

    def replay(
        self, noise: Tensor, noises: Noises | None, generator: torch.Generator | None, leaves: Leaves
    ) -> Tensor:
        """Copy the inputs into the static buffers, replay, return a copy of the output."""
        self.noise.copy_(noise)
        if self.noises.shape[0] and noises is None:
            _fill_noise(self.noises, generator)  # the same single draw as the eager path
        elif isinstance(noises, Tensor):
            self.noises.copy_(noises)
        elif self.noises.shape[0]:
            for i, z in enumerate(noises):  # type: ignore[arg-type]
                self.noises[i].copy_(z)
        for (_, dst), (_, src) in zip(self.cond, leaves):
            if isinstance(dst, Tensor):
                dst.copy_(src)
        self.graph.replay()
        return self.out.clone()  # the static output is overwritten by the next replay


def warm_up(body: Callable[[], Tensor], iters: int, device: torch.device) -> None:
    """Run ``body`` on a side stream (lazy initialisation, autotuning) before capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(iters):
            body()
    torch.cuda.current_stream(device).wait_stream(side)
