"""Bad input: each case a clear error naming the file; odd-but-valid images are converted, not rejected."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from distillfss.data import DataError, class_sets, load_image, load_split, load_support_tensors
from distillfss.data.folder import image_files
from distillfss.errors import UserError


def test_missing_folder(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_split(tmp_path / "nope")


def test_image_without_mask(binary_dataset) -> None:
    (binary_dataset / "train/masks/img01.png").unlink()
    with pytest.raises(DataError, match=r"img01\.png: no mask"):
        load_split(binary_dataset, "train")


def test_mask_without_image(binary_dataset) -> None:
    (binary_dataset / "train/images/img01.png").unlink()
    with pytest.raises(DataError, match=r"masks/img01\.png: mask without an image"):
        load_split(binary_dataset, "train")


def test_mask_of_another_size(binary_dataset) -> None:
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(binary_dataset / "train/masks/img02.png")
    split = load_split(binary_dataset, "train")
    with pytest.raises(DataError, match=r"img02\.png: mask is 10x10, its image is 48x40"):
        class_sets(split) and load_support_tensors(split, ["img02"], 32)


def test_label_outside_classes(binary_dataset) -> None:
    m = np.zeros((40, 48), np.uint8)
    m[0, 0], m[1, 1] = 7, 255  # 255 is ignore and fine; 7 is not a class
    Image.fromarray(m).save(binary_dataset / "train/masks/img00.png")
    with pytest.raises(DataError, match=r"img00\.png: label values \[7\] outside the classes 0\.\.1"):
        class_sets(load_split(binary_dataset, "train"))


def test_support_without_foreground(binary_dataset) -> None:
    for p in (binary_dataset / "train/masks").iterdir():
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(p)
    split = load_split(binary_dataset, "train")
    with pytest.raises(DataError, match="no foreground pixel"):
        load_support_tensors(split, ["img00", "img01"], 32)


def test_binary_masks_saved_as_0_and_255_are_explained(binary_dataset) -> None:
    for p in (binary_dataset / "train/masks").iterdir():
        Image.fromarray(np.asarray(Image.open(p)) * 255).save(p)  # objects 255: "ignore" in this format
    split = load_split(binary_dataset, "train")
    with pytest.raises(DataError, match=r"no foreground pixel; its masks hold only 0 and 255.*objects as 1"):
        load_support_tensors(split, ["img00", "img01"], 32)


def test_a_jpeg_mask_is_told_to_be_a_png(binary_dataset) -> None:
    mask = binary_dataset / "train/masks/img00.png"
    m = np.asarray(Image.open(mask)) * 255
    mask.unlink()
    Image.fromarray(m).save(mask.with_suffix(".jpg"), quality=75)  # lossy: values between 0 and 255 appear
    with pytest.raises(DataError, match=r"img00\.jpg: label values .* save masks as PNG"):
        class_sets(load_split(binary_dataset, "train"))


def test_corrupt_image(binary_dataset) -> None:
    (binary_dataset / "train/images/img03.png").write_bytes(b"this is not a png")
    split = load_split(binary_dataset, "train")
    with pytest.raises(DataError, match=r"img03\.png: not a readable image"):
        load_support_tensors(split, ["img03"], 32)


def test_colour_mask_with_differing_channels(binary_dataset) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 2, (40, 48, 3), dtype=np.uint8)).save(
        binary_dataset / "train/masks/img00.png"
    )
    with pytest.raises(DataError, match="single-channel label map of class indices"):
        class_sets(load_split(binary_dataset, "train"))


def test_bad_dataset_json(binary_dataset) -> None:
    (binary_dataset / "dataset.json").write_text("{broken")
    with pytest.raises(DataError, match=r"dataset\.json: not a valid dataset\.json"):
        load_split(binary_dataset, "train")


@pytest.mark.parametrize(
    "array,mode",
    [
        (np.full((6, 7), 128, np.uint8), "L"),
        (np.full((6, 7, 4), 128, np.uint8), "RGBA"),
        (np.linspace(0, 4000, 42).reshape(6, 7).astype(np.uint16), "I;16"),
    ],
)
def test_grayscale_rgba_16bit_are_converted(tmp_path, array, mode) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)  # Pillow infers L, RGBA and I;16 from the arrays
    img = load_image(path)
    assert img.shape == (6, 7, 3) and img.dtype == np.float32
    assert img.min() >= 0 and img.max() <= 1
    if mode == "I;16":
        assert img.max() == pytest.approx(1.0)  # stretched, not left dark


def test_plain_images_masks_folder_with_classes_txt(tmp_path) -> None:
    root = tmp_path / "plain"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images/a.png")
    Image.fromarray(np.eye(8, dtype=np.uint8) * 2).save(root / "masks/a.png")
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    split = load_split(root, "train")
    assert split.classes == ("background", "cat", "dog")
    assert class_sets(split) == [{2}]


def test_class_without_pixels_in_the_support(multiclass_dataset) -> None:
    split = load_split(multiclass_dataset, "train")
    sets = class_sets(split)
    stem = next(s.stem for s, c in zip(split.samples, sets) if c != {1, 2, 3})
    with pytest.raises(DataError, match=r"have no pixel in any support image"):
        load_support_tensors(split, [stem], 32)


def test_bundled_two_class_set_is_its_documented_derivation_of_nuclei(tmp_path) -> None:
    """nuclei_sizes re-derives byte-for-byte from nuclei; its two classes partition nuclei's foreground; a
    non-binary source and an existing output folder are refused."""
    pytest.importorskip("skimage")
    from distillfss.data.derive import split_by_size
    from distillfss.demo import demo_root

    src, bundled = demo_root() / "nuclei", demo_root() / "nuclei_sizes"
    meta = split_by_size(src, tmp_path / "again", "nuclei_sizes", "small_nucleus", "large_nucleus")
    assert meta == json.loads((bundled / "dataset.json").read_text())
    for split in ("train", "test"):
        new, old = load_split(tmp_path / "again", split), load_split(bundled, split)
        assert [s.stem for s in new.samples] == [s.stem for s in old.samples]
        for a, b in zip(new.samples, old.samples):
            assert np.array_equal(np.asarray(Image.open(a.mask)), np.asarray(Image.open(b.mask)))
            assert (tmp_path / "again" / split / "images" / a.image.name).read_bytes() == b.image.read_bytes()
            binary = np.asarray(Image.open(src / split / "masks" / a.mask.name)) > 0
            assert np.array_equal(np.asarray(Image.open(a.mask)) > 0, binary)
    assert load_split(bundled, "train").num_classes == 2
    with pytest.raises(UserError, match="not empty"):
        split_by_size(src, tmp_path / "again", "x")
    with pytest.raises(DataError, match="needs a binary dataset"):
        split_by_size(bundled, tmp_path / "third", "x")
    odd = tmp_path / "odd"  # an ignore label (255) would count as foreground: refused before anything is written
    shutil.copytree(src, odd)
    first = sorted((odd / "train" / "masks").iterdir())[0]
    last = sorted((odd / "test" / "masks").iterdir())[-1]
    # a train mask odd; then the train masks valid again and a test mask odd: each refused before writing
    for path, value, out in ((first, 255, "fourth"), (last, 2, "fifth")):
        mask = np.asarray(Image.open(path)).copy()
        mask[0, 0] = value
        Image.fromarray(mask).save(path)
        with pytest.raises(DataError, match=rf"{path.name}: split_by_size needs masks of 0 and 1 only"):
            split_by_size(odd, tmp_path / out, "x")
        assert not (tmp_path / out).exists()
        Image.fromarray(mask.clip(0, 1)).save(path)


def test_a_folder_whose_images_are_in_subfolders_says_so(tmp_path) -> None:
    (tmp_path / "scans" / "day1").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "scans" / "day1" / "a.png")
    with pytest.raises(DataError, match=r"scans: no images .*; subfolders \(day1\) are not searched"):
        image_files(tmp_path / "scans")
