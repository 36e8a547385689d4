"""Derived datasets: a bundled binary set turned into a multi-class one, so the multi-class code paths (two
classes' coarse masks, the one-vs-all merge) are measured on real images.

``split_by_size``: every connected foreground region becomes class 1 ("small") or class 2 ("large") by its area
against one threshold, the median region area over the train split (the test split uses the same threshold).
Touching objects merged in the source mask count as one region. Needs scikit-image (``distillfss[selfsup]``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..outputs import check_output, output_folder
from .folder import DataError, list_images

COMMAND = "distillfss.data.derive.split_by_size"


def _regions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from skimage.measure import label

    mask = np.asarray(Image.open(path))
    if not np.isin(mask, (0, 1)).all():
        raise DataError(f"{path}: split_by_size needs masks of 0 and 1 only, found {sorted(np.unique(mask))[:5]}")
    regions = label(mask > 0, connectivity=1)
    return regions, np.bincount(regions.ravel())[1:]


def split_by_size(src: Path, out: Path, name: str, small: str = "small", large: str = "large") -> dict:
    """Write ``out`` (a new folder) from the binary dataset ``src`` -> the new dataset.json."""
    src_meta = json.loads((src / "dataset.json").read_text())
    if len(src_meta["classes"]) != 2:
        raise DataError(f"{src / 'dataset.json'}: split_by_size needs a binary dataset, got {src_meta['classes']}")
    check_output(out, False, [src], command=COMMAND)
    masks = {split: list_images(src / split / "masks") for split in ("train", "test")}
    # every mask of both splits is read and checked once, before anything is written
    labelled = {split: {stem: _regions(path) for stem, path in sorted(files.items())} for split, files in masks.items()}
    areas = np.concatenate([area for _, area in labelled["train"].values()])
    threshold = float(np.median(areas))
    counts = {small: 0, large: 0}
    with output_folder(out, False, [src], command=COMMAND) as tmp:  # all of it, or nothing
        for split, regions_by_stem in labelled.items():
            (tmp / split / "masks").mkdir(parents=True)
            shutil.copytree(src / split / "images", tmp / split / "images")
            for stem, (regions, area) in regions_by_stem.items():
                cls = np.concatenate([[0], np.where(area > threshold, 2, 1)]).astype(np.uint8)  # region id -> class
                Image.fromarray(cls[regions]).save(tmp / split / "masks" / f"{stem}.png")
                if split == "train":
                    counts[small] += int((area <= threshold).sum())
                    counts[large] += int((area > threshold).sum())
        meta = _meta(src, src_meta, masks, name, small, large, threshold, counts)
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _meta(src, src_meta, masks, name, small, large, threshold, counts) -> dict:  # noqa: ANN001
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(masks["train"].values())}
    meta = {
        "name": name,
        "domain": f"{src_meta['domain']}; classes by region size (derived)",
        "classes": ["background", small, large],
        "derived_from": {"dataset": src_meta["name"], "source": src_meta.get("source"), "train_masks_sha256": sha},
        "license_note": src_meta.get("license_note"),
        "processing": (
            f"Images copied from '{src_meta['name']}'. Each 4-connected foreground region of its binary mask is "
            f"'{small}' (class 1) when its area is at most {threshold:g} px, the median region area over the train "
            f"split, else '{large}' (class 2); the test split uses the same threshold. Train regions: "
            f"{counts[small]} {small}, {counts[large]} {large}. Made by distillfss.data.derive.split_by_size."
        ),
    }
    return meta
