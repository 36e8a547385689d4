"""Frozen configuration dataclasses for models and runs.

Every saved model and every result carries the config that made it (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
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


# What `distillfss benchmark` runs when --methods names none: the paper's methods, the default fast student (what
# `adapt` writes), each student also with the train split's unlabeled images, and the two tuned baselines.
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

# Named presets: "fast" is the default measured on a 2-core CPU; "paper" is the paper's setting.
REFINE_ITERATIONS = 30  # student refinement steps when unlabeled images are given and the run names no number

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
    if image_size:
        fields["image_size"] = image_size
    return ModelConfig(backbone=backbone, num_classes=num_classes, **fields)


# The adaptation step's fixes, each of which ``AdaptConfig.legacy`` can undo (README, "Each fix of the adaptation step on its own"):
LEGACY_STEPS = (
    "shots_without_class",  # class c attends to every other support image, also those without c
    "self_in_softmax",  # the query's own tokens stay in the softmax, removed only by the value/renormaliser ratio
    "student_relabelled",  # the student's focal loss on the teacher's targets (classes without a shot -> background)
    "mse_per_pair",  # the distillation MSE averaged over (episode, class) pairs, not per episode first
)


@dataclass(frozen=True)
class AdaptConfig(Serializable):
    """TransferFSS / DistillFSS training on a support set."""

    method: Literal["distill", "transfer"] = "distill"
    mode: Literal["joint", "two_stage"] = "joint"  # joint = the original code; two_stage = teacher, then student
    iterations: int = 60  # optimizer steps (one step = one pass over all episodes)
    student_iterations: int | None = None  # two_stage only: student steps (default: same as iterations)
    lr: float = 1e-3
    schedule: Literal["cosine", "constant"] = "constant"  # cosine: 5 % linear warm-up, then cosine decay to 0
    weight_decay: float = 0.01  # AdamW default, as the original
    trainable: TrainableSet = "A"  # A: mappers+mixers; B: everything but the backbone; C: A + attention
    episodes: Literal["leave_one_out", "paired"] = "leave_one_out"
    # leave_one_out: at most this many of the other support images are an episode's shots, a seeded draw when there
    # are more (the paper's chunks of 10; redrawn each step when the attention trains), so a step costs O(K) instead
    # of O(K^2); 0 = all of them.
    max_shots: int = 10
    focal_gamma: float = 2.0
    class_weights: Literal["none", "balanced"] = "balanced"  # balanced: frequency^-0.5 (the original: none)
    distill_weight: float = 1.0  # weight of the MSE on coarse masks inside the joint loss (0 = ablation)
    # Training only: each (episode, class) has the coarse masks the teacher's decoder sees zeroed with this
    # probability, so the decoder also learns to segment from the query's own features (what the student has).
    coarse_dropout: float = 0.0
    # bf16 autocasts the decoder/heads: 2x faster on a CPU with fast bf16 kernels (AMD EPYC, measured), 1.3x slower
    # on another with avx512_bf16 (Intel Xeon, measured); fp32 does not depend on how a CPU does bf16: the default.
    precision: Literal["bf16", "fp32"] = "fp32"
    # Student refinement on a bank of views labelled by the adapted teacher (0 steps = off; see adapt.refine):
    refine_iterations: int = 0
    views: Literal["none", "hflip", "flips", "dihedral"] = "none"  # augmented copies of each support image
    unlabeled_views: Literal["none", "hflip", "flips", "dihedral"] = "flips"  # ... of each unlabeled image
    view_batch: int = 8  # views per refinement step
    # "fast": after the teacher's stage, a fast student (classes as channels, its own slim decoder, see student.py) is
    # distilled from the adapted teacher on a bank of views (support images and any unlabeled images, each under
    # ``fast_views``) for ``fast_iterations`` steps; it replaces the paper's student (and its refinement).
    student: Literal["paper", "fast"] = "paper"
    fast_iterations: int = 200
    fast_views: Literal["none", "hflip", "flips", "dihedral"] = "dihedral"
    fast_schedule: Literal["cosine", "constant"] = "constant"  # the fast student's learning rate over its steps
    fast_crops: int = 0  # plus this many random crops (50-90 % of the side, a random symmetry) of each support image
    # "mean": the teacher's labels of a view (soft labels and coarse masks) are the mean of its labels of all the
    # image's views in the bank, each mapped back to the view (test-time augmentation of the pseudo-labels); "view":
    # each view's own.
    label_views: Literal["view", "mean"] = "view"
    # > 0: the fast student ends with the exponential moving average of its weights over its steps, this decay per
    # step (0.98: about the last 50 steps weigh most); 0: its last step's weights.
    fast_ema: float = 0.0
    # The soft labels the fast student learns from: "teacher" = the adapted teacher's; "teacher+probe" = the mean of
    # the teacher's and a linear probe's class probabilities (the probe tuned on the support set by cross-validation
    # as the ``linear_probe`` baseline, at the model's size; a support view's from a probe fitted without its image).
    # The default since it scored above the teacher's labels alone over K = 1, 2 and 5 (README, *Two labellers*).
    fast_labels: Literal["teacher", "teacher+probe"] = "teacher+probe"
    # What trains before the fast student's distillation: "teacher" = the teacher alone (TransferFSS), "joint" = the
    # teacher with the paper's student beside it (the original's joint loss; that student is then discarded). The
    # teacher alone skips the paper student's per-class decoder passes: at K = 5 the whole adaptation took about 60 %
    # of the time, with accuracy not distinguishable (README, benchmark).
    fast_teacher_stage: Literal["joint", "teacher"] = "teacher"
    # K = 1 (one support image, its own shot in training): > 1 splits it into a grid of this many cells per side and
    # each query token attends only to the cells other than its own (the spatial counterpart of leave-one-out);
    # 1 = the image attends to itself whole, the query's own mask within reach of every token.
    one_shot_grid: int = 1
    # The training step as it was before the fixes of the numbers-you-can-trust issue, one switch per fix (names in
    # LEGACY_STEPS), for the per-fix ablation rows of the benchmark (``transferfss_old_<name>``); never a user's choice.
    legacy: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        from .errors import UserError

        object.__setattr__(self, "legacy", tuple(self.legacy))  # a list after a JSON round trip
        unknown = sorted(set(self.legacy) - set(LEGACY_STEPS))
        if unknown:
            raise UserError(f"legacy: unknown step(s) {', '.join(unknown)}; choose from {', '.join(LEGACY_STEPS)}")

        for name in ("iterations", "view_batch", "fast_iterations", "one_shot_grid"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        for name in ("max_shots", "refine_iterations", "fast_crops"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.fast_ema < 1.0:
            raise UserError(f"--fast-ema: expected a decay in [0, 1), got {self.fast_ema}")
        if not 0.0 <= self.coarse_dropout < 1.0:
            raise UserError(f"--coarse-dropout: expected a probability in [0, 1), got {self.coarse_dropout}")
        if self.student == "fast" and self.refine_iterations > 0:
            raise UserError(
                "--refine-iterations refines the paper student; the fast student learns from the same views and "
                "unlabeled images in its own distillation (--fast-iterations)"
            )


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


@dataclass(frozen=True)
class SupportInfo:
    """Which images formed the support set (recorded beside every model)."""

    dataset: str
    stems: tuple[str, ...]
    classes: tuple[str, ...]
    shots: int
    extra: dict[str, Any] = field(default_factory=dict)


# The student `distillfss adapt`, FewShotSegmenter and the app distil unless told otherwise (AdaptConfig keeps the
# paper's, which the benchmark's `distillfss` rows use): at K = 5 the fast student was more accurate than the
# paper's (+2.6 [+0.1, +4.6] mIoU, the gain on nuclei; README, benchmark) at a fraction of its inference cost.
DEFAULT_STUDENT = "fast"

# The demo's schedule: 3 seeds x 2 datasets at 40 steps (and 20 refinement steps for distillfss_unlabeled) keep it
# within 10 minutes on 2 CPU cores.
DEMO_ADAPT = AdaptConfig(iterations=40, refine_iterations=20)
