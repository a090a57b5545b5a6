"""The recipe logs the discriminator's ranking and warns once when it stays at chance."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("timm")

import add_sdxl  # examples/ is on pytest's pythonpath
import addkit


def test_rank_is_logged_and_a_discriminator_at_chance_is_warned_about_once(tmp_path: Path, monkeypatch) -> None:
    """Three steps of the random preset; d/rank and d/gap reach TensorBoard, the warning comes once."""
    # a watch that calls every ranking "chance" and loses patience after one step
    monkeypatch.setattr(addkit.losses, "ChanceWatch", lambda patience: addkit.losses.health.ChanceWatch(1, 1.0))
    argv = ["--preset", "random", "--output-dir", str(tmp_path), "--max-steps", "3", "--sample-every", "0",
            "--checkpoint-every", "0", "--no-export-pipeline"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_sdxl.main(argv)
    messages = [str(w.message) for w in caught if "no better than chance" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("add_sdxl: the discriminator"), messages
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [EventAccumulator(str(e)) for e in tmp_path.glob("logs/**/events.out.tfevents.*")]
    (acc,) = [a for a in runs if a.Reload() and "d/rank" in a.Tags()["scalars"]]
    ranks = [e.value for e in acc.Scalars("d/rank")]
    assert len(ranks) == 3 and all(0.0 <= r <= 1.0 for r in ranks)
    assert {"d/gap", "d/real_acc", "d/fake_acc"} <= set(acc.Tags()["scalars"])
