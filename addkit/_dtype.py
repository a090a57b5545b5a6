"""The dtype a network computes in, and inputs cast to it: the one rule for mixed precision inputs.

A float16 sample into a float32 network (a DMD fake score, a teacher used for features) fails
inside its first layer; a float32 sample into a float16 network likewise. Outside autocast,
addkit casts the input (differentiably) to the dtype of the network's first floating
parameter and leaves the output to the caller; under autocast it passes the input as given,
since autocast picks the precision of each op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from addkit._unwrap import unwrap_chain

__all__ = ["as_module_dtype", "module_dtype"]


def module_dtype(model: Any) -> torch.dtype | None:
    """dtype of the first floating parameter of the innermost model that has one (wrappers included)."""
    for module in reversed(unwrap_chain(model)):
        if isinstance(module, nn.Module):
            param = next((p for p in module.parameters() if p.is_floating_point()), None)
            if param is not None:
                return param.dtype
    return None


def as_module_dtype(x: Tensor, model: Any) -> Tensor:
    """``x`` cast to ``model``'s dtype outside autocast; unchanged for a model without parameters."""
    dtype = module_dtype(model)
    if dtype is None or dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)
