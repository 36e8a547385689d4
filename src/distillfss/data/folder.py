"""The project's dataset folder format, with validation that names the file and the problem.

```
<dataset>/dataset.json          {"name", "classes": ["background", ...], ...}
<dataset>/{train,test}/images/<stem>.png   <dataset>/{train,test}/masks/<stem>.png
```
A plain folder with ``images/`` and ``masks/`` (and optionally ``classes.txt``) is accepted as a support set too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IGNORE = 255  # the label of pixels to ignore, in mask files and everywhere in the code (the one definition)


class DataError(UserError, ValueError):
    """A dataset folder or file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Sample:
    stem: str
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class Split:
    """One split of a dataset: sorted samples and the class names (index 0 = background)."""

    name: str
    root: Path
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]

    @property
    def num_classes(self) -> int:
        """Foreground classes."""
        return len(self.classes) - 1


def list_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            if p.stem in out:
                raise DataError(f"{p}: two files share the stem {p.stem!r} ({out[p.stem].name})")
            out[p.stem] = p
    return out


def image_files(path: Path) -> list[Path]:
    """An image file, or a folder's images (name-sorted) -> their paths; DataError when there are none."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTS:
            raise DataError(f"{path}: not an image file ({', '.join(IMAGE_EXTS)})")
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = list(list_images(path).values())
    if not files:
        subs = [d.name for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        where = (
            f"; subfolders ({', '.join(subs[:3])}{', ...' if len(subs) > 3 else ''}) are not searched" if subs else ""
        )
        raise DataError(f"{path}: no images (.png, .jpg, .tif, .bmp){where}")
    return files


def read_classes(root: Path) -> tuple[str, ...]:
    """Class names from dataset.json, classes.txt (one per line, background first) or the default binary set."""
    for candidate in (root / "dataset.json", root.parent / "dataset.json"):
        if candidate.is_file():
            try:
                meta = json.loads(candidate.read_text())
                classes = tuple(str(c) for c in meta["classes"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{candidate}: not a valid dataset.json with a 'classes' list ({e})") from None
            if len(classes) < 2:
                raise DataError(f"{candidate}: 'classes' needs background and at least one class")
            return classes
    txt = root / "classes.txt"
    if txt.is_file():
        classes = tuple(line.strip() for line in txt.read_text().splitlines() if line.strip())
        if len(classes) < 2:
            raise DataError(f"{txt}: needs background and at least one class, one per line")
        return classes
    return ("background", "foreground")


def load_split(root: Path | str, split: str | None = "train", need_masks: bool = True) -> Split:
    """Load a split of a dataset folder (or a plain images/ + masks/ folder when ``root/split`` is absent).

    Every image must have a mask of the same stem and vice versa (when ``need_masks``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    base = root / split if split and (root / split).is_dir() else root
    if split and base is root and not (root / "images").is_dir():
        raise DataError(f"{root}: has neither a '{split}/' split nor an 'images/' folder")
    images = list_images(base / "images")
    if not images:
        raise DataError(f"{base / 'images'}: no images (.png, .jpg, .tif, .bmp)")
    masks = list_images(base / "masks") if need_masks or (base / "masks").is_dir() else {}
    if need_masks:
        for stem, p in images.items():
            if stem not in masks:
                raise DataError(f"{p}: no mask {base / 'masks' / stem}.png for this image")
        for stem, p in masks.items():
            if stem not in images:
                raise DataError(f"{p}: mask without an image of the same stem in {base / 'images'}")
    samples = tuple(Sample(stem, images[stem], masks.get(stem)) for stem in sorted(images))
    return Split(split or "", root, read_classes(root), samples)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header; DataError naming it when it is not readable."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def load_image(path: Path, keep_uint8: bool = False) -> np.ndarray:
    """Any PNG/JPEG/TIFF (grayscale, RGB, RGBA, palette; 8 or 16 bit) -> (H, W, 3) float32 RGB in [0, 1]
    (``keep_uint8``: an 8-bit image as uint8 0-255, a quarter of the memory; the models read either).

    16-bit and float images are min-max scaled per image (their full range is rarely used). Pixels are read as
    stored: an EXIF orientation tag is not applied (masks are drawn on the stored pixel grid by annotation tools, and
    image and mask stay aligned). Images beyond Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``,
    about 179 million pixels before it refuses) are a DataError.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float32)
                lo, hi = float(a.min()), float(a.max())
                a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
                return np.repeat(a[..., None], 3, axis=2)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA").convert("RGB")  # drop alpha: the colour channels carry the image
            a = np.asarray(im.convert("RGB"))
            a = a if keep_uint8 else a.astype(np.float32) / 255.0
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: too large to read safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    return a


def load_mask(path: Path, num_classes: int, expect_size: tuple[int, int] | None = None) -> np.ndarray:
    """A single-channel label map -> (H, W) uint8; 0 = background, 1..C = class, 255 = ignore.

    Palette masks are read by index (the colour a palette gives an index does not matter); 16-bit masks by value.

    Raises DataError for a corrupt file, a colour mask whose channels differ, another size than the image, or
    labels outside the classes.
    """
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: too large to read safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable mask ({e})") from None
    if a.ndim == 3:
        if a.shape[2] == 4:
            a = a[..., :3]
        if not (a == a[..., :1]).all():
            raise DataError(
                f"{path}: mask has {a.shape[2]} differing channels; need a single-channel label map of class indices "
                "(0 = background, 1..C; a palette PNG is fine, colours are not read as classes)"
            )
        a = a[..., 0]
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if expect_size is not None and a.shape != expect_size:
        raise DataError(f"{path}: mask is {a.shape[1]}x{a.shape[0]}, its image is {expect_size[1]}x{expect_size[0]}")
    values = np.unique(a)
    bad = values[(values > num_classes) & (values != IGNORE)]
    if bad.size:
        lossy = Path(path).suffix.lower() in (".jpg", ".jpeg")
        hint = "; JPEG compression changes label values: save masks as PNG" if lossy else ""
        raise DataError(
            f"{path}: label values {bad[:5].tolist()} outside the classes 0..{num_classes} (255 = ignore){hint}"
        )
    return a.astype(np.uint8)


def load_pair(sample: Sample, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    image = load_image(sample.image)
    if sample.mask is None:
        raise DataError(f"{sample.image}: no mask")
    return image, load_mask(sample.mask, num_classes, image.shape[:2])
