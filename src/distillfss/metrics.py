"""Dataset-level IoU: one confusion matrix accumulated over every test image, at the image's own resolution."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from .data.folder import IGNORE


@dataclass(frozen=True)
class IoUResult:
    per_class: dict[str, float]  # IoU in percent, background included
    miou: float  # mean over foreground classes, percent
    miou_with_background: float  # mean over all classes, percent


class IoUMeter:
    """Accumulates a (C+1) x (C+1) confusion matrix; pixels labelled 255 are ignored.

    A class absent from both predictions and ground truth gets IoU 0 (torchmetrics' and the original's rule).
    """

    def __init__(self, classes: tuple[str, ...]) -> None:
        self.classes = classes
        self._cm = MulticlassConfusionMatrix(num_classes=len(classes), ignore_index=IGNORE)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: (H, W) or (B, H, W) integer label maps of the same size."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ")
        self._cm.update(pred.reshape(-1).long(), target.reshape(-1).long())

    @property
    def confusion(self) -> Tensor:
        """(C+1, C+1) counts, rows = ground truth, columns = prediction."""
        return self._cm.compute()

    def compute(self) -> IoUResult:
        cm = self.confusion.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.zeros_like(tp)) * 100
        per_class = {name: round(float(v), 4) for name, v in zip(self.classes, iou)}
        return IoUResult(per_class, round(float(iou[1:].mean()), 4), round(float(iou.mean()), 4))
