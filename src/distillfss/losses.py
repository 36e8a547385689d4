"""Losses of TransferFSS / DistillFSS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Multi-class focal loss, mean over non-ignored pixels; no alpha, no class weights (as the original).

    logits: (B, C+1, H, W); target: (B, H, W) long with 255 = ignore.
    """
    valid = target != IGNORE
    t = torch.where(valid, target, torch.zeros_like(target))
    logp = F.log_softmax(logits.float(), dim=1).gather(1, t.unsqueeze(1)).squeeze(1)  # (B, H, W)
    loss = -((1 - logp.exp()) ** gamma) * logp
    return (loss * valid).sum() / valid.sum().clamp_min(1)


def coarse_mse(teacher: list[Tensor], student: list[Tensor], strides: tuple[int, ...], present: Tensor) -> Tensor:
    """Distillation loss: per stride, MSE between teacher and student coarse masks of the classes with shots;
    averaged over the strides.

    teacher, student: per backbone layer (B, C, h, w); present: (B, C) bool.
    """
    w = present.float()[:, :, None, None]  # (B, C, 1, 1)
    per_stride = []
    for s in sorted(set(strides)):
        err = [((t - u) ** 2 * w).mean(dim=(2, 3)) for t, u, st in zip(teacher, student, strides) if st == s]
        n = present.float().sum().clamp_min(1)
        per_stride.append(torch.stack(err).mean(0).sum() / n)
    return torch.stack(per_stride).mean()
