"""What real SD3 / Flux runs meet before the first step: the resolution checked at parse time,
``sample_flow.py``'s load dtype, fixed prompts encoded once, the export's few-step defaults.

Tiny random pipelines only (``recipe.flow.tiny``): the checks are about plumbing, not images.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("timm")

import add_flow  # examples/ is on pytest's pythonpath
import recipe.flow.tiny as tiny
import sample_flow
from recipe import loop
from recipe.args import check_paths, parse_args
from recipe.flow import models as fm
from recipe.flow.family import FLOW

REAL = ["--preset", "none", "--pretrained", "org/model", "--data", "org/data"]
QUIET = ["--sample-every", "0", "--log-every", "0", "--checkpoint-every", "0", "--diversity-seeds", "0",
         "--no-export-pipeline"]  # fmt: skip


# -- --resolution --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "flux", "--resolution", "1000", *REAL],
         r"--resolution 1000: Flux needs a multiple of 16 .*nearest valid: 992 or 1008"),
        (["--model", "sd3", "--resolution", "1020", *REAL],
         r"--resolution 1020: SD3 needs a multiple of 16 .*nearest valid: 1008 or 1024"),
        (["--model", "sd3", "--resolution", "8", *REAL], r"--resolution 8: SD3 .*nearest valid: 16$"),
        (["--model", "flux", "--resolution", "30"], r"--resolution 30: Flux needs a multiple of 4 .*28 or 32"),
    ],
    ids=["flux 1000", "sd3 1020", "sd3 8", "tiny flux 30"],
)  # fmt: skip
def test_a_resolution_the_transformer_cannot_tile_is_refused_when_parsed(argv: list, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        add_flow.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("add_flow.py: error: ") and re.search(message, err), err


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_valid_resolutions_parse_and_match_the_pipelines_own_multiple(model: str) -> None:
    for side in (512, 768, 1024, 1328):
        assert add_flow.parse_args(["--model", model, "--resolution", str(side), *REAL]).resolution == side
    # the multiple the check uses is the one each pipeline's own check computes from the tiny models
    pipe = tiny.pipeline(model)
    token_patch = pipe.transformer.config.patch_size if model == "sd3" else 2  # Flux packs 2 x 2
    assert pipe.vae_scale_factor == tiny.VAE_FACTOR and token_patch == fm.TOKEN_PATCH
    assert fm.resolution_problem(tiny.RESOLUTION + 2, model, pipe.vae_scale_factor) is not None


# -- sample_flow.py --dtype ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_sd3") / "pipe"
    tiny.pipeline("sd3").save_pretrained(folder)
    return folder


def test_sample_flow_loads_in_bf16_by_default_and_refuses_fp16(saved_sd3: Path, capsys) -> None:
    args = sample_flow.parse_args([str(saved_sd3), "a cat"])
    assert args.dtype == "bf16"
    pipe = sample_flow.load_pipeline(args)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert getattr(pipe, name).dtype == torch.bfloat16, name
    pipe = sample_flow.load_pipeline(sample_flow.parse_args([str(saved_sd3), "a cat", "--dtype", "fp32"]))
    assert pipe.transformer.dtype == pipe.text_encoder_3.dtype == torch.float32
    with pytest.raises(SystemExit):
        sample_flow.parse_args([str(saved_sd3), "a cat", "--dtype", "fp16"])
    assert "--dtype fp16: SD3 and Flux are trained and released in bf16" in capsys.readouterr().err


def test_sample_flow_exported_transformer_takes_the_dtype_too(saved_sd3: Path, tmp_path: Path) -> None:
    tiny.pipeline("sd3", seed=1).transformer.save_pretrained(tmp_path / "transformer")
    args = sample_flow.parse_args([str(saved_sd3), "a cat", "--transformer", str(tmp_path / "transformer")])
    pipe = sample_flow.load_pipeline(args)
    assert pipe.transformer.dtype == torch.bfloat16
    # the swapped-in transformer, not the pipeline's own
    want = tiny.pipeline("sd3", seed=1).transformer.state_dict()
    got = pipe.transformer.state_dict()
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)


def test_sample_flow_refuses_a_resolution_the_transformer_cannot_tile(saved_sd3: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--resolution 30: SD3 needs a multiple of 4"):
        sample_flow.main([str(saved_sd3), "a cat", "--resolution", "30", "--out", str(tmp_path / "s.png")])


# -- the empty and negative prompts, encoded once --------------------------------------------------
def _t5(pipe: Any) -> torch.nn.Module:
    return pipe.text_encoder_3 if fm.family(pipe) == "sd3" else pipe.text_encoder_2


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_cfg_and_nfsd_encode_the_empty_and_negative_prompts_once(model: str, tmp_path: Path) -> None:
    args = parse_args(FLOW, ["--preset", "tiny", "--model", model, "--output-dir", str(tmp_path), *QUIET,
                             "--max-steps", "3", "--guidance-scale", "2", "--weighting", "nfsd"])  # fmt: skip
    check_paths(args)
    state = loop.setup(FLOW, args)
    calls: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(1)) for m in (_t5(state.models.pipe),)]
    steps = 3
    for _ in range(steps):
        batches = [next(state.data) for _ in range(loop.dmd.micro_batches_per_step(args))]
        loop._train_step(state, batches)
    for hook in hooks:
        hook.remove()
    # one T5 call per step for the captions, one each for "" and the negative prompt in the whole run
    assert len(calls) == steps + 2, f"T5 ran {len(calls)} times in {steps} steps"
    # and the cached encodings are what encoding the batch would give
    for caption in ("", args.negative_prompt):
        cached, cached_pooled = state.text.fixed(caption, 2)
        fresh, fresh_pooled = state.text([caption] * 2)
        assert cached.keys() == fresh.keys()
        for key, value in fresh.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(cached[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached_pooled, fresh_pooled, rtol=1e-5, atol=1e-6)


# -- the export's model card -----------------------------------------------------------------------
def _card_call(card_text: str) -> dict[str, Any]:
    """The keyword arguments of the ``pipe(...)`` call in the card's Python block."""
    import ast

    code = card_text.split("```python\n", 1)[1].split("```", 1)[0]
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "pipe"]
    assert len(calls) == 1, code
    return {k.arg: ast.literal_eval(k.value) for k in calls[0].keywords}


@torch.no_grad()
@pytest.mark.parametrize(
    ("model", "extra"),
    [("sd3", ["--lora-rank", "2"]), ("flux", []), ("flux", ["--tiny-flux", "schnell"])],
    ids=["sd3-lora", "flux-dev-full", "flux-schnell-full"],
)
def test_export_card_gives_the_call_that_samples_the_student_as_trained(
    model: str, extra: list, tmp_path: Path
) -> None:
    from diffusers import DiffusionPipeline

    from recipe.flow import report

    args = parse_args(FLOW, ["--preset", "tiny", "--model", model, "--output-dir", str(tmp_path), *extra])
    models = fm.load_models(args, torch.float32)
    out = report.export(SimpleNamespace(args=args, models=models), models.student)
    card = (out / "README.md").read_text()
    kwargs = _card_call(card)
    times = list(models.schedule.timesteps(args.student_steps))
    assert kwargs["num_inference_steps"] == args.student_steps == 4 and kwargs["sigmas"] == times
    assert (kwargs["height"], kwargs["width"], kwargs["max_sequence_length"]) == (
        tiny.RESOLUTION, tiny.RESOLUTION, tiny.MAX_TOKENS)  # fmt: skip
    assert f"from_pretrained({str(out)!r}" in card  # the exported pipeline folder
    # what persists in the folder: the scheduler's shift and stochastic sampling, not the call's defaults
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe.scheduler.config.stochastic_sampling
    assert pipe.scheduler.config.shift == models.pipe.scheduler.config.shift
    # the card's call runs the student's steps at its noise levels, without CFG
    pipe(
        "a cat", **kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)
    )  # fmt: skip
    want = models.schedule.sigma(torch.tensor(times, dtype=torch.float64))
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(), want, rtol=0, atol=1e-6)
    if model == "sd3":
        assert kwargs["guidance_scale"] == 1.0 and not pipe.do_classifier_free_guidance
    elif models.guidance is not None:
        assert kwargs["guidance_scale"] == models.guidance == pipe.guidance_scale
    else:
        assert "guidance_scale" not in kwargs


def test_export_card_without_a_pipeline_loads_the_base_and_the_lora(tmp_path: Path) -> None:
    args = parse_args(FLOW, [*REAL, "--model", "sd3", "--lora-rank", "4", "--output-dir", str(tmp_path)])
    models = SimpleNamespace(family="sd3", pipe=tiny.pipeline("sd3"), guidance=None,
                             schedule=fm.flow_schedule(tiny.pipeline("sd3"), 1024))  # fmt: skip
    models.transformer = models.pipe.transformer
    from recipe.flow import card

    text = card.text(args, models, tmp_path / "export")
    assert "StableDiffusion3Pipeline.from_pretrained('org/model'" in text
    assert f"pipe.load_lora_weights({str(tmp_path / 'export' / 'lora')!r})" in text
    assert _card_call(text) == {
        "num_inference_steps": 4, "sigmas": [1.0, 0.75, 0.5, 0.25], "guidance_scale": 1.0,
        "height": 1024, "width": 1024, "max_sequence_length": 256,
    }  # fmt: skip
