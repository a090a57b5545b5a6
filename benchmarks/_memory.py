"""Peak-memory measurement for the benchmarks, honest about what it measures.

On CUDA the figure is the allocator's peak during one call, above what was allocated before
it (``torch.cuda.max_memory_allocated``). The CPU allocator keeps no such statistic, and
process RSS or ``tracemalloc`` do not see torch's allocations reliably, so on CPU the figure
is the total size of the distinct tensor storages that autograd saves for backward during
the call (``torch.autograd.graph.saved_tensors_hooks``), parameters, buffers and the given
inputs excluded. Saved activations stay alive until the last backward of the call, so this is
a lower bound of the activation peak (gradients and short-lived temporaries not counted);
it is deterministic, so it compares variants on a shared, noisy machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

CUDA_METHOD = "cuda_max_memory_allocated_minus_baseline"
CPU_METHOD = "autograd_saved_tensor_bytes"

METHODS = {
    CUDA_METHOD: "torch.cuda.max_memory_allocated during one call, minus memory_allocated before it",
    CPU_METHOD: (
        "bytes of distinct storages saved for backward during one call "
        "(torch.autograd.graph.saved_tensors_hooks; parameters, buffers and inputs excluded): "
        "a lower bound of the activation peak, not an allocator peak"
    ),
}


def memory_method(device: torch.device) -> str:
    """The name of the method `peak_memory` uses on ``device``."""
    return CUDA_METHOD if device.type == "cuda" else CPU_METHOD


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def peak_memory(
    fn: Callable[[], object],
    device: torch.device,
    *,
    modules: Iterable[nn.Module] = (),
    inputs: Iterable[Tensor] = (),
) -> int:
    """Bytes one call of ``fn`` needs, measured as `memory_method` says.

    Args:
        fn: the step to measure; called once (after the caller's warm-up).
        device: where ``fn`` runs.
        modules: modules whose parameters and buffers are not counted (CPU method).
        inputs: tensors that exist before the call and are not counted (CPU method).

    Returns:
        The peak in bytes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
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
