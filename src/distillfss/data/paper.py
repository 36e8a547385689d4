"""Adapters from the paper's benchmark datasets, in their native download layouts, to the project's folder format.

Lung Nodule (pickles), ISIC 2018, Kvasir-SEG, Nucleus (DSB 2018 ``stage1_train``), WeedMap RedEdge, Pothole-mix,
and Industrial-5i (one fold per converted dataset: its classes come from ``data.json``).

Splits are deterministic and recorded in ``dataset.json``: file lists are sorted, and where the original drew a
random 80/20 split (scikit-learn ``train_test_split(test_size=0.2, random_state=42)``, cached in a ``test.csv``
that is not shipped) we draw our own from the sorted ids with ``numpy.random.default_rng(42)``: the same
proportions and seed, not the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .folder import IMAGE_EXTS, DataError

SPLIT_SEED = 42


@dataclass(frozen=True)
class Item:
    stem: str
    split: str  # "train" | "test"
    image: Callable[[], np.ndarray]  # (H, W, 3) uint8
    mask: Callable[[], np.ndarray]  # (H, W) uint8 labels


@dataclass(frozen=True)
class Adapter:
    name: str
    domain: str
    classes: tuple[str, ...]
    split_rule: str
    items: Callable[[Path], Iterator[Item]]


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (see the README for the expected layout)")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def _rgb(path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    return load


def random_split(ids: list[str], test_fraction: float = 0.2) -> set[str]:
    """The test ids of a seeded 80/20 split over the sorted ids."""
    ids = sorted(ids)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(ids))
    n_test = int(round(test_fraction * len(ids)))
    return {ids[i] for i in order[:n_test]}


def _kvasir(src: Path) -> Iterator[Item]:
    images = _files(src / "images")
    masks = {p.stem: p for p in _files(src / "masks")}
    test = random_split([p.stem for p in images])
    for p in images:
        if p.stem not in masks:
            raise DataError(f"{p}: no mask {src / 'masks' / p.stem}.*")
        m = masks[p.stem]

        def mask(m: Path = m) -> np.ndarray:
            with Image.open(m) as im:
                first = np.asarray(im.convert("RGB"))[..., 0]
            return (first > 245).astype(np.uint8)  # JPEG masks: the original's threshold

        yield Item(p.stem, "test" if p.stem in test else "train", _rgb(p), mask)


def _nucleus(src: Path) -> Iterator[Item]:
    if not src.is_dir():
        raise DataError(f"{src}: folder not found (expected stage1_train/<id>/images and masks)")
    ids = sorted(d.name for d in src.iterdir() if (d / "images").is_dir())
    if not ids:
        raise DataError(f"{src}: no <id>/images/ folders (expected DSB 2018 stage1_train)")
    test = random_split(ids)
    for i in ids:
        found = _files(src / i / "images")
        if not found:
            raise DataError(f"{src / i / 'images'}: no image")
        image = found[0]

        def mask(i: str = i) -> np.ndarray:
            out = None
            for m in _files(src / i / "masks"):
                with Image.open(m) as im:
                    inst = np.asarray(im.convert("L")) >= 128
                out = inst if out is None else out | inst
            if out is None:
                raise DataError(f"{src / i / 'masks'}: no instance masks")
            return out.astype(np.uint8)

        yield Item(i, "test" if i in test else "train", _rgb(image), mask)


def _pothole(src: Path) -> Iterator[Item]:
    for split, folder in (("train", "training"), ("test", "testing")):
        root = src / folder
        if not root.is_dir():
            raise DataError(f"{root}: folder not found (expected pothole-mix/{{training,testing}}/<subset>/)")
        for subset in sorted(d for d in root.iterdir() if d.is_dir()):
            masks = {p.stem: p for p in _files(subset / "masks")}
            for p in _files(subset / "images"):
                if p.stem not in masks:
                    raise DataError(f"{p}: no mask {subset / 'masks' / p.stem}.*")

                def mask(m: Path = masks[p.stem]) -> np.ndarray:
                    with Image.open(m) as im:
                        return (np.asarray(im.convert("L")) > 0).astype(np.uint8)  # cracks merged, as the paper

                yield Item(f"{subset.name}_{p.stem}", split, _rgb(p), mask)


ISIC_CLASSES = {"NV": 1, "MEL": 2, "BKL": 3}  # nevus, melanoma, seborrheic keratosis (BKL in the 2019 CSV)


def stratified_split(ids_by_class: dict[int, list[str]], test_fraction: float = 0.2) -> set[str]:
    """Seeded 80/20 split drawn separately within each class (sorted ids), so every class reaches the test set."""
    test: set[str] = set()
    for c in sorted(ids_by_class):
        test |= random_split(ids_by_class[c], test_fraction)
    return test


def _isic(src: Path) -> Iterator[Item]:
    import csv

    images_dir = src / "ISIC2018_Task1-2_Training_Input"
    masks_dir = src / "ISIC2018_Task1_Training_GroundTruth"
    csv_path = src / "ISIC_2019_Training_GroundTruth.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found (the ISIC 2019 class CSV gives each image's diagnosis)")
    label: dict[str, int] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            scores = {k: float(v) for k, v in row.items() if k in ISIC_CLASSES or k.isupper()}
            best = max(scores, key=scores.get) if scores else None
            if best in ISIC_CLASSES:
                label[row["image"]] = ISIC_CLASSES[best]
    images = [p for p in _files(images_dir) if p.stem in label]  # other diagnoses are not among the 3 classes
    if not images:
        raise DataError(f"{images_dir}: no image with a nevus/melanoma/seborrheic-keratosis label in {csv_path.name}")
    by_class: dict[int, list[str]] = {}
    for p in images:
        by_class.setdefault(label[p.stem], []).append(p.stem)
    test = stratified_split(by_class)
    for p in images:
        m = masks_dir / f"{p.stem}_segmentation.png"
        if not m.is_file():
            raise DataError(f"{p}: no mask {m}")

        def mask(m: Path = m, c: int = label[p.stem]) -> np.ndarray:
            with Image.open(m) as im:
                return ((np.asarray(im.convert("L")) >= 128) * c).astype(np.uint8)  # one class per image

        yield Item(p.stem, "test" if p.stem in test else "train", _rgb(p), mask)


def _weedmap(src: Path) -> Iterator[Item]:
    """RedEdge tiles: ``<field>/tile/{R,G,B}/<frame>.png`` stacked to RGB, labels in
    ``<field>/groundtruth/<field>_<frame>_GroundTruth_iMap.png`` (0 background, 1 crop, 2 weed; the original also
    maps the value 10000 to crop). Field 000 is the train split, field 003 the test split."""
    for split, field in (("train", "000"), ("test", "003")):
        root = src / field
        channels = [_files(root / "tile" / c) for c in ("R", "G", "B")]
        for r in channels[0]:
            planes = [root / "tile" / c / r.name for c in ("R", "G", "B")]
            missing = [p for p in planes if not p.is_file()]
            if missing:
                raise DataError(f"{missing[0]}: channel tile missing for {r.name}")
            gt = root / "groundtruth" / f"{field}_{r.stem}_GroundTruth_iMap.png"
            if not gt.is_file():
                raise DataError(f"{r}: no ground truth {gt}")

            def image(planes: list[Path] = planes) -> np.ndarray:
                out = []
                for p in planes:
                    with Image.open(p) as im:
                        out.append(np.asarray(im.convert("L")))
                return np.stack(out, axis=2)

            def mask(gt: Path = gt) -> np.ndarray:
                with Image.open(gt) as im:
                    a = np.asarray(im)
                a = a[..., 0] if a.ndim == 3 else a
                a = np.where(a == 10000, 1, a)
                if a.max() > 2:
                    raise DataError(f"{gt}: labels {sorted(set(np.unique(a).tolist()) - {0, 1, 2})[:5]} not in 0/1/2")
                return a.astype(np.uint8)

            yield Item(f"{field}_{r.stem}", split, image, mask)


def _records(path: Path) -> list[dict]:
    """The Lung pickles: a list of per-slice records (dicts or objects) or a dict of per-slice columns."""
    import pickle

    if not path.is_file():
        raise DataError(f"{path}: file not found (expected lung_cancer_train.pkl and lung_cancer_test.pkl)")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - the user's own dataset file
    except ModuleNotFoundError as e:
        raise DataError(f"{path}: unpickling needs the package {e.name!r}; install it and retry") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"{path}: not a readable pickle ({e})") from None
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # a pandas DataFrame
        data = data.to_dict("records")
    if isinstance(data, dict) and "hu_array" in data:
        data = [dict(zip(data, row)) for row in zip(*data.values())]
    records = [r if isinstance(r, dict) else vars(r) for r in data]
    for i, r in enumerate(records):
        if "hu_array" not in r or "mask" not in r:
            raise DataError(f"{path}: record {i} has no 'hu_array' and 'mask' fields (found {sorted(r)[:6]})")
    return records


def _lung(src: Path) -> Iterator[Item]:
    train = _records(src / "lung_cancer_train.pkl")
    test = _records(src / "lung_cancer_test.pkl")
    # The original scales every slice with the global min/max of the train set's lung-only HU arrays.
    lo = min(float(np.min(r["hu_array"])) for r in train)
    hi = max(float(np.max(r["hu_array"])) for r in train)

    def image(r: dict) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            a = (np.asarray(r["hu_array"], dtype=np.float64) - lo) / max(hi - lo, 1e-8)
            g = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
            return np.repeat(g[..., None], 3, axis=2)

        return load

    for split, records in (("train", train), ("test", test)):
        for i, r in enumerate(records):
            yield Item(f"{split}_{i:04d}", split, image(r), lambda r=r: (np.asarray(r["mask"]) > 0).astype(np.uint8))


PICKLED = ("lung",)  # adapters whose source files are Python pickles

ADAPTERS: dict[str, Adapter] = {
    "weedmap": Adapter(
        "weedmap",
        "agriculture, UAV multispectral tiles (WeedMap RedEdge)",
        ("background", "crop", "weed"),
        "field 000 = train, field 003 = test",
        _weedmap,
    ),
    "isic": Adapter(
        "isic",
        "medical, dermoscopy (ISIC 2018 task 1, 2019 diagnoses)",
        ("background", "nevus", "melanoma", "seborrheic keratosis"),
        f"per class: sorted ids, numpy default_rng({SPLIT_SEED}) permutation, 20 % test",
        _isic,
    ),
    "lung": Adapter(
        "lung",
        "medical, lung CT nodules (Lung-RADS pickles)",
        ("background", "nodule"),
        "the official train/test pickles; slices numbered in file order",
        _lung,
    ),
    "kvasir": Adapter(
        "kvasir",
        "medical, colonoscopy polyps",
        ("background", "polyp"),
        f"sorted ids, numpy default_rng({SPLIT_SEED}) permutation, 20 % test",
        _kvasir,
    ),
    "nucleus": Adapter(
        "nucleus",
        "microscopy, cell nuclei (DSB 2018 stage1_train)",
        ("background", "nucleus"),
        f"sorted ids, numpy default_rng({SPLIT_SEED}) permutation, 20 % test",
        _nucleus,
    ),
    "pothole": Adapter(
        "pothole",
        "road surface, potholes and cracks (Pothole-mix)",
        ("background", "pothole"),
        "the official training/ and testing/ folders",
        _pothole,
    ),
}


def industrial_adapter(src: Path, fold: int = 0) -> Adapter:
    """Industrial-5i: ``data.json`` (``clsName``: the class names in order; ``clsDic[name]["bad"]``: that class's
    defect images, paths relative to ``src``) and, beside each image, its mask with the suffix ``.bmp`` (gray > 0
    = defect). The 20 classes form 4 interleaved folds: fold f keeps classes f+1, f+5, f+9, f+13, f+17 (1-based
    in ``clsName`` order), relabelled 1..5. Split: seeded 80/20 within each class over the sorted paths (the
    original split all images with scikit-learn's ``train_test_split(random_state=42)`` before the fold filter).
    """
    meta_path = src / "data.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: file not found (Industrial-5i's class list and image index)")
    try:
        meta = json.loads(meta_path.read_text())
        names, table = list(meta["clsName"]), meta["clsDic"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: expected 'clsName' and 'clsDic' ({e})") from None
    if fold not in range(4):
        raise DataError(f"--fold {fold}: Industrial-5i has folds 0-3")
    per_fold = (len(names) + 1) // 4
    kept = [names[fold + 4 * k] for k in range(per_fold) if fold + 4 * k < len(names)]
    paths: dict[int, list[str]] = {}
    for c, name in enumerate(kept, start=1):
        entry = table.get(name)
        if not isinstance(entry, dict) or "bad" not in entry:
            raise DataError(f"{meta_path}: clsDic[{name!r}] has no 'bad' image list")
        paths[c] = sorted(entry["bad"])

    def items(src: Path) -> Iterator[Item]:
        test = stratified_split(paths)
        for c, rels in sorted(paths.items()):
            for rel in rels:
                image = src / rel
                mask_path = image.with_suffix(".bmp")
                for f in (image, mask_path):
                    if not f.is_file():
                        raise DataError(f"{f}: listed in {meta_path.name} (class {kept[c - 1]}) but missing")
                stem = f"{kept[c - 1]}_{Path(rel).with_suffix('').as_posix().replace('/', '_')}"

                def mask(m: Path = mask_path, c: int = c) -> np.ndarray:
                    with Image.open(m) as im:
                        return ((np.asarray(im.convert("L")) > 0) * c).astype(np.uint8)

                yield Item(stem, "test" if rel in test else "train", _rgb(image), mask)

    return Adapter(
        f"industrial_fold{fold}",
        f"industrial defects (Industrial-5i, fold {fold})",
        ("background", *kept),
        "seeded 80/20 within each class over the sorted data.json paths (numpy default_rng(42))",
        items,
    )


def convert(name: str, src: Path, dst: Path, fold: int = 0, trust_pickle: bool = False) -> dict[str, int]:
    """Write dataset ``name`` from its native layout at ``src`` into the project format at ``dst`` (new folder).

    ``fold``: Industrial-5i only, which of its 4 folds to write. ``trust_pickle``: Lung only; its files are Python
    pickles, and unpickling runs whatever code a file holds, so they are read only when the caller vouches for
    them. Returns the number of images per split.
    """
    names = [*ADAPTERS, "industrial"]
    if name not in names:
        raise DataError(f"unknown dataset {name!r}; adapters: {', '.join(names)}")
    if name in PICKLED and not trust_pickle:
        raise DataError(
            f"{src}: the {name} files are Python pickles, and loading a pickle runs any code it contains; convert "
            "them only if they come from the dataset's official source, with --trust-pickle (no published checksum "
            "is known to check them against)"
        )
    adapter = industrial_adapter(Path(src), fold) if name == "industrial" else ADAPTERS[name]
    items = list(adapter.items(Path(src)))  # validates the layout before anything is written
    counts = {"train": 0, "test": 0}
    for split in counts:
        (dst / split / "images").mkdir(parents=True, exist_ok=True)
        (dst / split / "masks").mkdir(parents=True, exist_ok=True)
    for item in items:
        image, mask = item.image(), item.mask()
        if image.shape[:2] != mask.shape:
            raise DataError(f"{src}: {item.stem}: mask {mask.shape} and image {image.shape[:2]} differ in size")
        Image.fromarray(image).save(dst / item.split / "images" / f"{item.stem}.png")
        Image.fromarray(mask).save(dst / item.split / "masks" / f"{item.stem}.png")
        counts[item.split] += 1
    meta = {
        "name": adapter.name,
        "domain": adapter.domain,
        "classes": list(adapter.classes),
        "source": str(src),
        "split": adapter.split_rule,
        "counts": counts,
    }
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts
