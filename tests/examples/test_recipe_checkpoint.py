"""Checkpoints are complete or absent: verified on load, refused with the folder named, ``latest`` falls back.

The checkpoints come from the shared ``half`` run (``conftest.RUNS``); each test damages a
copy. The refusals happen before any model is built (``setup`` resolves ``--resume`` first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

import add_sdxl  # examples/ is on pytest's pythonpath
from recipe.args import RecipeError
from recipe.checkpoint import expected_files, problem, resolve_resume


@pytest.fixture
def out(recipe_run, tmp_path) -> Path:
    """A copy of the ``half`` run's output: checkpoints step-0000001 and step-0000002."""
    shutil.copytree(recipe_run("half") / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


def step(out: Path, n: int) -> Path:
    return out / "checkpoints" / f"step-{n:07d}"


def test_a_complete_checkpoint_lists_every_file_with_its_size(out):
    folder = step(out, 2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["layout"] == {
        "processes": 1, "fsdp": False, "ema": True, "lora": False, "scaler": False, "fake_score": False,
    }  # fmt: skip
    assert set(expected_files(manifest["layout"])) <= set(manifest["files"])
    assert "random_states_0.pkl" in manifest["files"] and problem(folder) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda f: (f / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
        (
            lambda f: (f / "model.safetensors").write_bytes(b"trunc"),
            r"model.safetensors has 5 bytes, \d+ were written",
        ),
        (lambda f: (f / "ema.pt").write_bytes(b""), r"ema.pt has 0 bytes"),
        (lambda f: (f / "manifest.json").unlink(), r"no manifest.json \(its save did not finish\)"),
        (lambda f: (f / "manifest.json").write_text("{"), "manifest.json is damaged"),
    ],
    ids=["missing RNG state", "truncated model", "empty EMA", "no manifest", "damaged manifest"],
)
def test_a_damaged_checkpoint_is_refused_naming_the_folder(out, damage, reason):
    folder = step(out, 2)
    damage(folder)
    with pytest.raises(RecipeError, match=f"--resume {folder}: not a complete checkpoint: {reason}"):
        resolve_resume(str(folder), out)


def test_an_empty_checkpoint_folder_is_refused_before_any_model_is_built(out, monkeypatch):
    def no_models(args):
        raise AssertionError("models were built")

    monkeypatch.setattr("recipe.sdxl.models.load_models", no_models)
    empty = out / "checkpoints" / "step-0000009"
    empty.mkdir()
    with pytest.raises(RecipeError, match=f"--resume {empty}: not a complete checkpoint: no manifest"):
        add_sdxl.main(["--output-dir", str(out), "--resume", str(empty)])


def test_latest_falls_back_to_the_newest_complete_checkpoint_and_says_so(out):
    (step(out, 2) / "random_states_0.pkl").unlink()
    said: list[str] = []
    assert resolve_resume("latest", out, said.append) == step(out, 1)
    skipped = f"skipping {step(out, 2)} (random_states_0.pkl is missing)"
    assert said == [f"add_sdxl: --resume latest: {skipped}; resuming from {step(out, 1)}"]


def test_latest_without_a_complete_checkpoint_is_refused(out, tmp_path):
    for n in (1, 2):
        (step(out, n) / "manifest.json").unlink()
    with pytest.raises(
        RecipeError, match=r"--resume latest: no complete checkpoint in .*skipping .*step-0000002"
    ):
        resolve_resume("latest", out)
    with pytest.raises(RecipeError, match="--resume latest: no checkpoint in "):
        resolve_resume("latest", tmp_path / "elsewhere")


def test_resuming_with_another_setup_is_refused_before_any_model_is_built(out, monkeypatch):
    def no_models(args):
        raise AssertionError("models were built")

    monkeypatch.setattr("recipe.sdxl.models.load_models", no_models)
    with pytest.raises(
        RecipeError, match=f"--resume {step(out, 2)}: it was written with --ema-decay; resume with"
    ):
        add_sdxl.main(["--preset", "random", "--output-dir", str(out), "--resume", "latest", "--max-steps", "3"])
    with pytest.raises(RecipeError, match="it was written without --lora-rank"):
        add_sdxl.main(
            ["--preset", "random", "--output-dir", str(out), "--resume", "latest", "--ema-decay", "0.9",
             "--lora-rank", "4"]
        )  # fmt: skip
