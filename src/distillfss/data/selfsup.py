"""Self-supervised few-shot episodes from unlabeled natural images (an offline source domain for meta-training).

Pseudo-masks come from SLIC superpixels: an episode picks one superpixel of one image as its "class"; the support
and the query are two independently augmented views (crop, scale, flip, brightness/contrast) of that image, and
the same geometric transform is applied to the superpixel label map, so the pseudo-mask is known in both views.

Images: scikit-image's bundled photographs and textures, never the demo or any evaluation images. Licences as
stated in scikit-image's docstrings (``SOURCE_IMAGES``). Requires scikit-image (the ``selfsup`` extra).

For meta-training the views form a fixed **bank** (``views`` augmented views per image, drawn once from the
seed): the frozen backbone's features of each view are computed once, and an episode pairs two views of one image
in which the same superpixel is visible. A class is one (image, superpixel) pair; the ``val`` split holds the
superpixels of images no training episode uses (``VAL_IMAGES``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .folder import DataError

SOURCE_IMAGES: dict[str, str] = {
    "astronaut": "NASA, public domain",
    "camera": "CC0 (Lav Varshney)",
    "chelsea": "CC0 (Stefan van der Walt)",
    "clock": "public domain (Stefan van der Walt)",
    "coffee": "CC0 (Rachel Michetti)",
    "coins": "no known copyright restrictions",
    "rocket": "SpaceX, public domain",
    "hubble_deep_field": "NASA, public domain",
    "brick": "CC0 (CC0Textures)",
    "grass": "CC0 (CC0Textures)",
    "gravel": "CC0 (CC0Textures)",
}


VAL_IMAGES = ("coffee", "gravel")  # one photograph, one texture: held out from training for validation


def load_source_images(names: tuple[str, ...] = tuple(SOURCE_IMAGES)) -> dict[str, np.ndarray]:
    """name -> (H, W, 3) float32 RGB in [0, 1]."""
    try:
        import skimage.data
    except ImportError:
        raise DataError("the selfsup source needs scikit-image: pip install 'distillfss[selfsup]'") from None

    out = {}
    for n in names:
        if n not in SOURCE_IMAGES:
            raise ValueError(f"{n!r} is not a registered source image ({', '.join(SOURCE_IMAGES)})")
        a = getattr(skimage.data, n)()
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        out[n] = a[..., :3].astype(np.float32) / 255.0
    return out


class _View(NamedTuple):
    image: str
    y: int
    x: int
    side: int
    flip: bool
    gain: float
    bias: float


class SelfSupSource:
    """The offline self-supervised source (see the module docstring); implements ``EpisodeSource``.

    Args:
        images: name -> (H, W, 3) float RGB in [0, 1] (``load_source_images``).
        size: working resolution of the views.
        views: augmented views per image in the bank.
        val_images: names whose superpixels form the ``val`` split (the rest form ``train``).
        min_fraction: a superpixel is visible in a view when it covers at least this fraction of it.
    """

    name = "selfsup"

    def __init__(
        self,
        images: dict[str, np.ndarray],
        size: int,
        views: int = 24,
        seed: int = 0,
        val_images: tuple[str, ...] = VAL_IMAGES,
        n_segments: int = 24,
        min_fraction: float = 0.01,
        max_fraction: float = 0.4,
    ) -> None:
        from skimage.segmentation import slic

        self.size, self.views = size, views
        self.pixels = {n: torch.from_numpy(images[n]).permute(2, 0, 1).contiguous() for n in sorted(images)}
        split_of = {n: ("val" if n in val_images else "train") for n in self.pixels}
        gen = torch.Generator().manual_seed(seed)
        self._views: dict[str, list[_View]] = {"train": [], "val": []}
        self._labels: dict[str, list[Tensor]] = {"train": [], "val": []}
        self._classes: dict[str, dict[int, tuple[str, int]]] = {"train": {}, "val": {}}  # class -> (image, segment)
        self._items: dict[str, dict[int, list[int]]] = {"train": {}, "val": {}}
        for n, img in self.pixels.items():
            split = split_of[n]
            seg = slic(images[n], n_segments=n_segments, compactness=10, start_label=0)
            area = np.bincount(seg.ravel()) / seg.size
            keep = set(np.nonzero((area >= 0.02) & (area <= max_fraction))[0].tolist())
            seg_t = torch.from_numpy(seg.astype(np.int64))
            ids = {}
            for sid in sorted(keep):
                ids[sid] = len(self._classes["train"]) + len(self._classes["val"])
                self._classes[split][ids[sid]] = (n, sid)
            for _ in range(views):
                v = _draw_view(n, img.shape[1], img.shape[2], gen)
                item = len(self._views[split])
                self._views[split].append(v)
                lab = _geometry(seg_t[None, None].float(), v, size, "nearest")[0, 0].long()
                self._labels[split].append(lab.to(torch.int16))
                frac = torch.bincount(lab.flatten(), minlength=int(seg.max()) + 1).float() / lab.numel()
                for sid in keep:
                    if frac[sid] >= min_fraction:
                        self._items[split].setdefault(ids[sid], []).append(item)

    def classes(self, split: str) -> list[int]:
        return sorted(self._items[split])

    def items_with(self, split: str, cls: int) -> list[int]:
        return self._items[split].get(cls, [])

    def image(self, split: str, item: int) -> Tensor:
        v = self._views[split][item]
        crop = _geometry(self.pixels[v.image][None], v, self.size, "bilinear")[0]
        return ((crop - 0.5) * v.gain + 0.5 + v.bias).clamp(0, 1)

    def mask(self, split: str, item: int, cls: int) -> Tensor:
        name, sid = self._classes[split][cls]
        if self._views[split][item].image != name:
            return torch.zeros(self.size, self.size, dtype=torch.long)
        return (self._labels[split][item] == sid).long()

    def describe(self) -> dict:
        per_split = {s: sorted({self._classes[s][c][0] for c in self._items[s]}) for s in ("train", "val")}
        return {
            "name": self.name,
            "images": {n: SOURCE_IMAGES.get(n, "user-supplied") for n in self.pixels},
            "train_images": per_split["train"],
            "val_images": per_split["val"],
            "views_per_image": self.views,
            "classes": {s: len(self._items[s]) for s in ("train", "val")},
        }


def _draw_view(name: str, h: int, w: int, gen: torch.Generator) -> _View:
    scale = 0.5 + 0.5 * torch.rand((), generator=gen).item()  # crop side as a fraction of the shorter side
    side = max(8, int(scale * min(h, w)))
    y = int(torch.randint(0, h - side + 1, (), generator=gen))
    x = int(torch.randint(0, w - side + 1, (), generator=gen))
    flip = torch.rand((), generator=gen).item() < 0.5
    gain = 0.8 + 0.4 * torch.rand((), generator=gen).item()  # contrast
    bias = 0.1 * (torch.rand((), generator=gen).item() - 0.5)  # brightness
    return _View(name, y, x, side, flip, gain, bias)


def _geometry(t: Tensor, v: _View, size: int, mode: str) -> Tensor:
    """Crop, flip and resize (1, C, H, W) by a view's geometric transform."""
    crop = t[..., v.y : v.y + v.side, v.x : v.x + v.side]
    if v.flip:
        crop = crop.flip(-1)
    if mode == "nearest":
        return F.interpolate(crop, size=(size, size), mode="nearest")
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
