"""The model inside training wrappers (DDP, FSDP1, ``torch.compile``, peft, addkit's ``AdaptersDisabled``).

Found by class name, without importing the libraries that define them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["unwrap_chain", "unwrap_module"]

# Wrappers that forward ``*args, **kwargs`` to the model they hold, as (class name, top-level package) ->
# attribute. Matched by name along the MRO, so neither torch.distributed nor peft is imported here.
_WRAPPERS = {
    ("DistributedDataParallel", "torch"): "module",
    ("DataParallel", "torch"): "module",
    ("FullyShardedDataParallel", "torch"): "module",  # FSDP1; FSDP2 subclasses the model itself
    ("OptimizedModule", "torch"): "_orig_mod",  # torch.compile
    ("PeftModel", "peft"): "base_model",
    ("BaseTuner", "peft"): "model",  # peft's LoraModel and its siblings
    ("AdaptersDisabled", "addkit"): "model",  # addkit.denoisers: a LoRA model run as its base
}


def _inner(model: Any) -> Any | None:
    """The model a known wrapper holds, or None if ``model`` is not one."""
    for cls in type(model).__mro__:
        attr = _WRAPPERS.get((cls.__name__, cls.__module__.partition(".")[0]))
        if attr is not None:
            return getattr(model, attr, None)
    return None


def unwrap_chain(model: Any) -> list[Any]:
    """``[model, inner, ..., innermost]`` through DDP, FSDP1, ``torch.compile`` and peft wrappers."""
    chain = [model]
    while (inner := _inner(chain[-1])) is not None and all(inner is not m for m in chain):
        chain.append(inner)
    return chain


def unwrap_module(model: Any) -> Any:
    """The innermost model of ``model`` (``model`` itself when it is no known wrapper)."""
    return unwrap_chain(model)[-1]
