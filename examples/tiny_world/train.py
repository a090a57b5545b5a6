"""Train the tiny world's networks from scratch, seeded: ``cd examples && python -m tiny_world.train``.

Five stages, each writing its part under ``--out`` (default ``tiny_world/weights``):

1. ``vae``: ``AutoencoderKL`` on world images, $\\lVert \\hat x - x\\rVert^2 + \\beta\\,\\mathrm{KL}$;
   then ``scaling_factor`` = 1 / std of the latents (as SD/SDXL's VAEs are scaled);
2. ``teacher``: the UNet and both text encoders together, as a DDPM with eps-prediction on
   SDXL's schedule, $\\min(\\mathrm{SNR}_t, 5)/\\mathrm{SNR}_t\\,\\lVert\\hat\\epsilon - \\epsilon\\rVert^2$
   (min-SNR weighting), 10 % of captions dropped to zero conditioning (SDXL's empty prompt),
   EMA weights; latents of a fixed pool of rendered training images, drawn from their posterior;
3. ``image_encoder``: the DINOv2-architecture ViT, supervised (attributes and position from the
   class token);
4. ``classifier``: the evaluation CNN (another seed and architecture), on all 180 captions;
5. ``scores``: the teacher's held-out scores at 1, 4 and 25 steps (``teacher_scores.json``), which
   ``add_sdxl.py --preset tiny`` reports beside its student's without sampling the teacher again.

Everything draws from explicit seeds; one thread by default (``--threads``), so the same
machine and library versions give the same weights. Held-out captions never enter stages 1–3.
Times and final numbers go to ``train_log.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from addkit import VPSchedule

from . import models as M
from .train_supervised import train_classifier, train_image_encoder
from .world import TRAIN, render, sample_batch

STAGES = ("vae", "teacher", "vae_decoder", "image_encoder", "classifier", "scores")
STEPS = {"vae": 600, "teacher": 5000, "vae_decoder": 800, "image_encoder": 2000, "classifier": 1200}


def _lr(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to 10 %."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * (1 - step / steps))


def _every(steps: int) -> int:
    return max(1, steps // 10)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """$\\theta_{ema} \\leftarrow d\\,\\theta_{ema} + (1 - d)\\,\\theta$."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - decay)


# -- 1. VAE --------------------------------------------------------------------------------------
def train_vae(steps: int, *, seed: int = 1, batch_size: int = 32, lr: float = 2e-3, kl_weight: float = 1e-4,
              log=print) -> tuple[nn.Module, dict]:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    vae = M.build_parts(seed=0).vae.train()
    with torch.no_grad():  # start with a narrow posterior (std e^-4): the decoder sees the signal from step 1
        vae.quant_conv.bias[vae.config.latent_channels :] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start, recent = time.time(), []
    for i in range(steps):
        x = sample_batch(batch_size, g).images
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss_rec = F.mse_loss(rec, x)
        loss = loss_rec + kl_weight * dist.kl().mean() / dist.mean[0].numel()
        for group in opt.param_groups:
            group["lr"] = lr * _lr(i, steps, max(1, steps // 20))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss_rec.item()])[-50:]
        if (i + 1) % _every(steps) == 0:
            log(f"vae {i + 1}/{steps}: mse {sum(recent) / len(recent):.5f} ({time.time() - start:.0f}s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = sample_batch(1024, torch.Generator().manual_seed(seed + 100)).images
        dist = vae.encode(x).latent_dist
        std = float(dist.sample(torch.Generator().manual_seed(seed)).std())
        vae.register_to_config(scaling_factor=1.0 / std)
        psnr = float(10 * torch.log10(4 / F.mse_loss(vae.decode(dist.mean).sample.clamp(-1, 1), x)))
    return vae, {"seconds": time.time() - start, "steps": steps, "seed": seed, "latent_std": std,
                 "posterior_std": float(dist.std.mean()), "psnr_db": psnr}  # fmt: skip


def finetune_vae_decoder(vae: nn.Module, steps: int, *, seed: int = 4, batch_size: int = 32, lr: float = 1e-3,
                         log=print) -> tuple[nn.Module, dict]:  # fmt: skip
    """Sharpen the decoder with $L_1 + L_2$ on posterior samples; the encoder (the latents the
    teacher learned) stays as it is, as SD's fine-tuned VAE decoders were made."""
    g = torch.Generator().manual_seed(seed)
    vae.requires_grad_(False).eval()
    trainable = nn.ModuleList([vae.post_quant_conv, vae.decoder]).train().requires_grad_(True)
    opt = torch.optim.AdamW(trainable.parameters(), lr=lr, weight_decay=0.0)
    start, recent = time.time(), []
    for i in range(steps):
        x = sample_batch(batch_size, g).images
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        for group in opt.param_groups:
            group["lr"] = lr * _lr(i, steps, max(1, steps // 20))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        opt.step()
        recent = (recent + [F.mse_loss(rec.detach(), x).item()])[-50:]
        if (i + 1) % _every(steps) == 0:
            log(
                f"vae_decoder {i + 1}/{steps}: mse {sum(recent) / len(recent):.5f} ({time.time() - start:.0f}s)"
            )
    vae.eval().requires_grad_(False)
    return vae, {"seconds": time.time() - start, "steps": steps, "seed": seed, "psnr_db": _psnr(vae)}


@torch.no_grad()
def _psnr(vae: nn.Module, seed: int = 101) -> float:
    x = sample_batch(1024, torch.Generator().manual_seed(seed)).images
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float(10 * torch.log10(4 / F.mse_loss(rec, x)))


# -- 2. teacher (UNet + text encoders) ---------------------------------------------------------
@torch.no_grad()
def latent_pool(vae: nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` training images rendered from ``seed``: posterior means and stds ``[n, 4, 8, 8]``, captions."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(len(TRAIN), (n,), generator=g)
    means, stds, captions = [], [], []
    for chunk in index.split(512):
        batch = render([TRAIN[i] for i in chunk.tolist()], g)
        dist = vae.encode(batch.images).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        captions += batch.captions
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale, captions


def train_teacher(vae: nn.Module, steps: int, *, seed: int = 0, batch_size: int = 64, lr: float = 8e-4,
                  warmup: int = 100, pool: int = 16384, p_uncond: float = 0.1, ema_decay: float = 0.999,
                  snr_gamma: float = 5.0, state: Path | None = None, every: int = 100, log=print) -> tuple[M.TinyParts, dict]:  # fmt: skip
    """The teacher after ``steps`` steps; constant learning rate after warm-up, so a run of N steps is
    the first N steps of any longer run; ``state`` (a folder of checkpoints, one every ``every`` steps)
    resumes from the latest one at or before ``steps``, exactly."""
    g = torch.Generator().manual_seed(seed)
    parts = M.build_parts(seed)
    means, stds, captions = latent_pool(vae, pool, seed + 10)
    schedule = VPSchedule.scaled_linear()
    nets = nn.ModuleList([parts.unet, parts.text_encoder, parts.text_encoder_2]).train().requires_grad_(True)
    ema = copy.deepcopy(nets).requires_grad_(False)
    opt = torch.optim.AdamW(nets.parameters(), lr=lr, weight_decay=0.0)
    first, seconds, cpu, recent = 0, 0.0, 0.0, []
    done = sorted(int(f.stem[5:]) for f in state.glob("step-*.pt")) if state is not None else []
    if [k for k in done if k <= steps]:
        path = state / f"step-{max(k for k in done if k <= steps):06d}.pt"
        saved = torch.load(path, weights_only=False)
        first, seconds, cpu, recent = saved["step"], saved["seconds"], saved["cpu_seconds"], saved["recent"]
        nets.load_state_dict(saved["nets"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        g.set_state(saved["generator"])
        log(f"teacher: resumed at step {first} from {path}")
    start, cpu_start = time.time() - seconds, time.process_time() - cpu
    for i in range(first, steps):
        index = torch.randint(pool, (batch_size,), generator=g)
        x0 = means[index] + stds[index] * torch.randn(means[index].shape, generator=g)
        cond = M.encode_text(parts, [captions[k] for k in index.tolist()])
        keep = (torch.rand(batch_size, generator=g) >= p_uncond).float()  # else SDXL's empty prompt: zeros
        hidden, pooled = (
            cond["encoder_hidden_states"] * keep[:, None, None],
            cond["text_embeds"] * keep[:, None],
        )
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, noise, t)
        eps = parts.unet(x_t, t, encoder_hidden_states=hidden,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": cond["time_ids"]}).sample  # fmt: skip
        snr = schedule.snr(t).float()
        loss = (snr.clamp(max=snr_gamma) / snr * (eps - noise).square().mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (i + 1) / warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.parameters(), 1.0)
        opt.step()
        ema_update(ema, nets, min(ema_decay, (1 + i) / (10 + i)))
        recent = (recent + [loss.item()])[-100:]
        if (i + 1) % every == 0:
            log(f"teacher {i + 1}/{steps}: loss {sum(recent) / len(recent):.4f} ({time.time() - start:.0f}s)")
            if state is not None:
                state.mkdir(parents=True, exist_ok=True)
                torch.save({"step": i + 1, "seconds": time.time() - start, "recent": recent,
                            "cpu_seconds": time.process_time() - cpu_start, "nets": nets.state_dict(),
                            "ema": ema.state_dict(), "opt": opt.state_dict(), "generator": g.get_state()},
                           state / f"step-{i + 1:06d}.pt")  # fmt: skip
    parts.unet, parts.text_encoder, parts.text_encoder_2 = (m.eval() for m in ema)
    parts.vae = vae
    return parts, {"seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu_start, "steps": steps, "seed": seed, "batch_size": batch_size,
                   "lr": lr, "final_loss": sum(recent) / len(recent)}  # fmt: skip


# -- saving and the command line -------------------------------------------------------------------
def _save_module(module: nn.Module, folder: Path, config: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_pipeline(parts: M.TinyParts, out: Path) -> None:
    """Write ``parts`` as a ``StableDiffusionXLPipeline`` folder (SDXL's Euler scheduler config)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(**M.scheduler_config(), timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(**vars(parts), scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def run_stage(stage: str, out: Path, steps: int, *, state: Path | None = None, log=print) -> dict:
    """Train one stage and write its weights under ``out``; returns its log entry."""
    from diffusers import AutoencoderKL

    if stage == "vae":
        vae, info = train_vae(steps, log=log)
        vae.save_pretrained(out / "vae", safe_serialization=True)
    elif stage == "teacher":
        vae = AutoencoderKL.from_pretrained(out / "vae").requires_grad_(False).eval()
        parts, info = train_teacher(vae, steps, state=state, log=log)
        save_pipeline(parts, out)
    elif stage == "vae_decoder":
        vae = AutoencoderKL.from_pretrained(out / "vae")
        vae, info = finetune_vae_decoder(vae, steps, log=log)
        vae.save_pretrained(out / "vae", safe_serialization=True)  # after "teacher", which saves the pipeline
    elif stage == "image_encoder":
        vit, info = train_image_encoder(steps, log=log)
        _save_module(vit, out / "image_encoder", {"model_name": M.VIT_NAME, "num_classes": 0, **M.VIT_KWARGS})
    elif stage == "classifier":
        net, info = train_classifier(steps, log=log)
        _save_module(net, out / "classifier", {"width": net.width, "heads": M.HEADS})
    else:  # the frozen teacher's held-out scores, which every distillation run reports beside its student's
        from .evaluate import Evaluator, store_teacher_scores

        start = time.time()
        evaluator = Evaluator(M.load_parts(out), M.load_classifier(out))
        info = {"teacher": store_teacher_scores(evaluator, out), "seconds": time.time() - start}
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stages", nargs="*", choices=STAGES, default=list(STAGES))
    p.add_argument("--out", type=Path, default=M.WEIGHTS)
    p.add_argument(
        "--teacher-state",
        type=Path,
        default=None,
        help="folder of teacher checkpoints to resume from and write",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: reproducible, fast on a busy box)"
    )
    for stage, steps in STEPS.items():
        p.add_argument(f"--{stage.replace('_', '-')}-steps", type=int, default=steps)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.json"
    for stage in args.stages:
        steps = getattr(args, f"{stage}_steps", 0)
        print(f"== {stage}: {steps} steps, {args.threads} thread(s)", flush=True)
        cpu = time.process_time()
        info = run_stage(stage, args.out, steps, state=args.teacher_state, log=lambda s: print(s, flush=True))
        entry = {
            "cpu_seconds": time.process_time() - cpu,
            **info,
            "threads": args.threads,
            "torch": torch.__version__,
        }
        record = json.loads(log_path.read_text()) if log_path.is_file() else {}  # stages may run in parallel
        log_path.write_text(json.dumps({**record, stage: entry}, indent=2) + "\n")
        print(f"== {stage} done: {json.dumps(entry)}", flush=True)


if __name__ == "__main__":
    main()
