"""The Python API in five lines::

    from distillfss import FewShotSegmenter
    seg = FewShotSegmenter()                                  # EfficientNet-Lite2, the shipped teacher
    seg.fit(images, masks, classes=["nucleus"])               # arrays or paths; unlabeled=... optional
    labels = seg.predict(new_images)                          # a list of (H, W) uint8 label maps, each at its size
    seg.save("my_model"); seg = FewShotSegmenter.load("my_model"); seg.export_onnx("m.onnx")

``fit`` runs what ``distillfss adapt`` runs (TransferFSS + DistillFSS on the support set, the same defaults and
seed), so the saved folder is the one the CLI writes and ``distillfss predict --model`` reads. A teacher-side pair
serves users who keep their support set: ``set_support(images, masks)`` then ``predict(images, model="teacher")``
(the adapted teacher after ``fit``; the starting teacher, without training, before it).

Images: file paths, or arrays (H, W, 3) / (H, W) -- uint8 (0-255) or float in [0, 1]. Masks: paths or (H, W)
integer arrays, 0 = background, 1..C = class, 255 = ignore, of their image's size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .adapt import adapt
from .backbones import FrozenBackbone, build_backbone
from .config import AdaptConfig, ModelConfig, model_config, warm_config
from .data.folder import IGNORE, DataError, list_images, load_image, load_mask
from .data.tensors import check_support_labels, stack_windows, unlabeled_windows
from .model_io import (
    LOG,
    ModelError,
    load_adapted_teacher,
    load_model,
    load_teacher_weights,
    resolve_teacher,
    save_model,
)
from .outputs import output_file, output_folder, timestamp
from .predictor import Predictor
from .preview import disagreement, quick_probe
from .student import FastStudent, Student
from .teacher import Teacher, build_teacher, encode_support
from .tiling import choose_scale as pick_scale
from .tiling import support_windows
from .transfer import seeded

log = logging.getLogger("distillfss")

ImageLike = str | Path | np.ndarray
PREDICT_BATCH = 8  # images per forward pass in predict
SAVE, EXPORT = "FewShotSegmenter.save", "FewShotSegmenter.export_onnx"  # the writers files and folders record


class FewShotSegmenter:
    """Adapt on a few labelled images, then segment with the support-free student (or the teacher)."""

    def __init__(
        self,
        backbone: str = "efficientnet_lite2",
        preset: str = "fast",
        image_size: int | None = None,
        teacher: str | Path = "auto",
        backbone_weights: str | None = None,
        device: str = "cpu",
        scale: str | float | None = "auto",
        **adapt_options: Any,
    ) -> None:
        """teacher: the starting teacher ('auto': the shipped meta-trained one when it fits, 'random', or a
        folder). adapt_options: any :class:`AdaptConfig` field (``iterations``, ``seed``, ``student``...); the
        defaults are ``distillfss adapt``'s (the fast student; ``student="paper"`` for the paper's). Checked here,
        as the CLI checks its flags. scale: the pixel scale (``distillfss adapt --scale``): "auto", "fit" or a
        number."""
        unknown = sorted(set(adapt_options) - {f.name for f in dataclasses.fields(AdaptConfig)})
        if unknown:
            raise TypeError(f"unknown adaptation option(s) {unknown}; see distillfss.AdaptConfig")
        AdaptConfig(**adapt_options)
        pick_scale([], 1, scale)  # a bad value fails here, as the flag does
        model_config(backbone, 1, preset, image_size)  # so do a bad preset and image size
        self.scale_option: str | float | None = scale
        self.scale: float | None = None  # the pixel scale fit chose (None: each image fitted to one window)
        self.backbone_name, self.preset, self.image_size = backbone, preset, image_size
        self.teacher_spec, self.backbone_weights = str(teacher), backbone_weights
        self.device = torch.device(device)
        self.adapt_options = dict(adapt_options)
        self.classes: tuple[str, ...] = ()
        self.model_cfg: ModelConfig | None = None
        self.student: Student | FastStudent | None = None
        self.teacher: Teacher | None = None
        self.meta: dict[str, Any] = {}
        self._backbone: FrozenBackbone | None = None
        self._support: tuple[Tensor, Tensor] | None = None
        self._predictors: dict[str, Predictor] = {}
        self._log: list[dict] = []
        self._inputs: list[Path] = []  # folders this segmenter reads (the model it was loaded from): never written
        self._folder: Path | None = None  # the folder it was loaded from

    # -- training ---------------------------------------------------------------------------------------------
    def fit(
        self,
        images: Sequence[ImageLike],
        masks: Sequence[ImageLike],
        classes: Sequence[str] | None = None,
        unlabeled: Sequence[ImageLike] | str | Path | None = None,
        progress: bool = False,
        on_step: Callable[[dict], None] | None = None,
        warm_start: bool = False,
    ) -> FewShotSegmenter:
        """Adapt the teacher on the support set (images, masks) and distil the student; returns self.

        classes: the foreground class names (label 1, 2, ...); default ``class1..classC`` from the largest label.
        unlabeled: images of the same domain without masks (a list, or a folder): the student then learns from
        them with the adapted teacher's labels.
        on_step: called with each step's log row (``step``, ``loss``, ...); an exception it raises stops the fit.
        warm_start: continue from this segmenter's adapted teacher and student (after ``fit``, or ``load`` of a
        folder adapt wrote) with a third of the steps (``adapt --from``): give the earlier images and the new ones.
        The classes, size and pixel scale stay.
        """
        if warm_start and classes is None and self.classes:
            classes = self.classes[1:]
        classes = self._classes(masks, classes)
        cfg = AdaptConfig(**self.adapt_options)
        warm = self._warm_start(classes) if warm_start else None
        if warm is not None:
            cfg = warm_config(cfg, given=self.adapt_options)
        else:
            self.model_cfg = model_config(self.backbone_name, len(classes), self.preset, self.image_size)
        x, y, sources = self._support_tensors(images, masks, classes, choose_scale=warm is None)
        given = [*images, *masks, *([unlabeled] if isinstance(unlabeled, (str, Path)) else unlabeled or [])]
        self._inputs += [Path(p) for p in given if isinstance(p, (str, Path))]
        if self.teacher_spec not in ("auto", "shipped", "random"):
            self._inputs.append(Path(self.teacher_spec))
        u = None if unlabeled is None else self._unlabeled(unlabeled)
        backbone = self._get_backbone()
        if warm is not None:
            teacher, label = warm[0], "warm start"
        else:
            start, label = resolve_teacher(self.teacher_spec, self.model_cfg)
            teacher = load_teacher_weights(start, backbone, self.model_cfg) if start is not None else None
        result = adapt(
            backbone,
            x.to(self.device),
            y.to(self.device),
            self.model_cfg,
            cfg,
            teacher=teacher,
            progress=progress,
            on_step=on_step,
            unlabeled=None if u is None else u.to(self.device),
            student_init=None if warm is None else warm[1],
            probe_settings=self.meta.get("probe") if warm is not None else None,
            sources=sources,
        )
        cfg = result.config
        self.classes, self.teacher, self.student = ("background", *classes), result.teacher, result.student
        self._support, self._predictors = (x, y), {}
        self.meta = {
            "created": timestamp(),
            "adapt": cfg.to_dict(),
            "backbone_weights": self.backbone_weights,
            "support": {"dataset": "python API", "shots": len(x)},
            "unlabeled": {"images": len(u)} if u is not None else None,
            "teacher_init": label,
            "adapt_seconds": round(result.seconds, 2),
            "scale": self.scale,
            "estimate": result.estimate.to_dict(),
            "probe": result.probe_settings,
        }
        self._log = result.log
        return self

    @property
    def estimate(self) -> dict[str, Any] | None:
        """The expected mIoU on new images after ``fit`` (``miou``, its interval ``low``-``high``, the trend from
        K-1 to K images ``gain``, and ``advice``, one line), from the support set alone; None before."""
        return self.meta.get("estimate")

    def _warm_start(self, classes: tuple[str, ...]) -> tuple[Teacher, FastStudent]:
        """The adapted teacher and fast student a warm start continues from (``fit`` or ``load`` gave them)."""
        if self._folder is not None and self.teacher is None:  # loaded: the teacher is read when needed
            self.teacher, x, y = load_adapted_teacher(self._folder, self._get_backbone())
            self._support = (x, y)
        if not isinstance(self.student, FastStudent) or self.teacher is None:
            raise ModelError(
                "warm_start: no adapted teacher and fast student yet (call fit, or load a folder adapt wrote)"
            )
        if tuple(classes) != self.classes[1:]:
            raise DataError(f"warm_start: classes {list(classes)} differ from the fitted {list(self.classes[1:])}")
        return self.teacher, self.student

    def set_support(
        self, images: Sequence[ImageLike], masks: Sequence[ImageLike], classes: Sequence[str] | None = None
    ) -> FewShotSegmenter:
        """Give the teacher a support set for ``predict(..., model='teacher')``: the adapted teacher after
        ``fit`` (its classes stay), else the starting teacher as it is (no training)."""
        fresh = self.teacher is None
        if fresh:
            classes = self._classes(masks, classes)
            self.model_cfg = model_config(self.backbone_name, len(classes), self.preset, self.image_size)
            backbone = self._get_backbone()
            start, _ = resolve_teacher(self.teacher_spec, self.model_cfg)
            if start is not None:
                self.teacher = load_teacher_weights(start, backbone, self.model_cfg).to(self.device).eval()
            else:
                with seeded(int(self.adapt_options.get("seed", 0)), self.device):
                    self.teacher = build_teacher(backbone, self.model_cfg).to(self.device).eval()
            self.classes = ("background", *classes)
        elif classes is not None and tuple(classes) != self.classes[1:]:
            raise DataError(f"set_support: classes {list(classes)} differ from the fitted {list(self.classes[1:])}")
        self._support = self._support_tensors(images, masks, self.classes[1:], choose_scale=fresh)[:2]
        self._predictors.pop("teacher", None)
        return self

    # -- inference --------------------------------------------------------------------------------------------
    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        model: Literal["student", "teacher"] | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Label maps (H, W) uint8 at each image's own size: a list for a list, one array for one image.
        model: 'student' (default when there is one) or 'teacher' (needs its support set).
        """
        predictor = self._predictor(model or ("student" if self.student is not None else "teacher"))
        single = isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3))
        items = [images] if single else list(images)  # type: ignore[list-item]
        out: list[np.ndarray] = []
        for start in range(0, len(items), PREDICT_BATCH):  # a few images per forward pass: bounded memory
            chunk = items[start : start + PREDICT_BATCH]
            out += predictor.predict_batch([_image(x, f"images[{start + j}]") for j, x in enumerate(chunk)])
        return out[0] if single else out

    def suggest(self, images: Sequence[ImageLike]) -> list[tuple[int, float]]:
        """Which images to label next -> (index into ``images``, score) pairs, the highest score first: how much
        the student and a linear probe fitted on the same support set disagree on the image (``preview``)."""
        student, probe = self._predictor("student"), self._predictor("probe")
        scored = []
        for start in range(0, len(images), PREDICT_BATCH):
            chunk = [_image(x, f"images[{start + j}]") for j, x in enumerate(images[start : start + PREDICT_BATCH])]
            pairs = zip(student.predict_batch(chunk), probe.predict_batch(chunk))
            scored += [(start + j, disagreement(a, b, len(self.classes) - 1)) for j, (a, b) in enumerate(pairs)]
        return sorted(scored, key=lambda t: (-t[1], t[0]))

    # -- files ------------------------------------------------------------------------------------------------
    def save(
        self, folder: str | Path, overwrite: bool = False, model: Literal["student", "teacher"] = "student"
    ) -> Path:
        """Write the model folder ``distillfss adapt`` writes (config.json, model.safetensors, train_log.jsonl).
        An existing non-empty folder is refused unless ``overwrite`` (which replaces only what distillfss wrote)."""
        net = self.student if model == "student" else self.teacher
        if net is None or self.model_cfg is None or (model == "teacher" and self._support is None):
            raise ModelError(
                f"{folder}: nothing to save yet (call fit{'' if model == 'student' else ' or set_support'})"
            )
        with output_folder(Path(folder), overwrite, self._inputs, command=SAVE) as tmp:
            teacher = self.teacher if model == "student" and self._support is not None else None
            save_model(tmp, net, self.model_cfg, self.classes, self.meta, support=self._support, teacher=teacher)
            if self._log:
                (tmp / LOG).write_text("".join(json.dumps(r) + "\n" for r in self._log))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", backbone_weights: str | None = None) -> FewShotSegmenter:
        """A saved student or adapted teacher folder (from ``save`` or ``distillfss adapt``); ``save`` and
        ``export_onnx`` refuse to write into it."""
        loaded = load_model(folder, backbone_weights, device=device)
        cfg = loaded.model_cfg
        seg = cls(cfg.backbone, image_size=cfg.image_size, backbone_weights=backbone_weights, device=device)
        seg.model_cfg, seg.classes, seg.meta = cfg, loaded.classes, dict(loaded.config)
        seg.scale = loaded.config.get("scale")
        seg._inputs = [Path(folder)]
        seg._folder = Path(folder)
        seg._backbone = loaded.model.backbone
        if loaded.kind == "student":
            seg.student = loaded.model  # type: ignore[assignment]
            seg._predictors["student"] = loaded.predictor
        else:
            seg.teacher = loaded.model  # type: ignore[assignment]
            seg._predictors["teacher"] = loaded.predictor
        return seg

    def export_onnx(self, path: str | Path, overwrite: bool = False) -> Path:
        """The student as a standalone ONNX graph (``predict --engine onnx`` and onnxruntime read it), checked
        against PyTorch as ``distillfss export`` checks it (refused, nothing written, beyond 1e-3). An existing
        file is replaced only with ``overwrite`` and only if ``export_onnx`` wrote it."""
        from .export import export_onnx, mark_onnx, onnx_path

        path = Path(path)
        if self.student is None or self.model_cfg is None:
            raise ModelError(f"{path}: no student to export (call fit, or load a student folder)")
        with output_file(path, overwrite, self._inputs, command=EXPORT) as tmp:
            onnx_path(path)  # after the guards: their refusals come first
            export_onnx(self.student, self.model_cfg.image_size, self.classes, tmp, name=path, scale=self.scale)
            mark_onnx(tmp, EXPORT)
        return path

    # -- helpers ----------------------------------------------------------------------------------------------
    def _get_backbone(self) -> FrozenBackbone:
        assert self.model_cfg is not None
        if self._backbone is None:
            cfg = self.model_cfg
            self._backbone = build_backbone(cfg.backbone, cfg.image_size, self.backbone_weights).to(self.device)
        return self._backbone

    def _predictor(self, which: str) -> Predictor:
        if which not in ("student", "teacher", "probe"):
            raise ValueError(f"model must be 'student' or 'teacher', got {which!r}")
        if which == "probe" and which not in self._predictors:  # suggest's second opinion, on the support set
            if self._support is None and self._folder is not None:
                self._support = load_adapted_teacher(self._folder, self._get_backbone())[1:]
            if self._support is None:
                raise ModelError("suggest needs the support set: call fit, or load a folder adapt wrote")
            x, y = (t.to(self.device) for t in self._support)
            probe = quick_probe(self._get_backbone(), x, y, len(self.classes) - 1, self.meta.get("probe"))
            self._predictors[which] = Predictor(probe, self.model_cfg.image_size, scale=self.scale)  # type: ignore[union-attr]
        if which not in self._predictors:
            if which == "student":
                if self.student is None:
                    raise ModelError("no student: call fit first (or load a student folder)")
                self._predictors[which] = Predictor(self.student, self.model_cfg.image_size, scale=self.scale)  # type: ignore[union-attr]
            else:
                if self.teacher is None or self._support is None:
                    raise ModelError("the teacher needs a support set: call fit or set_support first")
                x, y = (t.to(self.device) for t in self._support)
                support = encode_support(self.teacher.backbone, x, y, len(self.classes) - 1)
                self._predictors[which] = Predictor(self.teacher, self.model_cfg.image_size, support, scale=self.scale)  # type: ignore[union-attr]
        return self._predictors[which]

    @staticmethod
    def _classes(masks: Sequence[ImageLike], classes: Sequence[str] | None) -> tuple[str, ...]:
        if classes is not None:
            if not classes or len(set(classes)) != len(classes):
                raise DataError(f"classes: expected distinct foreground class names, got {list(classes)}")
            return tuple(classes)
        top = 0
        for i, m in enumerate(masks):
            a = _mask(m, 254, f"masks[{i}]")
            values = a[a != IGNORE]
            top = max(top, int(values.max()) if values.size else 0)
        return tuple(f"class{c}" for c in range(1, max(top, 1) + 1))

    def _support_tensors(
        self,
        images: Sequence[ImageLike],
        masks: Sequence[ImageLike],
        classes: Sequence[str],
        choose_scale: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        assert self.model_cfg is not None
        if isinstance(images, (str, Path, np.ndarray)) or isinstance(masks, (str, Path, np.ndarray)):
            raise DataError("images and masks: expected lists (one entry per support image)")
        if len(images) != len(masks) or not images:
            raise DataError(
                f"images and masks: expected as many masks as images (>= 1), got {len(images)} and {len(masks)}"
            )
        size, pairs, names = self.model_cfg.image_size, [], []
        for i, (im, m) in enumerate(zip(images, masks)):
            name = str(im) if isinstance(im, (str, Path)) else f"images[{i}]"
            img = _image(im, name)
            lab = _mask(m, len(classes), str(m) if isinstance(m, (str, Path)) else f"masks[{i}]")
            if lab.shape != img.shape[:2]:
                raise DataError(
                    f"{name}: image is {img.shape[1]}x{img.shape[0]}, its mask {lab.shape[1]}x{lab.shape[0]}"
                )
            pairs.append((img, lab))
            names.append(name)
        if choose_scale:  # fit chooses the scale; set_support keeps a fitted model's
            try:
                self.scale = pick_scale([img.shape[:2] for img, _ in pairs], size, self.scale_option)
            except ValueError as e:  # a valid number too large for these images
                raise DataError(f"support set: {e}") from None
        x, y, sources = stack_windows([support_windows(img, lab, size, self.scale) for img, lab in pairs])
        check_support_labels(y, ("background", *classes), "support set", names)
        return x, y, sources

    def _unlabeled(self, unlabeled: Sequence[ImageLike] | str | Path) -> Tensor:
        assert self.model_cfg is not None
        if isinstance(unlabeled, (str, Path)):
            folder = Path(unlabeled)
            if not folder.is_dir():
                raise DataError(f"{folder}: unlabeled folder not found")
            unlabeled = list(list_images(folder).values())
            if not unlabeled:
                raise DataError(f"{folder}: no images (.png, .jpg, .tif, .bmp)")
        size = self.model_cfg.image_size
        return torch.cat(
            [unlabeled_windows(_image(u, f"unlabeled[{i}]"), size, self.scale) for i, u in enumerate(unlabeled)]
        )


def _image(x: ImageLike, name: str) -> np.ndarray:
    """A path or array -> (H, W, 3) float32 RGB in [0, 1]."""
    if isinstance(x, (str, Path)):
        return load_image(Path(x))
    a = np.asarray(x)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or min(a.shape[:2]) < 1:
        raise DataError(f"{name}: expected an image array (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise DataError(f"{name}: a float image must hold values in [0, 1] (uint8 arrays may hold 0-255)")
    return a


def _mask(x: ImageLike, num_classes: int, name: str) -> np.ndarray:
    """A path or (H, W) integer array -> (H, W) uint8 labels (0..C, 255 = ignore)."""
    if isinstance(x, (str, Path)):
        return load_mask(Path(x), num_classes)
    a = np.asarray(x)
    if a.ndim != 2 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise DataError(f"{name}: expected an (H, W) integer label map, got {a.dtype} of shape {a.shape}")
    bad = np.unique(a[(a < 0) | ((a > num_classes) & (a != IGNORE))])
    if bad.size:
        raise DataError(f"{name}: label values {bad[:5].tolist()} outside the classes 0..{num_classes} (255 = ignore)")
    return a.astype(np.uint8)
