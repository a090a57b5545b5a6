"""The recipe's ``setup`` + ``train_step`` on the tiny preset: fp16 loss scaling, host reads, precision.

accelerate builds a ``GradScaler`` for fp16 only on GPUs; these tests inject one into the
``Accelerator`` exactly where accelerate keeps it (``accelerator.scaler``), in float32
compute, so the scaled run must reproduce the unscaled one bit for bit (scales are powers of
two).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("timm")

import add_sdxl  # examples/ is on pytest's pythonpath
from recipe.args import RecipeError, check_paths
from add_sdxl import parse_args
from recipe.checkpoint import checkpoints, resolve_resume, save_checkpoint
from recipe.step import RunState, train_step
from addkit.testing import count_host_reads


def fresh_state(out: Path, scaler: torch.amp.GradScaler | None = None, *extra: str) -> RunState:
    argv = ["--preset", "random", "--output-dir", str(out), "--sample-every", "0", "--log-every", "0", *extra]
    args = parse_args(argv)
    check_paths(args)
    accelerator = add_sdxl.make_accelerator(args)
    accelerator.scaler = scaler  # where accelerate keeps its fp16 GradScaler on a GPU
    return add_sdxl.setup(args, accelerator)


def weights(state: RunState) -> dict[str, torch.Tensor]:
    student = {f"student.{k}": v.detach().clone() for k, v in state.models.student.named_parameters()}
    disc = {f"disc.{k}": v.detach().clone() for k, v in state.discriminator.named_parameters()}
    return student | disc


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunState, list, list]:
    """Two float32 steps without a scaler: the state, the weights after each step, the host reads."""
    state = fresh_state(tmp_path_factory.mktemp("reference"))
    after, reads = [], []
    for _ in range(2):
        batch = [next(state.data)]
        with count_host_reads() as counted:
            result = train_step(state, batch)
        assert not result.skipped
        after.append(weights(state))
        reads.append(counted)
    return state, after, reads


def test_one_host_read_per_optimiser_step(reference):
    _, _, reads = reference
    for counted in reads:
        assert counted.count == 1, counted.summary()
        assert counted.reads[0].method == "__bool__" and "recipe/step.py" in counted.reads[0].where


@pytest.mark.slow
def test_fp16_grad_scaler_updates_equal_the_float32_ones(reference, tmp_path):
    """One GradScaler, both optimisers: each unscaled once, one update per step.

    With accelerate's handling the discriminator's gradients were unscaled twice (its
    update shrank by the scale) and the scale grew per optimiser call.
    """
    _, expected, _ = reference
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    state = fresh_state(tmp_path, scaler)
    for step in range(2):
        batch = [next(state.data)]
        with count_host_reads() as counted:
            assert not train_step(state, batch).skipped
        assert counted.count == 1, counted.summary()  # the scaler reads nothing back either
        got = weights(state)
        different = [k for k in expected[step] if not torch.equal(got[k], expected[step][k])]
        assert not different, f"step {step + 1}: {len(different)} tensors differ, e.g. {different[:3]}"
    assert scaler.get_scale() == 2.0**11  # grew once, after two good steps: one update() per step


@pytest.mark.slow
def test_fp16_overflow_skips_the_step_backs_the_scale_off_and_the_next_step_runs(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100, growth_interval=100)
    state = fresh_state(tmp_path, scaler)
    before = weights(state)
    first = train_step(state, [next(state.data)])  # the scaled loss overflows float32: inf gradients
    assert first.skipped and state.progress.nonfinite_total == 1
    assert all(torch.equal(v, before[k]) for k, v in weights(state).items())
    assert scaler.get_scale() == 2.0**27
    second = train_step(state, [next(state.data)])  # used to raise: unscale_() twice without update()
    assert not second.skipped and state.progress.nonfinite_in_row == 0
    after = weights(state)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(after["disc.heads.0.main.0.0.bias"], before["disc.heads.0.main.0.0.bias"])


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    state, _, _ = reference
    first = save_checkpoint(state, tmp_path, keep=0, last=None)
    assert [p.name for p in checkpoints(tmp_path)] == [first.name]
    original = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if ".tmp-" in str(f) and str(f).endswith("optimizer_discriminator.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RecipeError, match=f"the disk is full; the previous checkpoint {first} is kept"):
        save_checkpoint(state, tmp_path, keep=0, last=first)
    monkeypatch.setattr(torch, "save", original)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert resolve_resume("latest", tmp_path) == first


def test_vae_with_force_upcast_stays_float32_under_fp16(tmp_path):
    """The SDXL VAE overflows in float16: like the diffusers pipelines, keep it in float32."""
    from recipe.sdxl.models import load_models, place_models, vae_decode, vae_encode

    args = parse_args(["--preset", "random", "--output-dir", str(tmp_path)])
    models = load_models(args)
    assert models.vae.config.force_upcast
    place_models(models, torch.device("cpu"), torch.float16)
    assert models.vae.dtype == torch.float32 and models.teacher.dtype == torch.float16
    latents = torch.randn(2, 4, 16, 16)
    expected = vae_decode(models.vae, latents)
    with torch.autocast("cpu", dtype=torch.float16):  # the training step's autocast
        decoded = vae_decode(models.vae, latents)
        torch.manual_seed(0)
        encoded = vae_encode(models.vae, expected)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, expected)
    torch.manual_seed(0)
    assert torch.equal(encoded, vae_encode(models.vae, expected))


def test_sdxl_time_ids_are_original_crop_target():
    from recipe.sdxl.models import sdxl_time_ids, square_time_ids

    ids = sdxl_time_ids(torch.tensor([[30, 40], [64, 64]]), torch.tensor([[3, 5], [0, 0]]), 32)
    assert ids.dtype == torch.float32
    assert ids.tolist() == [[30, 40, 3, 5, 32, 32], [64, 64, 0, 0, 32, 32]]
    assert square_time_ids(16, 2).tolist() == [[16, 16, 0, 0, 16, 16]] * 2


def test_grid_rows_and_columns(tmp_path):
    from PIL import Image

    from recipe.sdxl.report import save_grid

    images = torch.stack([torch.full((3, 4, 5), v) for v in (-1.0, 1.0, 0.0, -1.0)])  # 2 rows x 2 columns
    grid = torch.from_numpy(__import__("numpy").array(Image.open(save_grid(tmp_path / "g.png", images, 2))))
    assert grid.shape == (8, 10, 3)
    corners = [int(grid[r, c, 0]) for r, c in ((0, 0), (0, 5), (4, 0), (4, 5))]
    assert corners == [0, 255, 128, 0]


def test_toy_teacher_ema_is_the_averaged_model_with_the_same_numbers():
    """The toy's EMA (an AveragedModel) equals the hand-written update it replaced, bit for bit."""
    from toy.teacher import ema_model

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ema_model(model, decay=0.999)
    by_hand = [p.detach().clone() for p in model.parameters()]
    for i in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        decay = min(0.999, (1 + i) / (10 + i))
        for e, p in zip(by_hand, model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), by_hand))
