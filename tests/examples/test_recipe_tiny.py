"""The recipe's default, ``--preset tiny``: the tiny world's shipped teacher distilled, then scored.

A short run checks the plumbing and the report's schema; the slow test runs the README's
command as shipped and checks what the README says it shows (ADD's one-step student beats the
teacher's one step).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("timm")

import add_sdxl
import tiny_world
from add_sdxl import parse_args

METRICS = {"prompt_accuracy", "fd", "diversity"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _run(out: Path, *argv: str) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        add_sdxl.main(["--output-dir", str(out), *argv])
    return stdout.getvalue()


def test_default_preset_is_the_tiny_world_with_its_tuned_settings(tmp_path: Path) -> None:
    args = parse_args(["--output-dir", str(tmp_path)])
    assert args.preset == "tiny"
    for key, value in tiny_world.DEFAULTS.items():
        assert getattr(args, key) == value, key
    assert args.augment is False and args.export_pipeline is True
    assert args.checkpoint_every == args.sample_every == args.max_steps
    mine = parse_args(["--output-dir", str(tmp_path), "--max-steps", "7", "--augment", "--lr", "3e-5"])
    assert (mine.max_steps, mine.augment, mine.lr) == (7, True, 3e-5)  # flags given win over the preset
    assert parse_args(["--preset", "random", "--output-dir", str(tmp_path)]).augment is True


def _readme_sample_prompt() -> str:
    """The prompt of the README's ``sample_sdxl.py outputs/tiny/export "..."`` command."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    match = re.search(r'sample_sdxl\.py outputs/tiny/export "([^"]+)"', readme)
    assert match, "the README's sample command is gone"
    return match.group(1)


def test_short_default_run_writes_the_report(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    text = _run(tmp_path, "--max-steps", "2")
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"teacher", "student", "real"}
    assert set(report["teacher"]) == {"1", "4", "25"} and set(report["student"]) == {"1", "4"}
    for row in [*report["teacher"].values(), *report["student"].values(), report["real"]]:
        assert set(row) == METRICS and all(math.isfinite(v) for v in row.values())
        assert 0.0 <= row["prompt_accuracy"] <= 1.0 and row["fd"] >= 0.0
    # the frozen teacher's scores are the ones stored beside the shipped weights
    stored = json.loads((tiny_world.WEIGHTS / "teacher_scores.json").read_text())["teacher"]
    assert report["teacher"] == stored
    assert report["real"]["prompt_accuracy"] > 0.9  # the evaluation classifier reads real images
    from PIL import Image

    width, height = Image.open(tmp_path / "comparison.png").size
    assert (width, height) == (5 * (3 * 32 + 2) + 2, 8 * (3 * 32 + 2) + 2)  # 5 columns, 8 held-out captions
    for name in ("teacher 25 steps", "student 1 step", "report.json", "comparison.png"):
        assert name in text
    assert (tmp_path / "export" / "model_index.json").is_file()
    assert (tmp_path / "samples" / "step-0000002.png").is_file()
    # the README's sample command on the export: a caption of the world, not truncated
    import sample_sdxl

    prompt = _readme_sample_prompt()
    assert tiny_world.parse_caption(prompt)
    capfd.readouterr()
    path = sample_sdxl.main([str(tmp_path / "export"), prompt, "--steps", "1", "--out", str(tmp_path / "s.png")])
    assert Image.open(path).size == (32, 32)
    assert "truncated" not in capfd.readouterr().err
    assert list((tmp_path / "tiny_data").glob("*.txt"))
    captions = {p.read_text().strip() for p in (tmp_path / "tiny_data").glob("*.txt")}
    assert not captions & set(tiny_world.HELD_OUT_CAPTIONS)  # held-out captions never trained on


def test_stored_teacher_scores_match_a_fresh_evaluation() -> None:
    parts = tiny_world.load_parts()
    evaluator = tiny_world.Evaluator(parts, tiny_world.load_classifier())
    stored = tiny_world.stored_teacher_scores(evaluator)
    assert stored is not None, (
        "teacher_scores.json does not match the weights: python -m tiny_world.train scores"
    )
    fresh = tiny_world.teacher_scores(parts.unet, evaluator)
    for steps, row in stored.items():
        for metric, value in row.items():
            assert fresh[steps][metric] == pytest.approx(value, rel=1e-3, abs=1e-3), (steps, metric)


@pytest.mark.slow
def test_readme_default_run_beats_the_teachers_one_step(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    _run(tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    teacher, student = report["teacher"]["1"], report["student"]
    assert student["1"]["prompt_accuracy"] >= teacher["prompt_accuracy"] + 0.2, report
    assert student["1"]["fd"] <= teacher["fd"] / 2, report
    assert student["4"]["prompt_accuracy"] >= student["1"]["prompt_accuracy"], report
    assert student["4"]["fd"] <= student["1"]["fd"], report
