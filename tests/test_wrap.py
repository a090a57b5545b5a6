"""``wrap`` through DDP, FSDP, torch.compile, peft and accelerate; the SD3 adapter's timestep.

Each wrapped model is checked three ways: ``wrap`` picks the diffusers adapter from the model
inside, the adapter calls the wrapper itself (a forward pre-hook on the wrapper fires), and
``.x0`` equals that of the bare UNet with the same weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from torch import Tensor, nn

from addkit._dtype import module_dtype
from addkit.denoisers import DiffusersTransformerAdapter, DiffusersUNetAdapter, wrap
from addkit.schedules import FlowSchedule, VPSchedule
from addkit.testing import tiny_sd3_transformer, tiny_sd_unet

VP = VPSchedule.scaled_linear()
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet() -> UNet2DConditionModel:
    return tiny_sd_unet(cross_attention_dim=16)


def _sd3(dtype: torch.dtype = torch.float32) -> SD3Transformer2DModel:
    model = tiny_sd3_transformer()
    return model if dtype == torch.float32 else model.to(dtype)


def _inputs() -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    return x_t, torch.tensor([999, 250]), {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g)}


def _x0(model: Any) -> Tensor:
    x_t, t, cond = _inputs()
    with torch.no_grad():
        return wrap(model, VP, "eps").x0(x_t, t, **cond)


def _check(wrapped: nn.Module, bare: nn.Module, *, atol: float = 1e-6) -> None:
    """``wrap(wrapped)`` adapts the UNet inside, calls ``wrapped`` and matches ``wrap(bare)``."""
    d = wrap(wrapped, VP, "eps")
    assert isinstance(d.model, DiffusersUNetAdapter)
    assert d.model.unet is wrapped
    calls: list[int] = []
    handle = wrapped.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        got = _x0(wrapped)
    finally:
        handle.remove()
    assert calls == [1]
    torch.testing.assert_close(got, _x0(bare), rtol=1e-5, atol=atol)


@pytest.fixture
def gloo(tmp_path: Path) -> Iterator[None]:
    """A single-process gloo group (rank 0 of 1), destroyed afterwards."""
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp(gloo: None) -> None:
    from torch.nn.parallel import DistributedDataParallel

    bare = _unet()
    _check(DistributedDataParallel(copy.deepcopy(bare)), bare)


def test_data_parallel_without_gpus() -> None:
    bare = _unet()
    _check(nn.DataParallel(copy.deepcopy(bare), device_ids=[]), bare)


def test_fsdp1_module(gloo: None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    bare = _unet()
    with pytest.warns(UserWarning):  # FSDP1 is deprecated in favour of fully_shard
        wrapped = FullyShardedDataParallel(copy.deepcopy(bare), device_id=torch.device("cpu"))
    _check(wrapped, bare)


def test_fsdp2_fully_shard(gloo: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    bare = _unet()
    sharded = fully_shard(copy.deepcopy(bare), mesh=init_device_mesh("cpu", (1,)))
    assert type(sharded) is not UNet2DConditionModel  # a dynamic FSDP subclass
    _check(sharded, bare)


def test_torch_compile_eager() -> None:
    bare = _unet()
    compiled = torch.compile(copy.deepcopy(bare), backend="eager")
    assert type(compiled).__name__ == "OptimizedModule"
    _check(compiled, bare)


def _random_lora(model: nn.Module) -> None:
    """Give every LoRA ``B`` nonzero weights, so that the adapter's output shows whether LoRA ran."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_peft_model() -> None:
    from peft import LoraConfig, get_peft_model

    bare = _unet()
    lora = get_peft_model(copy.deepcopy(bare), LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    _random_lora(lora)
    merged = copy.deepcopy(lora).merge_and_unload()
    assert type(merged) is UNet2DConditionModel
    _check(lora, merged, atol=1e-5)
    assert not torch.allclose(_x0(lora), _x0(bare), atol=1e-3)  # the LoRA layers ran


def test_diffusers_add_adapter() -> None:
    from peft import LoraConfig

    unet = _unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    _random_lora(unet)
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    _check(unet, merged, atol=1e-5)
    assert not torch.allclose(_x0(unet), _x0(_unet()), atol=1e-3)


def test_peft_inside_ddp(gloo: None) -> None:
    """The recipe's student: a LoRA UNet prepared for DDP (two wrappers deep)."""
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    bare = _unet()
    lora = get_peft_model(copy.deepcopy(bare), LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    _random_lora(lora)
    _check(DistributedDataParallel(lora), copy.deepcopy(lora).merge_and_unload(), atol=1e-5)


def test_accelerate_prepare_multi_cpu(gloo: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Accelerator(cpu=True)`` in a (one-process) distributed launch returns DDP."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    env |= {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # accelerate writes some of these; monkeypatch restores them
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test's (non-distributed) state
    try:
        accelerator = Accelerator(cpu=True)
        bare = _unet()
        prepared = accelerator.prepare(copy.deepcopy(bare))
        assert type(prepared).__name__ == "DistributedDataParallel"
        _check(prepared, bare)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_prepare_dynamo() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        bare = _unet()
        prepared = Accelerator(cpu=True, dynamo_backend="eager").prepare(copy.deepcopy(bare))
        assert type(prepared).__name__ == "OptimizedModule"
        _check(prepared, bare)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_user_module_with_a_model_attribute_is_not_unwrapped() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = _unet()
            self.module = self.model

        def forward(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
            return self.model(x_t, t, **cond).sample

    net = Net()
    d = wrap(net, VP, "eps")
    assert d.model is net
    torch.testing.assert_close(_x0(net), _x0(_unet()))


def test_model_dtype_through_wrappers() -> None:
    from peft import LoraConfig, get_peft_model

    unet = _unet().to(torch.bfloat16)
    assert module_dtype(torch.compile(unet, backend="eager")) == torch.bfloat16
    assert module_dtype(nn.DataParallel(unet, device_ids=[])) == torch.bfloat16
    lora = get_peft_model(unet, LoraConfig(r=4, target_modules=LORA_TARGETS))
    assert module_dtype(lora) == torch.bfloat16
    assert module_dtype(nn.Identity()) is None
    assert module_dtype(lambda x, t: x) is None


def _record_timestep(module: nn.Module) -> list[Tensor]:
    seen: list[Tensor] = []
    module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True
    )
    return seen


def test_sd3_flow_timestep_float32_for_bf16_transformer() -> None:
    tr = _sd3(torch.bfloat16)
    seen = _record_timestep(tr)
    sched = FlowSchedule(shift=3.0)
    d = wrap(tr, sched, "flow")
    assert isinstance(d.model, DiffusersTransformerAdapter)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9])
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16), "pooled_projections": torch.randn(2, 8)}
    with torch.no_grad():
        out = d.x0(x_t, t, **cond)
    assert out.dtype == torch.float32
    (timestep,) = seen
    assert timestep.dtype == torch.float32  # as StableDiffusion3Pipeline passes scheduler.timesteps
    torch.testing.assert_close(timestep, (1000 * sched.sigma(t)).float(), rtol=0, atol=0)
    assert not torch.equal(timestep, timestep.bfloat16().float())  # bf16 would have rounded it


def test_sd3_vp_timestep_integer_unchanged() -> None:
    tr = _sd3(torch.bfloat16)
    seen = _record_timestep(tr)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 250])
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16), "pooled_projections": torch.randn(2, 8)}
    with torch.no_grad():
        wrap(tr, VP, "eps").x0(x_t, t, **cond)
    (timestep,) = seen
    assert timestep.dtype == torch.long
    assert timestep.tolist() == [999, 250]  # bf16 would give 1000


def test_ddp_sd3_transformer(gloo: None) -> None:
    from torch.nn.parallel import DistributedDataParallel

    bare = _sd3()
    wrapped = DistributedDataParallel(copy.deepcopy(bare))
    sched = FlowSchedule(shift=3.0)
    d = wrap(wrapped, sched, "flow")
    assert isinstance(d.model, DiffusersTransformerAdapter)
    assert d.model.transformer is wrapped
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9])
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16), "pooled_projections": torch.randn(2, 8)}
    with torch.no_grad():
        torch.testing.assert_close(d.x0(x_t, t, **cond), wrap(bare, sched, "flow").x0(x_t, t, **cond))


@pytest.mark.cuda
def test_ddp_bf16_unet_on_cuda(tmp_path: Path) -> None:
    """On a GPU: a bf16 UNet under DDP (nccl) gets bf16 inputs and returns x_t's dtype."""
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("nccl", rank=0, world_size=1, init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        bare = _unet().to("cuda", torch.bfloat16)
        wrapped = DistributedDataParallel(copy.deepcopy(bare), device_ids=[0])
        x_t, t, cond = _inputs()
        x_t, t, cond = x_t.cuda(), t.cuda(), {k: v.cuda() for k, v in cond.items()}
        with torch.no_grad():
            got = wrap(wrapped, VP, "eps").x0(x_t, t, **cond)
            want = wrap(bare, VP, "eps").x0(x_t, t, **cond)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
    finally:
        dist.destroy_process_group()
