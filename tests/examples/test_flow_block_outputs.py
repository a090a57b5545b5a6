"""``recipe.flow.models.image_tokens`` on every form a transformer block's output takes.

LADD's teacher features and DMD2's GAN head read the image stream of SD3 / Flux blocks. Blocks
return ``(text tokens, image tokens)`` (SD3's last block: ``(None, image tokens)``), except Flux's
single-stream blocks before diffusers 0.35, which return one tensor of the text tokens followed
by the image tokens. The reference is independent of how a block returns: the tensor the
transformer feeds ``norm_out`` (the image stream after its last block) or the ``hidden_states``
the next SD3 block receives. The installed diffusers' form is checked on tiny random
transformers; both forms by hand; and the recipe's floor check at parse time.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers
from packaging.version import Version

import recipe.flow.models as fm
import recipe.flow.tiny as tiny
from recipe.args import parse_args
from recipe.flow.family import FLOW
from addkit import FlowSchedule, testing, wrap

BATCH, LATENT_SIDE, TEXT_TOKENS = 2, 8, 5  # 8 x 8 latents: 16 image tokens (2 x 2 patches)
NUM_IMAGE = (LATENT_SIDE // 2) ** 2


def _run(transformer: torch.nn.Module, tap: str, after: str) -> tuple[Any, torch.Tensor]:
    """The raw output of block ``tap`` and the image stream entering ``after`` (a submodule).

    ``after`` is ``norm_out`` (called with the image stream first) or the next SD3 block (called
    with ``hidden_states=``).
    """
    seen: dict[str, Any] = {}

    def keep_output(module: Any, args: Any, output: Any) -> None:
        seen["output"] = output

    def keep_input(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen["input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    modules = dict(transformer.named_modules())
    hooks = [
        modules[tap].register_forward_hook(keep_output),
        modules[after].register_forward_pre_hook(keep_input, with_kwargs=True),
    ]
    gen = torch.Generator().manual_seed(0)
    text_dim, pooled_dim = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim
    cond = {
        "encoder_hidden_states": torch.randn(BATCH, TEXT_TOKENS, text_dim, generator=gen),
        "pooled_projections": torch.randn(BATCH, pooled_dim, generator=gen),
    }
    x_t = torch.randn(BATCH, 4, LATENT_SIDE, LATENT_SIDE, generator=gen)
    try:
        with torch.no_grad():
            wrap(transformer, FlowSchedule(), "flow")(x_t, torch.tensor([0.3, 0.8]), **cond)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["output"], seen["input"]


def _sd3() -> torch.nn.Module:
    return testing.tiny_sd3_transformer(num_layers=2)


def _flux_double_only() -> torch.nn.Module:
    return testing.tiny_flux_transformer(num_single_layers=0)


CASES = {
    # (transformer, tapped block, where its image stream goes next)
    "sd3-joint": (_sd3, "transformer_blocks.0", "transformer_blocks.1"),
    "sd3-last": (_sd3, "transformer_blocks.1", "norm_out"),
    "flux-double": (_flux_double_only, "transformer_blocks.0", "norm_out"),
    "flux-single": (testing.tiny_flux_transformer, "single_transformer_blocks.0", "norm_out"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_image_tokens_of_the_installed_diffusers_blocks_are_the_image_stream(case: str) -> None:
    build, tap, after = CASES[case]
    output, stream = _run(build(), tap, after)
    tokens = fm.image_tokens(output, NUM_IMAGE)
    assert tokens.shape == (BATCH, NUM_IMAGE, stream.shape[-1])
    assert torch.equal(tokens, stream)


def test_flux_single_block_form_follows_the_diffusers_version() -> None:
    """A tuple from diffusers 0.35, one [text; image] tensor before (the form the test above met)."""
    output, _ = _run(testing.tiny_flux_transformer(), "single_transformer_blocks.0", "norm_out")
    if Version(diffusers.__version__) >= Version("0.35"):
        assert isinstance(output, tuple) and output[0].shape[1] == TEXT_TOKENS
    else:
        assert isinstance(output, torch.Tensor) and output.shape[1] == TEXT_TOKENS + NUM_IMAGE


def test_image_tokens_of_each_form() -> None:
    gen = torch.Generator().manual_seed(1)
    text, image = torch.randn(3, 7, 6, generator=gen), torch.randn(3, 4, 6, generator=gen)
    forms = {
        "(text, image)": (text, image),  # joint and double blocks; single blocks from 0.35
        "(None, image)": (None, image),  # SD3's last block (context_pre_only)
        "[text; image]": torch.cat([text, image], dim=1),  # Flux single blocks before 0.35
    }
    for name, output in forms.items():
        assert torch.equal(fm.image_tokens(output, 4), image), name


def test_image_tokens_refuses_a_tensor_without_text_tokens() -> None:
    message = r"image_tokens: .*text \+ 16 image tokens.*\(2, 16, 8\).*resolution"
    with pytest.raises(ValueError, match=message):
        fm.image_tokens(torch.zeros(2, 16, 8), 16)


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_image_token_count_is_the_transformers_token_count(model: str) -> None:
    """The recipe's count at the tiny resolution equals the tokens its transformer runs on."""
    pipe = tiny.pipeline(model)
    latents = pipe.vae.encode(torch.zeros(1, 3, tiny.RESOLUTION, tiny.RESOLUTION)).latent_dist.mean
    transformer = pipe.transformer
    patch = transformer.config.patch_size if model == "sd3" else 2  # Flux: the pipeline packs 2 x 2
    assert fm.image_token_count(pipe, tiny.RESOLUTION) == latents[0, 0].numel() // patch**2


@pytest.mark.parametrize("version", ["0.35.2", "0.36.0.dev0", "0.42.1"])
def test_diffusers_at_or_above_the_floor_pass(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diffusers, "__version__", version)
    assert fm.diffusers_conflicts() == []


def test_diffusers_below_the_floor_are_refused_at_parse_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(diffusers, "__version__", "0.35.1")
    with pytest.raises(SystemExit):
        parse_args(FLOW, ["--preset", "tiny", "--model", "flux"])
    err = capsys.readouterr().err
    assert "diffusers 0.35.1 is older than add_flow.py's floor 0.35.2" in err
    assert "pip install -U 'diffusers>=0.35.2'" in err
