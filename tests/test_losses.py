from __future__ import annotations

import pytest
import torch

from distillfss.losses import balanced_weights, coarse_mse, focal_loss


def test_focal_loss_ignores_255_and_reduces_to_ce_at_gamma_0() -> None:
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0, 0] = 255
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert focal_loss(logits, target, gamma=0.0) == pytest.approx(ce.item(), rel=1e-5)
    assert focal_loss(logits, target, gamma=2.0) < ce  # focusing only ever lowers each term


def test_balanced_weights_favour_rare_classes_and_keep_the_mean() -> None:
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, :1, :4] = 1  # 4 % foreground
    labels[0, 9, 9] = 255
    w = balanced_weights(labels, num_classes=2)
    assert w[1] > w[0] > 0 and w[2] == 0  # class 2 absent: weight 0
    freq = torch.tensor([95 / 99, 4 / 99, 0.0])
    assert (w * freq).sum() == pytest.approx(1.0, rel=1e-5)
    assert w[1] / w[0] == pytest.approx((95 / 4) ** 0.5, rel=1e-4)


def test_coarse_mse_only_counts_classes_with_shots() -> None:
    t = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)]
    s = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)]
    s[0][:, 1] = 5.0  # error only on class 2, which has no shot
    present = torch.tensor([[True, False]])
    assert coarse_mse(t, s, (8, 16), present) == 0
    assert coarse_mse(t, s, (8, 16), torch.tensor([[True, True]])) > 0


def test_coarse_mse_averages_classes_within_an_episode_then_episodes() -> None:
    # Episode 0 has two classes present (errors 1 and 3), episode 1 one class (error 8). The original's weighting:
    # mean over classes per episode (2 and 8), then over episodes -> 5; a mean over (episode, class) pairs gives 4.
    t = [torch.zeros(2, 2, 3, 3)]
    s = [torch.zeros(2, 2, 3, 3)]
    s[0][0, 0], s[0][0, 1], s[0][1, 0], s[0][1, 1] = 1.0, 3**0.5, 8**0.5, 100.0
    present = torch.tensor([[True, True], [True, False]])
    assert coarse_mse(t, s, (8,), present).item() == pytest.approx(5.0, rel=1e-6)
    # strides weigh equally whatever their layer counts: stride 8 (two layers, errors 1 and 3) -> 2, stride 16 -> 4
    t2 = [torch.zeros(1, 1, 2, 2)] * 3
    s2 = [torch.full((1, 1, 2, 2), v**0.5) for v in (1.0, 3.0, 4.0)]
    assert coarse_mse(t2, s2, (8, 8, 16), torch.tensor([[True]])).item() == pytest.approx(3.0, rel=1e-6)
    # no class present anywhere: 0, not NaN
    assert coarse_mse(t, s, (8,), torch.zeros(2, 2, dtype=torch.bool)).item() == 0


def test_plateau_is_where_the_loss_settles_for_good() -> None:
    from distillfss.transfer import plateau

    losses = [1.0] * 10 + [0.1] * 40
    rows = [{"step": i + 1, "loss": v, "seconds": 0.5 * (i + 1)} for i, v in enumerate(losses)]
    # trailing mean after n low steps: 1 - 0.09 n; within 15 % of the range (0.9) above 0.1: n >= 9
    assert plateau(rows, fraction=0.85) == (19, 9.5)
    spiky = [{"step": i + 1, "loss": v, "seconds": float(i)} for i, v in enumerate([1.0, 50.0] + [0.1] * 30)]
    step, _ = plateau(spiky, window=1)
    assert step == 3  # the spike does not count as the plateau, the first step after it does
    flat = [{"step": i + 1, "loss": 0.3, "seconds": float(i)} for i in range(20)]
    assert plateau(flat) == (1, 0.0)  # no decrease: the plateau is the start
    assert plateau([]) == (0, 0.0)
