"""CUDAGraphSampler: on the CPU it equals `sample` and warns once; on a GPU (tests marked `cuda`) graph
replay equals the eager loop, new noise gives new samples, new shapes capture anew within a bounded
cache, memory stays flat, weights updated in place are used without re-capture, also under autocast,
where the autocast state is part of the graph key."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from addkit.denoisers import wrap
from addkit.sampling import CUDAGraphSampler, EagerFallbackWarning, _static, sample
from addkit.sampling._static import CapturedLoop, autocast_dtype, flatten, graph_key, rebuild
from addkit.schedules import VPSchedule
from addkit.testing import tiny_sdxl_unet, tiny_vae

VP = VPSchedule.scaled_linear()
TEXT = 16


class Net(nn.Module):
    """A small conditional eps-network: conv + timestep and text embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.text = nn.Linear(TEXT, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, text: torch.Tensor) -> torch.Tensor:
        scale = (t.float() / 1000).view(-1, 1, 1, 1)
        return torch.tanh(self.conv(x) * scale + self.text(text)[:, :, None, None])


def _inputs(batch: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(batch)
    noise = torch.randn(batch, 4, 8, 8, generator=g).to(device, dtype)
    text = torch.randn(batch, TEXT, generator=g).to(device, dtype)
    return noise, text


def _warnings(fn: Any) -> tuple[Any, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, EagerFallbackWarning)]


@torch.no_grad()
@pytest.mark.parametrize("renoise", ["fresh", "ancestral"])
def test_cpu_equals_sample_and_warns_once(renoise: str) -> None:
    denoiser = wrap(Net(), VP, "eps")
    noise, text = _inputs()
    sampler = CUDAGraphSampler(denoiser, schedule=VP, renoise=renoise, decode=lambda x: x.clamp(-1, 1))
    got, caught = _warnings(
        lambda: [sampler(noise, generator=torch.Generator().manual_seed(s), text=text) for s in (0, 1)]
    )
    assert len(caught) == 1 and "not a CUDA device; running the loop eagerly" in str(caught[0].message)
    for s, out in zip((0, 1), got):
        want = sample(
            denoiser,
            noise,
            schedule=VP,
            renoise=renoise,
            generator=torch.Generator().manual_seed(s),
            text=text,
        )
        torch.testing.assert_close(out, want.clamp(-1, 1))
    explicit = torch.randn(3, *noise.shape)
    fresh = CUDAGraphSampler(denoiser, schedule=VP, renoise=renoise)
    with pytest.warns(EagerFallbackWarning):
        got = fresh(noise, noises=list(explicit), text=text)
    torch.testing.assert_close(
        got, sample(denoiser, noise, schedule=VP, renoise=renoise, noises=explicit, text=text)
    )


@torch.no_grad()
def test_compile_path_equals_sample_on_cpu() -> None:
    denoiser = wrap(Net(), VP, "eps")
    noise, text = _inputs()
    sampler = CUDAGraphSampler(
        denoiser, schedule=VP, timesteps=(999, 499), compile="default", compile_options={"backend": "eager"}
    )
    got, caught = _warnings(lambda: sampler(noise, generator=torch.Generator().manual_seed(3), text=text))
    want = sample(
        denoiser,
        noise,
        schedule=VP,
        timesteps=(999, 499),
        generator=torch.Generator().manual_seed(3),
        text=text,
    )
    torch.testing.assert_close(got, want)
    assert not caught


def test_bad_arguments() -> None:
    d = wrap(Net(), VP, "eps")
    with pytest.raises(ValueError, match="CUDAGraphSampler: max_graphs must be a positive integer, got 0"):
        CUDAGraphSampler(d, schedule=VP, max_graphs=0)
    with pytest.raises(
        ValueError, match="CUDAGraphSampler: compile must be one of 'default', 'reduce-overhead'"
    ):
        CUDAGraphSampler(d, schedule=VP, compile="fast")
    with pytest.raises(TypeError, match="CUDAGraphSampler: decode must be callable"):
        CUDAGraphSampler(d, schedule=VP, decode=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CUDAGraphSampler: timesteps must be strictly decreasing"):
        CUDAGraphSampler(d, schedule=VP, timesteps=(1, 2))
    sampler = CUDAGraphSampler(d, schedule=VP)
    noise, text = _inputs()
    with pytest.raises(ValueError, match="CUDAGraphSampler: callback is not supported"):
        sampler(noise, callback=print, text=text)
    with pytest.raises(TypeError, match="CUDAGraphSampler: conditioning 'extra.ids' must be a tensor"):
        sampler(noise, text=text, extra={"ids": {1, 2}})  # a set: neither a container nor hashable
    with pytest.raises(ValueError, match=r"CUDAGraphSampler: noises must have shape \(3, 2, 4, 8, 8\)"):
        sampler(noise, noises=torch.randn(2, 2, 4, 8, 8), text=text)


def test_graph_key_holds_the_autocast_state() -> None:
    noise, text = _inputs()
    leaves = flatten({"text": text})
    plain = graph_key("f", noise, leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = graph_key("f", noise, leaves)
        assert autocast_dtype("cpu") == torch.bfloat16 and autocast_dtype("cuda") is None
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = graph_key("f", noise, leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
        off = graph_key("f", noise, leaves)
    assert len({plain, bf16, fp16}) == 3 and off == plain == graph_key("f", noise, leaves)
    assert autocast_dtype("cpu") is None and autocast_dtype("meta") is None  # no autocast on meta


@torch.no_grad()
def test_cpu_under_autocast_equals_sample_under_autocast() -> None:
    denoiser = wrap(Net(), VP, "eps")
    noise, text = _inputs()
    noises = torch.randn(3, *noise.shape)
    sampler = CUDAGraphSampler(denoiser, schedule=VP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerFallbackWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = sampler(noise, noises=noises, text=text)
            want = sample(denoiser, noise, schedule=VP, noises=noises, text=text)
        plain = sampler(noise, noises=noises, text=text)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(plain, sample(denoiser, noise, schedule=VP, noises=noises, text=text))
    assert not torch.allclose(got, plain, rtol=1e-5, atol=1e-5)  # the autocast call did run in bf16


class Residual(Net):
    """Takes ControlNet-style conditioning: a tuple of residuals, one inside a list."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, text: torch.Tensor, res: Any) -> torch.Tensor:
        feature, (bias,) = res
        return super().forward(x, t, text=text) + feature + bias.mean(1).view(-1, 1, 1, 1)


class RecordedLoop:
    """A CPU stand-in for a captured CUDA graph: replay re-runs the recorded body, which reads the
    same static buffers (what a graph's kernels do), and writes the same static output."""

    def __init__(self, body: Any) -> None:
        self.body, self.out = body, body()

    def replay(self) -> None:
        self.out.copy_(self.body())

    def reset(self) -> None:
        pass

    def pool(self) -> tuple[int, int]:
        return (0, id(self))


@pytest.fixture
def cpu_capture(monkeypatch: pytest.MonkeyPatch) -> list[RecordedLoop]:
    """Let CUDAGraphSampler 'capture' on the CPU through `RecordedLoop`; the list holds each capture."""
    loops: list[RecordedLoop] = []

    def capture(body: Any, warmup: int, device: torch.device) -> tuple[RecordedLoop, torch.Tensor]:
        loops.append(RecordedLoop(body))
        return loops[-1], loops[-1].out

    monkeypatch.setattr(_static, "capturable", lambda device: True)
    monkeypatch.setattr(_static, "capture", capture)
    return loops


def _residuals(noise: torch.Tensor, seed: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(noise.shape, generator=g), [torch.randn(noise.shape[0], 3, generator=g)]


def test_flatten_and_rebuild_nested_conditioning() -> None:
    cond = {"text": torch.ones(1), "add": {"res": (torch.zeros(2), [torch.ones(3), 4]), "scale": None}}
    leaves = flatten(cond)
    paths = [("text",), ("add", "res", 0), ("add", "res", 1, 0), ("add", "res", 1, 1), ("add", "scale")]
    assert [path for path, _ in leaves] == paths
    back = rebuild(cond, (value for _, value in leaves))
    assert isinstance(back["add"]["res"], tuple) and isinstance(back["add"]["res"][1], list)
    assert flatten(back) == leaves


@torch.no_grad()
def test_tuple_conditioning_is_copied_into_one_captured_graph(cpu_capture: list[RecordedLoop]) -> None:
    denoiser = wrap(Residual(), VP, "eps")
    sampler = CUDAGraphSampler(denoiser, schedule=VP)
    noise, text = _inputs()
    outs = []
    for seed in range(3):  # new residual tensors (same shapes) each call: one capture, values copied in
        res = _residuals(noise, seed)
        noises = torch.randn(3, *noise.shape, generator=torch.Generator().manual_seed(seed))
        outs.append(sampler(noise, noises=noises, text=text, res=res))
        want = sample(denoiser, noise, schedule=VP, noises=noises, text=text, res=res)
        torch.testing.assert_close(outs[-1], want)
    assert sampler.captures == 1 and len(cpu_capture) == 1 and len(sampler.memory_pools) == 1
    assert not torch.allclose(outs[0], outs[1])
    sampler(noise, text=text, res=(noise, [torch.zeros(2, 5)]))  # a new residual shape: a new graph
    assert sampler.captures == 2


@torch.no_grad()
def test_replay_draws_noise_with_the_generator_on_its_device(cpu_capture: list[RecordedLoop]) -> None:
    denoiser = wrap(Net(), VP, "eps")
    sampler = CUDAGraphSampler(denoiser, schedule=VP)
    noise, text = _inputs()
    for seed in (0, 1):  # the capturing call, then a replay
        got = sampler(noise, generator=torch.Generator().manual_seed(seed), text=text)
        want = sample(denoiser, noise, schedule=VP, generator=torch.Generator().manual_seed(seed), text=text)
        torch.testing.assert_close(got, want)
    # meta stands in for CUDA: the static buffer is filled from a draw on the CPU generator's device
    buffers = torch.empty(3, 2, 4, device="meta")
    loop = CapturedLoop(RecordedLoop(lambda: buffers.sum(0)), buffers[0], buffers, [], buffers[0], None)
    g, ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    loop.replay(buffers[0], None, g, [])
    torch.randn(3, 2, 4, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


# -- on a GPU ---------------------------------------------------------------------------------
def _cuda_sampler(dtype: torch.dtype = torch.float32, **kw: Any) -> tuple[CUDAGraphSampler, Any]:
    torch.manual_seed(0)
    denoiser = wrap(Net().to("cuda", dtype), VP, "eps")
    return CUDAGraphSampler(denoiser, schedule=VP, **kw), denoiser


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("renoise", ["fresh", "ancestral"])
def test_replay_equals_eager(dtype: torch.dtype, rtol: float, renoise: str) -> None:
    sampler, denoiser = _cuda_sampler(dtype, renoise=renoise)
    noise, text = _inputs(device="cuda", dtype=dtype)
    noises = torch.randn(3, *noise.shape, device="cuda", dtype=dtype)
    with torch.no_grad():
        want = sample(denoiser, noise, schedule=VP, renoise=renoise, noises=noises, text=text)
    for _ in range(2):  # the capturing call and a pure replay
        got = sampler(noise, noises=noises, text=text)
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
    assert sampler.captures == 1


def test_inference_mode_calls_mix_with_plain_calls_on_cpu() -> None:
    denoiser = wrap(Net(), VP, "eps")
    noise, text = _inputs()
    noises = torch.randn(3, *noise.shape)
    sampler = CUDAGraphSampler(denoiser, schedule=VP)
    with torch.no_grad():
        want = sample(denoiser, noise, schedule=VP, noises=noises, text=text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerFallbackWarning)
        with torch.inference_mode():
            inside = sampler(noise.clone(), noises=noises.clone(), text=text.clone())
        outside = sampler(noise, noises=noises, text=text)
    torch.testing.assert_close(inside, want)
    torch.testing.assert_close(outside, want)
    assert not inside.is_inference()


@pytest.mark.cuda
def test_capture_under_inference_mode_then_replay_outside_and_inside() -> None:
    sampler, denoiser = _cuda_sampler()
    noise, text = _inputs(device="cuda")
    noises = torch.randn(3, *noise.shape, device="cuda")
    with torch.no_grad():
        want = sample(denoiser, noise, schedule=VP, noises=noises, text=text)
    with torch.inference_mode():  # the capturing call: its buffers must stay writable outside
        first = sampler(noise.clone(), noises=noises.clone(), text=text.clone())
    second = sampler(noise, noises=noises, text=text)
    with torch.inference_mode():
        third = sampler(noise.clone(), noises=noises.clone(), text=text.clone())
    assert sampler.captures == 1
    for got in (first, second, third):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_new_noise_new_samples_and_generator_stream() -> None:
    sampler, denoiser = _cuda_sampler()
    noise, text = _inputs(device="cuda")
    a = sampler(noise, generator=torch.Generator("cuda").manual_seed(0), text=text)
    b = sampler(noise, generator=torch.Generator("cuda").manual_seed(1), text=text)
    c = sampler(torch.randn_like(noise), generator=torch.Generator("cuda").manual_seed(1), text=text)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)
    with torch.no_grad():
        want = sample(
            denoiser, noise, schedule=VP, generator=torch.Generator("cuda").manual_seed(1), text=text
        )
    torch.testing.assert_close(b, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_batch_change_captures_and_cache_evicts_least_recent() -> None:
    sampler, _ = _cuda_sampler(max_graphs=2)
    for batch in (1, 2, 1):
        noise, text = _inputs(batch, device="cuda")
        sampler(noise, text=text)
    assert sampler.captures == 2 and sampler.num_graphs == 2
    noise, text = _inputs(3, device="cuda")
    sampler(noise, text=text)  # evicts batch 2, the least recently used
    assert sampler.captures == 3 and sampler.num_graphs == 2
    noise, text = _inputs(1, device="cuda")
    sampler(noise, text=text)  # still cached
    assert sampler.captures == 3
    noise, text = _inputs(2, device="cuda")
    sampler(noise, text=text)  # evicted before: captured again
    assert sampler.captures == 4 and sampler.num_graphs == 2


@pytest.mark.cuda
def test_memory_flat_over_100_replays() -> None:
    sampler, _ = _cuda_sampler()
    noise, text = _inputs(device="cuda")
    sampler(noise, text=text)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(100):
        sampler(noise, text=text)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@pytest.mark.cuda
def test_in_place_weight_update_needs_no_recapture() -> None:
    sampler, denoiser = _cuda_sampler()
    noise, text = _inputs(device="cuda")
    noises = torch.randn(3, *noise.shape, device="cuda")
    before = sampler(noise, noises=noises, text=text)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.mul_(-0.5)  # what an optimizer step or load_state_dict does: same storage
        want = sample(denoiser, noise, schedule=VP, noises=noises, text=text)
    got = sampler(noise, noises=noises, text=text)
    assert sampler.captures == 1 and not torch.allclose(got, before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_capture_failure_falls_back_with_one_warning() -> None:
    class Syncing(Net):
        def forward(self, x: torch.Tensor, t: torch.Tensor, *, text: torch.Tensor) -> torch.Tensor:
            if x.abs().max().item() > 1e6:  # a host read: cannot be captured
                raise RuntimeError("unreachable")
            return super().forward(x, t, text=text)

    denoiser = wrap(Syncing().cuda(), VP, "eps")
    sampler = CUDAGraphSampler(denoiser, schedule=VP)
    noise, text = _inputs(device="cuda")
    noises = torch.randn(3, *noise.shape, device="cuda")
    outs, caught = _warnings(lambda: [sampler(noise, noises=noises, text=text) for _ in range(2)])
    assert len(caught) == 1 and "capture failed" in str(caught[0].message)
    with torch.no_grad():
        want = sample(denoiser, noise, schedule=VP, noises=noises, text=text)
    torch.testing.assert_close(outs[1], want)
    assert sampler.num_graphs == 0


@pytest.mark.cuda
def test_sdxl_unet_and_vae_decode_inside_the_graph() -> None:
    unet, vae = tiny_sdxl_unet().cuda().eval(), tiny_vae().cuda().eval()
    denoiser = wrap(unet, VP, "eps")

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / vae.config.scaling_factor).sample

    sampler = CUDAGraphSampler(denoiser, schedule=VP, renoise="ancestral", decode=decode)
    noise = torch.randn(2, 4, 8, 8, device="cuda")
    cond = {
        "encoder_hidden_states": torch.randn(2, 8, 2 * TEXT, device="cuda"),
        "text_embeds": torch.randn(2, TEXT, device="cuda"),
        "time_ids": torch.randn(2, 6, device="cuda"),
    }
    noises = torch.randn(3, *noise.shape, device="cuda")
    got = sampler(noise, noises=noises, **cond)
    with torch.no_grad():
        want = decode(sample(denoiser, noise, schedule=VP, renoise="ancestral", noises=noises, **cond))
    assert got.shape == (2, 3, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_compile_reduce_overhead_equals_eager() -> None:
    sampler, denoiser = _cuda_sampler(compile="reduce-overhead")
    noise, text = _inputs(device="cuda")
    noises = torch.randn(3, *noise.shape, device="cuda")
    with torch.no_grad():
        want = sample(denoiser, noise, schedule=VP, noises=noises, text=text)
    for _ in range(3):
        torch.testing.assert_close(sampler(noise, noises=noises, text=text), want, rtol=1e-4, atol=1e-4)


def _bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def _eager(denoiser: Any, noise: torch.Tensor, noises: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sample(denoiser, noise, schedule=VP, noises=noises, text=text)


# Net's parameters require grad (as a trained student's do): autocast caches casts of exactly those.
@pytest.mark.cuda
def test_autocast_capture_sees_in_place_weight_update_made_outside_autocast() -> None:
    sampler, denoiser = _cuda_sampler()
    noise, text = _inputs(device="cuda")
    noises = torch.randn(3, *noise.shape, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        before = sampler(noise, noises=noises, text=text)  # warm-up and capture
        _bf16_close(before, _eager(denoiser, noise, noises, text))
    with torch.no_grad():
        for p in denoiser.parameters():
            p.mul_(-0.5)  # outside the autocast block, same storage
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = sampler(noise, noises=noises, text=text)
        want = _eager(denoiser, noise, noises, text)
    assert sampler.captures == 1 and not torch.allclose(got, before)
    _bf16_close(got, want)


@pytest.mark.cuda
def test_autocast_and_plain_calls_capture_a_graph_each() -> None:
    sampler, denoiser = _cuda_sampler()
    noise, text = _inputs(device="cuda")
    noises = torch.randn(3, *noise.shape, device="cuda")
    for _ in range(2):  # captures, then replays of each
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixed = sampler(noise, noises=noises, text=text)
            _bf16_close(mixed, _eager(denoiser, noise, noises, text))
        plain = sampler(noise, noises=noises, text=text)
        torch.testing.assert_close(plain, _eager(denoiser, noise, noises, text), rtol=1e-5, atol=1e-5)
    assert sampler.captures == 2 and sampler.num_graphs == 2
    assert not torch.allclose(mixed, plain, rtol=1e-5, atol=1e-5)  # bf16 matmuls in one graph only


@pytest.mark.cuda
def test_replay_after_the_capturing_autocast_block_ended() -> None:
    sampler, denoiser = _cuda_sampler()
    noise, text = _inputs(device="cuda")
    noises = torch.randn(3, *noise.shape, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sampler(noise, noises=noises, text=text)
    # The block has ended and autocast's cache with it. Fill freed memory with NaNs to expose stale reads:
    # the allocator reuses a block on the stream that freed it, and warm-up ran on a pooled side stream.
    junk: list[torch.Tensor] = []
    for _ in range(64):  # more than the pool's streams
        with torch.cuda.stream(torch.cuda.Stream()):
            junk += [torch.full((n,), float("nan"), device="cuda") for n in (16, 64, 256, 1024)]
    torch.cuda.synchronize()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = sampler(noise, noises=noises, text=text)
        want = _eager(denoiser, noise, noises, text)
    del junk
    assert sampler.captures == 1 and torch.isfinite(got).all()
    _bf16_close(got, want)


@pytest.mark.cuda
def test_tuple_conditioning_replays_one_graph_on_cuda() -> None:
    torch.manual_seed(0)
    denoiser = wrap(Residual().cuda(), VP, "eps")
    sampler = CUDAGraphSampler(denoiser, schedule=VP)
    noise, text = _inputs(device="cuda")
    for seed in range(3):
        feature, (bias,) = _residuals(noise.cpu(), seed)
        res = (feature.cuda(), [bias.cuda()])
        noises = torch.randn(3, *noise.shape, device="cuda")
        got = sampler(noise, noises=noises, text=text, res=res)
        with torch.no_grad():
            want = sample(denoiser, noise, schedule=VP, noises=noises, text=text, res=res)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sampler.captures == 1 and len(sampler.memory_pools) == 1
