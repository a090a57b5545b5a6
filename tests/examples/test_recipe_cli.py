"""The recipe's command line: every flag checked when parsed, paths checked before any model loads.

Option errors exit through argparse (status 2, one line naming the flag); I/O errors raise
``RecipeError`` before anything is built, printed by the script as one ``add_sdxl: error:``
line (status 1), like the data errors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

import add_sdxl  # examples/ is on pytest's pythonpath
from recipe.args import RecipeError, check_paths
from add_sdxl import parse_args
from recipe import loop

ROOT = Path(__file__).resolve().parents[2]

BAD = [
    (["--gradient-accumulation", "0"], "--gradient-accumulation: must be >= 1, got 0"),
    (["--max-steps", "0"], "--max-steps: must be >= 1"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--batch-size", "two"], "--batch-size: expected an integer, got 'two'"),
    (["--checkpoint-every", "-1"], r"--checkpoint-every: must be >= 0 \(0 = never\)"),
    (["--log-every", "-2"], r"--log-every: must be >= 0 \(0 = never\)"),
    (["--sample-every", "-1"], "--sample-every: must be >= 0"),
    (["--checkpoints-keep", "-1"], r"--checkpoints-keep: must be >= 0 \(0 = keep all\)"),
    (["--r1-interval", "0"], "--r1-interval: must be >= 1"),
    (["--max-nonfinite-in-row", "0"], "--max-nonfinite-in-row: must be >= 1"),
    (["--resolution", "4"], "--resolution: must be >= 8"),
    (["--num-workers", "-1"], "--num-workers: must be >= 0"),
    (["--warmup-steps", "-1"], "--warmup-steps: must be >= 0"),
    (["--lora-rank", "-4"], "--lora-rank: must be >= 0"),
    (["--dinov2-resolution", "7"], "--dinov2-resolution: must be >= 14"),
    (["--grid-seeds", "0", "-1"], "--grid-seeds: must be >= 0"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--student-timesteps", "-5"], "--student-timesteps: must be >= 0"),
    (["--student-timesteps", "999", "999"], "--student-timesteps must be distinct"),
    (["--lr", "0"], r"--lr: must be in \(0, inf\], got 0"),
    (["--lr", "nan"], "--lr: must be a finite number, got 'nan'"),
    (["--lr-d=-1e-4"], r"--lr-d: must be in \(0, inf\]"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--lambda-distill", "-1"], r"--lambda-distill: must be in \[0, inf\]"),
    (["--guidance-scale", "-1"], "--guidance-scale: must be in"),
    (["--weight-decay", "-0.1"], "--weight-decay: must be in"),
    (["--max-grad-norm", "0"], r"--max-grad-norm: must be in \(0, inf\]"),
    (["--ema-decay", "1"], r"--ema-decay: must be in \[0, 1\), got 1"),
    (["--adam-betas-d", "0", "1"], r"--adam-betas-d: must be in \[0, 1\)"),
    (["--r1-gamma", "-1"], "--r1-gamma: must be in"),
    (["--adversarial-loss", "wasserstein"], "--adversarial-loss: invalid choice: 'wasserstein'"),
    (["--r1-placement", "everywhere"], "--r1-placement: invalid choice"),
    (["--r1-placement", "none", "--r1-gamma", "1"], "--r1-gamma has no effect with --r1-placement none"),
    (["--diversity-seeds", "1"], "--diversity-seeds must be 0 .off. or at least 2"),
    (["--teacher-taps", "mid_block"], "--teacher-taps needs --discriminator teacher"),
    (["--discriminator", "teacher"], "--discriminator teacher works on latents: use --distill-space latent"),
    (["--fsdp", "--ema-decay", "0.9"], "--fsdp does not support --ema-decay"),
    (["--fsdp", "--lora-rank", "4"], "--fsdp does not support --lora-rank"),
    (["--fsdp", "--mixed-precision", "fp16"], "--fsdp does not support --mixed-precision fp16"),
    (["--debug-nonfinite-at", "x"], "--debug-nonfinite-at: expected STEP or STEP:RANK"),
    (["--debug-nonfinite-at", "9"], "--debug-nonfinite-at: steps must lie in 1..4"),
    (["--pretrained", "x", "--preset", "random"], "--preset random brings its own models"),
    (["--preset", "none"], "--preset none needs --pretrained"),
    (["--pretrained", "org/model"], "--data is required with --pretrained"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_are_refused_when_parsed_naming_the_flag(argv, message, capsys):
    preset = [] if {"--preset", "--pretrained"} & set(argv) else ["--preset", "random"]  # 4 steps
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*preset, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("add_sdxl.py: error: ") and re.search(message, err), err


def test_zero_means_never_and_the_library_defaults_stay_unset(tmp_path):
    args = parse_args(["--checkpoint-every", "0", "--log-every", "0", "--sample-every", "0"])
    assert (args.checkpoint_every, args.log_every, args.sample_every) == (0, 0, 0)
    assert loop._due(5, 0, 5) is False and loop._due(4, 2, 5) and loop._due(5, 2, 5)
    args = parse_args([])
    assert args.r1_gamma is None and args.student_timesteps is None  # the library decides


@pytest.mark.parametrize(("placement", "gamma"), [("features", 1e-5), ("approximate", 100.0), ("none", 0.0)])
def test_r1_gamma_defaults_to_the_placements_own(placement, gamma, tmp_path):
    from recipe.sdxl.models import build_discriminator, load_models

    args = parse_args(["--output-dir", str(tmp_path), "--r1-placement", placement])
    models = load_models(args)
    objective = loop._objective(add_sdxl.SDXL, args, models, build_discriminator(args, models), None)
    assert objective.r1_gamma == gamma
    assert objective.student_timesteps.tolist() == [999, 749, 499, 249]


def test_missing_data_folder_is_found_before_any_model_is_built(tmp_path, monkeypatch):
    def no_models(args):
        raise AssertionError("models were built")

    monkeypatch.setattr("recipe.sdxl.models.load_models", no_models)
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(RecipeError, match=f"--data {missing}: no such folder or file"):
        add_sdxl.main(["--data", str(missing), "--output-dir", str(tmp_path / "out")])


@pytest.mark.parametrize("where", ["output", "checkpoints"])
def test_unwritable_output_or_checkpoint_folder_is_refused_naming_it(where, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # refused even for root, unlike permission bits
    out = blocker / "out" if where == "output" else tmp_path / "out"
    if where == "checkpoints":
        out.mkdir()
        (out / "checkpoints").write_text("not a folder")
    flag = "--output-dir" if where == "output" else r"--output-dir \(its checkpoints folder\)"
    with pytest.raises(RecipeError, match=f"{flag}: cannot write to the folder "):
        check_paths(parse_args(["--output-dir", str(out)]))


def test_missing_resume_folder_and_weights_are_refused(tmp_path):
    args = parse_args(["--output-dir", str(tmp_path), "--resume", str(tmp_path / "nope")])
    with pytest.raises(RecipeError, match=r"--resume .*nope: no such checkpoint folder"):
        check_paths(args)
    args = parse_args(["--output-dir", str(tmp_path), "--dinov2-weights", str(tmp_path / "w.pt")])
    with pytest.raises(RecipeError, match=r"--dinov2-weights .*w\.pt: no such file"):
        check_paths(args)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--data", "{tmp}/images"], "--data {tmp}/images: no such folder or file"),
        (
            ["--mixed-precision", "fp16"],
            "--mixed-precision fp16 needs a GPU (on the CPU accelerate trains in float32)",
        ),
    ],
    ids=["missing --data", "fp16 on the CPU"],
)
def test_script_reports_an_error_as_one_line(argv, line, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    script = str(ROOT / "examples" / "add_sdxl.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(
        [sys.executable, script, *argv, "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"add_sdxl: error: {line.format(tmp=tmp_path)}")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
def test_r1_none_accumulation_and_never_checkpoint_or_log_run(tmp_path):
    """``--r1-placement none`` used to fail; ``--checkpoint-every 0`` / ``--log-every 0`` divided by zero after step 1."""
    summary = add_sdxl.main([
        "--output-dir", str(tmp_path), "--max-steps", "1", "--r1-placement", "none",
        "--adversarial-loss", "non_saturating", "--gradient-accumulation", "2",
        "--checkpoint-every", "0", "--log-every", "0", "--sample-every", "0", "--no-export-pipeline",
    ])  # fmt: skip
    assert summary.step == 1 and summary.nonfinite_total == 0 and summary.checkpoint is None
    assert add_sdxl.checkpoints(tmp_path) == [] and (tmp_path / "export" / "unet").is_dir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for event in (tmp_path / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event))
        accumulator.Reload()
        assert accumulator.Tags()["scalars"] == []  # --log-every 0: no scalars
