"""The reference recipe ``examples/add_sdxl.py`` on its ``tiny`` preset (CPU, random weights).

Runs call the script's ``main(argv)`` in-process (imports are paid once); the two-process run
goes through ``accelerate launch`` in a subprocess.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("timm")
pytest.importorskip("tensorboard")

ROOT = Path(__file__).resolve().parents[2]

import add_sdxl  # examples/ is on pytest's pythonpath
import add_sdxl_data
import sample_sdxl

FAST = ["--preset", "tiny", "--grid-seeds", "0", "--diversity-seeds", "2", "--checkpoint-every", "2"]


def run(out: Path, *extra: str) -> dict:
    return add_sdxl.main([*FAST, "--output-dir", str(out), *extra])


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Four steps in one go: the reference for the resume test."""
    out = tmp_path_factory.mktemp("straight")
    return out, run(out, "--max-steps", "4")


@pytest.fixture(scope="module")
def half(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The first two of those steps, in a run that stops there (checkpoint at step 2)."""
    out = tmp_path_factory.mktemp("half")
    return out, run(out, "--max-steps", "2", "--sample-every", "0")


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
def test_tiny_run_writes_checkpoint_logs_grid_and_loadable_export(straight):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    out, summary = straight
    assert summary["step"] == 4 and summary["nonfinite_total"] == 0
    assert [p.name for p in add_sdxl.checkpoints(out)] == ["step-0000002", "step-0000004"]
    assert (out / "checkpoints" / "step-0000004" / "model.safetensors").is_file()

    tags = _scalars(out / "logs")
    for tag in (
        "g/adv",
        "g/distill",
        "g/total",
        "d/r1",
        "d/logits_real",
        "d/logits_fake",
        "d/total",
        "lr/student",
        "lr/discriminator",
        "images_per_second",
        "nonfinite/total",
        "diversity/feature_distance_1step",
        "diversity/feature_distance_4step",
    ):
        assert tag in tags, f"{tag} missing from TensorBoard scalars {sorted(tags)}"
    assert len(tags["g/total"]) == 4

    grid = Image.open(out / "samples" / "step-0000004.png")
    assert grid.size == (32, 2 * 2 * 32)  # one seed; rows: (1 step, 4 steps) x two prompts

    pipe = StableDiffusionXLPipeline.from_pretrained(out / "export")
    assert_same_weights(pipe.unet, summary["student"])
    image = pipe(
        "a red circle", num_inference_steps=1, guidance_scale=0.0, height=32, width=32, output_type="np"
    ).images
    assert image.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_exported_student_samples_with_addkit_sampler(straight, tmp_path):
    from PIL import Image

    out, _ = straight
    path = sample_sdxl.main(
        [
            str(out / "export"),
            "a red circle",
            "--steps",
            "4",
            "--seeds",
            "0",
            "1",
            "--out",
            str(tmp_path / "s.png"),
        ]
    )
    assert Image.open(path).size == (2 * 32, 32)


@pytest.mark.slow
def test_resume_equals_straight_run(straight, half):
    _, reference = straight
    out, first = half
    assert first["step"] == 2
    resumed = run(out, "--max-steps", "4", "--resume", "latest", "--sample-every", "0")
    assert resumed["step"] == 4
    assert_same_weights(resumed["student"], reference["student"])
    assert_same_weights(resumed["discriminator"], reference["discriminator"])


@pytest.mark.slow
def test_crash_during_checkpoint_write_resumes_from_previous(half, tmp_path, monkeypatch):
    import accelerate

    _, reference = half
    original = accelerate.Accelerator.save_state
    calls = []

    def crashing_save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the step-2 save dies half-way through its files
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt("simulated kill during checkpoint write")
        return original(self, output_dir, **kwargs)

    argv = ["--max-steps", "2", "--checkpoint-every", "1", "--sample-every", "0"]
    monkeypatch.setattr(accelerate.Accelerator, "save_state", crashing_save_state)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *argv)
    monkeypatch.setattr(accelerate.Accelerator, "save_state", original)

    assert [p.name for p in add_sdxl.checkpoints(tmp_path)] == ["step-0000001"]
    assert (tmp_path / "checkpoints" / ".tmp-step-0000002").is_dir()  # the torn write, ignored
    resumed = run(tmp_path, *argv, "--resume", "latest")
    assert resumed["step"] == 2
    assert_same_weights(resumed["student"], reference["student"])
    assert_same_weights(resumed["discriminator"], reference["discriminator"])
    assert [p.name for p in add_sdxl.checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]


@pytest.mark.slow
def test_nonfinite_loss_is_skipped_counted_and_stops_after_k_in_a_row(tmp_path):
    from safetensors.torch import load_file

    argv = [
        "--max-steps",
        "6",
        "--checkpoint-every",
        "1",
        "--sample-every",
        "0",
        "--max-nonfinite-in-row",
        "2",
        "--debug-nonfinite-at",
        "2",
        "3",
    ]
    with pytest.raises(
        add_sdxl.NonFiniteLossError, match=r"2 steps in a row .*step 3.*step-0000002.* intact"
    ):
        run(tmp_path, *argv)
    ckpt = tmp_path / "checkpoints"
    assert [p.name for p in add_sdxl.checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]
    progress = torch.load(ckpt / "step-0000002" / "custom_checkpoint_0.pkl", weights_only=False)
    assert progress == {"step": 2, "samples": 4, "nonfinite_total": 1, "nonfinite_in_row": 1}
    before, after = (load_file(ckpt / f"step-000000{i}" / "model.safetensors") for i in (1, 2))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed nothing
    assert _scalars(tmp_path / "logs")["nonfinite/total"] == [0.0, 1.0, 2.0]


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process (multi-CPU goes through mpirun);
    # `--multi_gpu` starts two through torchrun, and ACCELERATE_USE_CPU=1 makes them gloo CPU ranks.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(ROOT / "examples" / "add_sdxl.py"),
        "--preset",
        "tiny",
        "--max-steps",
        "2",
        "--output-dir",
        str(tmp_path),
        "--grid-seeds",
        "0",
        "--diversity-seeds",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(
        cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [p.name for p in add_sdxl.checkpoints(tmp_path)] == ["step-0000002"]
    assert (tmp_path / "checkpoints" / "step-0000002" / "random_states_1.pkl").is_file()
    assert (tmp_path / "export" / "unet" / "config.json").is_file()


# -- data errors name the file ---------------------------------------------------------------
def _image(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)


def test_empty_folder_names_the_folder(tmp_path):
    with pytest.raises(add_sdxl_data.DataError, match=f"no images .* {tmp_path}"):
        add_sdxl_data.load_records(str(tmp_path))


def test_missing_caption_names_the_image(tmp_path):
    _image(tmp_path / "a.png")
    with pytest.raises(add_sdxl_data.DataError, match=r"missing caption file .*a\.txt .*a\.png"):
        add_sdxl_data.load_records(str(tmp_path))


def test_empty_caption_names_the_caption_file(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(add_sdxl_data.DataError, match=r"empty or missing caption .*a\.txt"):
        add_sdxl_data.load_records(str(tmp_path))


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "bad.txt").write_text("a caption")
    dataset = add_sdxl_data.ImageCaptionDataset(add_sdxl_data.load_records(str(tmp_path)), 16)
    with pytest.raises(add_sdxl_data.DataError, match=r"cannot read the image .*bad\.png"):
        dataset[0]


def test_manifest_rows_and_errors(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "text": "red"}\n')
    (tmp_path / "m.csv").write_text("file_name,caption\na.png,red\nmissing.png,blue\n")
    records = add_sdxl_data.load_records(str(tmp_path / "m.jsonl"))
    item = add_sdxl_data.ImageCaptionDataset(records, 16)[0]
    assert item["pixels"].shape == (3, 16, 16) and item["caption"] == "red"
    assert item["original_size"].tolist() == [30, 40]
    with pytest.raises(
        add_sdxl_data.DataError, match=r"m\.csv:3: the image file .*missing\.png does not exist"
    ):
        add_sdxl_data.load_records(str(tmp_path / "m.csv"))
    (tmp_path / "n.jsonl").write_text('{"picture": "a.png", "text": "red"}\n')
    with pytest.raises(add_sdxl_data.DataError, match=r"n\.jsonl:1: no image column"):
        add_sdxl_data.load_records(str(tmp_path / "n.jsonl"))


def test_bad_data_stops_the_script_with_the_file_named(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(add_sdxl_data.DataError, match="no images"):
        run(tmp_path / "out", "--data", str(tmp_path / "data"), "--max-steps", "1")


def test_stream_sampler_resumes_and_shards():
    full = add_sdxl_data.StreamSampler(5, seed=3)
    stream = [i for i, _ in zip(iter(full), range(12))]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    resumed = add_sdxl_data.StreamSampler(5, seed=3, start=7)
    assert [i for i, _ in zip(iter(resumed), range(5))] == stream[7:12]
    ranks = [add_sdxl_data.StreamSampler(5, seed=3, rank=r, world=2) for r in (0, 1)]
    shards = [[i for i, _ in zip(iter(s), range(6))] for s in ranks]
    assert shards[0] == stream[0:12:2] and shards[1] == stream[1:12:2]
