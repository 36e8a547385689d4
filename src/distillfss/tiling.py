"""Images of any size and aspect at one pixel scale: windows for training, sliding windows for inference.

A model works at one **pixel scale** ``scale`` (model pixels per image pixel), recorded in its ``config.json``:

* ``None`` ("fit"): each image is resized so that its longer side is the working size S (the shorter side is
  padded, never squashed), whatever its size.
* a number: an image of H x W becomes round(H * scale) x round(W * scale); an image no larger than S x S is padded to
  one window; a larger one is covered by S x S windows overlapping by ``OVERLAP`` of a window, whose class
  probabilities are blended with a Gaussian weight (highest at a window's centre, as nnU-Net's sliding window).

Inference streams windows in batches, so memory holds one image, its (classes x scaled size) float32 accumulator and
one batch of windows, whatever the image size; the labels come back at the image's full size. Training uses the same
windows without overlap (``support_windows``): a support image larger than one window gives up to
``WINDOWS_PER_IMAGE`` of them, those holding foreground first.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

OVERLAP = 0.25  # fraction of a window shared with its neighbour at inference
MAX_PIXELS = 2**28  # the most pixels a support image may have at its pixel scale (resized whole: 3 GiB as float)
WINDOWS_PER_IMAGE = 4  # at most this many training windows from one large support image
IGNORE = 255
STRIP = 1024  # output rows resized at a time when the output is large and the scale is not 1 (bounded memory)

Logits = Callable[[Tensor], Tensor]  # (B, 3, S, S) in [0, 1] -> (B, C+1, S, S) logits


def scaled_size(h: int, w: int, size: int, scale: float | None) -> tuple[int, int, float]:
    """An image's size at the model's pixel scale -> (height, width, the scale used)."""
    s = size / max(h, w) if scale is None else float(scale)
    return max(1, round(h * s)), max(1, round(w * s)), s


def starts(length: int, size: int, stride: int) -> list[int]:
    """Window origins covering [0, length) with windows of ``size`` every ``stride``, the last flush with the end."""
    if length <= size:
        return [0]
    n = math.ceil((length - size) / stride) + 1
    return sorted({min(i * stride, length - size) for i in range(n)})


def choose_scale(sizes: Sequence[tuple[int, int]], size: int, requested: str | float | None) -> float | None:
    """The pixel scale ``adapt`` records. ``"auto"``: the support images' own, working size / their median longer
    side, when that side is at most twice the working size (images of that size are resized to one window, as
    before; larger ones at inference are windowed at the same scale); 1 (native pixels, windows) for larger support
    images. ``"fit"``/None: every image, support or not, resized to one window whatever its size (the old
    behaviour for images of varying size). A number is used as given."""
    if requested in (None, "fit"):
        return None
    if requested == "auto":
        longest = float(np.median([max(h, w) for h, w in sizes])) if sizes else size
        return size / longest if longest <= 2 * size else 1.0
    try:
        value = float(requested)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"scale must be 'auto', 'fit' or a positive number, got {requested!r}")
    for h, w in sizes:
        if h * w * value**2 > MAX_PIXELS:
            raise ValueError(
                f"scale {value:g} makes a {w} x {h} px support image {round(w * value)} x {round(h * value)} px, "
                f"over {MAX_PIXELS:.3g} pixels (it is resized whole): a smaller scale, or crop the image"
            )
    return value


def _as_tensor(image: np.ndarray) -> Tensor:
    """(h, w, 3) uint8 or float in [0, 1] -> (1, 3, h, w) float32."""
    a = np.ascontiguousarray(image)
    t = torch.from_numpy(a if a.flags.writeable else a.copy()).permute(2, 0, 1)[None]  # read-only: Pillow's arrays
    return t.float() / 255.0 if image.dtype == np.uint8 else t.float()


def _resized(t: Tensor, h: int, w: int) -> Tensor:
    if t.shape[-2:] == (h, w):
        return t
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def _gaussian(size: int) -> Tensor:
    """(size, size) weights, 1 at the centre, sigma = size / 8, floored at 1e-3 (nnU-Net's importance map)."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * (size / 8) ** 2))
    return (g[:, None] * g[None, :]).clamp_min(1e-3)


@dataclass
class _Plan:
    """One image's windows and, while they run, its accumulated probabilities."""

    image: np.ndarray
    size: int
    scale: float | None
    out_size: tuple[int, int]
    sh: int = 0
    sw: int = 0
    s: float = 1.0
    origins: list[tuple[int, int]] = field(default_factory=list)
    acc: Tensor | None = None
    done: int = 0

    def __post_init__(self) -> None:
        h, w = self.image.shape[:2]
        self.sh, self.sw, self.s = scaled_size(h, w, self.size, self.scale)
        stride = max(1, round(self.size * (1 - OVERLAP)))
        self.origins = [(y, x) for y in starts(self.sh, self.size, stride) for x in starts(self.sw, self.size, stride)]

    def window(self, y: int, x: int) -> Tensor:
        """The (3, S, S) window at scaled origin (y, x), zero-padded past the image."""
        h, w = self.image.shape[:2]
        wh, ww = min(self.size, self.sh - y), min(self.size, self.sw - x)
        if self.sh == round(h * self.s) and self.sw == round(w * self.s) and self.s == 1.0:
            t = _as_tensor(self.image[y : y + wh, x : x + ww])
        else:  # the source pixels under this window, resized to it
            y0, y1 = math.floor(y / self.s), min(h, math.ceil((y + wh) / self.s))
            x0, x1 = math.floor(x / self.s), min(w, math.ceil((x + ww) / self.s))
            t = _resized(_as_tensor(self.image[y0:y1, x0:x1]), wh, ww)
        return F.pad(t, (0, self.size - ww, 0, self.size - wh))[0]

    def add(self, logits: Tensor, y: int, x: int, weight: Tensor) -> None:
        """Accumulate one window's logits (C+1, S, S): an image of one window keeps them as they are; windows of a
        larger image add their Gaussian-weighted probabilities."""
        wh, ww = min(self.size, self.sh - y), min(self.size, self.sw - x)
        if len(self.origins) == 1:
            self.acc = logits[:, :wh, :ww].float()
        else:
            if self.acc is None:
                self.acc = torch.zeros(logits.shape[0], self.sh, self.sw)
            self.acc[:, y : y + wh, x : x + ww] += (logits.softmax(0) * weight)[:, :wh, :ww]
        self.done += 1

    def labels(self) -> np.ndarray:
        """(H, W) uint8 at the requested output size (the image's own by default): the accumulated scores resized
        bilinearly, then the best class per pixel."""
        assert self.acc is not None
        oh, ow = self.out_size
        if (oh, ow) == (self.sh, self.sw):  # the best class, a strip of rows at a time (argmax is int64)
            out = np.empty((oh, ow), np.uint8)
            for r0 in range(0, oh, STRIP):
                out[r0 : r0 + STRIP] = self.acc[:, r0 : r0 + STRIP].argmax(0).to(torch.uint8).numpy()
            return out
        if oh * ow <= STRIP * STRIP:
            resized = F.interpolate(self.acc[None].float(), size=(oh, ow), mode="bilinear", align_corners=False)
            return resized[0].argmax(0).to(torch.uint8).numpy()
        out = np.empty((oh, ow), np.uint8)  # a large output: a strip of rows at a time, the same bilinear sampling
        xs = ((torch.arange(ow) + 0.5) * (self.sw / ow) - 0.5).clamp(0, self.sw - 1)
        for r0 in range(0, oh, STRIP):
            r1 = min(oh, r0 + STRIP)
            ys = ((torch.arange(r0, r1) + 0.5) * (self.sh / oh) - 0.5).clamp(0, self.sh - 1)
            s0, s1 = int(ys[0].floor()), min(self.sh, int(ys[-1].floor()) + 2)
            src = self.acc[None, :, s0:s1].float()
            gy = (2 * (ys - s0) + 1) / (s1 - s0) - 1
            gx = (2 * xs + 1) / self.sw - 1
            grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
            rows = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
            out[r0:r1] = rows.argmax(0).to(torch.uint8).numpy()
        return out


def segment_stream(
    images: Sequence[np.ndarray],
    size: int,
    scale: float | None,
    logits: Logits,
    batch: int = 8,
    sizes: Sequence[tuple[int, int] | None] | None = None,
) -> Iterator[np.ndarray]:
    """Label maps of ``images`` (each (H, W, 3), uint8 or float in [0, 1]) at their own size (or ``sizes``), from
    windows at the pixel scale, ``batch`` windows per forward pass; each is yielded as soon as its last window ran
    (one image in memory at a time, plus a batch of windows)."""
    weight = _gaussian(size)
    sizes = sizes if sizes is not None else itertools.repeat(None)
    plans: list[_Plan] = []
    pending: list[tuple[_Plan, int, int]] = []

    def run() -> None:
        x = torch.stack([p.window(y, x0) for p, y, x0 in pending])
        out = logits(x).float().cpu()
        for (p, y, x0), one in zip(pending, out):
            p.add(one, y, x0, weight)
        pending.clear()

    for image, out in zip(images, sizes):
        plan = _Plan(image, size, scale, tuple(out) if out else image.shape[:2])
        plans.append(plan)
        for y, x in plan.origins:
            pending.append((plan, y, x))
            if len(pending) == batch:
                run()
        while plans and plans[0].done == len(plans[0].origins):
            yield plans.pop(0).labels()
    if pending:
        run()
    for plan in plans:
        yield plan.labels()


def support_windows(image: np.ndarray, mask: np.ndarray, size: int, scale: float | None) -> tuple[Tensor, Tensor]:
    """A support image and its mask at the pixel scale -> windows (N, 3, S, S) and labels (N, S, S) long: one window
    (padded; padding is ignored in training) when the scaled image fits, else up to ``WINDOWS_PER_IMAGE`` of the
    non-overlapping grid, foreground-holding ones first (evenly spread, then evenly spread background ones)."""
    h, w = image.shape[:2]
    sh, sw, _ = scaled_size(h, w, size, scale)
    img = _resized(_as_tensor(image), sh, sw)
    lab = torch.from_numpy(mask.astype(np.int64))[None, None].float()
    lab = F.interpolate(lab, size=(sh, sw), mode="nearest")[0, 0].long() if (sh, sw) != (h, w) else lab[0, 0].long()
    origins = [(y, x) for y in starts(sh, size, size) for x in starts(sw, size, size)]
    if len(origins) > WINDOWS_PER_IMAGE:
        fg = [o for o in origins if ((lab[o[0] : o[0] + size, o[1] : o[1] + size] % IGNORE) > 0).any()]
        bg = [o for o in origins if o not in fg]
        n_fg = min(len(fg), max(WINDOWS_PER_IMAGE - len(bg), WINDOWS_PER_IMAGE - WINDOWS_PER_IMAGE // 4))
        origins = _spread(fg, n_fg) + _spread(bg, WINDOWS_PER_IMAGE - n_fg)
    xs, ys = [], []
    for y, x in origins:
        wh, ww = min(size, sh - y), min(size, sw - x)
        xs.append(F.pad(img[0, :, y : y + wh, x : x + ww], (0, size - ww, 0, size - wh)))
        ys.append(F.pad(lab[y : y + wh, x : x + ww], (0, size - ww, 0, size - wh), value=IGNORE))
    return torch.stack(xs), torch.stack(ys)


def _spread(items: list, n: int) -> list:
    if n <= 0 or not items:
        return []
    if n >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]
