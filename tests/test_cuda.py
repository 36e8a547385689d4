"""The library on a CUDA device: adapt (both students, unlabeled images, the baselines' searches), predict with
sliding windows, suggest, save and load. Skipped where there is no GPU (CI has none); on a GPU machine:
``pytest tests/test_cuda.py``. The backbone is EfficientNet-Lite2 (its offline weights are a dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_api import _support

from distillfss import FewShotSegmenter
from distillfss.backbones import build_backbone
from distillfss.baselines import LinearProbe, PrototypeMatcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
SMALL = {
    "backbone": "efficientnet_lite2",
    "image_size": 64,
    "teacher": "random",
    "iterations": 2,
    "fast_iterations": 2,
    "device": "cuda",
}


def _weights(seg: FewShotSegmenter) -> dict[str, torch.Tensor]:
    return {k: v for k, v in seg.student.state_dict().items() if not k.startswith("backbone.")}


def test_fit_on_cuda_is_reproducible_and_predicts_at_every_size(tmp_path: Path) -> None:
    images, masks = _support(4)
    a = FewShotSegmenter(**SMALL).fit(images, masks, classes=["bright", "dark"])
    b = FewShotSegmenter(**SMALL).fit(images, masks, classes=["bright", "dark"])
    wa, wb = _weights(a), _weights(b)
    assert all(v.is_cuda for v in wa.values())
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    wide = np.random.default_rng(0).integers(0, 255, (70, 300, 3), dtype=np.uint8)  # several windows, not square
    labels = a.predict([wide, images[0]])
    assert labels[0].shape == (70, 300) and labels[1].shape == images[0].shape[:2]
    assert a.predict(images[0], model="teacher").shape == images[0].shape[:2]
    ranked = a.suggest([wide, images[1]])
    assert sorted(i for i, _ in ranked) == [0, 1]
    a.save(tmp_path / "model")
    again = FewShotSegmenter.load(tmp_path / "model", device="cuda")
    assert np.array_equal(again.predict(wide), labels[0])


def test_paper_student_with_unlabeled_images_on_cuda() -> None:
    images, masks = _support(3)
    seg = FewShotSegmenter(**SMALL, student="paper", refine_iterations=2)
    seg.fit(images, masks, unlabeled=[images[0][::-1].copy()])
    assert seg.predict(images[1]).shape == images[1].shape[:2]


def test_baselines_search_their_settings_on_cuda() -> None:
    backbone = build_backbone("efficientnet_lite2", 64).cuda()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64, generator=gen).cuda()
    labels = torch.zeros(3, 64, 64, dtype=torch.long)
    labels[:, 10:30, 10:30] = 1
    labels = labels.cuda()
    for model in (LinearProbe(backbone, 1).cuda(), PrototypeMatcher(backbone, 1).cuda()):
        model.fit(images, labels)
        assert model.settings["cv"] != "none"
        assert model(images).shape == (3, 2, 64, 64)
