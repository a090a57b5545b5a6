"""Peak memory of one training step without allocating it: fake tensors and a storage tracker.

`estimate_step_memory` builds a training setup on ``torch.device("meta")``, turns every
parameter and buffer into a ``FakeTensor`` (shapes, dtypes and strides, no data), and runs one
whole step (generator and discriminator forward and backward, gradient clipping, the AdamW
steps) under ``FakeTensorMode``. `StepMemTracker`, a ``MemTracker``
(``torch.distributed._tools.mem_tracker``), follows every storage from its creation to its
release and keeps the peak with its breakdown: parameters, buffers, gradients, optimiser
state, activations (saved in forward), temporaries (allocated in backward and the optimiser
step) and inputs. Nothing is allocated, so an SDXL or Flux step is estimated on one CPU core in
about a minute (the number of operations sets the time, not their sizes).

Fake tensors live on the CPU (a fake CUDA tensor cannot run backward without a GPU), so the
step runs under ``_cuda_autocast.cuda_policy``, which makes CPU autocast cast each op as CUDA
autocast does; attention takes the fused path on both (flash attention saves
the output and a float32 log-sum-exp). It is compared with ``torch.cuda.max_memory_allocated``,
the caching allocator's peak of allocated bytes. Outside that figure (and the estimate): the
CUDA context, the allocator's fragmentation (``memory_reserved`` above ``memory_allocated``)
and NCCL buffers. Inside it but not in the estimate: cuDNN and cuBLAS workspaces, which torch
allocates through the caching allocator; they are part of what the comparison's tolerance
covers.

The same tracker run on real tensors (`measure_step_memory`) is the CPU validation:
``tests/benchmarks/test_memory_estimate.py`` checks that the fake estimate equals the
measurement of the same step on real CPU tensors.

This module leans on private torch tools (``FakeTensorMode``, ``MemTracker`` and its hooks;
checked with torch 2.14), which is why it lives in ``benchmarks/`` and not in ``addkit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed._tools.mod_tracker import ModTracker
from typing_extensions import Self

from _cuda_autocast import cuda_policy
from _materialize import Materializer

CATEGORIES = {  # MemTracker's reference types -> the names this benchmark reports
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "buffers",
    _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OTH: "inputs",
}


@dataclass
class Setup:
    """One training step and everything it touches.

    Attributes:
        parts: named modules (student, teacher, VAE, discriminator heads, feature network,
            ...); a module shared by two names is counted once.
        optimizers: the optimisers the step calls (their state is counted).
        inputs: the batch and conditioning that exist before the step.
        step: runs one whole step (forward, backward, optimiser steps, ``zero_grad``).
        fsdp_unit_bytes: what an FSDP run holds unsharded for its largest block (gathered
            parameters, and their gradients before the reduce-scatter when they are trained).
        sharded: the parameters an FSDP run shards (the recipe's ``--fsdp``: the student's);
            everything else stays whole on every device.
    """

    parts: dict[str, nn.Module]
    optimizers: list[torch.optim.Optimizer]
    inputs: list[torch.Tensor]
    step: Callable[[], None]
    fsdp_unit_bytes: int = 0
    sharded: list[nn.Parameter] = field(default_factory=list)


class _NoModuleHooks(ModTracker):
    """A ``ModTracker`` that installs no module hooks: `StepMemTracker` attributes by part itself.

    ``MemTracker`` only needs ``is_bw`` from it (whether autograd is running backward), which
    does not depend on hooks. Without them, a module may run several times in one step (the
    discriminator on fakes, then on reals and fakes), frozen parameters are fine, and R1's
    ``torch.autograd.grad`` on leaf features meets no multi-grad hook.
    """

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *args: object) -> None:
        return None


class StepMemTracker(MemTracker):
    """``MemTracker`` for a whole training step, by part, with a peak for FSDP-sharded state.

    ``MemTracker`` follows every storage from creation to release and categorises it
    (parameter, buffer, gradient, optimiser state, activation made in forward, temporary made
    in backward or in the optimiser step, other). This subclass adds:

    - the part running when each storage was made (the innermost of ``parts``' modules whose
      forward is active; ``"loss and glue"`` outside them, ``"backward"`` for gradients of
      activations), with each part's live bytes at the peak;
    - gradient hooks on trainable parameters only.

    Activations recomputed by gradient checkpointing during backward count as temporaries.

    Args:
        parts: named modules; a module reachable from two parts belongs to the first.
    """

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        super().__init__()
        self._mod_tracker = _NoModuleHooks()
        self._owner: dict[nn.Module, str] = {}
        for name, part in parts.items():
            for m in part.modules():
                self._owner.setdefault(m, name)
        self._stack: list[str] = []
        self._part_of: dict[int, tuple[str, int]] = {}  # id(winfo) -> (part, bytes)
        self._by_part: dict[str, int] = {}
        self.peak_by_part: dict[str, int] = {}
        self.peak_phase = ""
        self._trainable = [p for part in parts.values() for p in part.parameters() if p.requires_grad]

    def _pre(self, module: nn.Module, args: Any) -> None:
        if module in self._owner:
            self._stack.append(self._owner[module])

    def _post(self, module: nn.Module, args: Any, out: Any) -> None:
        if module in self._owner and self._stack:
            self._stack.pop()

    def __enter__(self) -> Self:
        super().__enter__()
        for p in dict.fromkeys(self._trainable):
            if self._param_to_grad_hook_handles.get(p) is None:
                self._param_to_grad_hook_handles[p] = (
                    p.register_hook(self._grad_hook),
                    p.register_post_accumulate_grad_hook(lambda q: self._grad_hook(q.grad)),
                )
        self._hooks = (
            torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
            torch.nn.modules.module.register_module_forward_hook(self._post, always_call=True),
        )
        return self

    def __exit__(self, *args: object) -> None:
        for handle in self._hooks:
            handle.remove()
        super().__exit__(*args)

    def _grad_hook(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _track(self, reftype: Any, t: torch.Tensor) -> None:
        fresh = [st for st in get_untyped_storages(t) if self._WINFO.get(st) is None]
        super()._track(reftype, t)
        if not fresh:
            return
        if self._stack:
            part = self._stack[-1]
        else:
            part = (
                "backward"
                if self._mod_tracker.is_bw
                else ("optimizer step" if self._in_opt else "loss and glue")
            )
        for st in fresh:
            winfo, _ = self._WINFO.get(st, (None, None))
            if winfo is not None:
                self._part_of[id(winfo)] = (part, winfo.mem_consumed)
                self._by_part[part] = self._by_part.get(part, 0) + winfo.mem_consumed

    def _phase(self) -> str:
        if self._in_opt:
            return "optimizer step"
        return "backward" if self._mod_tracker.is_bw else "forward"

    def _delete_callback(self, winfo: Any, w_st: Any) -> None:
        part, nbytes = self._part_of.pop(id(winfo), (None, 0))
        if part is not None:
            self._by_part[part] -= nbytes
        super()._delete_callback(winfo, w_st)

    # The global peak (no per-module snapshots: parts are counted above).
    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            total = snap["Total"]
            if self._peak_mem.get(dev, 0) < total:
                self._peak_mem[dev] = total
                self._peak_mem_snap[dev] = dict(snap)
                self.peak_by_part = {k: v for k, v in self._by_part.items() if v}
                self.peak_phase = self._phase()


def _named(snap: dict[Any, int], state: int = 0) -> dict[str, int]:
    """Bytes by category; what the optimiser step allocates beyond the ``state`` it held before
    the step (foreach temporaries) is ``optimizer_step``."""
    out = {name: snap.get(key, 0) for key, name in CATEGORIES.items()}
    opt = snap.get(_MemRefType.OPT, 0)
    out["optimizer"] = min(opt, state)
    out["optimizer_step"] = max(opt - state, 0)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def per_device(setup: Setup, peak: dict[str, int], world: int) -> dict[str, int]:
    """The peak on each of ``world`` devices of an FSDP run that shards ``setup.sharded``.

    Those parameters, their AdamW state and their gradients (as many as are alive at the peak)
    are divided by ``world``; everything else (frozen networks, the discriminator, activations)
    stays whole; the unsharded unit FSDP gathers (``fsdp_unit_bytes``) is added.
    """
    ids = {id(p) for p in setup.sharded}
    params = sum(_nbytes(p) for p in setup.sharded)
    state = sum(
        _nbytes(v) for opt in setup.optimizers for p, st in opt.state.items() if id(p) in ids
        for v in st.values() if isinstance(v, torch.Tensor)
    )  # fmt: skip
    grads = min(sum(_nbytes(p) for p in setup.sharded if p.requires_grad), peak["gradients"])
    out = dict(peak)
    for key, nbytes in (("parameters", params), ("optimizer", state), ("gradients", grads)):
        out[key] = peak[key] - nbytes + math.ceil(nbytes / world)
    out["fsdp_gather"] = setup.fsdp_unit_bytes
    out["total"] = peak["total"] - (params + state + grads) + sum(math.ceil(n / world) for n in (params, state, grads))
    out["total"] += setup.fsdp_unit_bytes
    return out


def warm_optimizers(setup: Setup) -> None:
    """One optimiser step on zero gradients, so the measured step finds AdamW's state in place."""
    for opt in setup.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def track_step(setup: Setup, *, world: int = 1) -> dict[str, Any]:
    """Run ``setup.step`` once under a `StepMemTracker`; return the peak and its breakdown."""
    tracker = StepMemTracker(setup.parts)
    tracker.track_external(*setup.parts.values(), *setup.optimizers, *setup.inputs)
    state = sum(snap.get(_MemRefType.OPT, 0) for snap in tracker.get_tracker_snapshot().values())
    with tracker:
        setup.step()
    snap = _merge(tracker._peak_mem_snap.values())
    peak = {"total": int(sum(v for k, v in snap.items() if k != "Total")), **_named(snap, state)}
    return {
        "peak": peak,
        "per_device": per_device(setup, peak, world) if world > 1 else None,
        "at_peak_by_part": tracker.peak_by_part,
        "peak_phase": tracker.peak_phase,
    }


def _merge(snaps: Iterable[dict[Any, int]]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for snap in snaps:
        for k, v in snap.items():
            out[k] = out.get(k, 0) + v
    return out


def estimate_step_memory(
    build: Callable[[Materializer], Setup],
    *,
    world: int = 1,
    cuda_autocast: bool = True,
    describe: Callable[[Setup], Any] | None = None,
) -> dict[str, Any]:
    """Peak memory of one step of ``build``'s setup, from fake tensors (nothing allocated).

    Args:
        build: constructs its modules under ``torch.device("meta")``, materializes them with
            the given `Materializer` and returns the `Setup`.
        world: devices sharding parameters, gradients and optimiser state (FSDP estimate).
        cuda_autocast: apply CUDA's autocast policy (the estimate is for a GPU).
        describe: called with the built setup; its result is returned as ``described``
            (e.g. parameter counts by part).

    Returns:
        ``peak`` (bytes by category and ``total``), ``per_device`` (the same with the
        sharded state divided by ``world``, plus ``fsdp_gather``), ``at_peak_by_part``
        (bytes made during the step and alive at the peak, by the part that made them) and
        ``peak_phase`` (``forward``, ``backward`` or ``optimizer step``).
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # real tensors (the schedule's tables) are lifted
    with cuda_policy() if cuda_autocast else nullcontext():
        setup = build(Materializer(mode, torch.device("cpu")))
        described = describe(setup) if describe is not None else None
        with mode:
            warm_optimizers(setup)
            return {**track_step(setup, world=world), "described": described}


def measure_step_memory(
    build: Callable[[Materializer], Setup], device: torch.device, *, cuda_autocast: bool = True
) -> dict[str, Any]:
    """The same step on real tensors: the tracker on a CPU, the allocator's peak on CUDA.

    On CUDA, ``max_memory_allocated`` over the step (everything resident included, less what
    was allocated before the setup was built) is returned as ``peak["total"]``; on a CPU the
    `StepMemTracker` figures of `track_step`.
    """
    policy = cuda_policy() if cuda_autocast and device.type == "cpu" else nullcontext()
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with policy:
        setup = build(Materializer(None, device))
        warm_optimizers(setup)
        if device.type != "cuda":
            return track_step(setup)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        setup.step()
        torch.cuda.synchronize(device)
        return {"peak": {"total": int(torch.cuda.max_memory_allocated(device)) - base}}
