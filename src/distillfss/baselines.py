"""The simplest support-free alternatives a practitioner would try first, tuned as a careful user would.

* ``LinearProbe``: per-pixel multinomial logistic regression on the frozen backbone's features, fitted by L-BFGS on
  every labelled pixel of the support set.
* ``PrototypeMatcher``: training-free prototype matching (masked average pooling, cosine similarity).

Feature levels are the stride-4 skip map and the last map of strides 8, 16 and 32, upsampled to stride 4. Which
levels (``LEVEL_SETS``), the probe's L2 strength (``L2_GRID``) and its class weighting (none / balanced) are chosen
by cross-validation **on the support set itself** (nothing from the test split): leave one support image out, or
with a single image, leave one quadrant out. The score is the pooled foreground IoU over the held-out parts at
feature resolution; ties keep the earlier (simpler, more regularised) setting. The choice and its score are kept in
``settings`` and recorded in every result row.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import FrozenBackbone, Pyramid, place
from .losses import IGNORE

LEVEL_SETS: dict[str, tuple[int, ...]] = {"all": (4, 8, 16, 32), "fine": (4, 8), "coarse": (16, 32)}
L2_GRID = (1.0, 1e-1, 1e-2, 1e-3)  # most regularised first: it wins ties
QUICK = {"l2": 0.1, "levels": "all", "balanced": True}  # fixed settings where there is no time for the search
CV_PIXELS = 8192  # pixels per cross-validation fit (a seeded, fixed subsample): keeps the search to seconds


def level_maps(p: Pyramid, strides: tuple[int, ...]) -> dict[int, Tensor]:
    """Stride -> (B, D_s, S/4, S/4): the skip map (stride 4) and the last layer of each stride, upsampled."""
    size = p.skip4.shape[-2:]
    last = {s: i for i, s in enumerate(strides)}  # the last index wins
    maps = {4: p.skip4}
    for s, i in last.items():
        maps[s] = F.interpolate(p.layers[i], size=size, mode="bilinear", align_corners=False)
    return maps


def probe_features(p: Pyramid, strides: tuple[int, ...], levels: str = "all") -> Tensor:
    """(B, D, S/4, S/4): the maps of one of ``LEVEL_SETS``, concatenated."""
    maps = level_maps(p, strides)
    return torch.cat([maps[s] for s in LEVEL_SETS[levels] if s in maps], dim=1)


def cv_folds(k: int, h: int, w: int) -> tuple[str, list[Tensor]]:
    """Held-out pixel sets -> (scheme, list of (K, h, w) bool masks): one per support image, or the four quadrants
    of a single image."""
    if k >= 2:
        folds = []
        for i in range(k):
            m = torch.zeros(k, h, w, dtype=torch.bool)
            m[i] = True
            folds.append(m)
        return "leave-one-image-out", folds
    folds = []
    for ys, xs in itertools.product((slice(0, h // 2), slice(h // 2, h)), (slice(0, w // 2), slice(w // 2, w))):
        m = torch.zeros(1, h, w, dtype=torch.bool)
        m[0, ys, xs] = True
        folds.append(m)
    return "leave-one-quadrant-out", folds


def _pixels(f: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Features (K, D, h, w) and full-size labels -> per-pixel rows (K*h*w, D) and labels at (K, h, w) (nearest)."""
    y = F.interpolate(labels[:, None].float(), size=f.shape[-2:], mode="nearest")[:, 0].long()
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), y


def _class_weights(y: Tensor, n_out: int) -> Tensor:
    """sklearn's 'balanced': n / (n_classes_present * count), 0 for absent classes."""
    counts = torch.bincount(y, minlength=n_out).float()
    present = (counts > 0).sum()
    return torch.where(counts > 0, y.numel() / (present * counts.clamp_min(1)), torch.zeros_like(counts))


def fit_logistic(
    x: Tensor, y: Tensor, n_out: int, l2: float, balanced: bool, max_iter: int = 100
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Multinomial logistic regression on standardised rows -> (weight (n_out, D), bias, mean, std)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    cw = _class_weights(y, n_out) if balanced else None
    w = torch.zeros(n_out, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(n_out, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y, weight=cw) + l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


def _foreground_iou(inter: Tensor, union: Tensor) -> float:
    return float((inter[1:] / union[1:].clamp_min(1)).mean())


def _accumulate(pred: Tensor, y: Tensor, n_out: int, inter: Tensor, union: Tensor) -> None:
    for c in range(n_out):
        p, t = pred == c, y == c
        inter[c] += (p & t).sum()
        union[c] += (p | t).sum()


class LinearProbe(nn.Module):
    """Backbone features -> per-pixel linear classifier. ``forward`` returns (B, C+1, S, S) logits.

    l2, levels, balanced: fixed settings, or None to choose each by cross-validation on the support set in ``fit``.
    """

    def __init__(
        self,
        backbone: FrozenBackbone,
        num_classes: int,
        l2: float | None = None,
        levels: str | None = None,
        balanced: bool | None = None,
    ) -> None:
        super().__init__()
        if levels is not None and levels not in LEVEL_SETS:
            raise ValueError(f"levels must be one of {sorted(LEVEL_SETS)}, got {levels!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.strides = tuple(li.stride for li in backbone.layer_info)
        self.grid = {
            "l2": L2_GRID if l2 is None else (l2,),
            "levels": tuple(LEVEL_SETS) if levels is None else (levels,),
            "balanced": (True, False) if balanced is None else (balanced,),
        }
        self.settings: dict[str, Any] = {}
        self.register_buffer("weight", torch.zeros(0))
        self.register_buffer("bias", torch.zeros(0))
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.zeros(0))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(self.backbone(images), tuple(images.shape[-2:]))

    def forward_features(self, pyramid: Pyramid, size: tuple[int, int]) -> Tensor:
        """The backbone's features of (B, 3, H, W) images -> (B, C+1, H, W) logits, ``size`` = (H, W)."""
        f = probe_features(pyramid, self.strides, self.settings["levels"])
        f = (f - self.mean[:, None, None]) / self.std[:, None, None]
        logits = torch.einsum("bdhw,cd->bchw", f, self.weight) + self.bias[:, None, None]
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def fit(self, images: Tensor, labels: Tensor, max_iter: int = 100) -> None:
        """images: (K, 3, S, S); labels: (K, S, S) long with 255 = ignore."""
        self.fit_features(self.backbone(images), labels, max_iter)

    @torch.no_grad()
    def fit_features(self, pyramid: Pyramid, labels: Tensor, max_iter: int = 100) -> None:
        """As ``fit``, from the backbone's features of the support images (already encoded)."""
        n_out = self.num_classes + 1
        feats = {lv: probe_features(pyramid, self.strides, lv) for lv in self.grid["levels"]}
        grid = list(itertools.product(self.grid["levels"], self.grid["l2"], self.grid["balanced"]))
        settings: dict[str, Any] = {"l2": grid[0][1], "levels": grid[0][0], "balanced": grid[0][2], "cv": "none"}
        if len(grid) > 1:
            settings = self._search(feats, labels, grid, n_out, max_iter)
        x, y = _pixels(feats[settings["levels"]], labels)
        y = y.reshape(-1)
        keep = y != IGNORE
        w, b, mean, std = fit_logistic(x[keep], y[keep], n_out, settings["l2"], settings["balanced"], max_iter)
        self.weight, self.bias, self.mean, self.std = w, b, mean, std
        self.settings = settings

    def _search(
        self, feats: dict[str, Tensor], labels: Tensor, grid: list[tuple], n_out: int, max_iter: int
    ) -> dict[str, Any]:
        k, _, h, w = next(iter(feats.values())).shape
        scheme, folds = cv_folds(k, h, w)
        gen = torch.Generator().manual_seed(0)
        scores = []
        for levels, l2, balanced in grid:
            x, y = _pixels(feats[levels], labels)
            y = y.reshape(-1)
            inter, union = torch.zeros(n_out, device=y.device), torch.zeros(n_out, device=y.device)
            for held in folds:
                held = held.reshape(-1).to(y.device)
                train = (~held & (y != IGNORE)).nonzero().flatten()
                if len(train) > CV_PIXELS:
                    train = train[torch.randperm(len(train), generator=gen)[:CV_PIXELS].to(train.device)]
                wt, bt, mean, std = fit_logistic(x[train], y[train], n_out, l2, balanced, max_iter // 2)
                test = held & (y != IGNORE)
                pred = (((x[test] - mean) / std) @ wt.T + bt).argmax(1)
                _accumulate(pred, y[test], n_out, inter, union)
            scores.append(_foreground_iou(inter, union))
        best = max(range(len(grid)), key=lambda i: (scores[i], -i))
        levels, l2, balanced = grid[best]
        return {
            "l2": l2,
            "levels": levels,
            "balanced": balanced,
            "cv": scheme,
            "cv_miou": round(100 * scores[best], 2),
            "grid_size": len(grid),
        }


def fixed_probe(
    backbone: FrozenBackbone, num_classes: int, settings: dict[str, Any], pyramid: Pyramid, labels: Tensor
) -> LinearProbe:
    """A ``LinearProbe`` with fixed ``settings`` (``l2``, ``levels``, ``balanced``: no search) fitted on the backbone's
    features of some images (``pyramid``) and their labels, on the labels' device."""
    fixed = {k: settings[k] for k in ("l2", "levels", "balanced")}
    probe = place(LinearProbe(backbone, num_classes, **fixed), labels.device)
    probe.fit_features(pyramid, labels)
    return probe


class PrototypeMatcher(nn.Module):
    """Training-free prototype matching (PANet-style): masked average pooling of the support's multi-level
    features gives one prototype per class (background included); each query pixel takes the class of the most
    cosine-similar prototype. ``forward`` returns (B, C+1, S, S) logits (scaled cosine similarities).

    levels: one of ``LEVEL_SETS``, or None to choose by cross-validation on the support set in ``fit``."""

    def __init__(self, backbone: FrozenBackbone, num_classes: int, scale: float = 20.0, levels: str | None = None):
        super().__init__()
        if levels is not None and levels not in LEVEL_SETS:
            raise ValueError(f"levels must be one of {sorted(LEVEL_SETS)}, got {levels!r}")
        self.backbone = backbone
        self.strides = tuple(li.stride for li in backbone.layer_info)
        self.num_classes = num_classes
        self.scale = scale
        self.candidates = tuple(LEVEL_SETS) if levels is None else (levels,)
        self.settings: dict[str, Any] = {}
        self.register_buffer("prototypes", torch.zeros(0))

    @staticmethod
    def _prototypes(f: Tensor, y: Tensor, n_out: int) -> Tensor:
        """Normalised features (K, D, h, w), labels (K, h, w) -> (n_out, D); a class with no pixel gets zeros."""
        protos = []
        for c in range(n_out):
            sel = (y == c).unsqueeze(1).float()
            n = sel.sum()
            proto = (f * sel).sum(dim=(0, 2, 3)) / n.clamp_min(1)
            protos.append(F.normalize(proto, dim=0) if n > 0 else torch.zeros_like(proto))
        return torch.stack(protos)

    @torch.no_grad()
    def fit(self, images: Tensor, labels: Tensor) -> None:
        """images: (K, 3, S, S); labels: (K, S, S) long with 255 = ignore."""
        n_out = self.num_classes + 1
        pyramid = self.backbone(images)
        feats = {lv: F.normalize(probe_features(pyramid, self.strides, lv), dim=1) for lv in self.candidates}
        y = F.interpolate(labels[:, None].float(), size=pyramid.skip4.shape[-2:], mode="nearest")[:, 0].long()
        settings: dict[str, Any] = {"levels": self.candidates[0], "cv": "none"}
        if len(self.candidates) > 1:
            scheme, folds = cv_folds(*y.shape)
            scores = []
            for lv in self.candidates:
                inter, union = torch.zeros(n_out, device=y.device), torch.zeros(n_out, device=y.device)
                for held in folds:
                    held = held.to(y.device)
                    train_y = torch.where(held, torch.full_like(y, IGNORE), y)
                    protos = self._prototypes(feats[lv], train_y, n_out)
                    pred = torch.einsum("bdhw,cd->bchw", feats[lv], protos).argmax(1)
                    test = held & (y != IGNORE)
                    _accumulate(pred[test], y[test], n_out, inter, union)
                scores.append(_foreground_iou(inter, union))
            best = max(range(len(self.candidates)), key=lambda i: (scores[i], -i))
            settings = {"levels": self.candidates[best], "cv": scheme, "cv_miou": round(100 * scores[best], 2)}
        self.prototypes = self._prototypes(feats[settings["levels"]], y, n_out)
        self.settings = settings

    def forward(self, images: Tensor) -> Tensor:
        f = F.normalize(probe_features(self.backbone(images), self.strides, self.settings["levels"]), dim=1)
        logits = self.scale * torch.einsum("bdhw,cd->bchw", f, self.prototypes)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
