from __future__ import annotations

import pytest
import torch

from distillfss.baselines import LinearProbe, PrototypeMatcher, cv_folds


def _blocks(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose foreground is a saturated red square on a dark, noisy background."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 64, 64, generator=g) * 0.2
    labels = torch.zeros(n, 64, 64, dtype=torch.long)
    for i in range(n):
        y, x = 8 + 10 * i, 30 - 8 * i
        labels[i, y : y + 24, x : x + 24] = 1
        images[i, :, y : y + 24, x : x + 24] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    return images, labels


@pytest.mark.parametrize("cls", [LinearProbe, PrototypeMatcher])
def test_simple_baselines_separate_an_obvious_class(lite0_64, cls) -> None:
    images, labels = _blocks()
    model = cls(lite0_64, num_classes=1)
    model.fit(images, labels)
    with torch.no_grad():
        pred = model(images).argmax(1)
    assert pred.shape == labels.shape
    inter = ((pred == 1) & (labels == 1)).sum().item()
    union = ((pred == 1) | (labels == 1)).sum().item()
    assert inter / union > 0.6


@pytest.mark.slow  # a few seconds; CI runs the slow tests (.ci/run)
def test_probe_settings_are_chosen_on_the_support_set_and_recorded(lite0_64) -> None:
    images, labels = _blocks(3)
    probe = LinearProbe(lite0_64, num_classes=1)
    probe.fit(images, labels)
    s = probe.settings
    assert s["cv"] == "leave-one-image-out" and s["grid_size"] == 24 and 0 <= s["cv_miou"] <= 100
    again = LinearProbe(lite0_64, num_classes=1)
    again.fit(images, labels)
    assert again.settings == s and torch.equal(again.weight, probe.weight)  # deterministic


@pytest.mark.slow
def test_one_support_image_is_cross_validated_by_quadrants(lite0_64) -> None:
    images, labels = _blocks(1)
    for model in (LinearProbe(lite0_64, 1), PrototypeMatcher(lite0_64, 1)):
        model.fit(images, labels)
        assert model.settings["cv"] == "leave-one-quadrant-out"


def test_fixed_settings_skip_the_search(lite0_64) -> None:
    images, labels = _blocks(2)
    probe = LinearProbe(lite0_64, 1, l2=1e-2, levels="fine", balanced=False)
    probe.fit(images, labels)
    assert probe.settings == {"l2": 1e-2, "levels": "fine", "balanced": False, "cv": "none"}
    assert probe.weight.shape[1] == lite0_64.skip4_channels + next(
        li.channels for li in reversed(lite0_64.layer_info) if li.stride == 8
    )
    with pytest.raises(ValueError, match="levels must be one of"):
        LinearProbe(lite0_64, 1, levels="deep")


def test_cv_folds_partition_the_pixels() -> None:
    for k in (1, 3):
        _, folds = cv_folds(k, 6, 8)
        total = torch.stack(folds).sum(0)
        assert torch.equal(total, torch.ones(k, 6, 8, dtype=total.dtype))
