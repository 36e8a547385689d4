"""The web app, driven in a real browser (headless Chromium through Playwright), and its pieces without one.

The browser test needs Debian's ``chromium`` package (``apt-get install chromium``) and the ``gradio`` and
``playwright`` Python packages (in the dev install); without them it is skipped and says so, except in CI
(``CI=true``), where a missing browser is a failure. With
``DISTILLFSS_SCREENSHOT=path.png`` it also saves its screenshot there (the README's).
"""

from __future__ import annotations

import os
import shutil
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillfss.demo import demo_root

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NUCLEI = demo_root() / "nuclei"
# No network here: without the background-networking flags Chromium keeps trying (and failing) to reach Google.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_painted_strokes_become_labels_by_nearest_brush_colour() -> None:
    pytest.importorskip("gradio")
    from distillfss.app import mask_from_strokes
    from distillfss.viz import class_colour

    layer = np.zeros((20, 30, 4), np.uint8)
    layer[2:5, 2:10] = (*class_colour(1), 255)
    layer[10:15, 5:8] = (*(np.array(class_colour(2)) + 3).clip(0, 255), 128)  # antialiased edge: nearest colour
    labels = mask_from_strokes(layer, 2, (40, 60))  # the canvas at half the image's size
    assert labels.shape == (40, 60) and set(np.unique(labels)) == {0, 1, 2}
    assert (labels[4:10, 4:20] == 1).all() and (labels[20:30, 10:16] == 2).all() and labels[30:, 30:].max() == 0


def test_workspace_copies_images_in_and_refuses_unsafe_folders(tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    from distillfss.app import Workspace
    from distillfss.outputs import OutputError

    ws = Workspace(tmp_path / "ws")
    src = sorted((NUCLEI / "train/images").iterdir())[:2]
    before = [p.read_bytes() for p in src]
    assert ws.add(src) == [p.stem for p in src]
    assert ws.add(src[:1]) == [f"{src[0].stem}_1"]  # a taken name gets a suffix, nothing is replaced
    assert [p.read_bytes() for p in src] == before and len(ws.images) == 3
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    with pytest.raises(Exception, match="bad.png"):
        ws.add([bad])
    with pytest.raises(OutputError):
        Workspace(Path.home())


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _needed(ok: bool, what: str) -> None:
    """Skip the browser test without ``what`` here; in CI (``CI=true``) its absence is a failure."""
    if not ok:
        message = f"browser test: {what}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: the browser test must run in CI)")
        pytest.skip(f"{message}; skipped")


def test_app_in_a_real_browser(tmp_path: Path) -> None:
    import importlib.util

    _needed(CHROMIUM is not None, "no Chromium here (Debian: apt-get install chromium)")
    for module, install in (("gradio", "pip install 'distillfss[app]'"), ("playwright", "pip install playwright")):
        _needed(importlib.util.find_spec(module) is not None, f"no {module} ({install})")
    from playwright import sync_api

    from distillfss.app import launch
    from distillfss.model_io import load_model

    port = _free_port()
    ws = tmp_path / "ws"
    app = launch(
        ws,
        port,
        block=False,
        steps=3,
        fast_iterations=5,
        backbone="efficientnet_lite0",
        image_size=64,
        teacher="random",
        device="cpu",
    )
    train = sorted((NUCLEI / "train/images").iterdir())[:4]
    test = sorted((NUCLEI / "test/images").iterdir())[:2]
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#classes textarea, #classes input").first.fill("nucleus")
            page.locator("#add-images input[type=file]").set_input_files([str(f) for f in train])
            page.get_by_text("added 4 image(s)").wait_for(timeout=60_000)
            for f, row in zip(train[:2], (-0.6, 0.0)):  # strokes at different places: no near copies
                _label(page, f.stem, row)
            # the live preview: every image, the labelled ones predicted without their own mask
            page.get_by_text("preview of 4 image(s)").wait_for(timeout=60_000)
            assert page.locator("#preview img").count() >= 4

            # start the third image from the preview's prediction, correct it with a stroke, save it
            _start_from(page, train[2].stem, "preview")
            _label(page, train[2].stem, 0.6)
            assert sorted(m.stem for m in (ws / "masks").iterdir()) == sorted(f.stem for f in train[:3])

            page.get_by_role("tab", name="2 · Adapt").click()
            page.locator("#adapt").click()
            page.get_by_text("done: adapted").wait_for(timeout=300_000)
            page.locator("#estimate").get_by_text("estimated mIoU on new images").wait_for(timeout=30_000)
            assert train[3].stem in page.locator("#label-next").inner_text()  # the one unlabeled image

            # correct the model's prediction of the first image, then adapt again from the current model
            page.get_by_role("tab", name="1 · Label").click()
            _start_from(page, train[0].stem, "model")
            _label(page, train[0].stem, -0.6)
            page.get_by_role("tab", name="2 · Adapt").click()
            assert page.locator("#warm-start input").is_checked()
            page.locator("#adapt").click()
            page.get_by_text("done: continued from the earlier model").wait_for(timeout=300_000)
            page.get_by_role("tab", name="1 · Label").click()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(tmp_path / "loop.png"), full_page=True)

            page.get_by_role("tab", name="3 · Segment").click()
            page.locator("#segment-images input[type=file]").set_input_files([str(f) for f in test])
            page.locator("#segment").click()
            page.get_by_text("segmented 2 image(s)").wait_for(timeout=120_000)
            assert page.locator("#overlays img").count() >= 2
            with page.expect_download() as info:
                page.locator('#downloads a[download="student.zip"]').click()
            zipped = tmp_path / "student.zip"
            info.value.save_as(zipped)
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        app.close()
    with zipfile.ZipFile(zipped) as z:
        z.extractall(tmp_path / "student")
    model = load_model(tmp_path / "student")
    image = np.asarray(Image.open(test[0]).convert("RGB"), dtype=np.float32) / 255
    assert model.kind == "student" and model.predictor.predict(image).shape == image.shape[:2]
    assert any((ws / ".uploads").rglob("*.png"))  # Gradio's copies of the uploads stay in the workspace
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ws", "student.zip", "student", "app.png", "loop.png"])
    if os.environ.get("DISTILLFSS_SCREENSHOT"):
        shutil.copyfile(tmp_path / "loop.png", os.environ["DISTILLFSS_SCREENSHOT"])


def _label(page, stem: str, row: float = 0.0) -> None:
    """Pick ``stem`` (unless it is picked), paint a stroke on it (``row``: see ``_paint_stroke``) and save its mask."""
    if page.locator("#pick input").first.input_value() != stem:
        page.locator("#pick input").first.click()
        page.get_by_role("option", name=stem).click()
    saved = page.get_by_text(f"saved the mask of {stem}")
    before = saved.count()
    unpainted = page.get_by_text(f"{stem}: the mask has no class pixel")
    for attempt in range(3):  # on a loaded machine the picked image can arrive after the stroke and clear it
        page.wait_for_timeout(500 * (attempt + 1))
        errors = unpainted.count()
        _paint_stroke(page, row)
        page.locator("#save-mask").click()
        for _ in range(120):  # until the save is answered, either way
            if saved.count() > before or unpainted.count() > errors:
                break
            page.wait_for_timeout(500)
        if saved.count() > before:
            return
    raise AssertionError(f"the mask of {stem} was not saved")


def _start_from(page, stem: str, source: str) -> None:
    """Pick ``stem`` and put the ``source``'s prediction of it into the editor."""
    page.locator("#pick input").first.click()
    page.get_by_role("option", name=stem).click()
    page.wait_for_timeout(1000)  # the picked image arrives in the editor first
    page.locator("#source").get_by_text(source, exact=True).click()
    page.locator("#from-prediction").click()
    page.get_by_text(f"{stem}: the {source}'s prediction is in the editor").wait_for(timeout=60_000)


def _paint_stroke(page, row: float = 0.0) -> None:
    """One brush stroke across the image editor's canvas (brush tool, first colour = class 1), at ``row`` (-1 to 1:
    top to bottom of the image's middle 70 %)."""
    canvas = page.locator("#editor canvas").first
    canvas.wait_for(timeout=30_000)
    page.locator("#editor").get_by_role("button", name="Brush", exact=True).click()
    box = canvas.bounding_box()
    assert box is not None
    # The image is fitted to the canvas height and centred: stroke across its middle, inside it.
    cx, half = box["x"] + box["width"] / 2, box["height"] * 0.3
    cy = box["y"] + box["height"] / 2 + row * box["height"] * 0.35
    page.mouse.move(cx - half, cy)
    page.mouse.down()
    for i in range(1, 5):  # few, large moves: every pointer event costs the editor a redraw
        page.mouse.move(cx - half + i * half / 2, cy + i * 2)
    page.mouse.up()
