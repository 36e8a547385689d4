"""Images of any size at one pixel scale: windows for training, sliding windows for inference, sharded predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ADAPT, write_dataset
from PIL import Image

from distillfss.cli import main
from distillfss.tiling import IGNORE, WINDOWS_PER_IMAGE, choose_scale, segment_stream, starts, support_windows


def segment(images, size, scale, logits, batch=8):  # noqa: ANN001, ANN201
    return list(segment_stream(images, size, scale, logits, batch))


def pixelwise(x: torch.Tensor) -> torch.Tensor:
    """A 'model' whose output at a pixel depends on that pixel only: windows must reproduce the whole image."""
    return torch.stack([x[:, 0] - 0.5, x[:, 1] - x[:, 2], 0.2 * torch.ones_like(x[:, 0])], 1) * 10


def test_sliding_windows_reproduce_a_pixelwise_model_on_images_of_any_size_and_aspect() -> None:
    rng = np.random.default_rng(0)
    for h, w in ((300, 1000), (64, 64), (70, 20), (129, 257)):
        image = rng.uniform(0, 1, (h, w, 3)).astype(np.float32)
        whole = pixelwise(torch.from_numpy(image).permute(2, 0, 1)[None])[0].argmax(0).numpy()
        for batch in (1, 5):
            (labels,) = segment([image], 64, 1.0, pixelwise, batch=batch)
            assert labels.shape == (h, w) and np.array_equal(labels, whole), (h, w, batch)


def test_fit_is_the_resize_of_before_for_square_images_and_pads_other_aspects() -> None:
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (100, 100, 3)).astype(np.float32)
    t = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=(64, 64), mode="bilinear", antialias=True)
    before = F.interpolate(pixelwise(t.clamp(0, 1)), size=(100, 100), mode="bilinear").argmax(1)[0].numpy()
    assert np.array_equal(segment([image], 64, None, pixelwise)[0], before)
    wide = rng.uniform(0, 1, (50, 200, 3)).astype(np.float32)
    assert segment([wide], 64, None, pixelwise)[0].shape == (50, 200)


def test_other_scales_and_uint8_images_come_back_at_full_size() -> None:
    yy, xx = np.mgrid[0:90, 0:150] / 30.0  # smooth: resampling keeps it
    image = (np.stack([np.sin(yy) / 2 + 0.5, np.cos(xx) / 2 + 0.5, np.sin(xx + yy) / 2 + 0.5], -1) * 255).astype(
        np.uint8
    )
    whole = pixelwise(torch.from_numpy(image / 255.0).float().permute(2, 0, 1)[None])[0].argmax(0).numpy()
    for scale in (0.5, 2.0):
        (labels,) = segment([image], 64, scale, pixelwise, batch=4)
        assert labels.shape == (90, 150)
        assert (labels == whole).mean() > 0.95  # resampled twice: the same map up to edges


def test_window_origins_cover_the_image_and_end_flush() -> None:
    for length, size, stride in ((1000, 64, 48), (64, 64, 48), (65, 64, 48), (10, 64, 48)):
        o = starts(length, size, stride)
        assert o[0] == 0 and o[-1] == max(0, length - size)
        assert all(b - a <= stride for a, b in zip(o, o[1:]))


def test_choose_scale_keeps_the_old_behaviour_for_images_about_the_working_size() -> None:
    assert choose_scale([(512, 512)], 256, "auto") == 0.5  # at most twice the size: one window each, as before
    assert choose_scale([(4000, 3000), (5000, 5000)], 256, "auto") == 1.0  # large: native pixels, windows
    assert choose_scale([(100, 100)], 256, "2") == 2.0 and choose_scale([], 256, "fit") is None
    for bad in ("0", "-1", "big", "nan", "inf"):
        with pytest.raises(ValueError, match="scale"):
            choose_scale([], 256, bad)
    assert choose_scale([(10_000, 10_000)], 256, "1") == 1.0
    with pytest.raises(ValueError, match=r"scale 1e\+09 makes a 500 x 300 px support image .* crop the image"):
        choose_scale([(300, 500)], 256, "1e9")  # not a crash allocating 1.5e23 pixels


def test_support_windows_take_foreground_first_and_ignore_padding() -> None:
    image = np.zeros((300, 500, 3), np.float32)
    mask = np.zeros((300, 500), np.uint8)
    mask[250:280, 450:490] = 1  # foreground in the bottom-right window only
    x, y = support_windows(image, mask, 64, 1.0)
    assert x.shape[1:] == (3, 64, 64) and len(x) == WINDOWS_PER_IMAGE
    holds = [bool((w == 1).any()) for w in y]
    assert holds == [True, True, False, False]  # the two grid windows over the object first, then background
    x, y = support_windows(np.zeros((40, 100, 3), np.float32), np.ones((40, 100), np.uint8), 64, None)
    assert len(x) == 1 and (y[0, 26:] == IGNORE).all() and (y[0, :25] == 1).all()  # 100 -> 64: 40 -> 26 rows


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory) -> Path:
    """Non-square images three windows wide at 64 px."""
    return write_dataset(tmp_path_factory.mktemp("wide") / "wide", n_train=3, n_test=2, size=(80, 200))


@pytest.fixture(scope="module")
def wide_model(wide_data, tmp_path_factory) -> Path:
    """A student adapted at pixel scale 1 (each wide image is three windows)."""
    model = tmp_path_factory.mktemp("wide_model") / "m"
    argv = ["adapt", "--support", str(wide_data), "--out", str(model), "--shots", "2", "--scale", "1", *TINY_ADAPT]
    assert main(argv) == 0
    return model


def test_adapt_at_scale_one_predicts_evaluates_and_exports_at_full_size(wide_data, wide_model, tmp_path) -> None:
    model = wide_model
    assert json.loads((model / "config.json").read_text())["scale"] == 1.0
    images = wide_data / "test" / "images"
    assert main(["predict", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "p")]) == 0
    labels = np.asarray(Image.open(tmp_path / "p" / "img00.png"))
    assert labels.shape == (80, 200)
    assert main(["evaluate", "--model", str(model), "--data", str(wide_data), "--json", str(tmp_path / "e.json")]) == 0
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "m.onnx")]) == 0
    onnx = ["predict", "--engine", "onnx", "--model", str(tmp_path / "m.onnx"), "--images", str(images)]
    assert main([*onnx, "--out", str(tmp_path / "q")]) == 0
    same = np.asarray(Image.open(tmp_path / "q" / "img00.png"))
    assert (same == labels).mean() > 0.99  # the ONNX graph windows the image the same way


def test_a_stopped_predict_resumes_without_recomputing_finished_images(
    wide_data, wide_model, tmp_path, monkeypatch
) -> None:
    from distillfss.predictor import Predictor

    model = wide_model
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(5):
        Image.fromarray(np.full((30, 40, 3), 40 * i, np.uint8)).save(images / f"i{i}.png")
    argv = ["predict", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "p"), "--batch", "1"]
    assert main([*argv[:-4], "--out", str(tmp_path / "whole")]) == 0
    real = Predictor.logits
    calls = []

    def dies_on_the_fourth(self, x):  # noqa: ANN001, ANN202
        calls.append(len(x))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(Predictor, "logits", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(Predictor, "logits", lambda self, x: (calls.append(len(x)), real(self, x))[1])
    calls.clear()
    assert main(argv) == 0
    assert len(calls) == 2  # the three finished images were not segmented again
    out, whole = tmp_path / "p", tmp_path / "whole"
    assert all((out / f"i{i}.png").read_bytes() == (whole / f"i{i}.png").read_bytes() for i in range(5))
    manifest = json.loads((out / ".distillfss-written.json").read_text())
    files = [".distillfss-predict.json", *(f"i{i}.png" for i in range(5))]  # the labels and what made them
    assert manifest["files"] == files and not list(out.glob(".distillfss-journal*"))


def test_two_names_with_one_stem_are_refused_before_anything_is_written(wide_data, tmp_path, capsys) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.jpg")
    assert main(["predict", "--model", "nowhere", "--images", str(images), "--out", str(tmp_path / "p")]) == 2
    assert "stem" in capsys.readouterr().err and not (tmp_path / "p").exists()


@pytest.mark.slow
def test_two_processes_write_the_same_labels_as_one(wide_data, wide_model, tmp_path) -> None:
    """torchrun --nproc-per-node 2 (gloo, CPU): byte-identical label files and one manifest."""
    model = wide_model
    images = wide_data / "train" / "images"
    assert main(["predict", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "distillfss", "predict"]
    run += ["--model", str(model), "--images", str(images), "--out", str(tmp_path / "two")]
    subprocess.run(run, check=True, env=env, capture_output=True, timeout=300)
    one, two = tmp_path / "one", tmp_path / "two"
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(p.name for p in two.glob("*.png")) and len(names) == 3
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)
    assert json.loads((two / ".distillfss-written.json").read_text())["files"] == [".distillfss-predict.json", *names]
    assert not list(two.glob(".distillfss-journal*"))
