"""The default path: the shipped meta-trained teacher that adapt, demo and benchmark start from."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from distillfss.adapt import adapt
from distillfss.backbones import build_backbone
from distillfss.config import AdaptConfig, ModelConfig
from distillfss.data import load_split, load_support_tensors
from distillfss.demo import demo_root
from distillfss.model_io import WEIGHTS, ModelError, load_teacher_weights, resolve_teacher
from distillfss.outputs import sha256_file


def test_the_default_start_is_the_shipped_teacher_with_the_checksum_of_its_card() -> None:
    folder, label = resolve_teacher("auto", ModelConfig(num_classes=1))
    assert folder is not None and label == f"shipped:{folder.name}"
    card = (folder / "MODEL_CARD.md").read_text()
    documented = re.search(r"sha256 `([0-9a-f]{64})`", card).group(1)
    assert sha256_file(folder / WEIGHTS) == documented


def test_a_size_without_a_shipped_teacher_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """auto falls back to a random start, with a warning naming what is shipped; shipped refuses."""
    cfg = ModelConfig(num_classes=1, image_size=128)
    with caplog.at_level(logging.WARNING, logger="distillfss"):
        assert resolve_teacher("auto", cfg) == (None, "random")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "at 128 px" in warning and "256 px" in warning and "randomly initialised" in warning
    with pytest.raises(ModelError, match="no shipped teacher fits backbone efficientnet_lite2 at 128 px"):
        resolve_teacher("shipped", cfg)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distillfss"):
        resolve_teacher("random", cfg)  # asked for: nothing to warn about
        resolve_teacher("auto", ModelConfig(num_classes=1))
    assert not caplog.records


@pytest.mark.slow
def test_adapting_from_the_shipped_teacher_on_a_tiny_support_set() -> None:
    cfg = ModelConfig(num_classes=1)
    folder, _ = resolve_teacher("auto", cfg)
    backbone = build_backbone(cfg.backbone, cfg.image_size)
    teacher = load_teacher_weights(folder, backbone, cfg)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train = load_split(demo_root() / "nuclei", "train")
    images, labels, _ = load_support_tensors(train, [s.stem for s in train.samples[:2]], cfg.image_size)
    result = adapt(backbone, images, labels, cfg, AdaptConfig(iterations=2), teacher=teacher, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.log)
    changed = [k for k, v in result.teacher.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith("decoder.") for k in changed)  # set A: mappers and mixers learned
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the loaded start is untouched
    out = result.student(images[:1])
    assert out.logits.shape == (1, 2, cfg.image_size, cfg.image_size)
