"""From files to the tensors the models consume: windows at the model's pixel scale (``tiling``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..tiling import support_windows
from .folder import IGNORE, DataError, Sample, Split, list_images, load_image, load_mask, load_pair


def image_tensor(image: np.ndarray, size: int) -> Tensor:
    """(H, W, 3) float RGB in [0, 1] -> (3, size, size)."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


def label_tensor(mask: np.ndarray, size: int) -> Tensor:
    """(H, W) uint8 labels -> (size, size) long, nearest neighbour."""
    t = torch.from_numpy(mask.astype(np.int64))[None, None].float()
    return F.interpolate(t, size=(size, size), mode="nearest")[0, 0].long()


def class_sets(split: Split) -> list[set[int]]:
    """Per sample, the foreground classes its mask contains (reads every mask once)."""
    out = []
    for s in split.samples:
        assert s.mask is not None
        values = np.unique(load_mask(s.mask, split.num_classes))
        out.append({int(v) for v in values if 0 < v <= split.num_classes})
    return out


def load_support_tensors(
    split: Split, stems: Sequence[str], size: int, scale: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Load the chosen support images -> windows (N, 3, S, S) in [0, 1], labels (N, S, S) long (255 = ignore), at
    the pixel scale (``tiling.support_windows``: one window per image when it fits, N = K), and sources (N,) long:
    the index in ``stems`` of each window's image.

    Raises DataError when the support set has no foreground pixel at all, or (after resizing) a class of the
    dataset that appears in some image vanishes.
    """
    by_stem: dict[str, Sample] = {s.stem: s for s in split.samples}
    windows = []
    for stem in stems:
        img, mask = load_pair(by_stem[stem], split.num_classes)
        windows.append(support_windows(img, mask, size, scale))
    images, lab, sources = stack_windows(windows)
    check_support_labels(lab, split.classes, f"{split.root}", stems)
    return images, lab, sources


def stack_windows(windows: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Per image, its (windows, labels) -> all windows, all labels and the sources (N,) long: each window's image."""
    sources = torch.cat([torch.full((len(x),), i, dtype=torch.long) for i, (x, _) in enumerate(windows)])
    return torch.cat([x for x, _ in windows]), torch.cat([y for _, y in windows]), sources


def check_support_labels(labels: Tensor, classes: Sequence[str], where: str, names: Sequence[str]) -> None:
    """A support set's labels at the working size (K, S, S) must show every foreground class of ``classes``
    (background first); DataError naming ``where`` and the images otherwise."""
    if not ((labels > 0) & (labels != IGNORE)).any():
        hint = "pick images that show the classes (or more shots)"
        if (labels == IGNORE).any():  # every labelled pixel 0 or 255: binary masks saved as 0/255?
            hint = "its masks hold only 0 and 255, and 255 means 'ignore' here: binary masks need their objects as 1"
        raise DataError(f"{where}: the support set ({', '.join(names)}) has no foreground pixel; {hint}")
    missing = [classes[c] for c in range(1, len(classes)) if not (labels == c).any()]
    if missing:
        raise DataError(
            f"{where}: class(es) {missing} have no pixel in any support image ({', '.join(names)}); "
            "use more shots or a support set that shows every class"
        )


def load_unlabeled(
    folder: Path, size: int, max_images: int, exclude: Sequence[Path] = (), scale: float | None = None
) -> tuple[Tensor, list[str]]:
    """Images of the target domain without masks (only the images are read) -> ((U, 3, S, S) in [0, 1], names):
    at the pixel scale, windows of each (``unlabeled_windows``).

    folder: an image folder, or a dataset folder whose ``images/`` (or ``train/images/``) holds them. Files in
    ``exclude`` (e.g. the support images) are left out. When more than ``max_images`` remain, an evenly spread
    subset of the name-sorted list is taken (deterministic). An unreadable file is a DataError naming it.
    """
    folder = Path(folder)
    for sub in ("train/images", "images"):
        if (folder / sub).is_dir():
            folder = folder / sub
            break
    skip = {Path(p).resolve() for p in exclude}
    files = [p for p in list_images(folder).values() if p.resolve() not in skip]
    if not files:
        raise DataError(f"{folder}: no unlabeled images (.png, .jpg, .tif, .bmp) besides the support set")
    if max_images < 1:
        raise DataError(f"max unlabeled images must be >= 1, got {max_images}")
    if len(files) > max_images:
        files = [files[int(i)] for i in np.unique(np.linspace(0, len(files) - 1, max_images).round())]
    return torch.cat([unlabeled_windows(load_image(p), size, scale) for p in files]), [p.name for p in files]


def unlabeled_windows(image: np.ndarray, size: int, scale: float | None) -> Tensor:
    """An image without a mask at the pixel scale -> its windows (N, 3, S, S), as a support image's."""
    return support_windows(image, np.zeros(image.shape[:2], np.uint8), size, scale)[0]
