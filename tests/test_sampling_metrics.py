from __future__ import annotations

import random

import pytest
import torch

from distillfss.metrics import IoUMeter
from distillfss.sampling import midpoint_order, sample_support


def test_midpoint_sampler_matches_the_paper_example() -> None:
    stems = [f"s{i:03d}" for i in range(100)]
    assert sample_support(stems, 5) == [stems[i] for i in (0, 24, 49, 74, 99)]


@pytest.mark.parametrize("n", [1, 2, 7, 50, 707])
def test_midpoint_order_is_a_permutation(n: int) -> None:
    assert sorted(midpoint_order(n)) == list(range(n))


def test_sampler_is_deterministic_nested_and_order_free() -> None:
    stems = [f"img{i:03d}" for i in range(37)]
    shuffled = stems[:]
    random.Random(1).shuffle(shuffled)
    prev: set[str] = set()
    for k in range(1, 38):
        chosen = sample_support(stems, k)
        assert chosen == sample_support(shuffled, k)  # listing order does not matter
        assert len(set(chosen)) == k and prev <= set(chosen)  # nested
        prev = set(chosen)


@pytest.mark.parametrize("multi", [False, True])
def test_further_draws_are_nested_reproducible_and_differ(multi: bool) -> None:
    stems = [f"img{i:02d}" for i in range(30)]
    sets = [{1} if i < 24 else {2} for i in range(30)] if multi else None
    shuffled = stems[::-1]
    shuffled_sets = sets[::-1] if sets else None
    draws = []
    for d in (1, 2):
        prev: set[str] = set()
        for k in range(1, 31):
            chosen = sample_support(stems, k, sets, draw=d)
            assert chosen == sample_support(shuffled, k, shuffled_sets, draw=d)  # seeded by the draw alone
            assert len(chosen) == k and prev <= set(chosen)
            prev = set(chosen)
        draws.append(sample_support(stems, 5, sets, draw=d))
        if multi:
            assert any(int(s[3:]) >= 24 for s in sample_support(stems, 2, sets, draw=d))  # still stratified
    assert len({tuple(x) for x in [*draws, sample_support(stems, 5, sets)]}) == 3  # three different 5-shot sets
    with pytest.raises(ValueError, match="draw"):
        sample_support(stems, 2, draw=-1)


def test_stratified_sampler_covers_classes_and_nests() -> None:
    stems = [f"img{i:02d}" for i in range(30)]
    sets = [{1} if i < 24 else {2} for i in range(30)]  # class 2 is rare and sits at the end
    two = sample_support(stems, 2, sets)
    assert any(int(s[3:]) >= 24 for s in two)  # the rare class is represented at K=2
    prev: set[str] = set()
    for k in range(1, 31):
        chosen = set(sample_support(stems, k, sets))
        assert len(chosen) == k and prev <= chosen
        prev = chosen


def test_sampler_rejects_k_larger_than_pool() -> None:
    with pytest.raises(ValueError, match="only 3 images"):
        sample_support(["a", "b", "c"], 4)


def test_iou_hand_computed() -> None:
    meter = IoUMeter(("background", "a", "b"))
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    meter.update(pred, target)
    meter.update(torch.tensor([[2]]), torch.tensor([[2]]))  # a second "image" accumulates into the same matrix
    r = meter.compute()
    # background: tp 1 (0,0); fp 2 ((1,1)->0 gt 2, (1,3)->0 gt 1); fn 1 ((0,1) gt 0 -> 1) -> 1/4
    # a: tp 2; fp 1; fn 1 -> 2/4;  b: tp 2 (incl. 2nd image); fp 0; fn 1 -> 2/3. Pixel 255 ignored.
    assert r.per_class["background"] == pytest.approx(25.0)
    assert r.per_class["a"] == pytest.approx(50.0)
    assert r.per_class["b"] == pytest.approx(200 / 3, abs=1e-3)
    assert r.miou == pytest.approx((50 + 200 / 3) / 2, abs=1e-3)
    assert r.miou_with_background == pytest.approx((25 + 50 + 200 / 3) / 3, abs=1e-3)


def test_iou_class_absent_everywhere_scores_zero() -> None:
    meter = IoUMeter(("background", "a"))
    meter.update(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    assert meter.compute().per_class == {"background": 100.0, "a": 0.0}


def test_evaluation_at_a_fixed_size_resizes_the_ground_truth(tmp_path) -> None:
    from conftest import write_dataset

    from distillfss.data import label_tensor, load_mask, load_split
    from distillfss.evaluate import evaluate_predictor

    class Oracle:
        """Returns the ground truth at the size it is asked for (resized like the evaluator does)."""

        mask_path = None

        def predict(self, image, size=None):
            mask = load_mask(self.mask_path, 1)
            if size is None or tuple(size) == mask.shape:
                return mask
            return label_tensor(mask, size[0]).to(torch.uint8).numpy()

    split = load_split(write_dataset(tmp_path / "d"), "test")
    oracle = Oracle()
    for s in split.samples:
        oracle.mask_path = s.mask
        one = type(split)(split.name, split.root, split.classes, (s,))
        for size in (None, 64):
            assert evaluate_predictor(oracle, one, progress=False, eval_size=size).miou == pytest.approx(100.0)
