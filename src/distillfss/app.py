"""``distillfss app``: a local web page to label a few images, adapt, and segment more (Gradio, offline).

Three tabs, one workspace folder (nothing is written outside it):

1. **Label**: add images (upload, or a folder path on this machine), paint each class with its brush colour (or
   upload a label PNG), save the mask; a table shows which images are labelled. After each saved mask a **live
   preview** (``preview.Preview``: a linear probe, seconds) shows the other images predicted, the labelled ones by
   a probe that did not see them. **Start from a prediction** puts the preview's or the adapted model's labels
   of the picked image into the editor, to correct with the brush and save. After an adaptation, **label next**
   lists the unlabeled images in ``suggest``'s order.
2. **Adapt**: TransferFSS + DistillFSS on the labelled images (``FewShotSegmenter.fit``, the same code as
   ``distillfss adapt``) in a background thread, with a live progress line and loss curve, and a Cancel button;
   **adapt again** continues from the current model (a warm start, ``adapt --from``). It ends with the estimate
   of the model's mIoU on new images and whether labelling more is likely to help.
3. **Segment**: the student (just adapted, or a student folder opened from disk) on uploaded images or a folder;
   overlays with a legend; downloads: the label PNGs (zip), the student folder (zip) and its ONNX file.

Errors the user can fix appear as one-line messages in the page; anything else is shown as an internal error with
its type and message (the traceback goes to the terminal), never as a page-breaking traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .api import FewShotSegmenter
from .config import AdaptConfig, model_config, warm_config
from .data.folder import IMAGE_EXTS, DataError, image_files, list_images, load_image, load_mask
from .errors import UserError
from .outputs import GrowingFolder
from .preview import Preview
from .viz import PALETTE, class_colour, overlay, with_legend

log = logging.getLogger("distillfss")

STUDENT, ONNX = "student", "student.onnx"
COMMAND = "distillfss app"  # the writer its workspace's manifest records


class Cancelled(UserError):
    """The user pressed Cancel during adaptation."""


def _hex(c: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*class_colour(c))


def mask_from_strokes(layer: np.ndarray, n_classes: int, size: tuple[int, int]) -> np.ndarray:
    """A painted RGBA layer -> (H, W) uint8 labels at ``size`` = (H, W): each painted pixel (alpha > 0) takes the
    class whose brush colour is nearest; unpainted pixels are background."""
    rgba = np.asarray(layer)
    if rgba.ndim != 3 or rgba.shape[2] < 3:
        raise DataError("the painted mask is not an RGBA image")
    painted = rgba[..., 3] > 0 if rgba.shape[2] == 4 else rgba[..., :3].any(axis=2)
    colours = (
        PALETTE[:n_classes]
        if n_classes <= len(PALETTE)
        else np.array([class_colour(c) for c in range(1, n_classes + 1)])
    )
    dist = ((rgba[..., None, :3].astype(np.float32) - colours[None, None]) ** 2).sum(-1)  # (H, W, C)
    labels = np.where(painted, dist.argmin(-1) + 1, 0).astype(np.uint8)
    if labels.shape != size:
        labels = np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))
    return labels


class Workspace:
    """The app's folder: images/ (added images), masks/ (saved label PNGs), models/, predictions/, and .uploads/
    (Gradio's copies of uploaded files).

    A new or empty folder, or one the app made before (its manifest says so): any other folder is refused, and so
    is one that is or holds an input (``--model``). Every file the app writes is recorded before it is written; a
    file it did not record (say, a mask copied in by hand) is never replaced."""

    def __init__(self, root: Path, inputs: Sequence[Path | None] = ()) -> None:
        self.folder, _ = GrowingFolder.claim(Path(root).expanduser().resolve(), False, inputs, command=COMMAND)
        self.root = self.folder.root
        for sub in ("images", "masks", "models", "predictions"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def images(self) -> dict[str, Path]:
        return list_images(self.root / "images")

    def mask_path(self, stem: str) -> Path:
        return self.root / "masks" / f"{stem}.png"

    def labelled(self) -> list[str]:
        return [s for s in self.images if self.mask_path(s).is_file()]

    def add(self, files: list[Path]) -> list[str]:
        """Copy images in (never moves or changes the originals); a name already taken gets a numeric suffix."""
        added = []
        for f in files:
            f = Path(f)
            if f.suffix.lower() not in IMAGE_EXTS:
                raise DataError(f"{f.name}: not an image file ({', '.join(IMAGE_EXTS)})")
            load_image(f)  # readable, or a DataError naming it
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f.stem) or "image"
            name, i = stem, 1
            while name in self.images:
                name, i = f"{stem}_{i}", i + 1
            self.folder.write_with(f"images/{name}{f.suffix.lower()}", functools.partial(shutil.copyfile, f))
            added.append(name)
        return added

    def save_mask(self, stem: str, labels: np.ndarray) -> None:
        """Write (or replace: an earlier save of the app) ``masks/<stem>.png``."""
        self.folder.write_with(f"masks/{stem}.png", lambda tmp: Image.fromarray(labels).save(tmp, format="PNG"))

    def new_run(self) -> str:
        """A fresh predictions/<time> folder name (never one already there)."""
        return self.folder.unique(f"predictions/{time.strftime('%Y%m%d-%H%M%S')}")

    def zip_folder(self, rel: str, folder: Path) -> Path:
        """``rel`` (a .zip) holding ``folder``'s files."""
        return self.folder.write_with(rel, lambda tmp: shutil.make_archive(str(tmp.with_suffix("")), "zip", folder))


def layer_of(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> the editor's RGBA layer: each class painted in its brush colour, the rest transparent."""
    layer = np.zeros((*labels.shape, 4), np.uint8)
    for c in np.unique(labels):
        if 0 < c < 255:
            layer[labels == c] = (*class_colour(int(c)), 255)
    return layer


def preview_panels(ws: Workspace, preview: Preview, classes: Sequence[str]) -> list[tuple[np.ndarray, str]]:
    """The live preview of the workspace: (overlay, caption) per image (``Preview.run``)."""
    labelled = {s: (ws.images[s], ws.mask_path(s)) for s in ws.labelled()}
    others = {s: p for s, p in ws.images.items() if s not in labelled}
    predicted = preview.run(labelled, others, len(classes))
    return [
        (overlay(preview.image(ws.images[s]), labels), f"{s} ({'labelled, held out' if s in labelled else 'preview'})")
        for s, labels in predicted.items()
    ]


def friendly(fn: Callable) -> Callable:
    """Show errors in the page as one line: UserError as it is, anything else as an internal error."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # noqa: BLE001 - shown in the page, logged with its traceback
            log.exception("app: internal error")
            raise gr.Error(f"internal error ({type(e).__name__}: {e}); details in the terminal") from None

    return wrapper


def build_app(workspace: Path, model: Path | None = None, steps: int = 60, **segmenter_options: Any):
    """The Gradio Blocks of the app (not launched). ``segmenter_options`` go to :class:`FewShotSegmenter`."""
    FewShotSegmenter(**segmenter_options)  # bad options and a bad --model fail before the workspace is made
    opened = FewShotSegmenter.load(model) if model else None
    ws = Workspace(workspace, [model])
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    # Gradio keeps uploaded files in its cache folder: inside the workspace too (read when the Blocks are built).
    os.environ["GRADIO_TEMP_DIR"] = str(ws.root / ".uploads")
    import gradio as gr
    import pandas as pd

    state: dict[str, Any] = {"seg": opened, "cancel": threading.Event()}
    state["opened"] = Path(model).expanduser().resolve() if model else None

    def classes_of(text: str) -> list[str]:
        names = [c.strip() for c in text.split(",") if c.strip()]
        if not names or len(set(names)) != len(names):
            raise DataError(f"classes: expected distinct comma-separated names, got {text!r}")
        return names

    def table() -> pd.DataFrame:
        done = set(ws.labelled())
        return pd.DataFrame({"image": list(ws.images), "labelled": ["yes" if s in done else "no" for s in ws.images]})

    def refresh(selected: str | None = None):
        names = list(ws.images)
        pick = (
            selected
            if selected in names
            else (next((s for s in names if s not in ws.labelled()), None) or (names[0] if names else None))
        )
        return table(), gr.update(choices=names, value=pick)

    @friendly
    def add_files(files: list[str] | None):
        if not files:
            raise DataError("no files chosen")
        added = ws.add([Path(f) for f in files])
        return (*refresh(added[0]), f"added {len(added)} image(s)")

    @friendly
    def add_folder(path: str):
        added = ws.add(image_files(Path(path).expanduser()))
        return (*refresh(added[0]), f"added {len(added)} image(s) from {path}")

    @friendly
    def show(stem: str | None, class_text: str):
        if not stem:
            return None
        image = (load_image(ws.images[stem]) * 255).astype(np.uint8)
        layer = np.zeros((*image.shape[:2], 4), np.uint8)
        if ws.mask_path(stem).is_file():
            layer = layer_of(load_mask(ws.mask_path(stem), 254))
        return {"background": image, "layers": [layer], "composite": None}

    def get_preview() -> Preview:
        if state.get("preview") is None:
            name = segmenter_options.get("backbone", "efficientnet_lite2")
            size = model_config(name, 1, segmenter_options.get("preset", "fast"), segmenter_options.get("image_size"))
            weights = segmenter_options.get("backbone_weights")
            state["preview"] = Preview.build(name, size.image_size, weights)
        return state["preview"]

    def live_preview(names: list[str]):
        """The preview gallery and its line; left as it is while an adaptation runs (the CPU is busy)."""
        if state.get("adapting"):
            return gr.update(), "the preview waits while adapting"
        t0 = time.perf_counter()
        panels = preview_panels(ws, get_preview(), names)
        return panels, f"preview of {len(panels)} image(s) in {time.perf_counter() - t0:.1f} s"

    @friendly
    def from_prediction(stem: str | None, source: str, class_text: str):
        """The picked image's predicted labels (the preview's, or the adapted model's) in the editor."""
        if not stem:
            raise DataError("choose an image first")
        names = classes_of(class_text)
        image = load_image(ws.images[stem])
        if source == "model":
            seg = state["seg"]
            if seg is None:
                raise DataError("no model yet: adapt first, or start from the preview")
            labels = seg.predict(image)
        else:
            labelled = {s: (ws.images[s], ws.mask_path(s)) for s in ws.labelled() if s != stem}
            if not labelled:
                raise DataError("the preview needs one saved mask of another image")
            labels = get_preview().run(labelled, {stem: ws.images[stem]}, len(names))[stem]
        value = {"background": (image * 255).astype(np.uint8), "layers": [layer_of(labels)], "composite": None}
        return value, f"{stem}: the {source}'s prediction is in the editor; correct it with the brush, then save"

    def label_next(seg: FewShotSegmenter | None) -> pd.DataFrame:
        """The unlabeled images, most informative first (``suggest``); empty without a model."""
        todo = [s for s in ws.images if s not in set(ws.labelled())]
        if seg is None or seg.student is None or not todo:
            return pd.DataFrame({"image": [], "score": []})
        ranking = seg.suggest([ws.images[s] for s in todo])
        return pd.DataFrame({"image": [todo[i] for i, _ in ranking], "score": [round(v, 1) for _, v in ranking]})

    @friendly
    def save_mask(stem: str | None, edited: dict | None, uploaded: str | None, class_text: str):
        if not stem:
            raise DataError("choose an image to label first")
        names = classes_of(class_text)
        h, w = load_image(ws.images[stem]).shape[:2]
        if uploaded:
            labels = load_mask(Path(uploaded), len(names))
            if labels.shape != (h, w):
                raise DataError(
                    f"{Path(uploaded).name}: mask is {labels.shape[1]}x{labels.shape[0]}, {stem} is {w}x{h}"
                )
        else:
            layers = [x for x in (edited or {}).get("layers") or [] if x is not None]
            if not layers:
                raise DataError(f"{stem}: nothing painted; paint the classes with the brush, or upload a mask")
            labels = np.zeros((h, w), np.uint8)
            for layer in layers:
                painted = mask_from_strokes(layer, len(names), (h, w))
                labels = np.where(painted > 0, painted, labels)
        if not (labels[(labels > 0) & (labels != 255)]).size:
            raise DataError(f"{stem}: the mask has no class pixel; paint at least one stroke")
        ws.save_mask(stem, labels)
        counts = ", ".join(f"{n}: {int((labels == i + 1).sum())} px" for i, n in enumerate(names))
        panels, line = live_preview(names)
        return (*refresh(stem), f"saved the mask of {stem} ({counts})", panels, line)

    def adapt_run(class_text: str, n_steps: float, warm: bool):
        """A generator: starts the adaptation in a thread and yields progress until it ends."""
        try:
            names = classes_of(class_text)
            stems = ws.labelled()
            if not stems:
                raise DataError("no labelled image yet: save at least one mask in the Label tab")
            earlier = state["seg"]
            if warm and (earlier is None or earlier.student is None):
                raise DataError("no model to continue from yet: adapt once without 'adapt again'")
        except UserError as e:
            raise gr.Error(str(e)) from None
        state["cancel"].clear()
        steps_q: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}

        def on_step(row: dict) -> None:
            steps_q.put(row)
            if state["cancel"].is_set():
                raise Cancelled("adaptation cancelled")

        options = {**segmenter_options, "iterations": int(n_steps)}
        cfg = AdaptConfig(**{k: v for k, v in options.items() if k in AdaptConfig.__dataclass_fields__})
        if warm:  # a third of the slider's steps and of the student's (warm_config)
            cfg = warm_config(cfg)
            seg = earlier
            seg.adapt_options = {
                **seg.adapt_options,
                "iterations": cfg.iterations,
                "fast_iterations": cfg.fast_iterations,
            }
        else:
            seg = FewShotSegmenter(**options)
        # the fast student's distillation steps follow the teacher's (their log restarts at step 1)
        total = cfg.iterations + (cfg.fast_iterations if cfg.student == "fast" else 0)

        def work() -> None:
            try:
                images, masks = [ws.images[s] for s in stems], [ws.mask_path(s) for s in stems]
                seg.fit(images, masks, classes=names, on_step=on_step, warm_start=warm)
                seg.save(ws.root / "models" / STUDENT, overwrite=True)
                result["seg"] = seg
            except Exception as e:  # noqa: BLE001 - reported in the page below
                if not isinstance(e, UserError):
                    log.exception("app: adaptation failed")
                result["error"] = e

        def curve(rows: list[dict]) -> pd.DataFrame:  # steps counted over both stages (each log restarts at 1)
            return pd.DataFrame({"step": list(range(1, len(rows) + 1)), "loss": [r["loss"] for r in rows]})

        thread = threading.Thread(target=work, daemon=True)
        state["adapting"] = True
        thread.start()
        rows: list[dict] = []
        t0 = time.perf_counter()
        while thread.is_alive() or not steps_q.empty():
            try:
                rows.append(steps_q.get(timeout=0.5))
            except queue.Empty:
                pass
            else:
                while not steps_q.empty():
                    rows.append(steps_q.get())
            done = len(rows)
            line = f"adapting on {len(stems)} image(s): step {done} / {total}, {time.perf_counter() - t0:.0f} s"
            yield line, curve(rows), gr.update(), gr.update(), gr.update()
        state["adapting"] = False
        if "error" in result:
            e = result["error"]
            message = str(e) if isinstance(e, UserError) else f"internal error ({type(e).__name__}: {e})"
            raise gr.Error(message)
        state["seg"] = state["saved"] = result["seg"]  # adapt saved it in models/student
        state["packed"] = None  # a warm start changes the same segmenter: pack it again
        how = "continued from the earlier model" if warm else "adapted"
        yield (
            f"done: {how} on {len(stems)} image(s), {total} steps, {time.perf_counter() - t0:.0f} s; the student is "
            f"in {ws.root / 'models' / STUDENT}. Segment more images in the next tab.",
            curve(rows),
            f"**Estimate**: {seg.estimate['advice']}",
            label_next(seg),
            gr.update(value=True, interactive=True),
        )

    def cancel():
        state["cancel"].set()
        return "cancelling..."

    @friendly
    def open_model(path: str):
        state["seg"] = FewShotSegmenter.load(Path(path).expanduser())
        state["opened"] = Path(path).expanduser().resolve()
        seg = state["seg"]
        line = f"opened {path}: {seg.student is not None and 'student' or 'teacher'} for {', '.join(seg.classes[1:])}"
        return line, gr.update(value=seg.student is not None, interactive=seg.student is not None)

    @friendly
    def segment(files: list[str] | None, folder: str):
        seg: FewShotSegmenter | None = state["seg"]
        if seg is None:
            raise DataError("no model yet: adapt in the Adapt tab, or open a student folder")
        paths = [Path(f) for f in files or []] + (image_files(Path(folder).expanduser()) if folder.strip() else [])
        if not paths:
            raise DataError("no images: upload some or give a folder")
        run = ws.new_run()
        gallery = []
        for p in paths:
            image = load_image(p)
            labels = seg.predict(image)
            name = Path(ws.folder.unique(f"{run}/labels/{p.stem}.png")).stem  # two inputs with one stem: -2, -3...
            ws.folder.write_with(f"{run}/labels/{name}.png", lambda tmp, a=labels: Image.fromarray(a).save(tmp))
            panel = with_legend([overlay(image, labels)], [p.name], seg.classes)
            shown = ws.folder.write_with(f"{run}/{name}_overlay.png", lambda tmp, a=panel: Image.fromarray(a).save(tmp))
            gallery.append((str(shown), p.name))
        run = ws.root / run
        downloads = [str(ws.zip_folder(f"{run.relative_to(ws.root)}/labels.zip", run / "labels"))]
        if seg.student is not None:
            downloads += packed(seg)
        return gallery, downloads, f"segmented {len(paths)} image(s) into {run}"

    def packed(seg: FewShotSegmenter) -> list[str]:
        """The student folder (zip) and its ONNX file, made once per student (adapted here or opened)."""
        if state.get("packed") is not seg:
            folder_out = ws.root / "models" / STUDENT
            if state.get("saved") is not seg and state.get("opened") != folder_out:
                seg.save(folder_out, overwrite=True)
            zipped = str(ws.zip_folder(f"models/{STUDENT}.zip", folder_out))
            state["downloads"] = [zipped, str(seg.export_onnx(ws.root / "models" / ONNX, overwrite=True))]
            state["packed"] = seg
        return state["downloads"]

    with gr.Blocks(title="distillfss", analytics_enabled=False) as app:
        gr.Markdown(
            "## distillfss: label a few images, adapt, segment the rest\n"
            f"Workspace: `{ws.root}` (everything this page writes goes there)."
        )
        status = gr.Markdown(elem_id="status")
        estimate = gr.Markdown(elem_id="estimate")  # after an adaptation: how good the model is likely to be
        with gr.Tab("1 · Label", id="label"):
            with gr.Row():
                class_text = gr.Textbox(
                    label="Classes (comma-separated; brush colours in this order)", value="object", elem_id="classes"
                )
                gr.Markdown(
                    "Brush colours: "
                    + ", ".join(f"<span style='color:{_hex(c)}'>■</span> class {c}" for c in range(1, 8))
                )
            with gr.Row():
                uploads = gr.File(
                    label="Add images", file_count="multiple", file_types=list(IMAGE_EXTS), elem_id="add-images"
                )
                with gr.Column():
                    folder = gr.Textbox(label="...or a folder of images on this machine", elem_id="image-folder")
                    load_btn = gr.Button("Load folder")
            images_table = gr.Dataframe(value=table(), label="Images", interactive=False, elem_id="images-table")
            pick = gr.Dropdown(label="Image to label", choices=list(ws.images), elem_id="pick")
            editor = gr.ImageEditor(
                label="Paint each class with its colour",
                type="numpy",
                image_mode="RGBA",
                sources=(),
                transforms=(),
                layers=False,
                format="png",
                brush=gr.Brush(colors=[_hex(c) for c in range(1, 8)], color_mode="fixed", default_size=12),
                elem_id="editor",
            )
            mask_file = gr.File(
                label="...or upload its mask (label PNG: 0 background, 1..C classes)",
                file_types=[".png", ".tif", ".tiff", ".bmp"],
                elem_id="mask-file",
            )
            with gr.Row():
                save_btn = gr.Button("Save mask", variant="primary", elem_id="save-mask")
                source = gr.Radio(
                    ["preview", "model"], value="preview", label="Start from the prediction of", elem_id="source"
                )
                start_btn = gr.Button("Start from the prediction", elem_id="from-prediction")
            preview_line = gr.Markdown(elem_id="preview-line")
            preview_gallery = gr.Gallery(
                label="Live preview (a quick probe; labelled images predicted without their own mask)",
                columns=4,
                object_fit="contain",
                elem_id="preview",
            )
            next_table = gr.Dataframe(
                value=label_next(state["seg"]),
                label="Label next (after adapting: where the student and a probe disagree most; measured: no better "
                "than random order yet)",
                interactive=False,
                elem_id="label-next",
            )
        with gr.Tab("2 · Adapt", id="adapt"):
            n_steps = gr.Slider(1, 300, value=steps, step=1, label="Adaptation steps", elem_id="steps")
            warm_box = gr.Checkbox(
                value=state["seg"] is not None,
                interactive=state["seg"] is not None,
                label="Adapt again: continue from the current model (a third of the steps)",
                elem_id="warm-start",
            )
            with gr.Row():
                adapt_btn = gr.Button("Adapt", variant="primary", elem_id="adapt")
                cancel_btn = gr.Button("Cancel", elem_id="cancel")
            progress = gr.Markdown(elem_id="progress")
            curve = gr.LinePlot(x="step", y="loss", label="Loss", elem_id="curve")
        with gr.Tab("3 · Segment", id="segment"):
            with gr.Row():
                model_path = gr.Textbox(label="Open a student folder (optional)", elem_id="model-path")
                open_btn = gr.Button("Open model")
            seg_files = gr.File(
                label="Images to segment", file_count="multiple", file_types=list(IMAGE_EXTS), elem_id="segment-images"
            )
            seg_folder = gr.Textbox(label="...or a folder of images", elem_id="segment-folder")
            seg_btn = gr.Button("Segment", variant="primary", elem_id="segment")
            gallery = gr.Gallery(label="Overlays", columns=3, object_fit="contain", elem_id="overlays")
            downloads = gr.File(
                label="Downloads: label PNGs (zip), student folder (zip), ONNX",
                file_count="multiple",
                elem_id="downloads",
            )

        uploads.upload(add_files, [uploads], [images_table, pick, status])
        load_btn.click(add_folder, [folder], [images_table, pick, status])
        pick.change(show, [pick, class_text], [editor])
        save_btn.click(
            save_mask,
            [pick, editor, mask_file, class_text],
            [images_table, pick, status, preview_gallery, preview_line],
        )
        start_btn.click(from_prediction, [pick, source, class_text], [editor, status])
        adapt_btn.click(adapt_run, [class_text, n_steps, warm_box], [progress, curve, estimate, next_table, warm_box])
        cancel_btn.click(cancel, None, [progress])
        open_btn.click(open_model, [model_path], [status, warm_box])
        seg_btn.click(segment, [seg_files, seg_folder], [gallery, downloads, status])
    return app


def launch(workspace: Path, port: int | None = None, model: Path | None = None, block: bool = True, **options: Any):
    """Build and start the app on 127.0.0.1 (only this machine can reach it)."""
    import gradio as gr

    app = build_app(workspace, model, **options)
    app.queue(default_concurrency_limit=1)
    # System fonts: the default theme would fetch Google's web fonts (the page must work offline).
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.launch(
        server_name="127.0.0.1",
        server_port=port,
        inbrowser=False,
        prevent_thread_lock=not block,
        allowed_paths=[str(Path(workspace).expanduser().resolve())],
        show_error=False,
        quiet=not block,
        ssr_mode=False,
        theme=theme,
    )
    return app
