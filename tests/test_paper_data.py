"""Adapters for the paper's datasets, on tiny replicas of their native layouts made here."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from distillfss.cli import main
from distillfss.data import class_sets, load_split
from distillfss.data.paper import random_split


def _save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_kvasir_thresholds_jpeg_masks_and_splits_80_20(tmp_path) -> None:
    src = tmp_path / "Kvasir-SEG"
    for i in range(10):
        _save(src / "images" / f"cju{i:02d}.jpg", np.full((24, 24, 3), 90, np.uint8))
        m = np.zeros((24, 24, 3), np.uint8)
        m[0:8, 8:16] = 255  # polyp (8x8-aligned blocks survive JPEG nearly unchanged)
        m[16:24, 0:8] = 240  # bright JPEG noise below the original's threshold (245) stays background
        _save(src / "masks" / f"cju{i:02d}.jpg", m)
    assert main(["data", "convert", "kvasir", str(src), str(tmp_path / "kv")]) == 0
    train, test = load_split(tmp_path / "kv", "train"), load_split(tmp_path / "kv", "test")
    assert len(train.samples) == 8 and len(test.samples) == 2
    assert {s.stem for s in test.samples} == random_split([f"cju{i:02d}" for i in range(10)])
    mask = np.asarray(Image.open(train.samples[0].mask))
    assert mask[16:24, 0:8].max() == 0 and mask[2:6, 10:14].min() == 1 and mask.max() == 1
    assert json.loads((tmp_path / "kv" / "dataset.json").read_text())["classes"] == ["background", "polyp"]


def test_nucleus_merges_instance_masks(tmp_path) -> None:
    src = tmp_path / "stage1_train"
    for i in range(5):
        sid = f"{i:03x}abc"
        _save(src / sid / "images" / f"{sid}.png", np.full((16, 16, 4), 120, np.uint8))
        for j in range(2):
            inst = np.zeros((16, 16), np.uint8)
            inst[2 + 6 * j : 6 + 6 * j, 2:6] = 255
            _save(src / sid / "masks" / f"inst{j}.png", inst)
    assert main(["data", "convert", "nucleus", str(src), str(tmp_path / "nu")]) == 0
    split = load_split(tmp_path / "nu", "train")
    assert len(split.samples) == 4
    mask = np.asarray(Image.open(split.samples[0].mask))
    assert mask.sum() == 2 * 16 and set(np.unique(mask)) == {0, 1}
    assert class_sets(split)[0] == {1}


def test_pothole_keeps_official_split_and_merges_cracks(tmp_path) -> None:
    src = tmp_path / "pothole-mix"
    for split in ("training", "testing"):
        for subset in ("cracks-and-potholes", "gaps"):
            m = np.zeros((12, 12), np.uint8)
            m[1:4, 1:4], m[6:8, 6:8] = 1, 2  # pothole and crack
            _save(src / split / subset / "images" / "a.jpg", np.full((12, 12, 3), 50, np.uint8))
            _save(src / split / subset / "masks" / "a.png", m)
    assert main(["data", "convert", "pothole", str(src), str(tmp_path / "po")]) == 0
    test = load_split(tmp_path / "po", "test")
    assert [s.stem for s in test.samples] == ["cracks-and-potholes_a", "gaps_a"]
    assert np.asarray(Image.open(test.samples[0].mask)).sum() == 9 + 4


def test_convert_errors_are_one_line_and_write_nothing(tmp_path, capsys) -> None:
    (tmp_path / "src").mkdir()
    assert main(["data", "convert", "industrial", str(tmp_path / "src"), str(tmp_path / "x")]) == 2
    assert "data.json: file not found" in capsys.readouterr().err
    assert main(["data", "convert", "kvasir", str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_industrial_keeps_the_folds_interleaved_classes(tmp_path, capsys) -> None:
    src = tmp_path / "industrial"
    names = [f"part{i:02d}" for i in range(20)]
    table = {}
    for i, name in enumerate(names):
        rels = []
        for j in range(5):
            rel = f"{name}/bad/{j:03d}.png"
            m = np.zeros((10, 10), np.uint8)
            m[: 1 + i % 5, :] = 255
            _save(src / rel, np.full((10, 10, 3), 10 * i, np.uint8))
            _save((src / rel).with_suffix(".bmp"), m)
            rels.append(rel)
        table[name] = {"bad": list(reversed(rels)), "good": []}
    (src / "data.json").write_text(json.dumps({"clsName": names, "clsDic": table}))
    assert main(["data", "convert", "industrial", str(src), str(tmp_path / "f1"), "--fold", "1"]) == 0
    meta = json.loads((tmp_path / "f1/dataset.json").read_text())
    assert meta["classes"] == ["background", "part01", "part05", "part09", "part13", "part17"]
    train, test = load_split(tmp_path / "f1", "train"), load_split(tmp_path / "f1", "test")
    assert len(train.samples) == 20 and len(test.samples) == 5  # 4 + 1 per class
    by_stem = dict(zip([s.stem for s in train.samples], class_sets(train)))
    assert by_stem["part05_part05_bad_000"] == {2}  # relabelled 1..5 in fold order
    mask = np.asarray(Image.open(next(s.mask for s in train.samples if s.stem.startswith("part09"))))
    assert set(np.unique(mask)) == {0, 3} and (mask == 3).sum() == 10 * (1 + 9 % 5)
    (src / "part13/bad/002.bmp").unlink()
    assert main(["data", "convert", "industrial", str(src), str(tmp_path / "f1b"), "--fold", "1"]) == 2
    assert "002.bmp: listed in data.json (class part13) but missing" in capsys.readouterr().err
    assert not (tmp_path / "f1b").exists()


def test_lung_pickles_scale_with_the_train_set_range(tmp_path) -> None:
    import pickle

    src = tmp_path / "lung"
    src.mkdir()

    def record(lo: float, hi: float) -> dict:
        hu = np.linspace(lo, hi, 64).reshape(8, 8)
        mask = np.zeros((8, 8), np.uint8)
        mask[2:4, 2:4] = 1
        return {"label1": 2, "mask": mask, "hu_array_old": hu, "hu_array": hu}

    (src / "lung_cancer_train.pkl").write_bytes(pickle.dumps([record(-1000, 0), record(-500, 200)]))
    (src / "lung_cancer_test.pkl").write_bytes(pickle.dumps({k: [v] for k, v in record(-2000, 500).items()}))
    assert main(["data", "convert", "lung", str(src), str(tmp_path / "lu")]) == 2  # pickles run code: opt in
    assert not (tmp_path / "lu").exists()
    assert main(["data", "convert", "lung", str(src), str(tmp_path / "lu"), "--trust-pickle"]) == 0
    train, test = load_split(tmp_path / "lu", "train"), load_split(tmp_path / "lu", "test")
    assert len(train.samples) == 2 and len(test.samples) == 1
    first = np.asarray(Image.open(train.samples[0].image))
    assert first.shape == (8, 8, 3) and first.min() == 0  # the train set's minimum maps to 0
    last = np.asarray(Image.open(test.samples[0].image))
    assert last.min() == 0 and last.max() == 255  # test values outside the train range are clipped
    assert np.asarray(Image.open(test.samples[0].mask)).sum() == 4


def test_isic_labels_each_image_with_its_diagnosis_and_stratifies(tmp_path) -> None:
    src = tmp_path / "isic"
    header = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
    rows = []
    for i in range(15):
        diag = ["NV", "MEL", "BKL"][i % 3] if i < 14 else "BCC"  # the last one is outside the 3 classes
        cols = {k: "0.0" for k in ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]}
        cols[diag] = "1.0"
        rows.append(f"ISIC_{i:07d}," + ",".join(cols.values()) + "\n")
        _save(src / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.jpg", np.full((10, 10, 3), 100, np.uint8))
        m = np.zeros((10, 10), np.uint8)
        m[3:6, 3:6] = 255
        _save(src / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_{i:07d}_segmentation.png", m)
    (src / "ISIC_2019_Training_GroundTruth.csv").write_text(header + "".join(rows))
    assert main(["data", "convert", "isic", str(src), str(tmp_path / "is")]) == 0
    train, test = load_split(tmp_path / "is", "train"), load_split(tmp_path / "is", "test")
    assert len(train.samples) + len(test.samples) == 14  # the BCC image is left out
    assert train.classes == ("background", "nevus", "melanoma", "seborrheic keratosis")
    assert {c for s in class_sets(test) for c in s} == {1, 2, 3}  # every class reaches the test split
    first = np.asarray(Image.open(load_split(tmp_path / "is", "train").samples[0].mask))
    assert set(np.unique(first)) <= {0, 1, 2, 3} and first.sum() > 0


def test_weedmap_stacks_channel_tiles_and_splits_by_field(tmp_path) -> None:
    src = tmp_path / "RedEdge"
    for field in ("000", "003"):
        for frame in ("frame0000", "frame0001"):
            for value, ch in ((10, "R"), (20, "G"), (30, "B")):
                _save(src / field / "tile" / ch / f"{frame}.png", np.full((6, 6), value, np.uint8))
            gt = np.zeros((6, 6), np.uint16)
            gt[0, 0], gt[1, 1] = 10000, 2
            _save(src / field / "groundtruth" / f"{field}_{frame}_GroundTruth_iMap.png", gt)
    assert main(["data", "convert", "weedmap", str(src), str(tmp_path / "wm")]) == 0
    train, test = load_split(tmp_path / "wm", "train"), load_split(tmp_path / "wm", "test")
    assert [s.stem for s in train.samples] == ["000_frame0000", "000_frame0001"]
    assert [s.stem for s in test.samples] == ["003_frame0000", "003_frame0001"]
    assert np.asarray(Image.open(train.samples[0].image))[0, 0].tolist() == [10, 20, 30]
    mask = np.asarray(Image.open(train.samples[0].mask))
    assert mask[0, 0] == 1 and mask[1, 1] == 2 and train.classes == ("background", "crop", "weed")
