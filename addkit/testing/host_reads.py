"""Count the places where code reads tensor values back to the host.

On a GPU, ``loss.item()``, ``if (x > 0).any():``, ``int(t.max())`` or ``x.tolist()`` each wait
for the device to finish (a synchronisation) before Python can go on. A training step or a
sampler call that does this stalls the GPU's queue. [`count_host_reads`][addkit.testing.host_reads.count_host_reads]
records every such read made inside a ``with`` block, on any device (on a CPU the reads are
cheap, but the same code would synchronise on a GPU), so a test can assert that a hot path
makes none:

```python
from addkit.testing import count_host_reads

with count_host_reads() as reads:
    loss, logs = objective.generator_loss(...)
assert reads.count == 0, reads.summary()
```

It is a ``torch.overrides.TorchFunctionMode``: it sees Python-level calls of ``item``,
``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``tolist``, ``numpy`` and ``nonzero``
(the calls that turn tensor values into Python values or data-dependent shapes). It does not
see reads made inside C++ (e.g. a kernel with a data-dependent output shape called from
another op) or explicit ``torch.cuda.synchronize()`` calls.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostRead", "HostReads", "count_host_reads"]

_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__index__: "__index__",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
}


@dataclass(frozen=True)
class HostRead:
    """One read: the method called and where (the innermost frame outside torch)."""

    method: str
    where: str


@dataclass
class HostReads:
    """The reads recorded by [`count_host_reads`][addkit.testing.host_reads.count_host_reads]."""

    reads: list[HostRead] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many reads were made."""
        return len(self.reads)

    def summary(self, limit: int = 20) -> str:
        """One line per read (up to ``limit``): the method and the calling line."""
        lines = [f"{r.method} at {r.where}" for r in self.reads[:limit]]
        more = f"\n... and {self.count - limit} more" if self.count > limit else ""
        return f"{self.count} host reads:\n" + "\n".join(lines) + more


class _Recorder(TorchFunctionMode):
    def __init__(self, record: HostReads) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = _READS.get(func)
        if name is not None:
            self.record.reads.append(HostRead(name, _caller()))
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("host_reads.py"):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "<torch>"


@contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Record every tensor-to-host read made inside the ``with`` block.

    Yields:
        A [`HostReads`][addkit.testing.host_reads.HostReads] that fills while the block
        runs; ``.count`` and ``.summary()`` after it.

    Examples:
        >>> import torch
        >>> x = torch.ones(3)
        >>> with count_host_reads() as reads:
        ...     y = x * 2              # stays on the device
        ...     big = bool(y.sum() > 5)  # one read
        >>> reads.count, reads.reads[0].method
        (1, '__bool__')
    """
    record = HostReads()
    with _Recorder(record):
        yield record
