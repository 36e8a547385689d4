"""Losses of TransferFSS / DistillFSS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.folder import IGNORE

__all__ = ["IGNORE", "balanced_weights", "coarse_mse", "focal_loss"]


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, weights: Tensor | None = None) -> Tensor:
    """Multi-class focal loss, mean over non-ignored pixels.

    logits: (B, C+1, H, W); target: (B, H, W) long with 255 = ignore; weights: optional (C+1,) per-class
    weights (the original uses none).
    """
    valid = target != IGNORE
    t = torch.where(valid, target, torch.zeros_like(target))
    logp = F.log_softmax(logits.float(), dim=1).gather(1, t.unsqueeze(1)).squeeze(1)  # (B, H, W)
    loss = -((1 - logp.exp()) ** gamma) * logp
    w = valid.float() if weights is None else weights[t] * valid
    return (loss * w).sum() / w.sum().clamp_min(1e-8)


def balanced_weights(labels: Tensor, num_classes: int, power: float = 0.5) -> Tensor:
    """(C+1,) class weights proportional to frequency^-power over the non-ignored pixels of ``labels``.

    Rare foreground classes (a few percent of the pixels) otherwise lose to background early in training and
    a freshly initialised decoder can settle on predicting background everywhere.
    """
    counts = torch.bincount(labels[labels != IGNORE].flatten(), minlength=num_classes + 1)[: num_classes + 1]
    freq = counts.float() / counts.sum().clamp_min(1)
    w = torch.where(counts > 0, freq.clamp_min(1e-6) ** -power, torch.zeros_like(freq))
    return w / (w * freq).sum().clamp_min(1e-8)  # the average pixel keeps weight 1


def coarse_mse(teacher: list[Tensor], student: list[Tensor], strides: tuple[int, ...], present: Tensor) -> Tensor:
    """Distillation loss as the original: per (episode, class with shots), the mean over strides of the MSE between
    teacher and student coarse masks (all layers of a stride pooled); averaged over the classes present in each
    episode, then over the episodes that have any.

    teacher, student: per backbone layer (B, C, h, w); present: (B, C) bool.
    """
    per_stride = []
    for s in sorted(set(strides)):
        err = [((t - u) ** 2).mean(dim=(2, 3)) for t, u, st in zip(teacher, student, strides) if st == s]  # (B, C)
        per_stride.append(torch.stack(err).mean(0))
    per_class = torch.stack(per_stride).mean(0)  # (B, C)
    w = present.float()
    n_cls = w.sum(dim=1)  # (B,)
    per_episode = (per_class * w).sum(dim=1) / n_cls.clamp_min(1)  # (B,)
    return per_episode.sum() / (n_cls > 0).float().sum().clamp_min(1)
