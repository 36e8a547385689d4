"""The simplest support-free alternative a practitioner would try first: a linear probe.

Per-pixel multinomial logistic regression on the same frozen multi-level features (the stride-4 skip map and the
last map of strides 8, 16 and 32, upsampled to stride 4 and concatenated), fitted by L-BFGS on every labelled
pixel of the support set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import FrozenBackbone, Pyramid


def probe_features(p: Pyramid, strides: tuple[int, ...]) -> Tensor:
    """(B, D, S/4, S/4): skip4 plus the last layer of each attention stride, upsampled to stride 4."""
    size = p.skip4.shape[-2:]
    last = {s: i for i, s in enumerate(strides)}  # the last index wins
    maps = [p.skip4] + [
        F.interpolate(p.layers[i], size=size, mode="bilinear", align_corners=False) for i in last.values()
    ]
    return torch.cat(maps, dim=1)


class LinearProbe(nn.Module):
    """Backbone features -> per-pixel linear classifier. ``forward`` returns (B, C+1, S, S) logits."""

    def __init__(self, backbone: FrozenBackbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.strides = tuple(li.stride for li in backbone.layer_info)
        dim = backbone.skip4_channels + sum(
            {li.stride: li.channels for li in backbone.layer_info}.values()
        )  # last layer's width per stride
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.classifier = nn.Conv2d(dim, num_classes + 1, 1)

    def forward(self, images: Tensor) -> Tensor:
        f = probe_features(self.backbone(images), self.strides)
        f = (f - self.mean[:, None, None]) / self.std[:, None, None]
        logits = self.classifier(f)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def fit(self, images: Tensor, labels: Tensor, l2: float = 1e-2, max_iter: int = 100) -> None:
        """images: (K, 3, S, S); labels: (K, S, S) long with 255 = ignore."""
        with torch.no_grad():
            f = probe_features(self.backbone(images), self.strides)  # (K, D, h, w)
            y = F.interpolate(labels[:, None].float(), size=f.shape[-2:], mode="nearest")[:, 0].long()
            x = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (K*h*w, D)
            y = y.reshape(-1)
            keep = y != 255
            x, y = x[keep], y[keep]
            self.mean.copy_(x.mean(0))
            self.std.copy_(x.std(0).clamp_min(1e-6))
            x = (x - self.mean) / self.std
        w, b = self.classifier.weight, self.classifier.bias  # (C+1, D, 1, 1), (C+1,)
        nn.init.zeros_(w)
        nn.init.zeros_(b)
        w.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            w2 = w.flatten(1)  # (C+1, D)
            loss = F.cross_entropy(x @ w2.T + b, y) + l2 * (w2**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.classifier.requires_grad_(False)


class PrototypeMatcher(nn.Module):
    """Training-free prototype matching (PANet-style): masked average pooling of the support's multi-level
    features gives one prototype per class (background included); each query pixel takes the class of the most
    cosine-similar prototype. ``forward`` returns (B, C+1, S, S) logits (scaled cosine similarities)."""

    def __init__(self, backbone: FrozenBackbone, num_classes: int, scale: float = 20.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.strides = tuple(li.stride for li in backbone.layer_info)
        self.num_classes = num_classes
        self.scale = scale
        self.register_buffer("prototypes", torch.zeros(0))

    def fit(self, images: Tensor, labels: Tensor) -> None:
        """images: (K, 3, S, S); labels: (K, S, S) long with 255 = ignore."""
        with torch.no_grad():
            f = F.normalize(probe_features(self.backbone(images), self.strides), dim=1)  # (K, D, h, w)
            y = F.interpolate(labels[:, None].float(), size=f.shape[-2:], mode="nearest")[:, 0].long()
            protos = []
            for c in range(self.num_classes + 1):
                sel = (y == c).unsqueeze(1).float()  # (K, 1, h, w)
                n = sel.sum()
                proto = (f * sel).sum(dim=(0, 2, 3)) / n.clamp_min(1)
                protos.append(F.normalize(proto, dim=0) if n > 0 else torch.zeros_like(proto))
            self.prototypes = torch.stack(protos)  # (C+1, D); a class with no pixel gets a zero prototype

    def forward(self, images: Tensor) -> Tensor:
        f = F.normalize(probe_features(self.backbone(images), self.strides), dim=1)
        logits = self.scale * torch.einsum("bdhw,cd->bchw", f, self.prototypes)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
