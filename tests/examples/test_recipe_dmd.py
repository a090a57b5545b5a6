"""``--method dmd2`` in ``add_sdxl.py`` (random preset) and ``add_flow.py`` (tiny preset).

DMD2's step: ``--fake-steps`` fake-score updates, then one generator update, one host read;
the teacher stays as it was; a non-finite step leaves every weight untouched; the fake score
and its optimiser go through a checkpoint; a LoRA fake score shares the teacher's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

import add_sdxl  # examples/ is on pytest's pythonpath
import recipe.dmd as dmd
from recipe.args import RecipeError, check_paths
from add_sdxl import parse_args
from recipe.checkpoint import MANIFEST, check_compatible, layout, load_checkpoint, save_checkpoint
from recipe.step import RunState
from addkit.testing import count_host_reads

DMD2 = ["--method", "dmd2", "--fake-steps", "2"]


def fresh_state(out: Path, *extra: str) -> RunState:
    argv = ["--preset", "random", "--output-dir", str(out), "--sample-every", "0", "--log-every", "0"]
    args = parse_args([*argv, *DMD2, *extra])
    check_paths(args)
    return add_sdxl.setup(args)


def batches(state: RunState) -> list:
    return [next(state.data) for _ in range(dmd.micro_batches_per_step(state.args))]


def step(state: RunState, micro_batches: list | None = None) -> dmd.StepResult:
    return dmd.train_step(state, micro_batches or batches(state), state.family.dmd_inputs)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights (not the heads' spectral-norm power-iteration buffers, which every forward moves)."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def adam_steps(optimizer: torch.optim.Optimizer) -> set[float]:
    return {float(s["step"]) for s in optimizer.state.values()}


@pytest.fixture(scope="module")
def stepped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two DMD2 steps with a GAN head: weights before and after, host reads, a checkpoint."""
    out = tmp_path_factory.mktemp("dmd2")
    state = fresh_state(out, "--ema-decay", "0.9")
    teacher, student, fake = (
        snapshot(m) for m in (state.models.teacher, state.models.student, state.fake.network)
    )
    heads = snapshot(state.discriminator)
    reads, results = [], []
    for _ in range(2):
        micro_batches = batches(state)
        with count_host_reads() as counted:
            results.append(step(state, micro_batches))
        reads.append(counted)
    folder = save_checkpoint(state, out, keep=0, last=None)
    return {"state": state, "before": (teacher, student, fake, heads), "reads": reads, "results": results,
            "folder": folder, "out": out}  # fmt: skip


def test_dmd2_trains_student_fake_score_and_heads_never_the_teacher(stepped):
    state = stepped["state"]
    teacher, student, fake, heads = stepped["before"]
    assert not any(r.skipped for r in stepped["results"])
    assert not changed(teacher, snapshot(state.models.teacher))
    assert changed(student, snapshot(state.models.student))
    assert changed(fake, snapshot(state.fake.network))
    assert changed(heads, snapshot(state.discriminator))
    assert {"g/dm", "g/gan", "f/denoise", "f/gan", "grad_norm/fake_score"} <= set(stepped["results"][0].logs)


def test_fake_steps_updates_per_generator_update_and_one_host_read(stepped):
    state = stepped["state"]
    assert adam_steps(state.opt_g) == {2.0}
    assert adam_steps(state.fake.optimizer) == {4.0}  # --fake-steps 2, two steps
    assert adam_steps(state.opt_d) == {4.0}  # the heads update with the fake score
    assert [c.count for c in stepped["reads"]] == [1, 1], stepped["reads"][0].summary()
    assert state.progress.samples == 2 * 3 * state.args.batch_size  # 3 micro-batches per step


def test_checkpoint_round_trip_restores_the_fake_score_and_its_optimiser(stepped, tmp_path):
    state, folder = stepped["state"], stepped["folder"]
    assert {"fake_score.pt", "optimizer_fake_score.pt", "scheduler_fake_score.pt"} <= {
        p.name for p in folder.iterdir()
    }
    resumed = fresh_state(tmp_path, "--ema-decay", "0.9")
    load_checkpoint(resumed, folder, say=lambda _: None)
    for a, b in zip(state.fake.params, resumed.fake.params, strict=True):
        assert torch.equal(a, b)
    assert adam_steps(resumed.fake.optimizer) == {4.0}
    assert resumed.progress.step == 2
    assert not changed(snapshot(state.discriminator), snapshot(resumed.discriminator))


@pytest.mark.parametrize("saved_fake", [True, False])
def test_resuming_across_methods_is_refused_and_older_layouts_read_as_add(saved_fake, tmp_path):
    saved = layout(processes=1, fsdp=False, ema=False, lora=False, scaler=False, fake_score=saved_fake)
    (tmp_path / MANIFEST).write_text(json.dumps({"layout": saved}))
    now = {**saved, "fake_score": not saved_fake}
    with pytest.raises(RecipeError, match="written (with|without) --method dmd2"):
        check_compatible(tmp_path, now, say=lambda _: None)
    del saved["fake_score"]  # a checkpoint written before --method existed: an ADD one
    (tmp_path / MANIFEST).write_text(json.dumps({"layout": saved}))
    check_compatible(tmp_path, {**saved, "fake_score": False}, say=lambda _: None)


def test_a_non_finite_step_leaves_every_weight_untouched(tmp_path):
    state = fresh_state(tmp_path, "--debug-nonfinite-at", "1")
    nets = (state.models.student, state.fake.network, state.discriminator)
    before = [snapshot(m) for m in nets]
    micro_batches = batches(state)
    with count_host_reads() as counted:
        result = step(state, micro_batches)
    assert result.skipped and counted.count == 1
    assert not any(changed(b, snapshot(m)) for b, m in zip(before, nets))
    assert adam_steps(state.fake.optimizer) == {0.0} and state.progress.nonfinite_total == 1


def test_lora_fake_score_holds_the_teachers_weights_once(tmp_path):
    state = fresh_state(tmp_path, "--lora-rank", "2", "--gan-weight", "0")
    teacher, fake = state.models.teacher, state.fake
    assert fake.network is teacher  # the adapter lives on the teacher's network
    assert fake.names and all(dmd.FAKE_ADAPTER in n for n in fake.names)
    adapter = {p.data_ptr() for p in fake.params}
    base = {k: v.clone() for k, v in teacher.named_parameters() if v.data_ptr() not in adapter}
    step(state)
    after = dict(teacher.named_parameters())
    assert all(torch.equal(base[k], after[k]) for k in base)  # the base (the teacher) is untouched
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in fake.params)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "dmd2", "--fsdp"], "--method dmd2 does not support --fsdp"),
        (["--method", "dmd2", "--discriminator", "teacher"], "--discriminator is --method add's"),
        (["--method", "dmd2", "--lambda-distill", "1"], "--lambda-distill is --method add's"),
        (["--fake-steps", "3"], "--fake-steps is --method dmd2's"),
        (["--method", "dmd2", "--fake-steps", "0"], "--fake-steps: must be >= 1"),
    ],
)
def test_combinations_dmd2_cannot_run_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "random", *argv])
    assert message in capsys.readouterr().err


def test_flow_recipe_dmd2_runs_on_its_tiny_preset(tmp_path):
    import add_flow

    argv = ["--model", "sd3", "--method", "dmd2", "--fake-steps", "2", "--max-steps", "2"]
    out = add_flow.main(
        [*argv, "--output-dir", str(tmp_path), "--sample-every", "0", "--checkpoint-every", "2"]
    )
    assert out.step == 2 and out.nonfinite_total == 0
    assert (out.checkpoint / "fake_score.pt").is_file()
