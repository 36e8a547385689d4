from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("skimage")

from distillfss.data.episodes import episode_generator, sample_episode, usable_classes  # noqa: E402
from distillfss.data.selfsup import VAL_IMAGES, SelfSupSource, load_source_images  # noqa: E402
from distillfss.data.sources import build_source  # noqa: E402
from distillfss.data.synthetic import MixedSource, SyntheticSource, _Material, render_item  # noqa: E402

SMALL = {"classes": {"train": 12, "val": 4}, "items": {"train": 24, "val": 8}}


@pytest.fixture(scope="module")
def photos():
    return load_source_images(("chelsea", "coffee", "brick"))


@pytest.fixture(scope="module")
def source(photos) -> SyntheticSource:
    return SyntheticSource(photos, size=64, seed=3, **SMALL)


def _flat(value: float, shape: str = "blob", count: tuple[int, int] = (3, 6)) -> _Material:
    c = (value, value, value)
    return _Material("noise", (c, c), 4.0, 0.0, "", (0, 0, 0), shape, (0.08, 0.15), count)


@pytest.mark.parametrize("shape", ["blob", "rect"])
def test_the_mask_is_exactly_where_the_class_is_drawn(shape) -> None:
    # A white class on black: after jitter, lighting, blur and noise, the pixels well inside its mask are bright
    # and the pixels well outside dark, so the mask and the drawing are the same region.
    gen = torch.Generator().manual_seed(0)
    image, labels = render_item(_flat(0.0), [(7, _flat(1.0, shape))], 96, gen, {})
    m = (labels == 7).float()[None, None]
    assert 0.02 < m.mean() < 0.9 and set(labels.unique().tolist()) == {-1, 7}
    inner = (-F.max_pool2d(-m, 5, 1, 2))[0, 0].bool()  # eroded by 2 px (the blur's reach)
    outer = F.max_pool2d(m, 5, 1, 2)[0, 0].bool()
    grey = image.mean(dim=0)
    assert grey[inner].min() > 0.6 and grey[~outer].max() < 0.3


def test_a_later_class_covers_an_earlier_one_and_the_masks_do_not_overlap() -> None:
    gen = torch.Generator().manual_seed(1)
    big = _Material("noise", ((0.5,) * 3, (0.5,) * 3), 4.0, 0.0, "", (0, 0, 0), "rect", (0.45, 0.5), (1, 1))
    image, labels = render_item(_flat(0.0), [(1, big), (2, _flat(1.0))], 96, gen, {})
    grey = image.mean(dim=0)
    for cls, lo, hi in ((1, 0.3, 0.7), (2, 0.6, 1.0)):  # each pixel holds one label: the class drawn on top
        m = (labels == cls).float()[None, None]
        inner = (-F.max_pool2d(-m, 5, 1, 2))[0, 0].bool()
        assert inner.any() and lo < grey[inner].min() and grey[inner].max() <= hi


def test_splits_are_disjoint_and_validation_photographs_are_held_out(source) -> None:
    d = source.describe()
    assert not set(source.classes("train")) & set(source.classes("val"))
    assert set(d["val_photos"]) <= set(VAL_IMAGES) and not set(d["train_photos"]) & set(VAL_IMAGES)
    assert d["items"] == SMALL["items"] and d["classes"]["train"] == len(source.classes("train"))


def test_episodes_hold_their_class_in_both_images(source) -> None:
    classes = usable_classes(source, "train", 1)
    assert len(classes) >= 5
    for j in range(8):
        spec = sample_episode(source, "train", classes, 1, episode_generator(0, 0, j))
        for item in (spec.query, *spec.support):
            m = source.mask("train", item, spec.cls)
            assert m.shape == (64, 64) and m.dtype == torch.long and set(m.unique().tolist()) <= {0, 1}
            assert m.float().mean() >= 0.004
            img = source.image("train", item)
            assert img.shape == (3, 64, 64) and img.min() >= 0 and img.max() <= 1


def test_the_bank_is_a_function_of_the_seed(photos) -> None:
    a = SyntheticSource(photos, size=48, seed=5, **SMALL)
    b = SyntheticSource(photos, size=48, seed=5, **SMALL)
    c = SyntheticSource(photos, size=48, seed=6, **SMALL)
    assert all(torch.equal(a.image("train", i), b.image("train", i)) for i in range(4))
    assert a.classes("train") == b.classes("train")
    assert not torch.equal(a.image("train", 0), c.image("train", 0))


def test_a_mixture_keeps_each_episode_within_one_source(photos, source) -> None:
    selfsup = SelfSupSource(photos, size=64, views=4)
    mixed = MixedSource(selfsup, source)
    assert mixed.name == "selfsup+synthetic"
    for split in ("train", "val"):
        assert len(mixed.classes(split)) == len(selfsup.classes(split)) + len(source.classes(split))
    n_self = len(selfsup.classes("train"))
    last_self = mixed.classes("train")[n_self - 1]
    first_syn = mixed.classes("train")[n_self]
    syn_item = mixed.items_with("train", first_syn)[0]
    own = source.items_with("train", source.classes("train")[0])[0]
    assert torch.equal(mixed.image("train", syn_item), source.image("train", own))
    assert torch.equal(mixed.mask("train", syn_item, first_syn), source.mask("train", own, source.classes("train")[0]))
    assert not mixed.mask("train", syn_item, last_self).any()  # a selfsup class is never in a synthetic image
    self_item = mixed.items_with("train", last_self)[0]
    assert not mixed.mask("train", self_item, first_syn).any()
    assert mixed.describe()["parts"][1]["name"] == "synthetic"


@pytest.mark.slow  # CI runs it (.ci/run); left out of make test for its time
def test_the_offline_sources_by_name() -> None:
    assert isinstance(build_source("synthetic", None, 32), SyntheticSource)
    mixed = build_source("selfsup+synthetic", None, 32, views=2)
    assert isinstance(mixed, MixedSource) and [p.name for p in mixed.parts] == ["selfsup", "synthetic"]


def test_meta_training_on_the_mixture_records_both_sources(tmp_path: Path, photos, source) -> None:
    from distillfss.backbones import build_backbone
    from distillfss.config import MetaConfig, ModelConfig
    from distillfss.meta import meta_train

    src = MixedSource(SelfSupSource(photos, size=64, views=3), source)
    model = ModelConfig(backbone="efficientnet_lite0", image_size=64)
    cfg = MetaConfig(source="selfsup+synthetic", steps=2, batch=4, val_every=2, val_episodes=4, precision="fp32")
    meta_train(src, build_backbone(model.backbone, 64), model, cfg, tmp_path / "t", progress=False)
    config = json.loads((tmp_path / "t/config.json").read_text())
    assert [p["name"] for p in config["source"]["parts"]] == ["selfsup", "synthetic"]
    card = (tmp_path / "t/MODEL_CARD.md").read_text()
    assert "distillfss meta-train --source selfsup+synthetic --out OUT --steps 2" in card and "--data" not in card
    assert "SLIC superpixel" in card and "Synthetic episodes with exact masks" in card
