"""Peak-memory measurement for the benchmarks, honest about what it measures.

On CUDA the figure is the allocator's peak during one call, above what was allocated before
it (``torch.cuda.max_memory_allocated``), plus the bytes reserved by the CUDA-graph private
memory pools the call replays: a captured graph keeps its intermediate tensors in its own pool,
reserved between replays, and a replay allocates nothing, so the allocator's peak alone would
put a graph's activations at zero. A pool's size is the sum of ``total_size`` over its segments
in ``torch.cuda.memory_snapshot`` (``segment_pool_id``). The CPU allocator keeps no such statistic, and
process RSS or ``tracemalloc`` do not see torch's allocations reliably, so on CPU the figure
is the total size of the distinct tensor storages that autograd saves for backward during
the call (``torch.autograd.graph.saved_tensors_hooks``), parameters, buffers and the given
inputs excluded. Saved activations stay alive until the last backward of the call, so this is
a lower bound of the activation peak (gradients and short-lived temporaries not counted);
it is deterministic, so it compares variants on a shared, noisy machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

CUDA_METHOD = "cuda_max_memory_allocated_minus_baseline_plus_graph_pools"
CPU_METHOD = "autograd_saved_tensor_bytes"

METHODS = {
    CUDA_METHOD: (
        "torch.cuda.max_memory_allocated during one call, minus memory_allocated before it, plus the "
        "bytes reserved by the CUDA-graph private memory pools it replays (torch.cuda.memory_snapshot)"
    ),
    CPU_METHOD: (
        "bytes of distinct storages saved for backward during one call "
        "(torch.autograd.graph.saved_tensors_hooks; parameters, buffers and inputs excluded): "
        "a lower bound of the activation peak, not an allocator peak"
    ),
}


def memory_method(device: torch.device) -> str:
    """The name of the method `peak_memory` uses on ``device``."""
    return CUDA_METHOD if device.type == "cuda" else CPU_METHOD


def private_pools(device: torch.device) -> list[tuple[int, int]]:
    """The ids of the private memory pools (CUDA graphs, ``torch.cuda.MemPool``) with segments on ``device``."""
    return list(dict.fromkeys(pool for pool, _ in _pool_segments(device)))


def graph_pool_bytes(device: torch.device, pools: Iterable[Any] | None = None) -> int:
    """Bytes reserved by the private memory pools ``pools`` on ``device`` (``None``: all of them)."""
    wanted = None if pools is None else {tuple(p) for p in pools}
    return sum(size for pool, size in _pool_segments(device) if wanted is None or pool in wanted)


def _pool_segments(device: torch.device) -> list[tuple[tuple[int, int], int]]:
    index = torch.cuda.current_device() if device.index is None else device.index
    return [
        (tuple(seg["segment_pool_id"]), int(seg["total_size"]))
        for seg in torch.cuda.memory_snapshot(include_traces=False)
        if seg.get("device", index) == index and tuple(seg["segment_pool_id"]) != (0, 0)
    ]


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def peak_memory(
    fn: Callable[[], object],
    device: torch.device,
    *,
    modules: Iterable[nn.Module] = (),
    inputs: Iterable[Tensor] = (),
    pools: Callable[[], Iterable[Any]] | None = None,
) -> int:
    """Bytes one call of ``fn`` needs, measured as `memory_method` says.

    Args:
        fn: the step to measure; called once (after the caller's warm-up).
        device: where ``fn`` runs.
        modules: modules whose parameters and buffers are not counted (CPU method).
        inputs: tensors that exist before the call and are not counted (CPU method).
        pools: returns the ids of the CUDA-graph memory pools ``fn`` replays (e.g.
            ``CUDAGraphSampler.memory_pools``), read after the call; ``None`` counts every
            private pool on the device, right when ``fn``'s graphs are the only ones alive.

    Returns:
        The peak in bytes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        held = graph_pool_bytes(device, None if pools is None else pools())
        return int(torch.cuda.max_memory_allocated(device) - base + held)
    excluded = {_storage_key(t) for t in inputs}
    for m in modules:
        excluded.update(_storage_key(t) for t in (*m.parameters(), *m.buffers()))
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in excluded and t.device.type != "meta":
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(saved.values()))
