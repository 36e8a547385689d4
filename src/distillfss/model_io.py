"""Saved models describe themselves: ``config.json`` + ``model.safetensors`` (+ ``train_log.jsonl``).

The backbone is never stored, only its name (and the weights file it came from, if any): it is rebuilt from its
weight source at load time. A student needs nothing else; a teacher also stores its support images and masks.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .backbones import FrozenBackbone, build_backbone
from .config import ModelConfig
from .predictor import Predictor
from .student import Student, build_student
from .teacher import Teacher, build_teacher, encode_support

FORMAT = "distillfss-model"
CONFIG, WEIGHTS, LOG = "config.json", "model.safetensors", "train_log.jsonl"


class ModelError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the problem."""


def _own_state(module: nn.Module) -> dict[str, Tensor]:
    """Trainable-part weights only: the backbone is rebuilt from its source, never stored."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if not k.startswith("backbone.")}


def save_model(
    out: Path,
    model: Teacher | Student,
    model_cfg: ModelConfig,
    classes: tuple[str, ...],
    meta: dict[str, Any],
    support: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Write config.json and model.safetensors into ``out`` (which must exist).

    support: for a teacher, its (images (K,3,S,S) in [0,1], labels (K,S,S)) support set.
    """
    kind = "teacher" if isinstance(model, Teacher) else "student"
    tensors = {f"model.{k}": v for k, v in _own_state(model).items()}
    if kind == "teacher":
        if support is None:
            raise ValueError("saving a teacher needs its support set")
        images, labels = support
        tensors["support.images"] = images.detach().cpu().float().contiguous()  # exact: predictions reload bit-equal
        tensors["support.labels"] = labels.cpu().to(torch.uint8).contiguous()
    save_file(tensors, str(out / WEIGHTS))
    config = {
        "format": FORMAT,
        "version": 1,
        "kind": kind,
        "classes": list(classes),
        "model": model_cfg.to_dict(),
    }
    config.update(meta)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


@dataclass
class LoadedModel:
    kind: Literal["teacher", "student"]
    model: Teacher | Student
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
) -> LoadedModel:
    """Rebuild a saved teacher or student on ``device``; loading is strict and names missing or unexpected keys."""
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
    teacher = build_teacher(backbone, model_cfg)
    model: Teacher | Student
    model = teacher if config["kind"] == "teacher" else build_student(backbone, teacher.decoder, model_cfg.num_classes)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    load_strict(model, state, weights_path)
    model.to(device).eval()
    support = None
    if config["kind"] == "teacher":
        images = tensors["support.images"].to(device)
        labels = tensors["support.labels"].to(device).long()
        support = encode_support(backbone, images, labels, model_cfg.num_classes)
    return LoadedModel(
        config["kind"], model, model_cfg, classes, config, Predictor(model, model_cfg.image_size, support, precision)
    )


def load_strict(module: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    expected = set(_own_state(module))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(f"{source}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    module.load_state_dict(state, strict=False)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty folder (before any work is done) unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"{out}: folder exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def output_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Write into a temporary folder beside ``out`` and move it into place only when everything succeeded.

    An existing non-empty ``out`` is refused unless ``overwrite``; on failure nothing of ``out`` changes.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
