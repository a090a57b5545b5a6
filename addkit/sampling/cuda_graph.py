"""The few-step sampler captured in a CUDA graph: one launch per call instead of one per kernel.

At 1–4 steps the Python and kernel-launch overhead of an eager loop is a large share of the
time (a UNet step launches hundreds of kernels). [`CUDAGraphSampler`][addkit.sampling.cuda_graph.CUDAGraphSampler]
records the whole loop (every denoiser call, the re-noising and optionally a VAE decode) once
per input signature with ``torch.cuda.graph`` and replays it. Its call and results are those
of [`FewStepSampler`][addkit.sampling.sampler.FewStepSampler].

Constraints of a captured loop (checked where possible):

- static shapes: each (shape, dtype, device, conditioning shapes) gets its own graph, kept in a
  bounded least-recently-used cache; conditioning tensors, also inside dicts, lists and tuples
  (ControlNet's residuals), are copied into the graph's buffers on every call, so new values of
  the same shapes replay the same graph;
- no host synchronisation inside the denoiser (``.item()``, ``.cpu()``, printing a tensor,
  data-dependent shapes): capture fails and the sampler runs eagerly, with one warning;
- parameters are read by address: updating weights in place (an optimizer step,
  ``load_state_dict``, ``p.copy_(...)``) needs no re-capture; replacing parameter tensors or
  moving the denoiser (``.to(...)``, ``.half()``) does: call ``reset()``;
- no gradients (the loop runs under ``torch.no_grad()``) and no per-step ``callback``;
- calls under ``torch.inference_mode()`` work and mix with plain calls: the sampler's own
  buffers are always ordinary tensors (an inference tensor captured as a static buffer could
  not be written to by a later call outside inference mode);
- under ``torch.autocast`` the loop is captured with autocast's weight cache off, so the graph
  casts the live parameters itself (in-place updates are seen; nothing it reads dies with the
  caller's autocast block), and the autocast dtype is part of the key (an fp32 call never
  replays a bf16 graph).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from addkit._checks import check_choice, check_positive_int
from addkit.sampling import _static
from addkit.sampling._plan import Plan, make_plan
from addkit.sampling._static import (
    CapturedLoop,
    CaptureFailed,
    Leaves,
    autocast_dtype,
    flatten,
    graph_key,
    rebuild,
    static_copy,
    uncached_autocast,
)
from addkit.sampling.renoise import Renoise, renoise_coefficients
from addkit.sampling.sampler import (
    Noises,
    _check_config,
    _check_noise,
    _check_noises,
    _draw_noises,
    _run_loop,
)
from addkit.typing import Schedule

__all__ = ["COMPILE_MODES", "CUDAGraphSampler", "EagerFallbackWarning"]

COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The ``torch.compile`` modes ``CUDAGraphSampler(compile=...)`` accepts."""


class EagerFallbackWarning(RuntimeWarning):
    """Warned once per [`CUDAGraphSampler`][addkit.sampling.cuda_graph.CUDAGraphSampler] that runs its loop eagerly.

    That happens for inputs that are not on a CUDA device and for inputs whose capture failed.
    Filter it with ``warnings.simplefilter("ignore", EagerFallbackWarning)``.
    """


class CUDAGraphSampler:
    """[`FewStepSampler`][addkit.sampling.sampler.FewStepSampler] whose loop is captured in a CUDA graph and replayed.

    Per call: the noise, the re-noising noise (drawn with ``generator`` on its device, or
    copied from ``noises``) and the conditioning tensors (also inside dicts, lists and tuples)
    are copied into the graph's static buffers,
    the graph is replayed, and a copy of its output is returned. Timesteps and coefficients
    live on the device, so the replay never synchronises with the host. One graph is kept per
    (shape, dtype, device, conditioning signature), at most ``max_graphs`` of them; the least
    recently used is released when a new one is needed. Each graph holds its own memory pool
    (the loop's activations), so ``max_graphs`` bounds the memory; ``memory_pools`` names the
    pools, which ``torch.cuda.memory_allocated`` does not count between replays.

    On a CPU (or any non-CUDA device), or when capture fails, the loop runs eagerly with the
    same results and one [`EagerFallbackWarning`][addkit.sampling.cuda_graph.EagerFallbackWarning].
    With ``compile=`` the loop is instead ``torch.compile``d (``"reduce-overhead"`` lets
    inductor capture CUDA graphs itself); that path runs on any device.

    Args:
        denoiser: anything with ``x0(x_t, t, **cond)``, capturable (no host synchronisation).
            Not copied: weights updated in place are seen by the next replay.
        schedule: the student's schedule.
        timesteps: student timesteps, noisiest first; ``None`` for
            ``schedule.timesteps(4, "trailing")`` (ADD's ``(999, 749, 499, 249)`` for VP).
        renoise: ``"fresh"`` (ADD) or ``"ancestral"`` (diffusers' Euler ancestral).
        decode: optional ``decode(x0) -> images`` run inside the graph (e.g.
            ``lambda z: vae.decode(z / vae.config.scaling_factor).sample``).
        max_graphs: how many captured graphs to keep (least recently used evicted).
        warmup: eager iterations on a side stream before capture.
        compile: a ``torch.compile`` mode (see ``COMPILE_MODES``) to use instead of manual
            capture; ``None`` captures with ``torch.cuda.graph``.
        compile_options: extra keyword arguments for ``torch.compile`` (e.g. ``backend``).

    Raises:
        TypeError, ValueError: for bad arguments, at construction (as
            [`sample`][addkit.sampling.sampler.sample]).

    Examples:
        >>> import warnings
        >>> from addkit.schedules import VPSchedule
        >>> class Half:
        ...     def x0(self, x_t, t):
        ...         return 0.5 * x_t
        >>> sampler = CUDAGraphSampler(Half(), schedule=VPSchedule.scaled_linear(), timesteps=(999,))
        >>> with warnings.catch_warnings(record=True):   # on a CPU: eager, with one warning
        ...     sampler(torch.ones(1, 2))
        tensor([[0.5000, 0.5000]])
    """

    def __init__(
        self,
        denoiser: Any,
        *,
        schedule: Schedule,
        timesteps: Sequence[int | float] | Tensor | None = None,
        renoise: Renoise = "fresh",
        decode: Callable[[Tensor], Tensor] | None = None,
        max_graphs: int = 4,
        warmup: int = 2,
        compile: str | None = None,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        fn = "CUDAGraphSampler"
        config = _check_config(fn, denoiser, schedule, timesteps, renoise, decode)
        self.denoiser, self.schedule, self.timesteps, self.renoise, self.decode = config
        self.max_graphs = check_positive_int(fn, "max_graphs", max_graphs)
        self.warmup = check_positive_int(fn, "warmup", warmup)
        self.compile = None if compile is None else check_choice(fn, "compile", compile, COMPILE_MODES)
        self.compile_options = dict(compile_options or {})
        self.captures = 0
        """How many graphs this sampler has captured so far (evicted ones included)."""
        self._k = renoise_coefficients(schedule, self.timesteps, renoise=renoise)
        self._graphs: OrderedDict[Hashable, CapturedLoop] = OrderedDict()
        self._failed: set[Hashable] = set()
        self._plans: dict[tuple[torch.device, torch.dtype], Plan] = {}
        self._compiled: Callable[..., Tensor] | None = None
        self._warned = False

    def __repr__(self) -> str:
        return (
            f"CUDAGraphSampler(timesteps={self.timesteps}, renoise={self.renoise!r}, "
            f"graphs={len(self._graphs)}/{self.max_graphs}, compile={self.compile!r})"
        )

    @property
    def num_graphs(self) -> int:
        """How many captured graphs the cache holds now."""
        return len(self._graphs)

    @property
    def memory_pools(self) -> list[Any]:
        """The private memory pools of the cached graphs (``torch.cuda.CUDAGraph.pool()`` handles).

        A graph's intermediate tensors live in its pool, reserved between replays but not
        counted by ``torch.cuda.memory_allocated``; their size is the sum of ``total_size`` over
        ``torch.cuda.memory_snapshot(mempool_id=pool)``. Empty until a graph is captured.
        """
        return [entry.graph.pool() for entry in self._graphs.values()]

    def reset(self) -> None:
        """Release every captured graph (and the compiled loop); the next call captures anew.

        Needed after replacing the denoiser's parameter tensors or moving it to another
        device or dtype; not after in-place weight updates.
        """
        for entry in self._graphs.values():
            entry.graph.reset()
        self._graphs.clear()
        self._failed.clear()
        self._plans.clear()
        self._compiled = None

    def __call__(
        self,
        noise: Tensor,
        *,
        generator: torch.Generator | None = None,
        noises: Noises | None = None,
        callback: Any = None,
        **cond: Any,
    ) -> Tensor:
        """Sample from ``noise`` ``[B, ...]``; arguments as [`sample`][addkit.sampling.sampler.sample].

        Returns:
            The last $\\hat x_0$ (decoded if ``decode`` was given), a fresh tensor.

        Raises:
            ValueError: if ``callback`` is given (a replay runs no Python between steps), or
                for ``noises`` of the wrong shape.
            TypeError: for conditioning that is neither a tensor (alone or in dicts, lists and
                tuples) nor a hashable constant.
        """
        fn = "CUDAGraphSampler"
        if callback is not None:
            raise ValueError(
                f"{fn}: callback is not supported (a captured loop runs no Python between steps); "
                f"use addkit.sampling.sample(..., callback=...) to watch the steps"
            )
        _check_noise(fn, noise)
        noises = _check_noises(fn, noises, noise, len(self.timesteps) - 1)
        leaves = flatten(cond)
        key = graph_key(fn, noise, leaves)  # shapes, dtypes, devices, constants, autocast state
        # Ordinary (not inference) tensors for the static buffers, whatever mode the caller is in.
        with torch.inference_mode(False), torch.no_grad():
            return self._run(key, noise, noises, generator, cond, leaves)

    # -- paths ----------------------------------------------------------------------------
    def _run(
        self, key: Hashable, noise: Tensor, noises: Noises | None, generator: Any, cond: dict, leaves: Leaves
    ) -> Tensor:
        if self.compile is not None:
            return self._run_compiled(noise, noises, generator, cond)
        if not _static.capturable(noise.device):
            self._warn(
                f"noise is on {noise.device}, not a CUDA device; running the loop eagerly", stacklevel=4
            )
            return self._run_eager(noise, noises, generator, cond)
        entry = self._graphs.get(key)
        if entry is None and key not in self._failed:
            entry = self._capture(key, noise, cond, leaves)
        if entry is None:
            return self._run_eager(noise, noises, generator, cond)
        self._graphs.move_to_end(key)
        return entry.replay(noise, noises, generator, leaves)

    def _body(self, noise: Tensor, noises: Noises, plan: Plan, cond: dict[str, Any]) -> Tensor:
        x0 = _run_loop(self.denoiser, noise, noises, plan, cond)
        return x0 if self.decode is None else self.decode(x0)

    def _plan(self, noise: Tensor) -> Plan:
        key = (noise.device, noise.dtype)
        if key not in self._plans:
            self._plans[key] = make_plan(
                self.schedule, self.timesteps, self._k, device=noise.device, dtype=noise.dtype
            )
        return self._plans[key]

    def _noises(self, noise: Tensor, noises: Noises | None, generator: Any) -> Tensor:
        count = len(self.timesteps) - 1
        if noises is None or count == 0:
            return _draw_noises(count, noise, generator if noises is None else None)
        return noises if isinstance(noises, Tensor) else torch.stack(list(noises))

    def _run_eager(self, noise: Tensor, noises: Noises | None, generator: Any, cond: dict) -> Tensor:
        return self._body(noise, self._noises(noise, noises, generator), self._plan(noise), cond)

    def _run_compiled(self, noise: Tensor, noises: Noises | None, generator: Any, cond: dict) -> Tensor:
        if self._compiled is None:
            self._compiled = torch.compile(
                self._body, mode=self.compile, dynamic=False, **self.compile_options
            )
        torch.compiler.cudagraph_mark_step_begin()  # a new inference step for inductor's graphs
        out = self._compiled(noise, self._noises(noise, noises, generator), self._plan(noise), cond)
        return out.clone()  # inductor's CUDA-graph outputs are overwritten by the next call

    def _capture(self, key: Hashable, noise: Tensor, cond: dict, leaves: Leaves) -> CapturedLoop | None:
        device, plan = noise.device, self._plan(noise)
        static_noise = noise.detach().clone()
        static_noises = torch.zeros((len(self.timesteps) - 1, *noise.shape), dtype=noise.dtype, device=device)
        static_leaves = static_copy(leaves)
        static_cond = rebuild(cond, (value for _, value in static_leaves))

        def body() -> Tensor:
            return self._body(static_noise, static_noises, plan, static_cond)

        # Under the caller's autocast dtype but without its weight cache: the graph casts the weights itself.
        try:  # errors of the warm-up are the denoiser's own: they propagate
            with uncached_autocast(device.type, autocast_dtype(device.type)):
                graph, out = _static.capture(body, self.warmup, device)
        except CaptureFailed as err:
            self._failed.add(key)
            self._warn(  # called from _capture <- _run <- __call__
                f"CUDA-graph capture failed for noise {tuple(noise.shape)} {noise.dtype} ({err}); "
                f"running the loop eagerly. The denoiser must not synchronise with the host "
                f"(.item(), .cpu(), data-dependent shapes)",
                stacklevel=5,
            )
            return None
        while len(self._graphs) >= self.max_graphs:  # least recently used first
            self._graphs.popitem(last=False)[1].graph.reset()
        entry = CapturedLoop(graph, static_noise, static_noises, static_leaves, out, plan)
        self._graphs[key] = entry
        self.captures += 1
        return entry

    def _warn(self, message: str, *, stacklevel: int) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"CUDAGraphSampler: {message}", EagerFallbackWarning, stacklevel=stacklevel)
