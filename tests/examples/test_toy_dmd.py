"""DMD2 on the toy: a few steps on an untrained teacher run, train the student and the fake score."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from toy.dmd import DMDConfig, distill_dmd, dmd_runs
from toy.nets import make_unet


@pytest.mark.parametrize("gan", [True, False], ids=["gan", "no_gan"])
def test_dmd_run_updates_student_and_logs(gan: bool) -> None:
    teacher = make_unet(0).eval().requires_grad_(False)
    cfg = DMDConfig(steps=2, batch_size=8, fake_updates=2, gan=gan)
    student, logs = distill_dmd(teacher, cfg, student_timesteps=(999, 499), log=lambda *_: None)
    assert len(logs["g/dm"]) == 2 and all(map(torch.isfinite, map(torch.tensor, logs["g/dm"])))
    assert ("g/gan" in logs) == gan and ("f/gan" in logs) == gan
    changed = any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    assert changed and not any(p.requires_grad for p in student.parameters())


def test_dmd_rows_follow_the_seeds_policy() -> None:
    rows = dmd_runs((0, 1, 2), steps=300)
    assert [seeds for _, _, seeds in rows] == [(0, 1, 2), (0, 1, 2)]  # the head against the seed spread
    assert [cfg.gan for _, cfg, _ in rows] == [True, False]
