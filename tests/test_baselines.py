from __future__ import annotations

import pytest
import torch

from distillfss.baselines import LinearProbe, PrototypeMatcher


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
