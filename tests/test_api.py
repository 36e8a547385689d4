"""The Python API: FewShotSegmenter fit / predict / save / load / export_onnx, and the teacher-side pair (issue 13)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from distillfss import FastStudent, FewShotSegmenter, load_model
from distillfss.data import DataError
from distillfss.errors import UserError

SMALL = {"backbone": "efficientnet_lite0", "image_size": 64, "teacher": "random", "iterations": 2, "fast_iterations": 2}


def _support(n: int = 3, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """uint8 images of different sizes with a bright square (class 1) and in the first a dark one (class 2)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        h, w = 40 + 8 * i, 48
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.int64)
        mask[5:20, 5:20] = 1
        img[mask == 1] = 220
        if i == 0:
            mask[25:35, 25:40] = 2
        images.append(img)
        masks.append(mask)
    return images, masks


def test_fit_predict_save_load_export_round_trip(tmp_path: Path) -> None:
    images, masks = _support()
    before = [im.copy() for im in images]
    seg = FewShotSegmenter(**SMALL).fit(images, masks, classes=["bright", "dark"])
    assert all(np.array_equal(a, b) for a, b in zip(images, before))  # inputs untouched
    labels = seg.predict(images)
    assert [lab.shape for lab in labels] == [im.shape[:2] for im in images]  # each at its own size
    assert all(lab.dtype == np.uint8 and lab.max() <= 2 for lab in labels)
    single = seg.predict(images[1])
    assert isinstance(single, np.ndarray) and np.array_equal(single, labels[1])
    assert np.array_equal(seg.predict(images[1]), single)  # the plain predictor is unchanged

    seg.save(tmp_path / "model")
    again = FewShotSegmenter.load(tmp_path / "model")
    assert again.classes == ("background", "bright", "dark")
    assert all(np.array_equal(a, b) for a, b in zip(again.predict(images), labels))
    assert load_model(tmp_path / "model").kind == "student"  # the folder the CLI reads
    assert (tmp_path / "model" / "train_log.jsonl").read_text().count("\n") == 2 + 2  # teacher, then fast steps
    assert isinstance(seg.student, FastStudent)  # the default student, as distillfss adapt's
    with pytest.raises(Exception, match="exists|not written"):
        seg.save(tmp_path / "model")  # no silent overwrite
    onnx = again.export_onnx(tmp_path / "m.onnx")
    assert onnx.stat().st_size > 0


def test_teacher_side_support_before_and_after_fit(tmp_path: Path) -> None:
    images, masks = _support()
    seg = FewShotSegmenter(**SMALL)
    with pytest.raises(Exception, match="support set"):
        seg.predict(images[0], model="teacher")
    seg.set_support(images, masks, classes=["bright", "dark"])  # the starting teacher, no training
    raw = seg.predict(images, model="teacher")
    assert seg.student is None and [r.shape for r in raw] == [im.shape[:2] for im in images]
    seg.fit(images[:2], masks[:2], classes=["bright", "dark"])
    seg.set_support(images, masks)  # the adapted teacher, with another support set
    assert len(seg.predict(images, model="teacher")) == 3
    seg.save(tmp_path / "teacher", model="teacher")
    assert load_model(tmp_path / "teacher").kind == "teacher"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda im, m: (im, m[:2]), "as many masks as images"),
        (lambda im, m: (im, [m[0] * 7, *m[1:]]), r"masks\[0\]: label values \[7, 14\]"),
        (lambda im, m: ([im[0].astype(np.float32) * 2, *im[1:]], m), r"images\[0\]: a float image"),
        (lambda im, m: (im, [m[0][:10], *m[1:]]), r"images\[0\]: image is 48x40, its mask 48x10"),
        (lambda im, m: (im, [np.zeros_like(x) for x in m]), "no foreground pixel"),
        (lambda im, m: ([np.zeros((4, 4, 2))] + im[1:], m), r"images\[0\]: expected an image array"),
    ],
)
def test_bad_support_is_a_data_error_naming_the_input(change, message: str) -> None:
    images, masks = change(*_support())
    with pytest.raises(DataError, match=message):
        FewShotSegmenter(**SMALL).fit(images, masks, classes=["bright", "dark"])


def test_unknown_option_and_missing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="iteratons"):
        FewShotSegmenter(iteratons=3)
    with pytest.raises(UserError, match="image size 50: a multiple of 32"):
        FewShotSegmenter(image_size=50)  # refused when made, not at fit
    images, masks = _support()
    with pytest.raises(DataError, match="nope.png"):
        FewShotSegmenter(**SMALL).fit([tmp_path / "nope.png"] * 3, masks)
    with pytest.raises(Exception, match="call fit"):
        FewShotSegmenter(**SMALL).save(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


@pytest.mark.slow
def test_readme_python_example_runs_on_the_demo_data(tmp_path: Path, monkeypatch) -> None:
    """The README's Python block, verbatim but for fewer adaptation steps."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(from distillfss import FewShotSegmenter.*?)```", readme, re.S)
    assert block, "README: no Python example starting with 'from distillfss import FewShotSegmenter'"
    code = block.group(1)
    assert "iterations=40" in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("iterations=40", "iterations=2, fast_iterations=2"), "README.md", "exec"), scope)
    assert len(scope["labels"]) == 8 and (tmp_path / "nuclei_model" / "config.json").is_file()
    assert (tmp_path / "nuclei.onnx").is_file()


@pytest.mark.slow  # a few seconds; CI runs the slow tests (.ci/run)
def test_on_step_sees_every_step_and_can_stop_the_fit(tmp_path: Path) -> None:
    """What the app's progress bar and Cancel button rely on: each step's row, and an exception that ends the fit
    with nothing fitted or written."""
    from distillfss.app import Cancelled

    images, masks = _support()
    rows: list[dict] = []
    FewShotSegmenter(**{**SMALL, "iterations": 3}).fit(images, masks, on_step=rows.append)
    assert [(r["stage"], r["step"]) for r in rows] == [
        ("teacher", 1),
        ("teacher", 2),
        ("teacher", 3),
        ("fast", 1),
        ("fast", 2),
    ]
    assert all(r["loss"] > 0 for r in rows)

    def cancel_at_two(row: dict) -> None:
        if row["step"] == 2:
            raise Cancelled("adaptation cancelled")

    seg = FewShotSegmenter(**{**SMALL, "iterations": 50})
    with pytest.raises(Cancelled):
        seg.fit(images, masks, on_step=cancel_at_two)
    assert seg.student is None and seg.teacher is None
