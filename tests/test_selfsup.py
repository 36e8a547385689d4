from __future__ import annotations

import pytest
import torch

pytest.importorskip("skimage")

from distillfss.data.selfsup import SOURCE_IMAGES, SelfSupEpisodes, load_source_images  # noqa: E402
from distillfss.demo import demo_datasets  # noqa: E402


@pytest.fixture(scope="module")
def episodes() -> SelfSupEpisodes:
    return SelfSupEpisodes(load_source_images(("chelsea", "coffee", "brick")), size=64)


def test_episodes_have_consistent_pseudo_masks(episodes) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        ep = episodes.sample(gen)
        assert ep.support_image.shape == ep.query_image.shape == (3, 64, 64)
        assert ep.support_mask.shape == (64, 64) and set(ep.support_mask.unique().tolist()) <= {0, 1}
        for m in (ep.support_mask, ep.query_mask):
            assert 0.01 <= m.float().mean() < 1.0


def test_both_views_mask_the_same_region() -> None:
    import numpy as np

    # Four flat colour quadrants: SLIC's superpixels follow them, so a pseudo-mask must cover one colour in both
    # views, whatever the crops, flips and colour jitter.
    img = np.zeros((96, 96, 3), np.float32)
    img[:48, :48] = (0.9, 0.1, 0.1)
    img[:48, 48:] = (0.1, 0.9, 0.1)
    img[48:, :48] = (0.1, 0.1, 0.9)
    img[48:, 48:] = (0.9, 0.9, 0.1)
    eps = SelfSupEpisodes({"quads": img}, size=48, n_segments=4, max_fraction=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        ep = eps.sample(gen)
        colours = []
        for image, mask in ((ep.support_image, ep.support_mask), (ep.query_image, ep.query_mask)):
            inside = image[:, mask.bool()].mean(dim=1)  # mean colour under the pseudo-mask
            colours.append((inside > inside.mean()).tolist())  # which channels are bright
        assert colours[0] == colours[1], ep.source


def test_sampling_is_deterministic(episodes) -> None:
    a = episodes.sample(torch.Generator().manual_seed(3))
    b = episodes.sample(torch.Generator().manual_seed(3))
    assert a.source == b.source and torch.equal(a.query_mask, b.query_mask)


def test_source_images_are_licensed_and_not_demo_data() -> None:
    assert all(SOURCE_IMAGES.values())
    assert not set(SOURCE_IMAGES) & set(demo_datasets())
    with pytest.raises(ValueError, match="not a registered source image"):
        load_source_images(("retina",))
