"""The export's model card (``export/README.md``): how to call the pipeline for a few-step student.

A diffusers pipeline folder stores its components and their configs, not ``__call__``'s
defaults: ``StableDiffusion3Pipeline`` loaded from the export still defaults to 28 steps and
CFG 7.0, ``FluxPipeline`` to 28 steps. What does persist is the scheduler's config (its shift
and ``stochastic_sampling=True``, ADD's fresh re-noising, set by ``report.export``). The card
gives the call that samples the student as it was trained: its number of steps, its times as
``sigmas`` (the scheduler shifts them as the student's schedule does), no classifier-free
guidance (SD3: ``guidance_scale=1.0``; a guidance-distilled Flux: the embedding scale the student
was trained with), the training resolution (Flux's shift depends on it) and T5 length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def call_kwargs(args: Any, models: Any) -> dict[str, Any]:
    """The keyword arguments of ``pipe(prompt, ...)`` that sample the student as it was trained."""
    times = [float(t) for t in models.schedule.timesteps(args.student_steps)]
    kwargs: dict[str, Any] = {"num_inference_steps": len(times), "sigmas": times}
    if models.family == "sd3":
        kwargs["guidance_scale"] = 1.0  # no classifier-free guidance
    elif models.guidance is not None:  # FLUX.1-dev's guidance embedding, as in training
        kwargs["guidance_scale"] = float(models.guidance)
    side = int(args.resolution)
    return {**kwargs, "height": side, "width": side, "max_sequence_length": int(args.max_sequence_length)}


def _load_lines(args: Any, models: Any, out: Path) -> list[str]:
    """Python lines that leave the student's pipeline in ``pipe``."""
    pipeline = type(models.pipe).__name__
    if args.export_pipeline:
        return [f"pipe = {pipeline}.from_pretrained({str(out)!r}, torch_dtype=torch.bfloat16)"]
    base = repr(str(args.pretrained)) if args.pretrained else "BASE  # the pipeline the student was trained from"
    if args.lora_rank:
        return [f"pipe = {pipeline}.from_pretrained({base}, torch_dtype=torch.bfloat16)",
                f"pipe.load_lora_weights({str(out / 'lora')!r})"]  # fmt: skip
    transformer = type(models.transformer).__name__
    return [f"transformer = {transformer}.from_pretrained({str(out / 'transformer')!r}, torch_dtype=torch.bfloat16)",
            f"pipe = {pipeline}.from_pretrained({base}, transformer=transformer, torch_dtype=torch.bfloat16)"]  # fmt: skip


def text(args: Any, models: Any, out: Path) -> str:
    """The card: front matter, what was trained, and the call (`call_kwargs`)."""
    kwargs = call_kwargs(args, models)
    n, family = kwargs["num_inference_steps"], {"sd3": "SD3", "flux": "Flux"}[models.family]
    imports = {type(models.pipe).__name__}
    if not args.export_pipeline and not args.lora_rank:
        imports.add(type(models.transformer).__name__)
    call = "\n".join(f"    {k}={v!r}," for k, v in kwargs.items())
    method = "DMD2" if args.method == "dmd2" else ("LADD" if args.discriminator == "teacher" else "ADD")
    base = f"base_model: {args.pretrained}\n" if args.pretrained else ""
    flux_note = "- Flux's shift depends on the resolution: other sizes move the noise levels.\n"
    flux_note = flux_note if models.family == "flux" else ""
    guidance = (
        "`guidance_scale=1.0`: no classifier-free guidance (the pipeline's default, 7.0, would apply it)"
        if models.family == "sd3"
        else f"`guidance_scale={kwargs['guidance_scale']!r}`: the guidance embedding the student was trained with"
        if "guidance_scale" in kwargs
        else "no `guidance_scale`: this transformer has no guidance embedding"
    )
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
{base}tags:
- addkit
- {method.lower()}
- few-step
- {models.family}
---

# A {n}-step {family} student ({method}, addkit `add_flow.py`)

Trained at {kwargs['height']}x{kwargs['width']} for {n} sampling steps. The pipeline's own call defaults
(28 steps{', CFG 7.0' if models.family == 'sd3' else ''}) are not stored with a pipeline folder and do not
suit the student: call it like this.

```python
import torch
from diffusers import {', '.join(sorted(imports))}

{chr(10).join(_load_lines(args, models, out))}
pipe.to("cuda")
image = pipe(
    "a photo of a cat",
{call}
).images[0]
```

- `sigmas`: the student's times, which the scheduler shifts as in training; fewer steps take the
  first ones (`num_inference_steps=1, sigmas=[1.0]`).
- {guidance}.
- The scheduler has `stochastic_sampling=True` (diffusers 0.34 and later): ADD's fresh noise
  between steps.
{flux_note}"""


def write(args: Any, models: Any, out: Path) -> Path:
    """Write ``out / "README.md"`` (`text`)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "README.md"
    path.write_text(text(args, models, out), encoding="utf-8")
    return path
