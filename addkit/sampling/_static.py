"""Static inputs of a captured loop: conditioning flattened into buffers, the graph that reads them.

A captured graph reads its inputs from fixed addresses. Conditioning (``encoder_hidden_states``,
SDXL's ``added_cond_kwargs`` dict, ControlNet's tuple of residuals, ...) is therefore flattened
through dicts, lists and tuples to ``(path, leaf)`` pairs: tensor leaves get a static buffer
each, keyed by shape, dtype and device (never by identity), and each call copies its values
into them; other leaves (numbers, strings, ``None``) are baked
into the graph and so become part of its cache key, as does the autocast state: a graph
captured under autocast casts the weights inside itself (autocast's weight cache is off during
warm-up and capture, so the graph reads the live parameters, not cached copies that die with
the caller's autocast block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from addkit.sampling._plan import Plan
from addkit.sampling.sampler import Noises, _fill_noise

__all__ = [
    "CaptureFailed",
    "CapturedLoop",
    "Leaves",
    "autocast_dtype",
    "capturable",
    "capture",
    "cond_key",
    "flatten",
    "graph_key",
    "rebuild",
    "static_copy",
    "uncached_autocast",
    "warm_up",
]

Path = tuple[str | int, ...]  # mapping keys as strings, sequence positions as integers
Leaves = list[tuple[Path, Any]]


def flatten(cond: Any, prefix: Path = ()) -> Leaves:
    """``(path, leaf)`` pairs of nested mappings, lists and tuples, in order."""
    if isinstance(cond, Mapping):
        items: Any = ((str(name), value) for name, value in cond.items())
    elif isinstance(cond, (list, tuple)):
        items = enumerate(cond)
    else:
        return [(prefix, cond)]
    return [leaf for key, value in items for leaf in flatten(value, (*prefix, key))]


def rebuild(template: Any, values: Iterator[Any]) -> Any:
    """``template``'s nesting of mappings, lists and tuples with its leaves taken from ``values`` in order."""
    if isinstance(template, Mapping):
        return {name: rebuild(value, values) for name, value in template.items()}
    if isinstance(template, (list, tuple)):
        items = [rebuild(value, values) for value in template]
        return template._make(items) if hasattr(template, "_make") else type(template)(items)
    return next(values)


def cond_key(fn: str, leaves: Leaves) -> tuple[Hashable, ...]:
    """What a captured graph depends on: tensor shapes, dtypes, devices, and other values."""
    key: list[Hashable] = []
    for path, value in leaves:
        if isinstance(value, Tensor):
            key.append((path, tuple(value.shape), value.dtype, value.device))
            continue
        if not isinstance(value, Hashable):
            name = ".".join(map(str, path))
            raise TypeError(
                f"{fn}: conditioning {name!r} must be a tensor (alone or in dicts, lists and tuples) "
                f"or a hashable constant (it is baked into the captured graph), got {type(value).__name__}"
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

    graph: Any  # a torch.cuda.CUDAGraph (anything with replay() and reset() in tests)
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


class CaptureFailed(RuntimeError):
    """Recording the loop in a CUDA graph failed (the warm-up ran): the cause is ``__cause__``."""


def capturable(device: torch.device) -> bool:
    """Whether a loop on ``device`` can be captured in a CUDA graph."""
    return device.type == "cuda"


def capture(body: Callable[[], Tensor], warmup: int, device: torch.device) -> tuple[Any, Tensor]:
    """Warm ``body`` up on a side stream, then record it: the graph and its static output.

    Raises:
        CaptureFailed: when recording fails (a host synchronisation in ``body``, ...); errors
            of the warm-up (the body's own) propagate unchanged.
    """
    with torch.cuda.device(device):
        warm_up(body, warmup, device)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(graph):
                out = body()
        except Exception as err:  # any capture failure: the caller falls back to the eager loop
            torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture stream current
            raise CaptureFailed(f"{type(err).__name__}: {err}") from err
    return graph, out
