"""Synthetic few-shot episodes with exact masks (an offline source domain for meta-training).

A **class** is a material: a texture (a region of one of scikit-image's bundled photographs, or a procedural
pattern: smooth noise, stripes, checks or dots in two colours of its own) together with how it occurs: its shape
(irregular blobs or rotated rectangles), its size and how many instances an image holds (one large object or many
small ones, as nuclei or buildings). An **item** is a composite image: a background material covered by the
instances of one to three foreground classes, each class drawn with a fresh crop / phase of its texture, a colour
jitter and fresh shapes, then lit by a smooth gradient, blurred a little and given sensor noise. The mask of a class
is exactly the pixels where its instances are on top. An episode pairs two items in which the same class is
visible: the teacher must find the material, not the image.

The bank is fixed (drawn once from the seed; images stored as uint8, labels as int16) so the frozen backbone's
features of every item are computed once, as for the ``selfsup`` source. ``train`` and ``val`` classes are disjoint;
the photographs of ``val`` classes are the ``selfsup`` validation images, never used by a training class.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from .selfsup import SOURCE_IMAGES, VAL_IMAGES

KINDS = ("photo", "noise", "stripes", "checks", "dots")
_KIND_WEIGHTS = (0.4, 0.2, 0.15, 0.1, 0.15)


class _Material(NamedTuple):
    kind: str
    colours: tuple[tuple[float, ...], tuple[float, ...]]  # procedural kinds: the two colours mixed
    scale: float  # pattern frequency (cycles per image) or noise grid size; photo: crop side (fraction of the box)
    angle: float  # stripes / checks orientation (radians)
    photo: str  # photo kinds: the photograph ...
    box: tuple[int, int, int]  # ... and its region (y, x, side) the class's crops come from
    shape: str  # "blob" | "rect"
    radius: tuple[float, float]  # instance radius range, fraction of the image side
    count: tuple[int, int]  # instances per image (inclusive range)


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def _muted(colour: Tensor, saturation: float) -> tuple[float, ...]:
    grey = colour.mean()
    return tuple((grey + saturation * (colour - grey)).tolist())


def _draw_material(gen: torch.Generator, photos: dict[str, Tensor], names: list[str]) -> _Material:
    kind = KINDS[int(torch.multinomial(torch.tensor(_KIND_WEIGHTS), 1, generator=gen))]
    # Two colours, often muted (towards their grey) as in stained tissue, CT or roofs, where few-shot is hard.
    c0, c1 = (_muted(torch.rand(3, generator=gen), _uniform(gen, 0.2, 1.0)) for _ in range(2))
    photo, box = "", (0, 0, 0)
    if kind == "photo":
        photo = names[int(torch.randint(len(names), (), generator=gen))]
        h, w = photos[photo].shape[-2:]
        side = max(16, int(_uniform(gen, 0.15, 0.4) * min(h, w)))
        box = (_randint(gen, 0, h - side), _randint(gen, 0, w - side), side)
    scale = {
        "photo": _uniform(gen, 0.6, 1.0),
        "noise": float(_randint(gen, 3, 24)),
        "stripes": _uniform(gen, 4, 24),
        "checks": _uniform(gen, 3, 16),
        "dots": _uniform(gen, 6, 24),
    }[kind]
    if torch.rand((), generator=gen).item() < 0.5:  # many small instances (cells, buildings, spots)
        radius, count = (
            (_uniform(gen, 0.03, 0.05), _uniform(gen, 0.06, 0.1)),
            (_randint(gen, 3, 6), _randint(gen, 7, 14)),
        )
    else:  # one or a few large objects
        radius, count = (_uniform(gen, 0.1, 0.18), _uniform(gen, 0.2, 0.35)), (1, _randint(gen, 1, 3))
    return _Material(
        kind=kind,
        colours=(c0, c1),
        scale=scale,
        angle=_uniform(gen, 0, math.pi),
        photo=photo,
        box=box,
        shape="rect" if torch.rand((), generator=gen).item() < 0.3 else "blob",
        radius=radius,
        count=count,
    )


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [0, 1): (y, x), each (size, size)."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return torch.meshgrid(c, c, indexing="ij")


def _texture(m: _Material, size: int, gen: torch.Generator, photos: dict[str, Tensor]) -> Tensor:
    """(3, size, size) in [0, 1]: one instance of the material's appearance (fresh crop or phase, colour jitter)."""
    if m.kind == "photo":
        y0, x0, side = m.box
        crop = max(8, int(m.scale * side))
        y = y0 + _randint(gen, 0, side - crop)
        x = x0 + _randint(gen, 0, side - crop)
        patch = photos[m.photo][:, y : y + crop, x : x + crop]
        if torch.rand((), generator=gen).item() < 0.5:
            patch = patch.flip(-1)
        tex = F.interpolate(patch[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    else:
        if m.kind == "noise":
            g = int(m.scale)
            v = F.interpolate(torch.randn(1, 1, g, g, generator=gen), size=(size, size), mode="bicubic")[0, 0]
            v = (v - v.min()) / (v.max() - v.min() + 1e-6)
        else:
            yy, xx = _grid(size)
            a = m.angle + _uniform(gen, -0.15, 0.15)
            u = xx * math.cos(a) + yy * math.sin(a) + _uniform(gen, 0, 1)
            w = -xx * math.sin(a) + yy * math.cos(a) + _uniform(gen, 0, 1)
            f = 2 * math.pi * m.scale * _uniform(gen, 0.9, 1.1)
            if m.kind == "stripes":
                v = 0.5 + 0.5 * torch.sin(f * u)
            elif m.kind == "checks":
                v = (torch.sin(f * u) * torch.sin(f * w) > 0).float()
            else:  # dots
                v = ((torch.cos(f * u) + torch.cos(f * w)) > 1.0).float()
        c0, c1 = (torch.tensor(c).view(3, 1, 1) for c in m.colours)
        tex = c0 * (1 - v) + c1 * v
    jitter = 1 + 0.08 * torch.randn(3, 1, 1, generator=gen)
    return (tex * jitter + 0.04 * torch.randn(3, 1, 1, generator=gen)).clamp(0, 1)


def _instances(m: _Material, size: int, gen: torch.Generator) -> Tensor:
    """(size, size) bool: the union of a fresh set of the material's instances."""
    yy, xx = _grid(size)
    out = torch.zeros(size, size, dtype=torch.bool)
    for _ in range(_randint(gen, *m.count)):
        r = _uniform(gen, *m.radius)
        cy, cx = _uniform(gen, 0, 1), _uniform(gen, 0, 1)
        a = _uniform(gen, 0, math.pi)
        aspect = _uniform(gen, 0.6, 1.6)
        dy, dx = yy - cy, xx - cx
        u = (dx * math.cos(a) + dy * math.sin(a)) / (r * aspect)
        v = (-dx * math.sin(a) + dy * math.cos(a)) * aspect / r
        if m.shape == "rect":
            out |= (u.abs() < 1) & (v.abs() < 1)
        else:  # a blob: an ellipse whose radius wobbles with a few harmonics of the angle
            theta = torch.atan2(v, u)
            wobble = torch.ones_like(theta)
            for k in range(2, 6):
                wobble += _uniform(gen, 0, 0.25 / k) * torch.cos(k * theta + _uniform(gen, 0, 2 * math.pi))
            out |= u.square() + v.square() < wobble.square()
    return out


def render_item(
    background: _Material,
    foreground: list[tuple[int, _Material]],
    size: int,
    gen: torch.Generator,
    photos: dict[str, Tensor],
) -> tuple[Tensor, Tensor]:
    """One composite image (3, size, size) in [0, 1] and its label map (size, size) int16: the class id of the
    foreground instance on top, -1 for background."""
    image = _texture(background, size, gen, photos)
    labels = torch.full((size, size), -1, dtype=torch.int16)
    for cls, m in foreground:
        inside = _instances(m, size, gen)
        image = torch.where(inside, _texture(m, size, gen, photos), image)
        labels[inside] = cls
    yy, xx = _grid(size)
    a = _uniform(gen, 0, 2 * math.pi)
    light = 1 + _uniform(gen, 0, 0.25) * ((xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a))
    image = image * light
    sigma = _uniform(gen, 0.1, 1.2)
    image = gaussian_blur(image[None], kernel_size=5, sigma=sigma)[0]
    image = image + _uniform(gen, 0, 0.03) * torch.randn(image.shape, generator=gen)
    return image.clamp(0, 1), labels


class SyntheticSource:
    """The offline synthetic source (see the module docstring); implements ``EpisodeSource``.

    Args:
        photos: name -> (H, W, 3) float RGB in [0, 1] (``selfsup.load_source_images``), the photographs textures
            are cut from; those in ``val_photos`` texture only ``val`` classes.
        size: working resolution.
        classes: materials per split, ``{"train": n, "val": m}``.
        items: composite images per split.
        min_fraction: a class is visible in an item when it covers at least this fraction of it.
    """

    name = "synthetic"

    def __init__(
        self,
        photos: dict[str, np.ndarray],
        size: int,
        classes: dict[str, int] | None = None,
        items: dict[str, int] | None = None,
        seed: int = 0,
        val_photos: tuple[str, ...] = VAL_IMAGES,
        min_fraction: float = 0.004,
    ) -> None:
        classes = classes or {"train": 160, "val": 32}
        items = items or {"train": 640, "val": 128}
        self.size = size
        self.photos = {n: torch.from_numpy(photos[n]).permute(2, 0, 1).contiguous() for n in sorted(photos)}
        names = {
            "train": [n for n in self.photos if n not in val_photos],
            "val": [n for n in self.photos if n in val_photos],
        }
        gen = torch.Generator().manual_seed(seed)
        self._materials: dict[str, dict[int, _Material]] = {}
        self._images: dict[str, list[Tensor]] = {}
        self._labels: dict[str, list[Tensor]] = {}
        self._items: dict[str, dict[int, list[int]]] = {}
        first = 0
        for split in ("train", "val"):
            if not names[split]:
                raise ValueError(f"no photograph for the {split} classes (val: {', '.join(val_photos)})")
            pool = [_draw_material(gen, self.photos, names[split]) for _ in range(classes[split])]
            ids = list(range(first, first + len(pool)))
            first += len(pool)
            self._materials[split] = dict(zip(ids, pool))
            self._images[split], self._labels[split], self._items[split] = [], [], {}
            for item in range(items[split]):
                picks = torch.randperm(len(pool), generator=gen)[: 1 + _randint(gen, 1, 3)].tolist()
                background, fg = pool[picks[0]], [(ids[i], pool[i]) for i in picks[1:]]
                image, labels = render_item(background, fg, size, gen, self.photos)
                self._images[split].append((image * 255).round().to(torch.uint8))
                self._labels[split].append(labels)
                for cls, _ in fg:
                    if (labels == cls).float().mean().item() >= min_fraction:
                        self._items[split].setdefault(cls, []).append(item)

    def classes(self, split: str) -> list[int]:
        return sorted(self._items[split])

    def items_with(self, split: str, cls: int) -> list[int]:
        return self._items[split].get(cls, [])

    def image(self, split: str, item: int) -> Tensor:
        return self._images[split][item].float() / 255

    def mask(self, split: str, item: int, cls: int) -> Tensor:
        return (self._labels[split][item] == cls).long()

    def describe(self) -> dict:
        kinds = {s: sorted({self._materials[s][c].kind for c in self._items[s]}) for s in ("train", "val")}
        return {
            "name": self.name,
            "images": {n: SOURCE_IMAGES.get(n, "user-supplied") for n in self.photos},
            "train_photos": sorted({m.photo for m in self._materials["train"].values() if m.photo}),
            "val_photos": sorted({m.photo for m in self._materials["val"].values() if m.photo}),
            "kinds": kinds,
            "items": {s: len(self._images[s]) for s in ("train", "val")},
            "classes": {s: len(self._items[s]) for s in ("train", "val")},
        }


class MixedSource:
    """Several sources as one: classes and items renumbered after each other, an episode stays within one source.
    Episodes draw the class uniformly over the union, so each source's share is its share of the classes."""

    def __init__(self, *parts) -> None:
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.size = parts[0].size
        if any(p.size != self.size for p in parts):
            raise ValueError("the sources of a mixture must share their working resolution")
        self._class_of: dict[str, dict[int, tuple[int, int]]] = {}  # split -> mixed class -> (part, class)
        self._item_base: dict[str, list[int]] = {}
        for split in ("train", "val"):
            self._class_of[split], base, next_cls = {}, [], 0
            items = 0
            for k, p in enumerate(parts):
                for c in p.classes(split):
                    self._class_of[split][next_cls] = (k, c)
                    next_cls += 1
                base.append(items)
                items += 1 + max((i for c in p.classes(split) for i in p.items_with(split, c)), default=-1)
            self._item_base[split] = base

    def _locate(self, split: str, item: int) -> tuple[int, int]:
        base = self._item_base[split]
        k = max(i for i, b in enumerate(base) if b <= item)
        return k, item - base[k]

    def classes(self, split: str) -> list[int]:
        return sorted(self._class_of[split])

    def items_with(self, split: str, cls: int) -> list[int]:
        k, c = self._class_of[split][cls]
        return [self._item_base[split][k] + i for i in self.parts[k].items_with(split, c)]

    def image(self, split: str, item: int) -> Tensor:
        k, i = self._locate(split, item)
        return self.parts[k].image(split, i)

    def mask(self, split: str, item: int, cls: int) -> Tensor:
        k, c = self._class_of[split][cls]
        part, i = self._locate(split, item)
        if part != k:  # another source's image never holds this class
            return torch.zeros(self.size, self.size, dtype=torch.long)
        return self.parts[k].mask(split, i, c)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "parts": [p.describe() for p in self.parts],
            "classes": {s: len(self._class_of[s]) for s in ("train", "val")},
        }
