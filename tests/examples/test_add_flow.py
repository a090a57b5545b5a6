"""The flow recipe ``examples/add_flow.py`` on its tiny presets (CPU, random SD3 and Flux models).

Runs call the script's ``main(argv)`` in-process and are shared through module-scoped fixtures:

- ``sd3_lora``: SD3, LADD (teacher features, default), LoRA, EMA, real data, 4 steps: checkpoints,
  TensorBoard scalars, grid, LoRA + pipeline export (loads with ``from_pretrained`` and
  ``load_lora_weights``; the exported pipeline samples as addkit's fresh sampler does);
- ``sd3_lora_half``: its first 2 steps; resumed to 4 it equals ``sd3_lora`` bit for bit;
- ``flux_full``: Flux (guidance-distilled form), ADD (DINOv2 on decoded images, distillation
  loss), a full fine-tune, teacher-synthesised data: export loads with ``FluxPipeline``;
- the non-finite skip, and (``slow``) two processes, a crash during a checkpoint write, and one
  short run per remaining flag.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")
pytest.importorskip("timm")
pytest.importorskip("tensorboard")

import add_flow  # examples/ is on pytest's pythonpath
import recipe.flow.tiny as tiny
import recipe.checkpoint
import sample_flow
from addkit import wrap
from addkit.sampling import sample

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--grid-seeds", "0", "--diversity-seeds", "2"]
SIZE = {"height": tiny.RESOLUTION, "width": tiny.RESOLUTION, "max_sequence_length": tiny.MAX_TOKENS}


def run(out: Path, *extra: str) -> dict:
    return add_flow.main([*FAST, "--output-dir", str(out), *extra])


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list[float]] = {}
    for event in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return tags


SD3_LORA = ["--model", "sd3", "--lora-rank", "4", "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def sd3_lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sd3_lora")
    return out, run(out, *SD3_LORA, "--max-steps", "4")


@pytest.fixture(scope="module")
def sd3_lora_half(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sd3_lora_half")
    return out, run(out, *SD3_LORA, "--max-steps", "2", "--sample-every", "0", "--no-export-pipeline")


@pytest.fixture(scope="module")
def flux_full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("flux_full")
    extra = ["--model", "flux", "--discriminator", "dinov2", "--data-source", "teacher", "--max-steps", "2"]
    return out, run(out, *extra, "--sample-every", "2")


def test_sd3_lora_ladd_run_writes_checkpoints_logs_grid(sd3_lora: Any) -> None:
    from PIL import Image

    out, summary = sd3_lora
    assert summary.step == 4 and summary.nonfinite_total == 0
    assert [p.name for p in recipe.checkpoint.checkpoints(out)] == ["step-0000002", "step-0000004"]
    folder = out / "checkpoints" / "step-0000004"
    assert recipe.checkpoint.problem(folder) is None  # complete, as its manifest says
    from safetensors.torch import load_file

    saved = load_file(folder / add_flow.MODEL_FILE)  # the adapters only, not the base again
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    tags = scalars(out / "logs")
    for tag in (
        "g/adv",
        "g/total",
        "d/r1",
        "d/logits_real",
        "d/logits_fake",
        "d/total",
        "d/real_acc",
        "lr/student",
        "grad_norm/student",
        "nonfinite/total",
        "images_per_second",
        "diversity/feature_distance_1step",
        "diversity/feature_distance_4step",
    ):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert "g/distill" not in tags  # LADD: adversarial only by default
    assert len(tags["g/total"]) == 4
    grid = Image.open(out / "samples" / "step-0000004.png")
    assert grid.size == (tiny.RESOLUTION, 2 * 2 * tiny.RESOLUTION)  # one seed; (1, 4 steps) x two prompts


@torch.no_grad()
def test_sd3_lora_export_loads_and_samples_like_addkit(sd3_lora: Any, tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    out, summary = sd3_lora
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "export")
    assert pipe.scheduler.config.stochastic_sampling  # ADD's fresh re-noising
    base = tiny.pipeline("sd3")  # the same seed: the student's base
    base.load_lora_weights(out / "export" / "lora")
    ema = summary.ema
    assert ema is not None
    schedule = summary.models.schedule
    latents = torch.randn(1, 4, tiny.RESOLUTION // 2, tiny.RESOLUTION // 2)
    cond = {"encoder_hidden_states": torch.randn(1, 7, 32), "pooled_projections": torch.randn(1, 32)}
    fused, lora = (wrap(p.transformer, schedule, "flow") for p in (pipe, base))
    torch.testing.assert_close(
        fused.x0(latents, 0.75, **cond), lora.x0(latents, 0.75, **cond), rtol=1e-5, atol=1e-5
    )
    # the exported pipeline, given the student's times as sigmas, samples as sample(renoise="fresh")
    timesteps = schedule.timesteps(4)
    torch.manual_seed(3)
    want = pipe(
        "a cat",
        num_inference_steps=4,
        sigmas=list(timesteps),
        guidance_scale=1.0,
        latents=latents,
        output_type="latent",
        **SIZE,
    ).images
    torch.manual_seed(3)  # the scheduler draws its re-noising noise from the global generator, one per step
    noises = [torch.randn(latents.shape) for _ in timesteps][:-1]
    embeds, _, pooled, _ = pipe.encode_prompt(
        "a cat", None, None, do_classifier_free_guidance=False, max_sequence_length=tiny.MAX_TOKENS
    )
    got = sample(
        fused,
        latents,
        schedule=schedule,
        timesteps=timesteps,
        renoise="fresh",
        noises=noises,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    path = sample_flow.main(
        [
            str(out / "export"),
            "a red circle",
            "--steps",
            "4",
            "--seeds",
            "0",
            "1",
            "--max-sequence-length",
            str(tiny.MAX_TOKENS),
            "--out",
            str(tmp_path / "s.png"),
        ]
    )
    from PIL import Image

    assert Image.open(path).size == (2 * tiny.RESOLUTION, tiny.RESOLUTION)


def test_resume_equals_straight_run(sd3_lora: Any, sd3_lora_half: Any) -> None:
    _, reference = sd3_lora
    out, first = sd3_lora_half
    assert first.step == 2
    resumed = run(
        out,
        *SD3_LORA,
        "--max-steps",
        "4",
        "--resume",
        "latest",
        "--sample-every",
        "0",
        "--no-export-pipeline",
    )
    assert resumed.step == 4
    assert_same_weights(resumed.student, reference.student)
    assert_same_weights(resumed.discriminator, reference.discriminator)
    assert_same_weights(resumed.ema, reference.ema)


def test_flux_full_add_on_teacher_data_exports_a_flux_pipeline(flux_full: Any, tmp_path: Path) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    out, summary = flux_full
    assert summary.step == 2 and summary.nonfinite_total == 0
    assert summary.models.guidance == 3.5  # the guidance-distilled teacher and student take it
    tags = scalars(out / "logs")
    assert "g/distill" in tags and "g/adv" in tags  # ADD: adversarial + distillation
    pipe = FluxPipeline.from_pretrained(out / "export")
    assert_same_weights(pipe.transformer, summary.student)
    assert_same_weights(
        FluxTransformer2DModel.from_pretrained(out / "export" / "transformer"), summary.student
    )
    latents = FluxPipeline._pack_latents(torch.randn(1, 4, 16, 16), 1, 4, 16, 16)
    images = pipe("a cat", num_inference_steps=1, latents=latents, output_type="np", **SIZE).images
    assert images.shape == (1, tiny.RESOLUTION, tiny.RESOLUTION, 3)
    path = sample_flow.main(
        [
            str(out / "export"),
            "a cat",
            "--steps",
            "2",
            "--resolution",
            str(tiny.RESOLUTION),
            "--max-sequence-length",
            str(tiny.MAX_TOKENS),
            "--out",
            str(tmp_path / "f.png"),
        ]
    )
    assert path.is_file()


def test_nonfinite_steps_are_skipped_counted_and_stop_after_k_in_a_row(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    argv = [
        "--model",
        "sd3",
        "--lora-rank",
        "2",
        "--max-steps",
        "5",
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
        add_flow.NonFiniteLossError, match=r"2 steps in a row .*step 3.*step-0000002.* intact"
    ):
        run(tmp_path, *argv)
    ckpt = tmp_path / "checkpoints"
    assert [p.name for p in recipe.checkpoint.checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]
    progress = json.loads((ckpt / "step-0000002" / "progress.json").read_text())
    assert progress == {"step": 2, "samples": 4, "nonfinite_total": 1, "nonfinite_in_row": 1}
    before, after = (load_file(ckpt / f"step-000000{i}" / add_flow.MODEL_FILE) for i in (1, 2))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert scalars(tmp_path / "logs")["nonfinite/total"] == [0.0, 1.0, 2.0]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        add_flow.parse_args(["--discriminator", "teacher", "--distill-space", "pixel"])
    with pytest.raises(SystemExit):
        add_flow.parse_args(["--model", "flux", "--synth-guidance-scale", "5"])
    with pytest.raises(SystemExit):
        add_flow.parse_args(["--preset", "none"])


# -- slow: distribution, crash safety, the remaining flags -------------------------------------
def _launch(tmp_path: Path, launch: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch <launch> examples/add_flow.py <argv>`` in a fresh process on CPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = str(ROOT / "examples" / "add_flow.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1",
           "--dynamo_backend", "no", "--main_process_port", str(port), script, *argv,
           "--output-dir", str(tmp_path), *FAST]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(
        cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tmp_path: Path) -> None:
    # accelerate 1.x: `--multi_gpu` starts two processes through torchrun; ACCELERATE_USE_CPU=1 makes
    # them gloo CPU ranks
    launch = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]
    proc = _launch(tmp_path, launch, ["--model", "flux", "--lora-rank", "4", "--max-steps", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [p.name for p in recipe.checkpoint.checkpoints(tmp_path)] == ["step-0000002"]
    assert (tmp_path / "checkpoints" / "step-0000002" / "random_states_1.pkl").is_file()
    assert (tmp_path / "export" / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_bf16_mixed_precision_lora(tmp_path: Path) -> None:
    """In its own process: accelerate fixes the mixed precision once per process."""
    launch = ["--num_processes", "1", "--mixed_precision", "bf16"]
    argv = ["--model", "sd3", "--mixed-precision", "bf16", "--lora-rank", "4", "--max-steps", "2",
            "--sample-every", "2"]  # fmt: skip
    proc = _launch(tmp_path, launch, argv)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "samples" / "step-0000002.png").is_file()
    assert (tmp_path / "export" / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_crash_during_checkpoint_write_resumes_from_previous(tmp_path: Path, monkeypatch: Any) -> None:
    import accelerate

    argv = [
        "--model",
        "flux",
        "--max-steps",
        "2",
        "--checkpoint-every",
        "1",
        "--sample-every",
        "0",
        "--no-export-pipeline",
    ]
    reference = run(tmp_path / "reference", *argv)
    original, calls = accelerate.Accelerator.save_state, []

    def crashing_save_state(self: Any, output_dir: Any = None, **kwargs: Any) -> Any:
        calls.append(output_dir)
        if len(calls) == 2:  # the step-2 save dies half-way through its files
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt("simulated kill during checkpoint write")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", crashing_save_state)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crash", *argv)
    monkeypatch.setattr(accelerate.Accelerator, "save_state", original)
    assert [p.name for p in recipe.checkpoint.checkpoints(tmp_path / "crash")] == ["step-0000001"]
    resumed = run(tmp_path / "crash", *argv, "--resume", "latest")
    assert resumed.step == 2
    assert_same_weights(resumed.student, reference.student)
    assert_same_weights(resumed.discriminator, reference.discriminator)


FLAGS = {  # name -> add_flow.py arguments
    "flux-schnell-lora": "--model flux --tiny-flux schnell --lora-rank 4",
    "sd3-teacher-data-cfg": "--model sd3 --data-source teacher --synth-guidance-scale 4",
    "sd3-distill-cfg-ns": "--model sd3 --lambda-distill 1 --guidance-scale 3 --adversarial-loss "
    "non_saturating",
    "sd3-dinov2-nfsd": "--model sd3 --discriminator dinov2 --distill-space pixel --weighting nfsd "
    "--guidance-scale 2",
    "flux-r1-images-taps": "--model flux --r1-placement images --teacher-taps single_transformer_blocks.0 "
    "--disc-logit-mean 0.5",
    "sd3-r1-approx-lazy": "--model sd3 --r1-placement approximate --r1-gamma 100 --r1-interval 2 "
    "--student-steps 2",
    "flux-accum-ckpt": "--model flux --gradient-accumulation 2 --gradient-checkpointing --lora-rank 2",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FLAGS))
def test_each_flag_runs(name: str, tmp_path: Path) -> None:
    summary = run(
        tmp_path, *FLAGS[name].split(), "--max-steps", "2", "--sample-every", "2", "--no-export-pipeline"
    )
    assert summary.step == 2 and summary.nonfinite_total == 0
    assert (tmp_path / "samples" / "step-0000002.png").is_file()
