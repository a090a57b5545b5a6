"""``--fsdp``: the student sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``), driven here.

accelerate's FSDP plugin only applies to GPU-type launches (on ``ACCELERATE_USE_CPU=1`` it
silently falls back to DDP), so the recipe shards the student itself: one FSDP unit per down,
mid and up block plus the root, over a 1-D device mesh of all processes. accelerate still
launches the processes, sets up the process group (gloo on CPU, NCCL on GPUs), autocast and
the logs. The student and its optimiser are checkpointed with ``torch.distributed.checkpoint``
(each process writes its shard; a resumed run may use another number of processes); sampling
and export gather the full weights onto the main process.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn


def shard(unet: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Shard a diffusers UNet in place over all ``world`` processes; returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    unet.to(device)
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        fully_shard(block, mesh=mesh)
    return fully_shard(unet, mesh=mesh)


def save(student: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shard of the student and its optimiser state (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(student, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load(student: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load the shards written by `save` (collective; any number of processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(student, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def gather(student: nn.Module, template: nn.Module, is_main: bool) -> nn.Module | None:
    """The full student as a plain float32 UNet on the main process (None elsewhere; collective).

    Args:
        student: the sharded student.
        template: an unsharded module of the same architecture (the teacher), copied.
        is_main: whether this is the main process.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(student, options=options)  # on the main process only
    if not is_main:
        return None
    device = next(template.parameters()).device
    unet: Any = copy.deepcopy(template).to(device, torch.float32)
    unet.load_state_dict(full)
    return unet.eval()
