"""Package hygiene: importing addkit loads no optional dependency; the public API is complete."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import addkit

OPTIONAL = ("timm", "open_clip", "diffusers", "transformers", "accelerate", "peft", "safetensors", "tqdm")


def _loaded(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint(' '.join(m for m in {OPTIONAL!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_addkit_loads_no_optional_package() -> None:
    baseline = _loaded("import torch, einops")  # torch itself may import e.g. tqdm
    modules = sorted(m.name for m in pkgutil.walk_packages(addkit.__path__, "addkit."))
    assert "addkit.losses" in modules and "addkit.discriminators" in modules
    loaded = _loaded("import addkit\n" + "\n".join(f"import {m}" for m in modules))
    assert loaded - baseline == set(), f"import addkit loaded optional packages: {loaded - baseline}"


def test_public_api_names_resolve() -> None:
    assert addkit.__version__ == "0.1.0"
    for name in addkit.__all__:
        assert getattr(addkit, name) is not None, name


def test_dmd2_losses_sit_beside_each_other_at_the_top_level() -> None:
    from addkit.losses import matching

    assert addkit.distribution_matching_loss is matching.distribution_matching_loss
    assert addkit.fake_score_loss is matching.fake_score_loss
    assert {"distribution_matching_loss", "fake_score_loss"} <= set(addkit.__all__)
