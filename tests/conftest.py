"""Shared fixtures: tiny synthetic datasets in the project's folder format, and small backbones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

# `--config` for the CLI tests: the fast student's 200 steps cut to 2 (a file, as a user would pass the field)
SMALL_CONFIG = Path(__file__).parent / "small_adapt.yaml"
# The smallest adaptation the CLI tests run: lite0 at 64 px, one teacher step, the fast student's steps from the file.
TINY_ADAPT = [
    "--backbone",
    "efficientnet_lite0",
    "--image-size",
    "64",
    "--iterations",
    "1",
    "--config",
    str(SMALL_CONFIG),
]


def write_dataset(
    root: Path,
    n_train: int = 4,
    n_test: int = 2,
    num_classes: int = 1,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> Path:
    """Images with bright rectangles; class c's rectangles have their own colour. size = (H, W)."""
    rng = np.random.default_rng(seed)
    classes = ["background"] + [f"class{c}" for c in range(1, num_classes + 1)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"name": root.name, "domain": "synthetic", "classes": classes}))
    h, w = size
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            img = rng.uniform(0, 60, size=(h, w, 3))
            mask = np.zeros((h, w), np.uint8)
            for c in range(1, num_classes + 1):
                if num_classes > 1 and (i + c) % 3 == 0:
                    continue  # not every image holds every class
                y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
                mask[y : y + h // 3, x : x + w // 3] = c
                img[mask == c] = np.array([200, 60 * c % 255, 255 - 50 * c])
            Image.fromarray(img.astype(np.uint8)).save(root / split / "images" / f"img{i:02d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"img{i:02d}.png")
    return root


@pytest.fixture
def binary_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "binary")


@pytest.fixture
def multiclass_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "multi", n_train=6, n_test=3, num_classes=3)


@pytest.fixture(scope="session")
def lite0_64():
    from distillfss.backbones import build_backbone

    return build_backbone("efficientnet_lite0", 64)
