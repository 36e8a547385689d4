"""PASCAL-5i and COCO-20i sources on tiny replicas of their native layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillfss.data import DataError
from distillfss.data.episodes import episode_generator, sample_episode, usable_classes
from distillfss.data.sources import CocoSource, PascalSource, coco_fold_classes, pascal_fold_classes


def write_pascal(root: Path) -> dict[str, dict[str, set[int]]]:
    """VOC2012-like folder; image i of a split holds two classes (one of fold 0, one outside) and a 255 border."""
    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation", "ImageSets/SegmentationAug"):
        (root / d).mkdir(parents=True, exist_ok=True)
    truth: dict[str, dict[str, set[int]]] = {"train": {}, "val": {}}
    for split, n in (("train", 8), ("val", 6)):
        ids = []
        for i in range(n):
            image_id = f"2008_{split}{i:03d}"
            mask = np.zeros((30, 40), np.uint8)
            a, b = 1 + i % 5, 6 + (i % 3) * 5  # a in fold 0 (1..5); b in 6, 11, 16
            mask[2:12, 2:20] = a
            mask[15:28, 10:38] = b
            mask[12, :] = 255
            Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
                root / "JPEGImages" / f"{image_id}.jpg"
            )
            ids.append(image_id)
            truth[split][image_id] = {a, b}
        if split == "train":  # PFENet-style path pairs
            lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in reversed(ids)]
            (root / "ImageSets/SegmentationAug/train_aug.txt").write_text("\n".join(lines) + "\n")
        else:
            (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return truth


def test_pascal_folds_items_and_masks(tmp_path: Path) -> None:
    truth = write_pascal(tmp_path / "VOC2012")
    src = PascalSource(tmp_path / "VOC2012", size=32, fold=0)
    assert pascal_fold_classes(0) == [1, 2, 3, 4, 5] and pascal_fold_classes(3) == [16, 17, 18, 19, 20]
    assert src.classes("train") == [6, 11, 16]  # fold-0 classes never train
    assert set(src.classes("val")) == {1, 2, 3, 4, 5}
    # every training image holds a training class; items are the sorted ids
    ids = sorted(truth["train"])
    assert [ids[i] for i in src.items_with("train", 6)] == [k for k in ids if 6 in truth["train"][k]]
    item = src.items_with("val", 1)[0]
    m = src.mask("val", item, 1)
    assert m.shape == (32, 32) and set(m.unique().tolist()) == {0, 1, 255}
    assert (m == 1).float().mean() > 0.1  # the class-1 block, nothing of the other class
    assert src.image("val", item).shape == (3, 32, 32)
    spec = sample_episode(src, "train", usable_classes(src, "train", 1), 1, episode_generator(0, 0, 0))
    assert spec.query not in spec.support and spec.query in src.items_with("train", spec.cls)


def test_pascal_bad_layout_is_named(tmp_path: Path) -> None:
    write_pascal(tmp_path / "V")
    (tmp_path / "V/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DataError, match="no val list"):
        PascalSource(tmp_path / "V", size=32)
    with pytest.raises(DataError, match="no JPEGImages"):
        PascalSource(tmp_path, size=32)
    with pytest.raises(DataError, match="fold 4"):
        PascalSource(tmp_path / "V", size=32, fold=4)


def write_coco(root: Path) -> None:
    """COCO 2014 layout: 80 categories with COCO's gapped ids, polygon and crowd-RLE annotations."""
    pytest.importorskip("pycocotools")
    cat_ids = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
    assert len(cat_ids) == 80
    (root / "annotations").mkdir(parents=True)
    ann_id = 0
    for split, folder in (("train", "train2014"), ("val", "val2014")):
        (root / folder).mkdir()
        images, anns = [], []
        for i in range(6):
            image_id = 100 * (split == "val") + i
            name = f"COCO_{folder}_{image_id:012d}.jpg"
            Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(root / folder / name)
            images.append({"id": image_id, "file_name": name, "height": 20, "width": 24})
            # class index 1 (category 1, fold 0) and class index 2 (category 2, fold 1) as polygons
            for cls_index, (x0, x1) in ((1 + i % 2, (0, 10)), (3, (12, 24))):
                ann_id += 1
                poly = [x0, 0, x1, 0, x1, 10, x0, 10]
                anns.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cat_ids[cls_index - 1],
                        "segmentation": [poly],
                        "iscrowd": 0,
                        "area": 100.0,
                        "bbox": [x0, 0, x1 - x0, 10],
                    }
                )
            ann_id += 1  # a crowd region of category index 5 (fold 0), uncompressed RLE, column-major
            col = [0] * 20
            col[15:20] = [1] * 5
            flat = np.array([col] * 24).ravel()  # 24 columns of 20 rows
            counts, cur, run = [], 0, 0
            for v in flat:
                if v != cur:
                    counts.append(run)
                    cur, run = v, 0
                run += 1
            counts.append(run)
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat_ids[4],
                    "iscrowd": 1,
                    "segmentation": {"counts": counts, "size": [20, 24]},
                    "area": 120.0,
                    "bbox": [0, 15, 24, 5],
                }
            )
        cats = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in reversed(cat_ids)]
        (root / "annotations" / f"instances_{folder}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )


def test_coco_folds_and_masks(tmp_path: Path) -> None:
    write_coco(tmp_path / "coco")
    assert coco_fold_classes(0)[:3] == [1, 5, 9] and coco_fold_classes(1)[:3] == [2, 6, 10]
    src = CocoSource(tmp_path / "coco", size=24, fold=0)
    assert src.classes("val") == [1, 5]  # fold-0 classes present in val2014
    assert src.classes("train") == [2, 3]
    item = src.items_with("val", 5)[0]
    crowd = src.mask("val", item, 5)
    assert crowd[-3:].eq(1).all() and crowd[:10].eq(0).all()  # the bottom band, from the RLE
    poly = src.mask("val", src.items_with("val", 1)[0], 1)
    assert poly[:5, :5].eq(1).all() and poly[:5, -5:].eq(0).all()  # left block only
    assert torch.equal(src.image("train", 0), src.image("train", 0))


def test_coco_missing_annotations(tmp_path: Path) -> None:
    write_coco(tmp_path / "coco")
    (tmp_path / "coco/annotations/instances_val2014.json").unlink()
    with pytest.raises(DataError, match="instances_val2014.json: missing"):
        CocoSource(tmp_path / "coco", size=24)
