"""The reference recipe ``examples/add_sdxl.py`` on its ``tiny`` preset (CPU, random weights).

The runs shared by several tests come from the ``recipe_run`` fixture (``conftest.py``: once
per session, also under pytest-xdist); tests compare the files runs write. Runs that only one
test needs call the script's ``main(argv)`` in-process (imports are paid once).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("timm")
pytest.importorskip("tensorboard")

import add_sdxl  # examples/ is on pytest's pythonpath
import recipe.data
import sample_sdxl

FAST = ["--preset", "random", "--grid-seeds", "0", "--diversity-seeds", "2"]  # as conftest.recipe_run
EMA = ("--ema-decay", "0.9")
HALF = ("--max-steps", "2", "--checkpoint-every", "1", "--sample-every", "0", *EMA)  # as conftest.RUNS
README_PROMPT = "a red circle on a blue background"


def run(out: Path, *extra: str) -> add_sdxl.RunSummary:
    return add_sdxl.main([*FAST, "--output-dir", str(out), *extra])


def load_checkpoint_files(folder: Path) -> dict[str, object]:
    """Every state file of a checkpoint, loaded (the RNG pickles and the manifest aside)."""
    from safetensors.torch import load_file

    out: dict[str, object] = {"progress": json.loads((folder / "progress.json").read_text())}
    for path in sorted(folder.glob("*.pt")):
        out[path.stem] = torch.load(path, weights_only=True)
    if (folder / "model.safetensors").is_file():
        out["model"] = load_file(folder / "model.safetensors")
    return out


def assert_same(a: object, b: object, where: str = "") -> None:
    """Exact equality of nested state (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(logdir.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {logdir}"
    tags: dict[str, list[float]] = {}
    for event in events:
        acc = EventAccumulator(str(event))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return tags


@pytest.mark.slow
def test_tiny_run_writes_checkpoint_logs_grid_export_and_one_summary(recipe_run):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image
    from safetensors.torch import load_file

    out = recipe_run("straight")
    assert [p.name for p in add_sdxl.checkpoints(out)] == ["step-0000002", "step-0000004"]
    last = out / "checkpoints" / "step-0000004"
    assert (last / "manifest.json").is_file() and (last / "ema.pt").is_file()
    assert json.loads((last / "progress.json").read_text()) == {
        "step": 4, "samples": 8, "nonfinite_total": 0, "nonfinite_in_row": 0,
    }  # fmt: skip

    tags = _scalars(out / "logs")
    for tag in (
        "g/adv", "g/distill", "g/total", "d/r1", "d/logits_real", "d/logits_fake", "d/total",
        "lr/student", "lr/discriminator", "grad_norm/student", "grad_norm/discriminator",
        "images_per_second", "nonfinite/total", "diversity/feature_distance_1step",
        "diversity/feature_distance_4step",
    ):  # fmt: skip
        assert tag in tags, f"{tag} missing from TensorBoard scalars {sorted(tags)}"
    assert len(tags["g/total"]) == 4

    grid = Image.open(out / "samples" / "step-0000004.png")
    assert grid.size == (32, 2 * 2 * 32)  # one seed; rows: (1 step, 4 steps) x two prompts

    # the export holds the EMA weights (--ema-decay), as a loadable pipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "export")
    ema = torch.load(last / "ema.pt", weights_only=True)
    averaged = [v for k, v in ema.items() if k.startswith("module.")]
    trained = [v for v in pipe.unet.state_dict().values()]
    assert len(averaged) == len(trained) and all(torch.equal(a, b) for a, b in zip(averaged, trained))
    assert not all(torch.equal(a, b) for a, b in zip(load_file(last / "model.safetensors").values(), trained))
    image = pipe(
        README_PROMPT, num_inference_steps=1, guidance_scale=0.0, height=32, width=32, output_type="np"
    )
    assert image.images.shape == (1, 32, 32, 3)

    summary = (out / "stdout.txt").read_text().strip().splitlines()
    assert summary[0].startswith("add_sdxl: 4 steps (0 skipped as non-finite) in ")
    assert [line.split()[0] for line in summary[1:]] == ["checkpoint", "export", "grid", "logs", "sample"]
    assert str(last) in summary[1] and "sample_sdxl.py" in summary[-1]


@pytest.mark.slow
def test_exported_student_samples_the_readme_prompt_without_truncation(recipe_run, tmp_path, capfd):
    from PIL import Image

    out = recipe_run("straight")
    argv = [
        str(out / "export"),
        README_PROMPT,
        "--steps",
        "4",
        "--seeds",
        "0",
        "1",
        "--out",
        str(tmp_path / "s.png"),
    ]
    path = sample_sdxl.main(argv)
    assert Image.open(path).size == (2 * 32, 32)
    assert "truncated" not in capfd.readouterr().err


@pytest.mark.slow
def test_resume_equals_straight_run_optimisers_and_ema_included(recipe_run, tmp_path):
    reference = recipe_run("straight") / "checkpoints" / "step-0000004"
    shutil.copytree(recipe_run("half"), tmp_path, dirs_exist_ok=True)
    resumed = run(tmp_path, "--max-steps", "4", "--checkpoint-every", "2", "--resume", "latest", *EMA)
    assert resumed.step == 4 and resumed.checkpoint == tmp_path / "checkpoints" / "step-0000004"
    mine = load_checkpoint_files(resumed.checkpoint)
    assert {"model", "ema", "optimizer_student", "optimizer_discriminator", "discriminator"} <= mine.keys()
    assert_same(mine, load_checkpoint_files(reference))


@pytest.mark.slow
def test_crash_during_checkpoint_write_resumes_from_previous(recipe_run, tmp_path, monkeypatch):
    """A kill while step 2 is being saved: step 1 stays the newest checkpoint and resuming from it is exact."""
    import accelerate

    half = recipe_run("half") / "checkpoints"
    shutil.copytree(half / "step-0000001", tmp_path / "checkpoints" / "step-0000001")
    original = accelerate.Accelerator.save_state

    def crashing_save_state(self, output_dir=None, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")  # dies half-way through its files
        raise KeyboardInterrupt("simulated kill during checkpoint write")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", crashing_save_state)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *HALF, "--resume", "latest")
    monkeypatch.setattr(accelerate.Accelerator, "save_state", original)

    assert [p.name for p in add_sdxl.checkpoints(tmp_path)] == ["step-0000001"]
    assert (tmp_path / "checkpoints" / ".tmp-step-0000002").is_dir()  # the torn write, ignored
    resumed = run(tmp_path, *HALF, "--resume", "latest")
    assert resumed.step == 2
    assert_same(load_checkpoint_files(resumed.checkpoint), load_checkpoint_files(half / "step-0000002"))
    assert [p.name for p in add_sdxl.checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]


@pytest.mark.slow
def test_forward_nan_from_huge_lr_is_skipped_counted_and_stops_after_k_in_a_row(tmp_path):
    """``--lr 1e30``: step 1 blows the student's weights up; steps 2 and 3 go NaN in the forward pass."""
    from safetensors.torch import load_file

    argv = ["--lr", "1e30", "--max-steps", "6", "--checkpoint-every", "1", "--sample-every", "0",
            "--max-nonfinite-in-row", "2"]  # fmt: skip
    with pytest.raises(
        add_sdxl.NonFiniteLossError, match=r"2 steps in a row .*step 3.*step-0000002\) is intact"
    ):
        run(tmp_path, *argv)
    ckpt = tmp_path / "checkpoints"
    assert [p.name for p in add_sdxl.checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]
    progress = json.loads((ckpt / "step-0000002" / "progress.json").read_text())
    assert progress == {"step": 2, "samples": 4, "nonfinite_total": 1, "nonfinite_in_row": 1}
    before, after = (load_file(ckpt / f"step-000000{i}" / "model.safetensors") for i in (1, 2))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed nothing
    assert _scalars(tmp_path / "logs")["nonfinite/total"] == [0.0, 1.0, 2.0]


# -- data errors name the file ---------------------------------------------------------------
def _image(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)


def test_empty_folder_names_the_folder(tmp_path):
    with pytest.raises(recipe.data.DataError, match=f"no images .* {tmp_path}"):
        recipe.data.load_records(str(tmp_path))


def test_missing_caption_names_the_image(tmp_path):
    _image(tmp_path / "a.png")
    with pytest.raises(recipe.data.DataError, match=r"missing caption file .*a\.txt .*a\.png"):
        recipe.data.load_records(str(tmp_path))


def test_empty_caption_names_the_caption_file(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(recipe.data.DataError, match=r"empty or missing caption .*a\.txt"):
        recipe.data.load_records(str(tmp_path))


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "bad.txt").write_text("a caption")
    dataset = recipe.data.ImageCaptionDataset(recipe.data.load_records(str(tmp_path)), 16)
    with pytest.raises(recipe.data.DataError, match=r"cannot read the image .*bad\.png"):
        dataset[0]


def test_manifest_rows_and_errors(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "text": "red"}\n')
    (tmp_path / "m.csv").write_text("file_name,caption\na.png,red\nmissing.png,blue\n")
    records = recipe.data.load_records(str(tmp_path / "m.jsonl"))
    item = recipe.data.ImageCaptionDataset(records, 16)[0]
    assert item["pixels"].shape == (3, 16, 16) and item["caption"] == "red"
    assert item["original_size"].tolist() == [30, 40]
    with pytest.raises(
        recipe.data.DataError, match=r"m\.csv:3: the image file .*missing\.png does not exist"
    ):
        recipe.data.load_records(str(tmp_path / "m.csv"))
    (tmp_path / "n.jsonl").write_text('{"picture": "a.png", "text": "red"}\n')
    with pytest.raises(recipe.data.DataError, match=r"n\.jsonl:1: no image column"):
        recipe.data.load_records(str(tmp_path / "n.jsonl"))


def test_bad_data_stops_the_script_with_the_file_named(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(recipe.data.DataError, match="no images"):
        run(tmp_path / "out", "--data", str(tmp_path / "data"), "--max-steps", "1")


def test_stream_sampler_resumes_and_shards():
    full = recipe.data.StreamSampler(5, seed=3)
    stream = [i for i, _ in zip(iter(full), range(12))]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    resumed = recipe.data.StreamSampler(5, seed=3, start=7)
    assert [i for i, _ in zip(iter(resumed), range(5))] == stream[7:12]
    ranks = [recipe.data.StreamSampler(5, seed=3, rank=r, world=2) for r in (0, 1)]
    shards = [[i for i, _ in zip(iter(s), range(6))] for s in ranks]
    assert shards[0] == stream[0:12:2] and shards[1] == stream[1:12:2]
