"""The tiny world: data, shipped weights (offline), evaluation metrics, teacher quality."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("timm")

import tiny_world
from tiny_world import models, world
from tiny_world.evaluate import Evaluator


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def parts() -> models.TinyParts:
    return tiny_world.load_parts()


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return tiny_world.load_classifier()


# -- the world -----------------------------------------------------------------------------------
def test_world_sizes_and_captions() -> None:
    assert len(world.ALL_ATTRIBUTES) == 3 * 6 * 5 * 2
    assert len(tiny_world.HELD_OUT_CAPTIONS) == 24
    assert len(set(world.TRAIN_CAPTIONS)) == len(world.TRAIN_CAPTIONS) == 180 - 24
    caption = "a small red circle on a blue background"
    a = tiny_world.parse_caption(caption)
    assert (world.SHAPES[a.shape], world.COLOUR_NAMES[a.colour], world.COLOUR_NAMES[a.background]) == (
        "circle", "red", "blue",
    )  # fmt: skip
    assert a.caption == caption
    with pytest.raises(ValueError, match="not a caption of the tiny world"):
        tiny_world.parse_caption("a purple circle on a blue background")


def test_held_out_captions_never_in_training() -> None:
    held = set(tiny_world.HELD_OUT_CAPTIONS)
    assert not held & set(world.TRAIN_CAPTIONS)
    batch = tiny_world.sample_batch(4096, torch.Generator().manual_seed(0))
    assert not held & set(batch.captions)
    # every pair of attributes of a held-out triple is seen in training (composition, not novelty)
    train = {(a.shape, a.colour, a.background) for a in world.TRAIN}
    for s, c, b in world.HELD_OUT_TRIPLES:
        assert any(t[:2] == (s, c) for t in train)
        assert any((t[0], t[2]) == (s, b) for t in train)
        assert any(t[1:] == (c, b) for t in train)
    # balanced: each shape 4 times, each colour twice as shape and twice as background
    triples = world.HELD_OUT_TRIPLES
    for i in range(3):
        assert sum(t[0] == i for t in triples) == 4
    for i in range(6):
        assert sum(t[1] == i for t in triples) == sum(t[2] == i for t in triples) == 2


def test_generator_is_deterministic() -> None:
    a = tiny_world.sample_batch(16, torch.Generator().manual_seed(3))
    b = tiny_world.sample_batch(16, torch.Generator().manual_seed(3))
    c = tiny_world.sample_batch(16, torch.Generator().manual_seed(4))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (16, 3, 32, 32) and a.images.min() >= -1 and a.images.max() <= 1


def test_images_show_their_caption() -> None:
    batch = tiny_world.sample_batch(64, torch.Generator().manual_seed(0))
    palette = torch.tensor(list(world.COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    corners = batch.images[:, :, 0, 0]  # shapes stay a pixel away from the border
    assert torch.allclose(corners, palette[batch.background], atol=1e-6)
    small = batch.size == 0
    covered = (
        (batch.images - palette[batch.background][:, :, None, None]).abs().sum(1).gt(0.5).float().mean((1, 2))
    )
    assert covered[small].max() < covered[~small].min()


def test_make_dataset_writes_the_same_folder_twice(tmp_path: Path) -> None:
    from PIL import Image

    one = tiny_world.make_dataset(tmp_path / "a", 12, seed=5)
    two = tiny_world.make_dataset(tmp_path / "b", 12, seed=5)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == 24
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes()
    caption = (one / "00000.txt").read_text().strip()
    assert caption in world.TRAIN_CAPTIONS
    assert Image.open(one / "00000.png").size == (32, 32)


# -- shipped weights -------------------------------------------------------------------------------
def test_weights_are_small_and_safetensors() -> None:
    files = [p for p in tiny_world.WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 6


def test_parts_load_offline_with_sdxl_architecture(parts: models.TinyParts) -> None:
    unet, vae = parts.unet, parts.vae
    assert type(unet).__name__ == "UNet2DConditionModel" and type(vae).__name__ == "AutoencoderKL"
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == (
        parts.text_encoder.config.hidden_size + parts.text_encoder_2.config.hidden_size
    )
    assert (
        unet.config.projection_class_embeddings_input_dim
        == parts.text_encoder_2.config.projection_dim + 6 * 8
    )
    assert type(parts.text_encoder).__name__ == "CLIPTextModel"
    assert type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert parts.tokenizer.model_max_length == parts.tokenizer_2.model_max_length == models.MAX_TOKENS
    assert (parts.tokenizer.pad_token, parts.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert vae.config.scaling_factor != 1.0  # set from the latents' std after training
    assert not any(p.requires_grad for p in unet.parameters())
    cond = tiny_world.encode_text(parts, ["a small red circle on a blue background"] * 2)
    assert {k: tuple(v.shape) for k, v in cond.items()} == {
        "encoder_hidden_states": (2, 48, 64), "text_embeds": (2, 32), "time_ids": (2, 6),
    }  # fmt: skip
    x0 = tiny_world.teacher_denoiser(unet).x0(torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), **cond)
    assert x0.shape == (2, 4, 8, 8)


def test_weights_folder_is_an_sdxl_pipeline() -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_world.WEIGHTS)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a large blue square on a yellow background", num_inference_steps=2, guidance_scale=1.0,
               output_type="pt", generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 3, 32, 32)


def test_image_encoder_and_discriminator_load_offline() -> None:
    import addkit

    encoder = tiny_world.image_encoder()
    assert type(encoder).__name__ == "VisionTransformer" and encoder.num_features == 48
    images = tiny_world.sample_batch(4, torch.Generator().manual_seed(0)).images
    assert encoder(images).shape == (4, 48)
    D = addkit.ProjectedDiscriminator.from_dinov2(**tiny_world.dinov2_kwargs(), c_text_dim=32, c_image_dim=48)
    backbone = D.features.model
    assert torch.equal(backbone.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)
    logits = D(images, c_text=torch.zeros(4, 32), c_image=torch.zeros(4, 48))
    assert logits.shape == (4, 5 * 64)  # five taps x 8 x 8 patches


def test_classifier_reads_real_images(classifier: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    for held_out in (False, True):
        batch = tiny_world.sample_batch(256, g, held_out=held_out)
        with torch.no_grad():
            logits = classifier(batch.images)
        assert tiny_world.prompt_accuracy(logits, batch.captions) >= 0.9
        assert float((logits["size"].argmax(1) == batch.size).float().mean()) >= 0.9


def test_teacher_25_steps_beats_1_step(parts: models.TinyParts, classifier: torch.nn.Module) -> None:
    evaluator = Evaluator(parts, classifier, per_caption=2, real_per_caption=8)
    teacher = tiny_world.teacher_denoiser(parts.unet)
    one = evaluator(teacher, 1, renoise="ancestral")
    many = evaluator(teacher, 25, renoise="ancestral")
    assert many["prompt_accuracy"] >= one["prompt_accuracy"] + 0.3, (one, many)
    assert many["fd"] < one["fd"], (one, many)


# -- metrics on known inputs -----------------------------------------------------------------------
def test_frechet_distance_known_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g)
    assert tiny_world.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, 2.0, 0.0, -2.0])
    assert tiny_world.frechet_distance(x, x + shift) == pytest.approx(9.0, abs=1e-6)
    # diagonal Gaussians: sum (s_a - s_b)^2 for the standard deviations
    a = torch.randn(4000, 3, generator=g)
    b = a * torch.tensor([2.0, 1.0, 0.5])
    expected = float(((a.std(0) - b.std(0)) ** 2).sum())
    assert tiny_world.frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert tiny_world.frechet_distance(a, b) == pytest.approx(tiny_world.frechet_distance(b, a), rel=1e-6)


def test_diversity_and_prompt_accuracy_known_values() -> None:
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert tiny_world.diversity(f, torch.tensor([0, 0, 1, 1, 1])) == pytest.approx((5.0 + 4.0 / 3.0) / 2)
    assert tiny_world.diversity(torch.ones(4, 3), torch.tensor([0, 0, 1, 1])) == 0.0
    captions = ["a small red circle on a blue background", "a large white triangle on a black background"]
    attrs = [tiny_world.parse_caption(c) for c in captions]

    def onehot(key: str, n: int, shift: int = 0) -> torch.Tensor:
        return torch.nn.functional.one_hot(
            torch.tensor([(getattr(a, key) + shift) % n for a in attrs]), n
        ).float()

    right = {k: onehot(k, n) for k, n in models.HEADS.items()}
    assert tiny_world.prompt_accuracy(right, captions) == 1.0
    assert (
        tiny_world.prompt_accuracy({**right, "size": onehot("size", 2, 1)}, captions) == 1.0
    )  # size not asked
    for key in ("shape", "colour", "background"):
        assert tiny_world.prompt_accuracy({**right, key: onehot(key, models.HEADS[key], 1)}, captions) == 0.0


def test_grid_layout() -> None:
    columns = {f"c{i}": torch.full((3, 3, 32, 32), i / 2 - 1) for i in range(5)}
    image = tiny_world.grid(columns, scale=2)
    assert image.shape == (3, 3 * 66 + 2, 5 * 66 + 2)
    # row-major: the first row holds one image of each column, in order
    assert image[0, 2 + 10, 2 + 10].item() == pytest.approx(0.0)
    assert image[0, 2 + 10, 2 + 66 * 4 + 10].item() == pytest.approx(1.0)


def test_defaults_are_recipe_arguments() -> None:
    from recipe.args import build_parser
    from recipe.sdxl.family import SDXL

    dests = {action.dest for action in build_parser(SDXL)._actions}
    assert set(tiny_world.DEFAULTS) <= dests, set(tiny_world.DEFAULTS) - dests
