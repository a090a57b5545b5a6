"""One copy of the weights: with LoRA, teacher and LADD feature network are the student's base.

The recipe's own state (``add_flow.setup``) is searched for every tensor it can reach: the
pipeline's parts, the student (inside its accelerate wrapper), the objective's teacher, the
discriminator and its feature network, the optimisers. Each weight of the base transformer must
be held in exactly one storage (a full fine-tune, checked alongside, holds two: student and
teacher), and the teacher must return what the bare base model returns, bit for bit, while the
student (LoRA weights made non-zero) returns something else. ``adapters_disabled`` restores
exactly the adapter state it found.
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

import add_flow  # examples/ is on pytest's pythonpath
import recipe.flow.tiny as tiny
from addkit.denoisers import AdaptersDisabled, adapters_disabled, wrap
from addkit.schedules import FlowSchedule
from addkit.testing import randomize_lora, storage_counts


def _setup(model: str, tmp_path: Any, *extra: str) -> Any:
    return add_flow.setup(add_flow.parse_args(["--model", model, "--output-dir", str(tmp_path), *extra]))


def _modules(run: Any) -> Iterator[nn.Module]:
    """Every module the run holds, following the references that sit outside module trees."""
    yield from (m for m in run.models.pipe.components.values() if isinstance(m, nn.Module))
    yield run.student

    yield run.objective.teacher
    yield run.discriminator
    yield run.discriminator.features
    for view in (run.models.teacher, run.discriminator.features.teacher, run.objective.teacher.model.transformer):
        if isinstance(view, AdaptersDisabled):
            yield view.model


def _tensors(run: Any) -> list[torch.Tensor]:
    found = [t for m in _modules(run) for t in (*m.parameters(), *m.buffers())]
    for opt in (run.opt_g, run.opt_d):
        found += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return found


def _copies(run: Any) -> dict[str, int]:
    """For each base transformer weight: how many distinct storages hold a tensor equal to it.

    Only randomly initialised weights are counted: a norm's constant ones (or a zero bias) equal
    many unrelated tensors of the same shape.
    """
    base = tiny.pipeline(run.args.model, run.args.seed, **_variant(run)).transformer.state_dict()
    return storage_counts(base, _tensors(run))


def _variant(run: Any) -> dict[str, Any]:
    return {"guidance_embeds": run.args.tiny_flux == "dev"} if run.args.model == "flux" else {}


def _inputs(run: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    side = run.args.resolution // run.models.pipe.vae_scale_factor
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    cond, _ = run.text(["a red circle on a blue background", "a cat"])
    return x, cond


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_lora_run_holds_the_transformer_once_and_its_teacher_is_the_base(model: str, tmp_path: Any) -> None:
    run = _setup(model, tmp_path, "--lora-rank", "4")
    assert isinstance(run.models.teacher, AdaptersDisabled)
    assert run.models.teacher.model is run.models.student is run.models.pipe.transformer
    assert run.discriminator.features.teacher is run.models.teacher  # LADD reads the same base
    assert not list(run.discriminator.features.parameters())  # nothing registered twice
    assert randomize_lora(run.models.student) > 0
    counts = _copies(run)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    tensors = _tensors(run)
    total = len({t.untyped_storage().data_ptr() for t in tensors})
    base_numel = sum(p.numel() for n, p in run.models.student.named_parameters() if "lora_" not in n)
    print(
        f"{model} LoRA: {len(counts)} random base weights, one storage each; {total} storages in the run; "
        f"transformer base {base_numel} parameters"
    )

    base = wrap(tiny.pipeline(model, 0, **_variant(run)).transformer, run.models.schedule, "flow")
    x, cond = _inputs(run)
    t = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        want = base.x0(x, t, **cond)
        torch.testing.assert_close(run.objective.teacher.x0(x, t, **cond), want, rtol=0, atol=0)
        assert (run.denoiser.x0(x, t, **cond) - want).abs().max() > 1e-3  # the student is not the base
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        got = run.discriminator.features(x, t=0.5, noise=noise, **cond)
        features = type(run.discriminator.features)(
            base.model.transformer,
            run.models.schedule,
            run.discriminator.features.taps,
            channels=run.discriminator.features.channels,
            call=base,
            select=run.discriminator.features.select,
        )
        for a, b in zip(got, features(x, t=0.5, noise=noise, **cond)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(p.requires_grad for n, p in run.models.student.named_parameters() if "lora_" in n)


def test_full_fine_tune_holds_two_copies(tmp_path: Any) -> None:
    """The same count on a full fine-tune finds student and teacher: the check can tell."""
    run = _setup("sd3", tmp_path)
    counts = _copies(run)
    assert set(counts.values()) == {2}
    print(f"sd3 full fine-tune: {len(counts)} random base weights, two storages each")


def test_adapters_disabled_restores_the_state_it_found() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    plain = [m.weight.detach().clone() for m in (net[0], net[2])]
    model = get_peft_model(net, LoraConfig(target_modules=["0", "2"], init_lora_weights=False))
    layer0, layer2 = model.base_model.model[0], model.base_model.model[2]
    layer2.enable_adapters(False)  # a layer the user switched off stays off
    layer0.lora_A["default"].weight.requires_grad_(False)  # and a frozen adapter weight stays frozen
    x = torch.randn(2, 3)
    with adapters_disabled(model):
        off = model(x)
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(
        off,
        nn.functional.linear(
            torch.relu(nn.functional.linear(x, plain[0], net[0].base_layer.bias)),
            plain[1],
            net[2].base_layer.bias,
        ),
    )
    assert not layer0.disable_adapters and layer2.disable_adapters
    assert not layer0.lora_A["default"].weight.requires_grad and layer0.lora_B["default"].weight.requires_grad


def test_adapters_disabled_refuses_a_model_without_adapters() -> None:
    no_adapters = r"adapters_disabled: Linear has no peft adapter layers: add them"
    with pytest.raises(ValueError, match=no_adapters), adapters_disabled(nn.Linear(2, 2)):
        pass
    with pytest.raises(TypeError, match=r"AdaptersDisabled: model must be an nn.Module with peft adapters"):
        AdaptersDisabled(lambda x: x)  # type: ignore[arg-type]


def test_wrap_sees_through_the_view_to_the_flux_adapter() -> None:
    from peft import LoraConfig

    transformer = tiny.pipeline("flux", guidance_embeds=False).transformer
    transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    teacher = wrap(AdaptersDisabled(transformer), FlowSchedule(), "flow")
    assert type(teacher.model).__name__ == "DiffusersFluxAdapter"
    assert (
        teacher.model.transformer.get_submodule("transformer_blocks.0") is transformer.transformer_blocks[0]
    )


def test_teacher_gradients_through_a_checkpointed_lora_transformer() -> None:
    """LADD's generator step differentiates through the teacher; with gradient checkpointing on, the
    teacher's segments must not be recomputed after the adapters are back on."""
    from peft import LoraConfig

    transformer = tiny.pipeline("sd3").transformer
    transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    randomize_lora(transformer)
    schedule = FlowSchedule(shift=3.0)
    student, teacher = (
        wrap(transformer, schedule, "flow"),
        wrap(AdaptersDisabled(transformer), schedule, "flow"),
    )
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32), "pooled_projections": torch.randn(2, 32)}
    x = torch.randn(2, 4, 8, 8)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        else:
            transformer.disable_gradient_checkpointing()
        transformer.zero_grad(set_to_none=True)
        x0 = student.x0(x, 0.75, **cond)
        teacher.x0(x0, 0.5, **cond).square().mean().backward()
        assert transformer.gradient_checkpointing is checkpointing  # restored after the teacher's call
        return [p.grad for n, p in transformer.named_parameters() if "lora_" in n]

    transformer.train()
    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


def test_the_view_serves_an_sdxl_unet_too() -> None:
    """What the SDXL recipe would call: ``AdaptersDisabled(unet)`` as teacher and LADD feature network."""
    from peft import LoraConfig

    from addkit import TeacherFeatures, VPSchedule
    from addkit.testing import tiny_sdxl_unet

    unet, base = tiny_sdxl_unet(), tiny_sdxl_unet()
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora(unet)
    schedule = VPSchedule.scaled_linear()
    cond = {"encoder_hidden_states": torch.randn(2, 3, 32), "text_embeds": torch.randn(2, 16),
            "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}  # fmt: skip
    x = torch.randn(2, 4, 8, 8)
    teacher = wrap(AdaptersDisabled(unet), schedule, "eps")
    with torch.no_grad():
        want = wrap(base, schedule, "eps").x0(x, 499, **cond)
        torch.testing.assert_close(teacher.x0(x, 499, **cond), want, rtol=0, atol=0)
        assert (wrap(unet, schedule, "eps").x0(x, 499, **cond) - want).abs().max() > 1e-3
        features = TeacherFeatures(
            AdaptersDisabled(unet), schedule, ["mid_block"], channels=[64], call=teacher
        )
        assert features(x, t=499, **cond)[0].shape == (2, 64, 4, 4)  # the mid block on its grid
    assert all(
        p.requires_grad for n, p in unet.named_parameters() if "lora_" in n
    )  # not frozen by the features
