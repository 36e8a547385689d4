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


def class_colour(c: int) -> tuple[int, int, int]:
    r, g, b = PALETTE[(c - 1) % len(PALETTE)]
    return int(r), int(g), int(b)


def with_legend(tiles: list[np.ndarray], titles: list[str], classes: tuple[str, ...], gap: int = 4) -> np.ndarray:
    """Panels side by side, each under its title, and a legend of the class colours below them.

    tiles: (H, W, 3) uint8 overlays of one size; titles: one per tile; classes: background first (not drawn).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    h, w = tiles[0].shape[:2]
    bar = 14  # title and legend line height (the default bitmap font is 11 px tall)
    per_row = max(1, (len(tiles) * (w + gap)) // 200)  # legend entries per line, ~200 px each
    entries = list(enumerate(classes[1:], start=1))
    legend_lines = -(-len(entries) // per_row) if entries else 0
    width = len(tiles) * (w + gap) - gap
    canvas = Image.new("RGB", (max(width, 200), bar + h + 2 + legend_lines * bar), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, title) in enumerate(zip(tiles, titles)):
        x = i * (w + gap)
        canvas.paste(Image.fromarray(tile), (x, bar))
        draw.text((x + 2, 1), _fit(draw, title, font, w - 4), fill="black", font=font)
    col = max(width, 200) // per_row
    for j, (c, name) in enumerate(entries):
        x, y = (j % per_row) * col + 2, bar + h + 2 + (j // per_row) * bar
        draw.rectangle((x, y + 2, x + 10, y + 11), fill=class_colour(c), outline="black")
        draw.text((x + 14, y + 1), _fit(draw, f"{c}: {name}", font, col - 18), fill="black", font=font)
    return np.asarray(canvas)


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
