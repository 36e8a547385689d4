"""Quick predictions while labelling, and the ranking of what to label next.

**Preview** (the app's Label tab): a linear probe on the frozen backbone's features with fixed settings
(``baselines.QUICK``, no cross-validation search), fitted in about a second; every image is fitted into one window at
the working size.
After each saved mask the app shows the probe's predictions of the unlabeled images (fitted on every labelled one)
and of each labelled image (fitted on the others: what a model that never saw it makes of it). Images are read and
encoded once (cached by path and modification time).

**Suggest** (``distillfss suggest``, the app's "label next" list): unlabeled images ranked by how much the student
and a probe fitted on the same support set disagree on them (100 - their mean foreground IoU with each other):
where two models trained on the same labels differ, a label settles most.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .backbones import FrozenBackbone, Pyramid, build_backbone
from .baselines import QUICK, LinearProbe, fixed_probe
from .data.folder import load_image, load_mask
from .predictor import Predictor
from .tiling import support_windows
from .transfer import select

MAX_SHOWN = 16  # images a preview predicts (labelled ones first, then unlabeled ones in name order)


def quick_probe(
    backbone: FrozenBackbone, images: Tensor, labels: Tensor, num_classes: int, settings: Mapping | None = None
) -> LinearProbe:
    """A linear probe fitted on (K, 3, S, S) images and (K, S, S) labels with fixed settings (default
    ``baselines.QUICK``: no search)."""
    with torch.no_grad():
        pyramid = backbone(images)
    return fixed_probe(backbone, num_classes, dict(settings or QUICK), pyramid, labels).eval()


def disagreement(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """100 - the mean IoU between two label maps over the foreground classes either predicts (0 when neither
    predicts any foreground)."""
    ious = []
    for c in range(1, num_classes + 1):
        pa, pb = a == c, b == c
        union = (pa | pb).sum()
        if union:
            ious.append((pa & pb).sum() / union)
    return float(100 * (1 - np.mean(ious))) if ious else 0.0


class Preview:
    """The Label tab's live preview (see the module docstring)."""

    def __init__(self, backbone: FrozenBackbone, image_size: int) -> None:
        self.backbone, self.size = backbone, image_size
        self._images: dict[Path, tuple[float, np.ndarray]] = {}

    @classmethod
    def build(cls, backbone: str, image_size: int, weights: str | None = None) -> Preview:
        return cls(build_backbone(backbone, image_size, weights), image_size)

    def image(self, path: Path) -> np.ndarray:
        """An image, read once while its file is unchanged."""
        stamp = path.stat().st_mtime
        cached = self._images.get(path)
        if cached is None or cached[0] != stamp:
            cached = self._images[path] = (stamp, load_image(path))
        return cached[1]

    @torch.no_grad()
    def run(
        self, labelled: Mapping[str, tuple[Path, Path]], others: Mapping[str, Path], num_classes: int
    ) -> dict[str, np.ndarray]:
        """stem -> (H, W) uint8 predicted labels: for ``others`` from a probe fitted on every labelled image
        ((image, mask) paths), for each labelled image from one fitted on the others (none with a single one).
        At most ``MAX_SHOWN`` images, labelled ones first."""
        windows = {}
        for stem, (image, mask) in labelled.items():
            windows[stem] = support_windows(self.image(image), load_mask(mask, num_classes), self.size, None)
        out: dict[str, np.ndarray] = {}
        if not windows:
            return out
        stems = list(windows)
        owner = torch.cat([torch.full((len(windows[s][0]),), i) for i, s in enumerate(stems)])
        x, y = torch.cat([w[0] for w in windows.values()]), torch.cat([w[1] for w in windows.values()])
        pyramid = self.backbone(x)  # every labelled window encoded once, for all the probes below
        if len(stems) > 1:
            for i, stem in enumerate(stems[:MAX_SHOWN]):
                probe = self._fit(pyramid, y, owner != i, num_classes)
                out[stem] = Predictor(probe, self.size).predict(self.image(labelled[stem][0]))
        targets = [s for s in others if s not in windows][: max(0, MAX_SHOWN - len(out))]
        if targets:
            predictor = Predictor(self._fit(pyramid, y, owner >= 0, num_classes), self.size)
            for stem, labels in zip(targets, predictor.predict_batch([self.image(others[s]) for s in targets])):
                out[stem] = labels
        return out

    def _fit(self, pyramid: Pyramid, labels: Tensor, keep: Tensor, num_classes: int) -> LinearProbe:
        """A quick probe on the encoded windows where ``keep`` is True."""
        return fixed_probe(self.backbone, num_classes, QUICK, select(pyramid, keep), labels[keep]).eval()
