"""The fake-tensor memory estimate: equal to the tracked peak of the same step on real CPU tensors and
within 5 % of the CPU allocator's own count (profiler), within 10 % of the CUDA allocator's peak on a GPU,
CUDA's autocast policy as torch's header lists it, the real architectures' parameter counts, and the
committed table's sanity (estimate >= analytic floor)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("timm")
import _architectures as arches  # benchmarks/ is on pytest's pythonpath
import _cuda_autocast
import bench_memory
from _recipe_step import StepConfig, build_state, parts_of, setup_for
from _cuda_autocast import cuda_policy
from _estimate import estimate_step_memory, measure_step_memory, warm_optimizers
from _gpu_stages import committed_estimate
from _materialize import Materializer, parameter_count

CPU = torch.device("cpu")
TINY = [
    StepConfig("tiny_sdxl", 16, 2, "full"),  # DINOv2 on decoded pixels, image embedding, pixel distillation, FSDP
    StepConfig("tiny_flux", 16, 2, "lora", checkpointing=True, discriminator="teacher"),  # one copy
]


@pytest.mark.parametrize("cfg", TINY, ids=lambda c: c.name)
def test_estimate_equals_measurement_on_real_cpu_tensors(cfg: StepConfig) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        est = estimate_step_memory(setup_for(cfg), world=8)
        real = measure_step_memory(setup_for(cfg), CPU)
    finally:
        torch.set_num_threads(threads)
    assert est["peak"]["total"] == pytest.approx(real["peak"]["total"], rel=0.05)
    for key in ("parameters", "gradients", "optimizer", "activations"):
        assert est["peak"][key] == pytest.approx(real["peak"][key], rel=0.05, abs=4096), key
    assert est["peak"]["optimizer"] > 0 and est["peak"]["total"] == sum(
        v for k, v in est["peak"].items() if k != "total"
    )
    # FSDP per device (--fsdp: a full SDXL student): the student's weights, gradients and AdamW state
    # divided by 8, nothing else, plus the gathered unit
    dev = est["per_device"]
    if cfg.architecture.kind == "unet" and cfg.train == "full":
        assert dev["total"] < est["peak"]["total"]
        assert dev["total"] == sum(v for k, v in dev.items() if k != "total")
        student = sum(p.numel() * 4 for p in _state(cfg).models.student.parameters())  # float32
        assert est["peak"]["parameters"] - dev["parameters"] == student - -(-student // 8)
        moments = 2 * student  # AdamW's two float32 moments (its step counters stay whole)
        assert est["peak"]["optimizer"] - dev["optimizer"] >= moments - -(-moments // 8)
    else:  # the flow recipe refuses --fsdp; a LoRA student is not sharded by add_sdxl.py either
        assert dev is None or not any(p for p in setup_for(cfg)(Materializer(None, CPU)).sharded)
    # what was made during the step and is alive at the peak, by part, adds up to no more than the peak
    assert 0 < sum(est["at_peak_by_part"].values()) <= est["peak"]["total"]


def _state(cfg: StepConfig):  # noqa: ANN202
    return build_state(cfg, Materializer(None, CPU))[0]


def _holdings(state) -> list[tuple]:  # noqa: ANN001
    """Every distinct storage the run holds (networks by part, optimiser state): sorted (part, shape, dtype, trained)."""
    seen, out = set(), []
    for part, module in parts_of(state).items():
        for t in (*module.parameters(), *module.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                out.append((part, tuple(t.shape), str(t.dtype), t.requires_grad))
    for opt in (state.opt_g, state.opt_d):
        out += [("optimizer", tuple(v.shape), str(v.dtype), False) for st in opt.state.values() for v in st.values()]
    return sorted(out)


@pytest.mark.parametrize("train", ["lora", "full"])
def test_the_benchmark_step_holds_what_the_recipe_holds(train: str, tmp_path: Path) -> None:
    """The memory plan's step and ``add_sdxl.py``'s own ``setup`` hold the same storages (one copy
    of the UNet under LoRA, the VAE and encoders in bf16, LoRA weights and a full student in float32)."""
    import add_sdxl
    from recipe.step import train_step

    cfg = StepConfig("tiny_sdxl", 32, 2, train)
    bench_state, batch = build_state(cfg, Materializer(None, CPU))
    args = add_sdxl.parse_args([*cfg.argv(), "--output-dir", str(tmp_path), "--log-every", "0"])
    recipe_state = add_sdxl.setup(args)
    for state, b in ((bench_state, batch), (recipe_state, next(recipe_state.data))):
        assert not train_step(state, [b]).skipped  # AdamW's state exists
    assert _holdings(bench_state) == _holdings(recipe_state)
    one_copy = bench_state.models.student is bench_state.models.unet
    assert one_copy == (train == "lora") == (recipe_state.models.student is recipe_state.models.unet)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_estimate_matches_the_cpu_allocators_own_count(checkpointing: bool) -> None:
    """Independent of the tracker: the profiler's allocation events of the real step.

    With the student's gradient checkpointing the allocator sees more than the tracker at the
    forward peak (measured: 19 % at this tiny size, bf16; 0.1 % without checkpointing): allocations
    inside diffusers' checkpointed blocks that ``MemTracker`` does not attribute. Bounded here and
    said in docs/performance.md until it is explained.
    """
    from torch.profiler import ProfilerActivity, profile

    cfg = StepConfig("tiny_flux", 64, 2, "lora", checkpointing=checkpointing, discriminator="teacher")
    est = estimate_step_memory(setup_for(cfg))["peak"]["total"]
    with cuda_policy():
        setup = setup_for(cfg)(Materializer(None, CPU))
        warm_optimizers(setup)
        resident = [t for m in setup.parts.values() for t in (*m.parameters(), *m.buffers())]
        resident += [
            v for o in setup.optimizers for st in o.state.values() for v in st.values() if torch.is_tensor(v)
        ]
        before = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*resident, *setup.inputs)
        }
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            setup.step()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):  # every allocation (+) and release (-)
        live += event.nbytes()
        peak = max(peak, live)
    allocator = sum(before.values()) + peak
    if not checkpointing:
        assert allocator == pytest.approx(est, rel=0.05)
    else:
        assert est <= allocator <= 1.25 * est


@pytest.mark.cuda
def test_estimate_within_10_percent_of_cuda_allocator() -> None:
    cfg = StepConfig("sdxl", 512, 4, "lora", checkpointing=True)  # VAE decode, DINOv2: CUDA's autocast policy
    est = committed_estimate(cfg.name)  # the committed CPU estimate (a minute of CPU: not redone here)
    assert est is not None, f"memory.json lacks {cfg.name}: run benchmarks/bench_memory.py --only {cfg.name}"
    real = measure_step_memory(setup_for(cfg), torch.device("cuda"))
    assert real["peak"]["total"] == pytest.approx(est["bytes"], rel=0.10)


def _header_lists() -> dict[str, tuple[str, ...]]:
    header = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    if not header.exists():
        pytest.skip(f"{header} is not installed")
    text = header.read_text()
    lists = {}
    for macro in ("LOWER_PRECISION_FP", "FP32", "FP32_SET_OPT_DTYPE", "PROMOTE"):
        body = text.split(f"#define AT_FORALL_{macro}(_)", 1)[1].split("\n\n", 1)[0]
        names = re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", body)
        lists[macro] = tuple(f"{op}.{overload}" if overload else op for op, overload in names)
    return lists


def test_cuda_policy_lists_are_torchs() -> None:
    lists = _header_lists()
    assert set(_cuda_autocast.LOWER) == set(lists["LOWER_PRECISION_FP"])
    assert set(_cuda_autocast.FP32) == set(lists["FP32"])
    assert set(_cuda_autocast.FP32_SET_OPT_DTYPE) == set(lists["FP32_SET_OPT_DTYPE"])
    assert set(_cuda_autocast.PROMOTE) == set(lists["PROMOTE"])


def test_cuda_policy_casts_as_cuda_and_goes_away() -> None:
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    w = torch.nn.Linear(4, 4)
    with _cuda_autocast.cuda_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.float32  # CUDA: fp32 list
        assert torch.softmax(x, -1).dtype == torch.float32  # fp32 via dtype=
        assert w(x.float()).dtype == torch.bfloat16  # lower precision, CPU's own kernel
        assert torch.addcmul(x, x.float(), x).dtype == torch.float32  # promote to the widest
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.bfloat16  # CPU's policy is back


def test_architectures_have_their_published_parameter_counts() -> None:
    with torch.device("meta"):
        sdxl, sd35, flux = (arches.ARCHITECTURES[k] for k in ("sdxl", "sd35_medium", "flux_dev"))
        assert parameter_count([arches.denoiser(sdxl)]) == sdxl.params["unet"]
        assert parameter_count([arches.vae(sdxl)]) == sdxl.params["vae"]
        assert parameter_count(arches.text_encoders(sdxl)) == sdxl.params["text_encoders"]
        assert parameter_count([arches.denoiser(flux)]) == flux.params["transformer"]
        for arch in (sd35, flux):  # CLIP towers and the T5-XXL encoder
            assert parameter_count(arches.text_encoders(arch)) == arch.params["text_encoders"]
        mmdit = arches.denoiser(sd35)  # the model card's 2.5B counts the 384 x 384 position table (a buffer)
        total = parameter_count([mmdit]) + sum(b.numel() for b in mmdit.buffers())
        assert total == pytest.approx(sd35.params["transformer"], rel=0.02)


def test_committed_table_is_sane() -> None:
    path = bench_memory.OUT / "memory.json"
    if not path.exists():
        pytest.skip("no estimate committed yet: python benchmarks/bench_memory.py")
    payload = json.loads(path.read_text())
    rows = {r["name"]: r for r in payload["results"]}
    assert set(rows) <= {e.name for e in bench_memory.CONFIGS}
    for name, r in rows.items():
        assert r["peak"]["total"] >= r["floor_bytes"], name
        if r["world"] > 1:
            assert r["per_device"]["total"] >= r["floor_bytes_per_device"], name
            assert r["per_device"]["total"] < r["peak"]["total"], name


def test_floor_counts_bytes_per_role() -> None:
    counts = {
        "student": {"trained": 10, "lora": 0, "frozen": 0, "buffers": 0},
        "teacher": {"trained": 0, "lora": 0, "frozen": 10, "buffers": 1},
        "discriminator": {"trained": 3, "lora": 0, "frozen": 0, "buffers": 2},
        "features": {"trained": 0, "lora": 0, "frozen": 5, "buffers": 0},
    }
    full = StepConfig("sdxl", 512, 1, "full")
    assert bench_memory.floor_bytes(full, counts) == 16 * 13 + 2 * 11 + 4 * 2 + 4 * 5
    teacher_d = StepConfig("sdxl", 512, 1, "full", discriminator="teacher")  # features: the bf16 teacher
    assert bench_memory.floor_bytes(teacher_d, counts) == 16 * 13 + 2 * 11 + 4 * 2 + 2 * 5
