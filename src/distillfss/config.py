"""Frozen configuration dataclasses for models and runs.

Every saved model and every result carries the config that made it (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

TrainableSet = Literal["A", "B", "C"]
_C = TypeVar("_C", bound="Serializable")


class Serializable:
    """JSON round trip for the frozen config dataclasses; unknown keys (from newer versions) are ignored."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ModelConfig(Serializable):
    """Architecture of the teacher (and of the student, which reuses its decoder)."""

    backbone: str = "efficientnet_lite2"  # one of backbones.BACKBONES
    image_size: int = 256  # square working resolution; the paper uses 384 (preset "paper")
    heads: int = 8  # attention heads on every level except the stride-8 one
    heads_stride8: int = 1  # heads on the stride-8 level (paper: 8); 1 head halves its cost
    pe_dropout: float = 0.0  # dropout after the positional encoding (paper: 0.5)
    attn_dropout: float = 0.0  # dropout on the attention probabilities (paper: 0.5)
    num_classes: int = 1  # foreground classes


# Named presets: "fast" is the default measured on a 2-core CPU; "paper" is the paper's setting.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {},
    "paper": {"image_size": 384, "heads": 8, "heads_stride8": 8, "pe_dropout": 0.5, "attn_dropout": 0.5},
}


def model_config(backbone: str, num_classes: int, preset: str = "fast", image_size: int | None = None) -> ModelConfig:
    """The architecture of a named preset for ``backbone`` and ``num_classes`` (``image_size`` overrides it)."""
    from .errors import UserError

    if preset not in PRESETS:
        raise UserError(f"preset {preset!r}: unknown; choose from {', '.join(sorted(PRESETS))}")
    fields = dict(PRESETS[preset])
    if image_size is not None:
        if not (MIN_SIZE <= image_size <= MAX_SIZE and image_size % 32 == 0):
            raise UserError(
                f"image size {image_size}: a multiple of 32 (the backbone's coarsest stride) from {MIN_SIZE} to "
                f"{MAX_SIZE} px; larger images are windowed at this size (see --scale)"
            )
        fields["image_size"] = image_size
    return ModelConfig(backbone=backbone, num_classes=num_classes, **fields)


MIN_SIZE, MAX_SIZE = 64, 1024  # the working sizes model_config accepts (px)


# What `distillfss benchmark` runs when --methods names none (row names: see protocol.ROWS): the paper's methods,
# the default fast student (what `adapt` writes), each student also with the train split's unlabeled images, and the
# two tuned baselines.
BENCHMARK_METHODS = (
    "teacher",
    "transferfss",
    "distillfss",
    "distillfss_unlabeled",
    "distillfss_fast",
    "distillfss_fast_unlabeled",
    "linear_probe",
    "prototype",
)
REFINE_ITERATIONS = 30  # the paper student's refinement steps on unlabeled images when the config names no number
Views = Literal["none", "hflip", "flips", "dihedral"]


@dataclass(frozen=True)
class AdaptConfig(Serializable):
    """TransferFSS and DistillFSS on a support set: everything that changes the adapted model.

    Invalid combinations raise ``UserError`` here, so the CLI, the Python API, the app and the benchmark refuse the
    same things with the same message; ``for_unlabeled`` settles what depends on whether unlabeled images are given.
    """

    method: Literal["distill", "transfer"] = "distill"  # transfer: the adapted teacher is the model
    # fast: one slim pass for all classes, distilled from the adapted teacher on a bank of views (the product's
    # student); paper: the paper's ConvDist student, trained beside the teacher (joint) or after it (two_stage).
    student: Literal["fast", "paper"] = "fast"
    iterations: int = 60  # teacher (and paper-student) optimizer steps; one step = one pass over all episodes
    fast_iterations: int = 200  # the fast student's steps (minibatches of ``view_batch`` views)
    # The symmetries the domain has: each support and unlabeled image's views the student learns from (8 = the
    # flips and 90-degree rotations; "hflip" or "none" where orientation matters, e.g. anatomy with a fixed side).
    views: Views = "dihedral"
    # The paper's knobs (its ablations): which teacher modules train (A mappers+mixers; B everything but the
    # backbone; C A + attention), joint or two-stage training of the paper student, the weight of its distillation
    # MSE (0 = the no-distillation ablation).
    trainable: TrainableSet = "A"
    mode: Literal["joint", "two_stage"] = "joint"
    student_iterations: int | None = None  # two_stage: the paper student's steps (default: ``iterations``)
    distill_weight: float = 1.0
    # The paper student's refinement on unlabeled images labelled by the adapted teacher; None: REFINE_ITERATIONS
    # when unlabeled images are given, else 0.
    refine_iterations: int | None = None
    # Episodes: "leave_one_out" (each support image the query once, at most ``max_shots`` of the others as shots,
    # a seeded draw when there are more, so a step costs O(K); 0 = all) or "paired" (the original's pairs).
    episodes: Literal["leave_one_out", "paired"] = "leave_one_out"
    max_shots: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW default, as the original
    focal_gamma: float = 2.0
    class_weights: Literal["none", "balanced"] = "balanced"  # balanced: frequency^-0.5 (the original: none)
    view_batch: int = 8  # views per student step
    # bf16 autocasts the decoder/heads: faster on CPUs with fast bf16 kernels, can be slower on others; fp32 is the
    # same everywhere: the default.
    precision: Literal["bf16", "fp32"] = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        from .errors import UserError

        for f in dataclasses.fields(self):  # a typo in a config file is named, not carried into training
            allowed = typing.get_args(_HINTS[f.name])
            if allowed and all(isinstance(a, str) for a in allowed) and getattr(self, f.name) not in allowed:
                raise UserError(f"{f.name}: expected one of {', '.join(allowed)}, got {getattr(self, f.name)!r}")
        for name in ("iterations", "view_batch", "fast_iterations"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("max_shots", "refine_iterations", "student_iterations"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"{name}: expected >= 0, got {value}")
        if self.distill_weight < 0:
            raise UserError(f"distill_weight: expected >= 0, got {self.distill_weight}")
        paper_only = {
            "refine_iterations": self.refine_iterations,
            "student_iterations": self.student_iterations,
            "mode": None if self.mode == "joint" else self.mode,
        }
        named = [k for k, v in paper_only.items() if v is not None]
        if named and (self.student != "paper" or self.method != "distill"):
            raise UserError(f"{', '.join(named)}: set(s) the paper student's training only; use student paper")

    def for_unlabeled(self, given: bool) -> AdaptConfig:
        """The config as run with (``given``) or without unlabeled images: the paper student's refinement steps
        settled (REFINE_ITERATIONS with them, 0 without, unless named); unlabeled images for a run that has no
        student to teach refused."""
        from .errors import UserError

        if given and self.method != "distill":
            raise UserError("unlabeled images train the student: use method distill (not transfer)")
        if self.student != "paper" or self.method != "distill":
            return self
        steps = self.refine_iterations
        if steps is None:
            steps = REFINE_ITERATIONS if given else 0
        if given and steps < 1:
            raise UserError("unlabeled images refine the paper student: give refine_iterations >= 1")
        return dataclasses.replace(self, refine_iterations=steps)


_HINTS = typing.get_type_hints(AdaptConfig)
WARM_FRACTION = 3  # a warm start (adapt --from) runs a third of the steps: its teacher and student already fit


def warm_config(cfg: AdaptConfig, given: typing.Iterable[str] = ()) -> AdaptConfig:
    """The config of a warm start (``adapt --from``, ``fit(..., warm_start=True)``): ``cfg`` with a third of its
    teacher and student steps (rounded up), except the step counts the user ``given`` explicitly."""
    steps = {
        name: -(-getattr(cfg, name) // WARM_FRACTION)
        for name in ("iterations", "fast_iterations")
        if name not in set(given)
    }
    return dataclasses.replace(cfg, **steps)


def read_adapt_config(path: Path) -> dict[str, Any]:
    """The AdaptConfig fields a JSON or YAML file sets (``--config FILE``); unknown fields and values of the wrong
    type are a ``UserError`` naming the file."""
    import yaml

    from .errors import UserError

    try:
        fields = yaml.safe_load(path.read_text())  # JSON is YAML
    except OSError as e:
        raise UserError(f"{path}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not JSON or YAML ({str(e).splitlines()[0]})") from None
    fields = {} if fields is None else fields
    if not isinstance(fields, dict):
        raise UserError(f"{path}: expected a mapping of AdaptConfig fields, got {type(fields).__name__}")
    known = {f.name: f for f in dataclasses.fields(AdaptConfig)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise UserError(f"{path}: unknown field(s) {', '.join(map(str, unknown))}; known: {', '.join(known)}")
    for name, value in fields.items():
        default = known[name].default
        kinds = (int, float) if isinstance(default, float) else (type(default),) if default is not None else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise UserError(f"{path}: {name}: expected {kinds[0].__name__}, got {value!r}")
    return fields


@dataclass(frozen=True)
class MetaConfig(Serializable):
    """Source-domain training of the teacher. Everything that changes the result is here (and in the checkpoint)."""

    source: Literal["selfsup", "synthetic", "selfsup+synthetic", "pascal", "coco"] = "selfsup"
    fold: int = 0  # PASCAL-5i / COCO-20i fold held out for validation
    steps: int = 1000  # optimizer steps (may be raised when resuming)
    batch: int = 8  # episodes per step, global over all processes
    shots: int = 1  # shots per episode (DCAMA trains 1-shot)
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: DCAMA's SGD, Nesterov, momentum 0.9
    lr: float = 1e-3
    weight_decay: float = 0.01  # DCAMA with sgd: 1e-4
    ce_weight: float = 0.5
    bce_weight: float = 2.0
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast of the decoder
    val_every: int = 100
    val_episodes: int = 60
    views: int = 24  # selfsup: augmented views per source image in the bank
    seed: int = 0

    def __post_init__(self) -> None:
        from .errors import UserError

        least = {"steps": 1, "batch": 1, "shots": 1, "val_every": 1, "val_episodes": 1, "views": 1, "fold": 0}
        for name, low in least.items():
            if getattr(self, name) < low:
                raise UserError(f"{name}: expected >= {low}, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "ce_weight", "bce_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)) or (name == "lr" and value == 0):
                raise UserError(
                    f"{name}: expected a {'positive' if name == 'lr' else 'non-negative'} number, got {value}"
                )


# The demo's schedule, shorter than adapt's defaults (60 teacher, 200 fast-student steps) so that every bundled set
# x 3 seeds takes minutes on 2 CPU cores (the README gives the measured time).
DEMO_ADAPT = AdaptConfig(iterations=20, fast_iterations=100)

# `distillfss speed`'s defaults for the flags of one mode (inference, or --adapt's training steps); a flag of the other
# mode is refused, not ignored.
SPEED_INFERENCE: dict[str, Any] = {
    "ways": "1,3,5",
    "warmup": 2,
    "iters": 10,
    "models": "backbone,student,teacher",
    "chunk": 0,
    "channels_last": True,
    "compile": False,
}
SPEED_ADAPT: dict[str, Any] = {"trainable": "A,B", "steps": 4, "max_shots": str(AdaptConfig.max_shots)}
