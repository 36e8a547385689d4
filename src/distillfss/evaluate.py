"""Evaluate a predictor on every image of a split: dataset-level IoU at each image's original resolution."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import Split, label_tensor, load_pair
from .data.folder import IGNORE
from .metrics import IoUMeter
from .predictor import Predictor


@dataclass(frozen=True)
class EvalResult:
    miou: float  # foreground classes, percent
    miou_with_background: float
    per_class: dict[str, float]
    n_images: int
    seconds_per_image: float  # model time only (resize, forward, resize back), file reading excluded

    def to_json(self) -> dict:
        return {
            "miou": self.miou,
            "miou_with_background": self.miou_with_background,
            "per_class": self.per_class,
            "n_images": self.n_images,
            "seconds_per_image": round(self.seconds_per_image, 5),
        }


def evaluate_predictor(
    predictor: Predictor,
    split: Split,
    progress: bool = True,
    eval_size: int | None = None,
    per_image: list[dict] | None = None,
) -> EvalResult:
    """eval_size: None scores at each image's original resolution; N resizes the ground truth to N x N (nearest)
    and scores the prediction there (the paper's protocol: 384 for every dataset but WeedMap).

    per_image: a list to append one row per image to: ``{"image", "miou", <class>: IoU}``; a class absent from both
    the image's prediction and its ground truth is None (its IoU is undefined on that image), and the image's
    ``miou`` is the mean over the foreground classes that are defined (None if none is)."""
    meter = IoUMeter(split.classes)
    seconds = 0.0
    for sample in tqdm(split.samples, desc=f"evaluate {split.name}", disable=None if progress else True, leave=False):
        image, mask = load_pair(sample, split.num_classes)
        if eval_size:
            mask = label_tensor(mask, eval_size).to(torch.uint8).numpy()
        t0 = time.perf_counter()
        pred = predictor.predict(image, size=mask.shape)
        seconds += time.perf_counter() - t0
        meter.update(torch.from_numpy(pred), torch.from_numpy(mask))
        if per_image is not None:
            per_image.append(_image_row(sample.image.name, pred, mask, split.classes))
    iou = meter.compute()
    n = len(split.samples)
    return EvalResult(iou.miou, iou.miou_with_background, iou.per_class, n, seconds / max(n, 1))


def _image_row(name: str, pred, mask, classes: tuple[str, ...]) -> dict:
    valid = mask != IGNORE
    row: dict = {"image": name}
    for c, cls in enumerate(classes):
        p, t = (pred == c) & valid, (mask == c) & valid
        union = int((p | t).sum())
        row[cls] = round(100.0 * int((p & t).sum()) / union, 4) if union else None
    fg = [row[c] for c in classes[1:] if row[c] is not None]
    row["miou"] = round(sum(fg) / len(fg), 4) if fg else None
    return row
