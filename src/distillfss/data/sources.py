"""Labelled source domains for meta-training, read in their native download layouts: PASCAL-5i and COCO-20i.

PASCAL-5i (``--data VOCdevkit/VOC2012`` or any folder laid out like it)::

    JPEGImages/<id>.jpg
    SegmentationClassAug/<id>.png          # SBD-augmented class masks: 0 bg, 1..20, 255 ignore
    ImageSets/SegmentationAug/train_aug.txt  (or ImageSets/Segmentation/train.txt)
    ImageSets/Segmentation/val.txt

List lines are an id (``2007_000032``) or a path pair (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/...``);
the id is taken from the first field. Fold i holds classes 5i+1..5i+5: training episodes use the training list and
the 15 other classes, validation episodes the val list and the fold's 5 classes (as in OSLSM / HSNet / DCAMA).

COCO-20i (``--data`` a COCO 2014 folder)::

    train2014/*.jpg   val2014/*.jpg
    annotations/instances_train2014.json   annotations/instances_val2014.json

The 80 categories are sorted by id and numbered 1..80; fold i holds the classes 4k+i+1 (k = 0..19), the interleaved
split of HSNet and DCAMA. Class masks are the union of the category's instance masks (``pycocotools``). Training
uses train2014 and the 60 other classes, validation val2014 and the fold's 20.

In both, an item is an image of the split that contains at least one of the split's classes; pixels of the
other classes are background in a binary episode mask, as in the FSS literature.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .episodes import binary_mask
from .folder import DataError, load_image
from .tensors import image_tensor, label_tensor

PASCAL_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def pascal_fold_classes(fold: int) -> list[int]:
    """The 5 held-out classes of PASCAL-5i fold ``fold`` (1-based class ids)."""
    _check_fold(fold)
    return list(range(5 * fold + 1, 5 * fold + 6))


def coco_fold_classes(fold: int) -> list[int]:
    """The 20 held-out classes of COCO-20i fold ``fold`` (1-based indices into the id-sorted categories)."""
    _check_fold(fold)
    return [4 * k + fold + 1 for k in range(20)]


def _check_fold(fold: int) -> None:
    if fold not in range(4):
        raise DataError(f"fold {fold}: expected 0, 1, 2 or 3")


class _LabelledSource:
    """Shared by PASCAL and COCO: per split, the images, their label maps, and which classes each contains."""

    name = ""

    def __init__(self, size: int, fold: int, held_out: list[int], all_classes: int) -> None:
        self.size, self.fold = size, fold
        val_classes = set(held_out)
        self._classes = {
            "train": [c for c in range(1, all_classes + 1) if c not in val_classes],
            "val": sorted(val_classes),
        }
        self._ids: dict[str, list[str]] = {}
        self._items: dict[str, dict[int, list[int]]] = {}

    def _index(self, split: str, ids: list[str], present: list[set[int]]) -> None:
        wanted = set(self._classes[split])
        keep = [(i, p & wanted) for i, p in zip(ids, present) if p & wanted]
        self._ids[split] = [i for i, _ in keep]
        self._items[split] = {}
        for item, (_, classes) in enumerate(keep):
            for c in sorted(classes):
                self._items[split].setdefault(c, []).append(item)

    def classes(self, split: str) -> list[int]:
        return [c for c in self._classes[split] if c in self._items[split]]

    def items_with(self, split: str, cls: int) -> list[int]:
        return self._items[split].get(cls, [])

    def image(self, split: str, item: int) -> Tensor:
        return image_tensor(load_image(self._image_path(split, self._ids[split][item])), self.size)

    def mask(self, split: str, item: int, cls: int) -> Tensor:
        return binary_mask(label_tensor(self._labels(split, self._ids[split][item]), self.size), cls)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "fold": self.fold,
            "train_classes": self.classes("train"),
            "val_classes": self.classes("val"),
            "images": {s: len(self._ids[s]) for s in self._ids},
        }

    def _image_path(self, split: str, image_id: str) -> Path:
        raise NotImplementedError

    def _labels(self, split: str, image_id: str) -> np.ndarray:
        raise NotImplementedError


class PascalSource(_LabelledSource):
    name = "pascal"

    def __init__(self, root: Path | str, size: int, fold: int = 0) -> None:
        super().__init__(size, fold, pascal_fold_classes(fold), len(PASCAL_CLASSES))
        self.root = Path(root)
        for d in ("JPEGImages", "SegmentationClassAug"):
            if not (self.root / d).is_dir():
                raise DataError(f"{self.root}: no {d}/ folder (expected the VOC2012 layout, see the README)")
        lists = {
            "train": [
                self.root / "ImageSets/SegmentationAug/train_aug.txt",
                self.root / "ImageSets/Segmentation/train.txt",
            ],
            "val": [self.root / "ImageSets/Segmentation/val.txt"],
        }
        for split, candidates in lists.items():
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise DataError(f"{self.root}: no {split} list ({' or '.join(str(p) for p in candidates)})")
            ids = sorted(
                {
                    line.split()[0].rsplit("/", 1)[-1].split(".")[0]
                    for line in path.read_text().splitlines()
                    if line.strip()
                }
            )
            present = []
            for i in tqdm(ids, desc=f"pascal {split} index", leave=False, disable=None):
                values = np.unique(self._labels(split, i))
                present.append({int(v) for v in values if 0 < v <= len(PASCAL_CLASSES)})
            self._index(split, ids, present)

    def _image_path(self, split: str, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def _labels(self, split: str, image_id: str) -> np.ndarray:
        path = self.root / "SegmentationClassAug" / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"{path}: listed in the {split} list but missing")
        return np.asarray(Image.open(path))  # palette indices = class ids


class CocoSource(_LabelledSource):
    name = "coco"
    _folders = {"train": "train2014", "val": "val2014"}

    def __init__(self, root: Path | str, size: int, fold: int = 0) -> None:
        super().__init__(size, fold, coco_fold_classes(fold), 80)
        try:
            from pycocotools import mask as mask_utils
        except ImportError:
            raise DataError("the COCO source needs pycocotools: pip install 'distillfss[coco]'") from None
        self._mask_utils = mask_utils
        self.root = Path(root)
        self._anns: dict[str, dict[str, list[dict]]] = {}
        self._sizes: dict[str, dict[str, tuple[int, int]]] = {}
        self._files: dict[str, dict[str, str]] = {}
        for split, folder in self._folders.items():
            path = self.root / "annotations" / f"instances_{folder}.json"
            if not path.is_file():
                raise DataError(f"{path}: missing (expected the COCO 2014 layout, see the README)")
            try:
                coco = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
            cat_ids = sorted(c["id"] for c in coco["categories"])
            if len(cat_ids) != 80:
                raise DataError(f"{path}: {len(cat_ids)} categories, COCO-20i needs the 80 of COCO 2014")
            index = {cid: i + 1 for i, cid in enumerate(cat_ids)}
            anns: dict[str, list[dict]] = {}
            for a in coco["annotations"]:
                anns.setdefault(str(a["image_id"]), []).append({**a, "class": index[a["category_id"]]})
            self._anns[split] = anns
            self._sizes[split] = {str(im["id"]): (im["height"], im["width"]) for im in coco["images"]}
            self._files[split] = {str(im["id"]): im["file_name"] for im in coco["images"]}
            ids = sorted(self._files[split])
            self._index(split, ids, [{a["class"] for a in anns.get(i, [])} for i in ids])

    def _image_path(self, split: str, image_id: str) -> Path:
        return self.root / self._folders[split] / self._files[split][image_id]

    def _labels(self, split: str, image_id: str) -> np.ndarray:
        h, w = self._sizes[split][image_id]
        out = np.zeros((h, w), np.uint8)
        for a in self._anns[split].get(image_id, []):
            seg = a["segmentation"]
            if isinstance(seg, list):  # polygons
                rle = self._mask_utils.merge(self._mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg["counts"], list):  # uncompressed RLE (crowd regions)
                rle = self._mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            out[self._mask_utils.decode(rle).astype(bool)] = a["class"]
        return out


OFFLINE_SOURCES = ("selfsup", "synthetic", "selfsup+synthetic")  # no download, no --data


def build_source(name: str, data: Path | str | None, size: int, fold: int = 0, views: int = 24, seed: int = 0):
    """The meta-training source ``name`` (selfsup | synthetic | selfsup+synthetic | pascal | coco)."""
    if name in OFFLINE_SOURCES:
        from .selfsup import SelfSupSource, load_source_images
        from .synthetic import MixedSource, SyntheticSource

        photos = load_source_images()
        parts = []
        if "selfsup" in name.split("+"):
            parts.append(SelfSupSource(photos, size, views=views, seed=seed))
        if "synthetic" in name.split("+"):
            parts.append(SyntheticSource(photos, size, seed=seed))
        return parts[0] if len(parts) == 1 else MixedSource(*parts)
    if data is None:
        raise DataError(f"--source {name} needs --data (the dataset folder, see the README)")
    if not Path(data).is_dir():
        raise DataError(f"{data}: not a folder")
    if name == "pascal":
        return PascalSource(data, size, fold)
    if name == "coco":
        return CocoSource(data, size, fold)
    raise DataError(f"unknown source {name!r} ({', '.join(OFFLINE_SOURCES)}, pascal or coco)")
