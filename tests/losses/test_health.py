"""discriminator_stats against a brute-force loop; ChanceWatch's counting."""

from __future__ import annotations

import pytest
import torch

from addkit.losses import ChanceWatch, discriminator_stats


def test_stats_match_a_loop_over_samples_heads_and_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    real = [torch.randn(6, 5, generator=g) + 0.3, torch.randn(6, 2, generator=g)]
    fake = [torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g) - 0.2]
    real[1][2] = fake[1][2] = 0.0
    real[0][2] = fake[0][2] = 1.0  # sample 2: a tie
    s = discriminator_stats(real, fake)
    wins, gaps, pos_real, pos_fake, tokens = 0.0, [], 0, 0, 0
    for b in range(6):
        score_r = sum(sum(h[b].tolist()) / h.shape[1] for h in real)
        score_f = sum(sum(h[b].tolist()) / h.shape[1] for h in fake)
        wins += 1.0 if score_r > score_f else 0.5 if score_r == score_f else 0.0
        gaps.append(score_r - score_f)
    for h_r, h_f in zip(real, fake):
        for v_r, v_f in zip(h_r.flatten().tolist(), h_f.flatten().tolist()):
            pos_real, pos_fake, tokens = pos_real + (v_r > 0), pos_fake + (v_f > 0), tokens + 1
    assert float(s["rank"]) == pytest.approx(wins / 6)
    assert float(s["gap"]) == pytest.approx(sum(gaps) / 6, abs=1e-6)
    assert float(s["real_acc"]) == pytest.approx(pos_real / tokens)
    assert float(s["fake_acc"]) == pytest.approx(1 - pos_fake / tokens)
    means_r = [float(h.mean()) for h in real]
    assert float(s["logits_real"]) == pytest.approx(sum(means_r) / 2, abs=1e-6)
    assert all(v.requires_grad is False and v.ndim == 0 for v in s.values())


def test_stats_reject_mismatched_layouts() -> None:
    with pytest.raises(ValueError, match="discriminator_stats: real_logits and fake_logits"):
        discriminator_stats(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="same heads"):
        discriminator_stats([torch.zeros(4, 3)], [torch.zeros(4, 3), torch.zeros(4, 1)])


def test_chance_watch_warns_once_after_patience_and_resets_on_learning() -> None:
    watch = ChanceWatch(patience=10)
    assert watch.update(1, 0.5) is None and watch.update(9, 0.55) is None
    assert watch.update(10, 0.9) is None  # learning: the count restarts
    assert watch.update(11, 0.5) is None and watch.update(19, 0.5) is None
    message = watch.update(20, 0.5)
    assert message is not None and "10 steps (since step 11)" in message and "norm='sample'" in message
    assert watch.update(40, 0.5) is None and watch.warned
    with pytest.raises(ValueError, match="patience"):
        ChanceWatch(patience=0)
    with pytest.raises(ValueError, match="threshold"):
        ChanceWatch(threshold=0.3)
