"""Inputs are checked as a whole and named in the error: starting teachers, benchmark datasets."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import TINY_ADAPT, write_dataset

from distillfss.cli import main
from distillfss.config import ModelConfig
from distillfss.model_io import ModelError, load_teacher_weights, save_teacher_checkpoint
from distillfss.teacher import build_teacher


@pytest.mark.parametrize(
    "change", [{"image_size": 96}, {"heads": 4}, {"heads_stride8": 2}, {"pe_dropout": 0.5}, {"backbone": "resnet50"}]
)
def test_a_starting_teacher_of_another_architecture_is_refused_by_field(tmp_path, lite0_64, change) -> None:
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=64, heads=2, num_classes=1)
    save_teacher_checkpoint(tmp_path, build_teacher(lite0_64, cfg), cfg, {})
    field = next(iter(change))
    with pytest.raises(ModelError, match=f"{field} = "):
        load_teacher_weights(tmp_path, lite0_64, dataclasses.replace(cfg, **change))
    loaded = load_teacher_weights(tmp_path, lite0_64, dataclasses.replace(cfg, num_classes=3))  # classes may differ
    assert loaded.decoder is not None


def test_benchmark_refuses_two_datasets_with_one_name(tmp_path, capsys) -> None:
    a = write_dataset(tmp_path / "a" / "data")
    b = write_dataset(tmp_path / "b" / "data")
    assert main(["benchmark", "--data", f"{a},{b}", "--out", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err
    assert "two datasets are named data" in err and str(a) in err and not (tmp_path / "bench").exists()


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (no pixel data): enough for Pillow's decompression-bomb check."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_bad_input_sweep(tmp_path) -> None:
    """Each odd file gives its documented behaviour: it works, or a one-line DataError naming the file."""
    import numpy as np
    from PIL import Image

    from distillfss.data import DataError, load_image, load_mask

    d = tmp_path / "sweep"
    d.mkdir()
    rgb = (np.random.default_rng(0).uniform(0, 255, (16, 20, 3))).astype(np.uint8)
    broken = {}
    (d / "empty.png").write_bytes(b"")
    broken["empty.png"] = "not a readable image"
    Image.fromarray(rgb).save(d / "full.jpg", quality=90)
    (d / "truncated.jpg").write_bytes((d / "full.jpg").read_bytes()[:200])
    broken["truncated.jpg"] = "not a readable image"
    _png_header_only(d / "huge.png", 20000, 20000)
    broken["huge.png"] = "too large to read safely"
    (d / "loop.png").symlink_to(d / "loop.png")
    broken["loop.png"] = "not a readable image"
    for name, message in broken.items():
        with pytest.raises(DataError, match=message) as e:
            load_image(d / name)
        assert name in str(e.value) and "\n" not in str(e.value)

    # A palette mask read by index, even where the palette paints class 1 black.
    labels = np.zeros((16, 20), np.uint8)
    labels[4:10, 5:12] = 1
    pal = Image.fromarray(labels, mode="P")
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 white, index 1 black
    pal.save(d / "palette.png")
    assert np.array_equal(load_mask(d / "palette.png", 1), labels)
    # A 16-bit mask by value.
    Image.fromarray(labels.astype(np.uint16)).save(d / "mask16.png")
    assert np.array_equal(load_mask(d / "mask16.png", 1), labels)
    # EXIF orientation is not applied: pixels as stored, so a mask drawn on them stays aligned.
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(d / "exif.jpg", exif=exif.tobytes(), quality=95)
    assert load_image(d / "exif.jpg").shape == (16, 20, 3)
    # A file name that is not UTF-8 is read, and named in errors without a crash.
    odd = d / b"caf\xe9.png".decode("utf-8", "surrogateescape")
    Image.fromarray(rgb).save(odd)
    assert load_image(odd).shape == (16, 20, 3)


def test_predict_skips_bad_files_names_them_and_writes_the_rest(tmp_path, capsys) -> None:
    import numpy as np
    from PIL import Image

    data = write_dataset(tmp_path / "d", n_train=3, n_test=1)
    model = tmp_path / "m"
    fast = TINY_ADAPT
    assert main(["adapt", "--support", str(data), "--shots", "2", "--out", str(model), *fast]) == 0
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(images / "good.png")
    (images / "empty.png").write_bytes(b"")
    _png_header_only(images / "huge.png", 20000, 20000)
    (images / "loop.png").symlink_to(images / "loop.png")
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(model), "--images", str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("empty.png", "huge.png", "loop.png"))
    assert np.asarray(Image.open(out / "good.png")).shape == (30, 40)
    assert sorted(p.name for p in out.glob("*.png")) == ["good.png"]
