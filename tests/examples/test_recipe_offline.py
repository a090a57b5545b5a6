"""Offline: the README's ``ProjectedDiscriminator.from_dinov2()`` fails at once and says what to do.

Without the weights in the Hugging Face cache and without the hub (``HF_HUB_OFFLINE=1``, or no
route to it), the hub client used to retry for about a minute per file before a traceback that
named neither ``pretrained`` nor a way out.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("timm")
huggingface_hub = pytest.importorskip("huggingface_hub")

import addkit


@pytest.fixture
def empty_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no route"])
def test_from_dinov2_offline_fails_fast_with_guidance(how, empty_cache, monkeypatch):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        reason = "HF_HUB_OFFLINE is set"
    else:  # nothing listens on the discard port: the connection is refused at once
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
        for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(var, raising=False)
        reason = "127.0.0.1:9 cannot be reached"
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=f"not cached and {reason}.*pretrained=False.*local file"):
        addkit.ProjectedDiscriminator.from_dinov2()
    assert time.perf_counter() - start < 10


def test_from_clip_offline_fails_fast_with_guidance(empty_cache, monkeypatch):
    pytest.importorskip("open_clip")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"CLIPFeatures.from_open_clip: .*'ViT-L-14' \(openai\).*"):
        addkit.ProjectedDiscriminator.from_clip()


def test_random_weights_need_no_hub(empty_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from addkit.testing import tiny_dinov2_kwargs

    D = addkit.ProjectedDiscriminator.from_dinov2(**tiny_dinov2_kwargs(), c_text_dim=8)
    assert len(D.heads) == 5


def test_a_missing_local_weights_file_is_named(tmp_path):
    missing = str(tmp_path / "dinov2.safetensors")
    with pytest.raises(FileNotFoundError, match=f"from_timm: pretrained='{missing}' is not a file"):
        addkit.ProjectedDiscriminator.from_dinov2(pretrained=missing)
    pytest.importorskip("open_clip")
    with pytest.raises(FileNotFoundError, match=f"from_open_clip: pretrained='{missing}' is not a file"):
        addkit.ProjectedDiscriminator.from_clip(pretrained=missing)
