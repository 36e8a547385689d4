"""Colour overlays of label maps."""

from __future__ import annotations

import numpy as np

# Background stays uncoloured; classes 1.. take these colours in turn.
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
    ],
    dtype=np.float32,
)


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """image (H, W, 3) float in [0, 1], labels (H, W) -> (H, W, 3) uint8 with classes tinted."""
    out = image.astype(np.float32) * 255
    for c in np.unique(labels):
        if c == 0 or c == 255:
            continue
        sel = labels == c
        out[sel] = (1 - alpha) * out[sel] + alpha * PALETTE[(int(c) - 1) % len(PALETTE)]
    return out.clip(0, 255).astype(np.uint8)
