"""Saved models describe themselves: ``config.json`` + ``model.safetensors`` (+ ``train_log.jsonl``).

The backbone is never stored, only its name (and the weights file it came from, if any): it is rebuilt from its
weight source at load time. A student needs nothing else; an adapted teacher also stores its support images and
masks. A meta-trained teacher checkpoint (``meta-train``) has no support set (``"support": false``): it is a
starting point for ``adapt --teacher``, not a predictor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .backbones import FrozenBackbone, build_backbone
from .config import ModelConfig
from .errors import UserError
from .outputs import replace_atomically, write_json_atomic
from .predictor import VOTE_CHUNK, Predictor
from .student import FAST_VERSION, STUDENT_KINDS, FastStudent, Student, build_fast_student, build_student
from .teacher import Teacher, build_teacher, encode_support

log = logging.getLogger("distillfss")

FORMAT = "distillfss-model"
CONFIG, WEIGHTS, LOG = "config.json", "model.safetensors", "train_log.jsonl"
TEACHER = "teacher.safetensors"  # beside a student: its adapted teacher and support set (adapt --from, suggest)


class ModelError(UserError, ValueError):
    """A model folder that cannot be loaded; the message names the file and the problem."""


def own_state(module: nn.Module) -> dict[str, Tensor]:
    """Trainable-part weights only: the backbone is rebuilt from its source, never stored."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if not k.startswith("backbone.")}


def save_model(
    out: Path,
    model: Teacher | Student | FastStudent,
    model_cfg: ModelConfig,
    classes: tuple[str, ...],
    meta: dict[str, Any],
    support: tuple[Tensor, Tensor] | None = None,
    teacher: Teacher | None = None,
) -> None:
    """Write config.json and model.safetensors into ``out`` (which must exist).

    support: for a teacher, its (images (K,3,S,S) in [0,1], labels (K,S,S)) support set.
    teacher: for a student, its adapted teacher: written with the support set to teacher.safetensors, for a warm
    start (``adapt --from``) and ``suggest``; predict and export read only the student.
    """
    kind = "teacher" if isinstance(model, Teacher) else "student"
    if kind == "teacher":
        save_file(_with_support(model, support), str(out / WEIGHTS))
    else:
        save_file({f"model.{k}": v for k, v in own_state(model).items()}, str(out / WEIGHTS))
        if teacher is not None:
            save_file(_with_support(teacher, support), str(out / TEACHER))
    config = {
        "format": FORMAT,
        "version": 1,
        "kind": kind,
        "classes": list(classes),
        "model": model_cfg.to_dict(),
    }
    if kind == "student":
        config["student"] = "fast" if isinstance(model, FastStudent) else "paper"  # what the weights are for
        if isinstance(model, FastStudent):
            config["student_version"] = FAST_VERSION
    config.update(meta)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _with_support(teacher: Teacher, support: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
    if support is None:
        raise ValueError("saving a teacher needs its support set")
    images, labels = support
    tensors = {f"model.{k}": v for k, v in own_state(teacher).items()}
    tensors["support.images"] = images.detach().cpu().float().contiguous()  # exact: predictions reload bit-equal
    tensors["support.labels"] = labels.cpu().to(torch.uint8).contiguous()
    return tensors


def load_adapted_teacher(folder: Path, backbone: FrozenBackbone) -> tuple[Teacher, Tensor, Tensor]:
    """A student folder's adapted teacher and support set (teacher.safetensors) -> (teacher, images, labels), on
    the backbone's device; a teacher folder's own. A ModelError names the folder when it has none."""
    config = read_config(folder)
    path = folder / (WEIGHTS if config.get("kind") == "teacher" else TEACHER)
    if config.get("kind") == "teacher" and config.get("support") is False or not path.is_file():
        raise ModelError(
            f"{folder}: no adapted teacher with its support set ({path.name}); adapt it again with this version"
        )
    device = next(backbone.parameters()).device
    tensors = load_file(str(path))
    teacher = build_teacher(backbone, ModelConfig.from_dict(config["model"]))
    load_strict(teacher, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    return teacher.to(device).eval(), tensors["support.images"].to(device), tensors["support.labels"].to(device).long()


@dataclass
class LoadedModel:
    kind: Literal["teacher", "student"]
    model: Teacher | Student | FastStudent
    model_cfg: ModelConfig
    classes: tuple[str, ...]
    config: dict[str, Any]
    predictor: Predictor


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise ModelError(f"{folder}: not a model folder (no {CONFIG})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise ModelError(f"{path}: not a distillfss model (format {config.get('format')!r})")
    return config


def load_model(
    folder: Path | str,
    backbone_weights: str | None = None,
    backbone: FrozenBackbone | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    vote_chunk: int = VOTE_CHUNK,
) -> LoadedModel:
    """Rebuild a saved teacher or student on ``device``; loading is strict and names missing or unexpected keys.
    ``vote_chunk`` (teachers only): see :class:`Predictor`."""
    folder = Path(folder)
    config = read_config(folder)
    model_cfg = ModelConfig.from_dict(config["model"])
    classes = tuple(config["classes"])
    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        raise ModelError(f"{folder}: no {WEIGHTS}")
    tensors = load_file(str(weights_path))
    if backbone is None:
        backbone = build_backbone(
            model_cfg.backbone, model_cfg.image_size, backbone_weights or config.get("backbone_weights")
        )
    model: Teacher | Student | FastStudent
    student_kind = config.get("student", "paper")  # folders written before the fast student existed: "paper"
    if config["kind"] == "teacher":
        model = build_teacher(backbone, model_cfg)
    elif student_kind == "fast":
        version = config.get("student_version", 1)
        if version != FAST_VERSION:
            raise ModelError(
                f"{folder / CONFIG}: a fast student of layout version {version}, written by an earlier distillfss; "
                f"this version builds layout {FAST_VERSION}: adapt it again (distillfss adapt ...)"
            )
        model = build_fast_student(backbone, model_cfg.num_classes, model_cfg.image_size)
    elif student_kind == "paper":
        model = build_student(backbone, build_teacher(backbone, model_cfg).decoder, model_cfg.num_classes)
    else:
        raise ModelError(f"{folder / CONFIG}: unknown student {student_kind!r}; expected one of {STUDENT_KINDS}")
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    load_strict(model, state, weights_path)
    model.to(device).eval()
    support = None
    if config["kind"] == "teacher":
        if config.get("support") is False:
            raise ModelError(
                f"{folder}: a meta-trained teacher without a support set; adapt it first "
                f"(distillfss adapt --teacher {folder} --support DATA --out MODEL)"
            )
        images = tensors["support.images"].to(device)
        labels = tensors["support.labels"].to(device).long()
        support = encode_support(backbone, images, labels, model_cfg.num_classes)
    return LoadedModel(
        config["kind"],
        model,
        model_cfg,
        classes,
        config,
        Predictor(model, model_cfg.image_size, support, precision, vote_chunk, config.get("scale")),
    )


def save_teacher_checkpoint(out: Path, teacher: Teacher, model_cfg: ModelConfig, meta: dict[str, Any]) -> None:
    """A meta-trained teacher: weights and config, no classes and no support. Each file is replaced atomically."""
    weights = {f"model.{k}": v for k, v in own_state(teacher).items()}
    replace_atomically(out / WEIGHTS, lambda tmp: save_file(weights, str(tmp)))
    config = {
        "format": FORMAT,
        "version": 1,
        "kind": "teacher",
        "support": False,
        "classes": [],
        "model": model_cfg.to_dict(),
    }
    config.update(meta)
    write_json_atomic(out / CONFIG, config)


def load_teacher_weights(folder: Path | str, backbone: FrozenBackbone, model_cfg: ModelConfig) -> Teacher:
    """A new teacher for ``model_cfg`` (any number of classes) with a saved teacher's attention and decoder
    weights. The saved teacher must have the same architecture (every ModelConfig field but the number of
    classes: backbone, image size, heads per stride, dropout); its support set, if any, is not loaded."""
    folder = Path(folder)
    config = read_config(folder)
    if config.get("kind") != "teacher":
        raise ModelError(f"{folder}: is a {config.get('kind')}, a starting teacher must be a teacher")
    saved = config["model"]
    for name, value in model_cfg.to_dict().items():  # every architecture field but the number of classes
        if name != "num_classes" and saved.get(name) != value:
            raise ModelError(
                f"{folder / CONFIG}: a teacher with {name} = {saved.get(name)!r}, this run uses {value!r} "
                "(choose the matching --preset/--image-size/--backbone, or another --teacher)"
            )
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{folder}: no {WEIGHTS}")
    teacher = build_teacher(backbone, model_cfg)
    state = {k[len("model.") :]: v for k, v in load_file(str(weights)).items() if k.startswith("model.")}
    load_strict(teacher, state, weights)
    return teacher


def shipped_teachers() -> dict[str, Path]:
    """Meta-trained teachers bundled with the package (``distillfss/teachers/<name>/``), by name."""
    from importlib import resources

    root = Path(str(resources.files("distillfss") / "teachers"))
    return {p.name: p for p in sorted(root.iterdir()) if (p / CONFIG).is_file()} if root.is_dir() else {}


def resolve_teacher(spec: str | None, model_cfg: ModelConfig) -> tuple[Path | None, str]:
    """The starting teacher of an adaptation -> (folder or None for a random initialisation, a label for logs
    and results).

    spec: ``auto`` (or None): the shipped teacher made for this backbone and architecture (every ModelConfig field
    but the number of classes), else a random initialisation; ``random``; ``shipped``: the shipped one, an error if
    none fits; or a teacher folder.
    """
    if spec == "random":
        return None, "random"
    if spec in (None, "auto", "shipped"):
        want = {**model_cfg.to_dict(), "num_classes": None}
        for name, folder in shipped_teachers().items():
            if {**read_config(folder)["model"], "num_classes": None} == want:
                return folder, f"shipped:{name}"
        missing = (
            f"no shipped teacher fits backbone {model_cfg.backbone} at {model_cfg.image_size} px with this preset "
            f"(shipped: {_shipped_summary()})"
        )
        if spec == "shipped":
            raise ModelError(f"{missing}; train one with distillfss meta-train")
        log.warning(
            "%s: starting from a randomly initialised teacher (not meta-trained; see the README's Backbones)", missing
        )
        return None, "random"
    return Path(spec), str(spec)


def _shipped_summary() -> str:
    """The shipped teachers' names with their backbone and working size, for messages."""
    models = {name: read_config(folder)["model"] for name, folder in shipped_teachers().items()}
    return ", ".join(f"{n} ({m['backbone']}, {m['image_size']} px)" for n, m in models.items()) or "none"


def load_strict(module: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    expected = set(own_state(module))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(f"{source}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    module.load_state_dict(state, strict=False)
