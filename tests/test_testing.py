"""addkit.testing: every builder builds offline and runs a forward; seeds decide the weights; the
tokenizer round-trips captions; the repository reaches its modules without editing sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from addkit import testing

pytest.importorskip("diffusers")
pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]


def _sd_unet_forward() -> tuple[int, ...]:
    return tuple(testing.tiny_sd_unet()(torch.randn(2, 4, 8, 8), 999, torch.randn(2, 5, 32)).sample.shape)


def _sdxl_unet_forward() -> tuple[int, ...]:
    added = {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}
    unet = testing.tiny_sdxl_unet(sample_size=16)
    return tuple(
        unet(torch.randn(2, 4, 16, 16), 10, torch.randn(2, 5, 32), added_cond_kwargs=added).sample.shape
    )


def _vae_forward() -> tuple[int, ...]:
    vae = testing.tiny_vae()
    latents = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist.mode()
    assert latents.shape == (2, 4, 16, 16)
    return tuple(vae.decode(latents).sample.shape)


def _sd3_forward() -> tuple[int, ...]:
    out = testing.tiny_sd3_transformer()(
        hidden_states=torch.randn(2, 4, 8, 8),
        encoder_hidden_states=torch.randn(2, 3, 16),
        pooled_projections=torch.randn(2, 8),
        timestep=torch.tensor([300.0, 900.0]),
    )
    return tuple(out.sample.shape)


def _flux_forward() -> tuple[int, ...]:
    h = w = 4  # packed: an 8 x 8 latent of 4 channels in 2 x 2 patches
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros(h * w), rows.flatten(), cols.flatten()], dim=1)
    out = testing.tiny_flux_transformer()(
        hidden_states=torch.randn(2, h * w, 16),
        encoder_hidden_states=torch.randn(2, 5, 16),
        pooled_projections=torch.randn(2, 8),
        timestep=torch.tensor([0.3, 0.9]),
        img_ids=img_ids,
        txt_ids=torch.zeros(5, 3),
    )
    return tuple(out.sample.shape)


def _dinov2_forward() -> tuple[int, ...]:
    return tuple(testing.tiny_dinov2()(torch.randn(2, 3, 56, 56)).shape)


def _discriminator_forward() -> tuple[int, ...]:
    from addkit import ProjectedDiscriminator

    D = ProjectedDiscriminator.from_dinov2(**testing.tiny_dinov2_kwargs(), c_text_dim=8)
    return tuple(D(torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 8)).shape)


def _text_forward() -> tuple[int, ...]:
    tok = testing.tiny_clip_tokenizer(pad_token="!")
    enc = testing.tiny_clip_text_encoder(tok, with_projection=True)
    out = enc(**tok(["a red circle", "a cat"], padding="max_length", truncation=True, return_tensors="pt"))
    assert out.last_hidden_state.shape == (2, 16, 16)
    return tuple(out.text_embeds.shape)


FORWARDS: dict[str, tuple[Callable[[], tuple[int, ...]], tuple[int, ...]]] = {
    "sd_unet": (_sd_unet_forward, (2, 4, 8, 8)),
    "sdxl_unet": (_sdxl_unet_forward, (2, 4, 16, 16)),
    "vae": (_vae_forward, (2, 3, 32, 32)),
    "sd3_transformer": (_sd3_forward, (2, 4, 8, 8)),
    "flux_transformer": (_flux_forward, (2, 16, 16)),
    "dinov2": (_dinov2_forward, (2, 32)),
    "dinov2_discriminator": (_discriminator_forward, (2, 5 * 16)),
    "clip_text_encoder": (_text_forward, (2, 16)),
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(FORWARDS))
def test_builder_forward_on_cpu(name: str) -> None:
    forward, shape = FORWARDS[name]
    assert forward() == shape


BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "sd_unet": testing.tiny_sd_unet,
    "sdxl_unet": testing.tiny_sdxl_unet,
    "vae": testing.tiny_vae,
    "sd3_transformer": testing.tiny_sd3_transformer,
    "flux_transformer": testing.tiny_flux_transformer,
    "dinov2": testing.tiny_dinov2,
    "clip_text_encoder": lambda **kw: testing.tiny_clip_text_encoder(testing.tiny_clip_tokenizer(), **kw),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_seed_decides_weights_and_global_rng_is_untouched(name: str) -> None:
    build = BUILDERS[name]
    state = torch.random.get_rng_state()
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in a.parameters())


def test_config_overrides_reach_the_model() -> None:
    unet = testing.tiny_sd_unet(sample_size=16, block_out_channels=(16, 32), attention_head_dim=2)
    assert unet.config.sample_size == 16 and tuple(unet.config.block_out_channels) == (16, 32)
    assert testing.tiny_dinov2(depth=2).blocks.__len__() == 2


def test_tokenizer_round_trips_captions_and_pads_like_sdxl() -> None:
    tok, tok_2 = testing.tiny_clip_tokenizer(model_max_length=40), testing.tiny_clip_tokenizer(pad_token="!")
    caption = "a red circle on a blue background, 3 times!"
    ids = tok(caption).input_ids  # one token per character, between the start and end tokens
    assert len(ids) == len(caption.replace(" ", "")) + 2 and tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle on a blue background , 3 times !"
    assert tok.pad_token == "<|endoftext|>" and tok_2.pad_token == "!"
    assert tok.pad_token_id == tok.eos_token_id and tok_2.pad_token_id != tok_2.eos_token_id
    assert tok_2.model_max_length == 16 and len(tok_2("x" * 40, truncation=True).input_ids) == 16
    assert tok.get_vocab() == tok_2.get_vocab()


def test_tokenizer_bad_arguments() -> None:
    with pytest.raises(
        ValueError, match=r"tiny_clip_tokenizer: model_max_length must be at least 2 .*, got 1"
    ):
        testing.tiny_clip_tokenizer(model_max_length=1)
    with pytest.raises(ValueError, match=r"tiny_clip_tokenizer: pad_token must be a token of the vocabulary"):
        testing.tiny_clip_tokenizer(pad_token="<pad>")


@torch.no_grad()
def test_sdxl_pipeline_and_condition_fit_its_unet() -> None:
    pipe = testing.tiny_sdxl_pipeline(sample_size=8, model_max_length=8)
    assert not any(p.requires_grad for p in pipe.unet.parameters()) and not pipe.text_encoder_2.training
    cond = testing.sdxl_condition(pipe, "a cat", batch=2)
    assert {k: tuple(v.shape) for k, v in cond.items()} == {
        "encoder_hidden_states": (2, 8, 32),
        "text_embeds": (2, 16),
        "time_ids": (2, 6),
    }
    assert cond["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    out = pipe.unet(torch.randn(2, 4, 8, 8), 999, cond["encoder_hidden_states"], added_cond_kwargs=added)
    assert out.sample.shape == (2, 4, 8, 8)
    images = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, height=16, width=16, output_type="pt")
    assert images.images.shape == (1, 3, 16, 16)


def test_components_are_the_pipeline_arguments() -> None:
    parts = testing.tiny_sdxl_components(sample_size=16, seed=5)
    assert set(parts) == {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
    assert parts["unet"].config.sample_size == 16 and parts["vae"].config.sample_size == 32
    assert parts["text_encoder_2"].config.projection_dim == 16


@pytest.mark.parametrize(
    "build,module,extra",
    [
        (testing.tiny_sd_unet, "diffusers", "diffusers"),
        (testing.tiny_clip_tokenizer, "transformers", "diffusers"),
        (testing.tiny_dinov2, "timm", "timm"),
    ],
)
def test_missing_library_names_the_extra(
    build: Callable[[], object], module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ModuleNotFoundError, match=rf"needs {module}: pip install 'addkit\[{extra}\]'"):
        build()


def test_import_addkit_does_not_import_testing() -> None:
    code = "import sys, addkit; print('addkit.testing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_no_sys_path_edits_in_the_repository() -> None:
    patterns = ("sys.path" + ".insert(", "sys.path" + ".append(")  # split: this file holds neither
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [
            d for d in dirs if not d.startswith(".") and d not in {"site", "node_modules", "__pycache__"}
        ]
        for name in files:
            if name.endswith(".py"):
                path = Path(folder, name)
                text = path.read_text(encoding="utf-8", errors="replace")
                found += [f"{path.relative_to(ROOT)}: {p}" for p in patterns if p in text]
    assert not found, f"edit sys.path nowhere (pytest's pythonpath option, sibling imports): {found}"
