"""One copy of the UNet in ``add_sdxl.py --lora-rank``: teacher and LADD features are the student's base.

The recipe's state (``add_sdxl.setup``, random preset) is searched for every tensor it can
reach: the models, the student as trained, the objective's teacher, the discriminator and its
feature network, the EMA, the optimisers, and the model behind every ``AdaptersDisabled`` view
(not a registered submodule). Each randomly initialised weight of the base UNet must be held in
exactly one storage with LoRA; a full fine-tune holds two (student and teacher), and so does
``--method dmd2 --lora-rank``, whose LoRA student sits on a copy while its fake score is a
second adapter on the teacher's UNet. The teacher returns what the bare base UNet returns, bit
for bit, while the student (LoRA weights made non-zero) returns something else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import add_sdxl  # examples/ is on pytest's pythonpath
import recipe.sdxl.random as random_preset
from recipe.args import check_paths
from add_sdxl import parse_args
from recipe.sdxl.models import square_time_ids, unet_features
from recipe.sdxl.report import export, teacher_apart
from addkit.denoisers import AdaptersDisabled, wrap
from addkit.testing import randomize_lora, storage_counts

LORA = ["--lora-rank", "4"]
LADD = ["--discriminator", "teacher", "--distill-space", "latent"]


def _setup(tmp_path: Any, *extra: str) -> Any:
    argv = ["--preset", "random", "--output-dir", str(tmp_path), "--sample-every", "0", "--log-every", "0"]
    args = parse_args([*argv, *extra])
    check_paths(args)
    return add_sdxl.setup(args)


def _modules(state: Any) -> Iterator[nn.Module]:
    """Every module the run holds, the model behind each ``AdaptersDisabled`` view included."""
    m = state.models
    roots = [m.teacher, m.student, m.vae, *m.text_encoders, state.student, state.discriminator]
    roots += [r for r in (m.image_encoder, state.ema) if r is not None]
    roots += [v for v in vars(state.objective).values() if isinstance(v, nn.Module)]  # its teacher
    if state.fake is not None:
        roots += [state.fake.network, state.fake.real]
    seen: set[int] = set()
    while roots:
        for module in roots.pop().modules():
            if id(module) not in seen:
                seen.add(id(module))
                yield module
                if isinstance(module, AdaptersDisabled):
                    roots.append(module.model)


def _tensors(state: Any) -> list[torch.Tensor]:
    found = [t for m in _modules(state) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
    optimisers = [state.opt_g, state.opt_d] + ([state.fake.optimizer] if state.fake is not None else [])
    for opt in optimisers:
        found += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        found += [p for g in opt.param_groups for p in g["params"]]
    return found


def _copies(state: Any) -> dict[str, int]:
    """For each random weight of the base UNet: how many distinct storages hold a tensor equal to it.

    Constant weights (a norm's ones, a zero bias) are skipped: they equal unrelated tensors.
    """
    base = random_preset.build_parts(state.args.seed).unet.state_dict()
    return storage_counts(base, _tensors(state))


def _inputs(state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    side = state.args.resolution // state.models.vae_factor
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    cond, _ = state.text(["a red circle on a blue background", "a cat"])
    cond["time_ids"] = square_time_ids(state.args.resolution, 2)
    return x, cond


@pytest.mark.parametrize("extra", [[], LADD], ids=["add", "ladd"])
def test_lora_run_holds_the_unet_once_and_its_teacher_is_the_base(extra: list[str], tmp_path: Any) -> None:
    state = _setup(tmp_path, *LORA, *extra)
    models = state.models
    assert isinstance(models.teacher, AdaptersDisabled)
    assert (
        models.teacher.model is models.student is models.unet is state.accelerator.unwrap_model(state.student)
    )
    assert randomize_lora(models.student) > 0
    counts = _copies(state)
    assert counts and set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    base_numel = sum(p.numel() for n, p in models.unet.named_parameters() if "lora_" not in n)
    print(
        f"sdxl LoRA {extra or 'add'}: {len(counts)} random base weights, one storage each; base {base_numel}"
    )

    bare = random_preset.build_parts(state.args.seed).unet
    x, cond = _inputs(state)
    t = torch.tensor([899, 399])
    with torch.no_grad():
        want = wrap(bare, models.schedule, models.prediction).x0(x, t, **cond)
        torch.testing.assert_close(state.objective.teacher.x0(x, t, **cond), want, rtol=0, atol=0)
        assert (state.denoiser.x0(x, t, **cond) - want).abs().max() > 1e-3  # the student is not the base
        if extra:  # LADD: the discriminator's features are the bare base's
            features = state.discriminator.features
            assert features.teacher is models.teacher and not list(features.parameters())
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
            reference = unet_features(bare, models, features.taps, channels=features.channels)
            for a, b in zip(features(x, t=499, noise=noise), reference(x, t=499, noise=noise)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(p.requires_grad for n, p in models.student.named_parameters() if "lora_" in n)
    trained = {id(p) for p in state.trainable}
    assert trained == {id(p) for n, p in models.unet.named_parameters() if "lora_" in n}


def test_full_fine_tune_and_dmd2_lora_hold_two_copies(tmp_path: Any) -> None:
    """The same count finds student and teacher in a full fine-tune, and in DMD2 with LoRA."""
    full = _setup(tmp_path / "full")
    assert full.models.teacher is full.models.unet is not full.models.student
    assert set(_copies(full).values()) == {2}
    dmd2 = _setup(tmp_path / "dmd2", *LORA, "--method", "dmd2", "--fake-steps", "1", "--gan-weight", "0")
    models = dmd2.models
    assert models.teacher is models.unet is dmd2.fake.network  # teacher and fake score: one UNet
    assert isinstance(dmd2.fake.real, AdaptersDisabled) and models.student is not models.unet
    assert set(_copies(dmd2).values()) == {2}


def test_two_steps_train_the_lora_only_and_scoring_sees_the_base(tmp_path: Any) -> None:
    state = _setup(tmp_path, *LORA, *LADD, "--ema-decay", "0.9")
    unet = state.models.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    for _ in range(2):
        assert not add_sdxl.train_step(state, [next(state.data)]).skipped
    after = dict(unet.named_parameters())
    base = [n for n in before if "lora_" not in n]
    assert all(torch.equal(before[n], after[n]) for n in base)  # the teacher did not move
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)

    bare = random_preset.build_parts(state.args.seed).unet
    with teacher_apart(state.models, unet) as (models, student):  # the tiny preset's scoring pair
        assert models.teacher is unet and student is not unet
        x, cond = _inputs(state)
        with torch.no_grad():
            run = lambda m: wrap(m, models.schedule, models.prediction).x0(x, 499, **cond)
            torch.testing.assert_close(run(models.teacher), run(bare), rtol=0, atol=0)
            assert not torch.equal(run(student), run(bare))
    assert all(
        not unet.get_submodule(n.split(".lora_A.")[0]).disable_adapters for n in before if ".lora_A." in n
    )
    export(state.args, state.models, unet)  # fuses the LoRA into a copy
    assert all(torch.equal(before[n], p) for n, p in unet.named_parameters() if n in base)


@pytest.mark.slow
def test_lora_resume_equals_straight_run(tmp_path: Any) -> None:
    """Resuming a one-copy LoRA run (EMA on) at step 1 writes step 2's checkpoint bit for bit."""
    import shutil

    from safetensors.torch import load_file

    argv = ["--preset", "random", "--grid-seeds", "0", "--diversity-seeds", "2", *LORA, *LADD]
    argv += ["--max-steps", "2", "--checkpoint-every", "1", "--sample-every", "0", "--ema-decay", "0.9"]
    argv += ["--no-export-pipeline"]
    straight = add_sdxl.main([*argv, "--output-dir", str(tmp_path / "straight")])
    first = tmp_path / "straight" / "checkpoints" / "step-0000001"
    shutil.copytree(first, tmp_path / "resumed" / "checkpoints" / first.name)
    resumed = add_sdxl.main([*argv, "--output-dir", str(tmp_path / "resumed"), "--resume", "latest"])
    assert resumed.step == straight.step == 2
    for name in ("model.safetensors", "ema.pt", "optimizer_student.pt", "discriminator.pt"):
        load = load_file if name.endswith(".safetensors") else lambda p: torch.load(p, weights_only=True)
        a, b = load(straight.checkpoint / name), load(resumed.checkpoint / name)
        flat_a, flat_b = _flat(a), _flat(b)
        assert flat_a.keys() == flat_b.keys(), name
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), name


def _flat(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else []
    return {k: v for key, value in items for k, v in _flat(value, f"{prefix}/{key}").items()}
