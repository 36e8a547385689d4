from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")

from distillfss.data.episodes import episode_generator, sample_episode, usable_classes  # noqa: E402
from distillfss.data.selfsup import SOURCE_IMAGES, VAL_IMAGES, SelfSupSource, load_source_images  # noqa: E402
from distillfss.demo import demo_datasets  # noqa: E402


@pytest.fixture(scope="module")
def source() -> SelfSupSource:
    return SelfSupSource(load_source_images(("chelsea", "coffee", "brick")), size=64, views=4)


def test_episodes_pair_two_views_of_one_image(source) -> None:
    classes = usable_classes(source, "train", 1)
    assert classes
    for j in range(5):
        spec = sample_episode(source, "train", classes, 1, episode_generator(0, 0, j))
        (shot,) = spec.support
        assert shot != spec.query
        for item in (spec.query, shot):
            m = source.mask("train", item, spec.cls)
            assert m.shape == (64, 64) and set(m.unique().tolist()) <= {0, 1}
            assert 0.01 <= m.float().mean() < 1.0
            assert source.image("train", item).shape == (3, 64, 64)


def test_validation_images_are_held_out(source) -> None:
    d = source.describe()
    assert d["val_images"] == ["coffee"] and "coffee" not in d["train_images"]
    assert not set(source.classes("train")) & set(source.classes("val"))
    assert set(VAL_IMAGES) <= set(SOURCE_IMAGES)


def test_both_views_mask_the_same_region() -> None:
    # Four flat colour quadrants: SLIC's superpixels follow them, so a pseudo-mask must cover one colour in both
    # views, whatever the crops, flips and colour jitter.
    img = np.zeros((96, 96, 3), np.float32)
    img[:48, :48] = (0.9, 0.1, 0.1)
    img[:48, 48:] = (0.1, 0.9, 0.1)
    img[48:, :48] = (0.1, 0.1, 0.9)
    img[48:, 48:] = (0.9, 0.9, 0.1)
    src = SelfSupSource({"quads": img}, size=48, views=6, val_images=(), n_segments=4, max_fraction=0.5)
    classes = usable_classes(src, "train", 1)
    for j in range(10):
        spec = sample_episode(src, "train", classes, 1, episode_generator(1, 0, j))
        colours = []
        for item in (spec.support[0], spec.query):
            image, mask = src.image("train", item), src.mask("train", item, spec.cls)
            inside = image[:, mask.bool()].mean(dim=1)  # mean colour under the pseudo-mask
            colours.append((inside > inside.mean()).tolist())  # which channels are bright
        assert colours[0] == colours[1], spec


def test_bank_and_episodes_are_deterministic() -> None:
    imgs = load_source_images(("chelsea",))
    a = SelfSupSource(imgs, size=48, views=3, seed=5, val_images=())
    b = SelfSupSource(imgs, size=48, views=3, seed=5, val_images=())
    assert torch.equal(a.image("train", 2), b.image("train", 2))
    ea = sample_episode(a, "train", a.classes("train"), 1, episode_generator(0, 7, 1))
    eb = sample_episode(b, "train", b.classes("train"), 1, episode_generator(0, 7, 1))
    assert ea == eb


def test_source_images_are_licensed_and_not_demo_data() -> None:
    assert all(SOURCE_IMAGES.values())
    assert not set(SOURCE_IMAGES) & set(demo_datasets())
    with pytest.raises(ValueError, match="not a registered source image"):
        load_source_images(("retina",))
