"""One evaluation cell of the protocol: a dataset, a fixed support set of K images, every method adapted on it
and evaluated on every test image. Shared by ``demo`` and ``benchmark``.

Every row that stands for a model (``transferfss``, the students and the paper's ablations) is a call of
``adapt.adapt`` with the run's ``AdaptConfig`` and the row's changes (``ROWS``): the ``distillfss_fast`` row at seed s
is the model ``distillfss adapt --seed s`` writes for the same support set. Rows that need the same adaptation share
one call (``transferfss`` is the teacher of ``distillfss_fast``'s run).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from .adapt import TeacherStage, adapt
from .backbones import FrozenBackbone, build_backbone
from .baselines import LinearProbe, PrototypeMatcher
from .config import BENCHMARK_METHODS, AdaptConfig, ModelConfig, model_config
from .data import DataError, Split, class_sets, load_support_tensors, load_unlabeled
from .data.folder import image_size
from .errors import UserError
from .estimate import HeldOut, held_out_counts
from .evaluate import evaluate_predictor
from .fast import LabelProbes, fit_label_probes
from .model_io import load_teacher_weights
from .predictor import VOTE_CHUNK, Predictor
from .sampling import sample_support
from .teacher import EncodedSupport, Teacher, build_teacher, encode_support
from .tiling import choose_scale
from .transfer import plateau, seeded

LogTo = Callable[[str], Path]  # a name (seed and rows) -> the file an adaptation's training log is appended to


class Row(NamedTuple):
    """A model row: the ``AdaptConfig`` fields it sets, its starting teacher (the cell's, or a random one), whether
    it learns from the train split's images outside the support set, and which model of the adaptation it scores."""

    changes: tuple[tuple[str, object], ...]
    start: Literal["cell", "random"]
    unlabeled: bool
    model: Literal["teacher", "student"]


_FAST = (("student", "fast"),)
_PAPER = (("student", "paper"),)
ROWS: dict[str, Row] = {
    "transferfss": Row(_FAST, "cell", False, "teacher"),
    "distillfss_fast": Row(_FAST, "cell", False, "student"),  # the product's default: what `adapt` writes
    "distillfss_fast_unlabeled": Row(_FAST, "cell", True, "student"),
    "distillfss": Row(_PAPER, "cell", False, "student"),  # the paper's student
    "distillfss_unlabeled": Row(_PAPER, "cell", True, "student"),
    # the paper's ablations: a random starting teacher, trainable sets B and C, two-stage, no distillation loss
    "transferfss_random": Row(_FAST, "random", False, "teacher"),
    "distillfss_random": Row(_PAPER, "random", False, "student"),
    "transferfss_setB": Row((*_FAST, ("trainable", "B")), "cell", False, "teacher"),
    "distillfss_setB": Row((*_PAPER, ("trainable", "B")), "cell", False, "student"),
    "transferfss_setC": Row((*_FAST, ("trainable", "C")), "cell", False, "teacher"),
    "distillfss_setC": Row((*_PAPER, ("trainable", "C")), "cell", False, "student"),
    "distillfss_two_stage": Row((*_PAPER, ("mode", "two_stage")), "cell", False, "student"),
    "distillfss_nodistill": Row((*_PAPER, ("distill_weight", 0.0)), "cell", False, "student"),
}
UNTRAINED = ("teacher", "teacher_random")  # the starting teacher with the support set, before adaptation
BASELINES = ("linear_probe", "prototype")
ALL_METHODS = (*UNTRAINED[:1], *ROWS, *UNTRAINED[1:], *BASELINES)
RANDOM_START = ("teacher_random", "transferfss_random", "distillfss_random")


def row_config(base: AdaptConfig, method: str) -> AdaptConfig:
    """The ``AdaptConfig`` a model row runs: ``base`` with the row's changes."""
    return dataclasses.replace(base, **dict(ROWS[method].changes))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What the demo and the benchmark share: the model, starting teacher and evaluation settings (their CLI flags,
    typed). Invalid values raise ``DataError``."""

    seeds: tuple[int, ...] = (0,)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)  # its seed is replaced by each of ``seeds``
    backbone: str = "efficientnet_lite2"
    backbone_weights: str | None = None
    preset: str = "fast"
    image_size: int | None = None
    teacher: str = "auto"
    device: str = "cpu"
    probe_size: int = 384  # 0: the model's size
    vote_chunk: int = VOTE_CHUNK
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.seeds or min(self.seeds) < 0:
            raise DataError(f"--seeds: expected integers >= 0, got {list(self.seeds)}")
        if self.vote_chunk < 0:
            raise DataError(f"--vote-chunk: expected >= 0, got {self.vote_chunk}")
        # a bad preset, image size or probe size fails here, before any work
        for flag, size in (("--image-size", self.image_size), ("--probe-size", self.probe_size or None)):
            try:
                model_config(self.backbone, 1, self.preset, size)
            except UserError as e:
                raise DataError(f"{flag}: {e}") from None

    def model_config(self, num_classes: int) -> ModelConfig:
        return model_config(self.backbone, num_classes, self.preset, self.image_size)


@dataclass
class BackboneCache:
    """Frozen backbones by working size, built once per run."""

    name: str
    weights: str | None
    device: torch.device
    built: dict[int, FrozenBackbone] = field(default_factory=dict)

    def get(self, size: int) -> FrozenBackbone:
        if size not in self.built:
            self.built[size] = build_backbone(self.name, size, self.weights).to(self.device)
        return self.built[size]


@dataclass(frozen=True)
class Cell:
    dataset: str
    train: Split
    test: Split
    shots: int
    model_cfg: ModelConfig
    adapt_cfg: AdaptConfig  # the run's config; each row applies its changes (``row_config``)
    probe_size: int  # working size of the linear probe and prototype baselines
    methods: tuple[str, ...] = BENCHMARK_METHODS
    per_class: bool = False  # shots = K images per foreground class (K x C in all) instead of K in all
    eval_size: int | None = None  # None: score at original resolution; N: ground truth resized to N x N
    teacher: Path | None = None  # starting teacher folder (meta-trained); None: random initialisation (seeded)
    teacher_label: str = "random"  # how results name that start
    draw: int = 0  # support draw: 0 = the protocol's midpoint set, 1.. = seeded random nested sets
    vote_chunk: int = VOTE_CHUNK  # teacher predictors vote over chunks of this many shots per class (0: all at once)
    max_unlabeled: int = 64  # rows with unlabeled images: at most this many train images outside the support
    scale: str | float = "auto"  # the pixel scale asked for (``adapt --scale``); each cell chooses from its support

    def seeded_methods(self) -> tuple[str, ...]:
        """The methods whose result depends on the adaptation seed (the others are deterministic given the support:
        the baselines, and the teacher before adaptation when it starts from a saved one)."""
        fixed = set(BASELINES) | ({"teacher"} if self.teacher is not None else set())
        return tuple(m for m in self.methods if m not in fixed)

    def support_stems(self) -> list[str]:
        """The cell's support set: the first K (K x C with ``per_class``) of the draw's nested order, the order
        ``distillfss adapt --shots K`` samples from a dataset's train split (draw 0)."""
        total = self.shots * self.train.num_classes if self.per_class else self.shots
        return sample_support([s.stem for s in self.train.samples], total, class_sets(self.train), self.draw)


@dataclass
class Prepared:
    """What a cell's seeds share: the support set, its encoding, the fast student's label probes and the
    seed-independent predictors (baselines; the starting teacher when it is a saved one), with their seconds."""

    stems: list[str]
    scale: float | None  # the pixel scale chosen from the support images (``tiling.choose_scale``)
    images: torch.Tensor
    labels: torch.Tensor
    support: EncodedSupport
    encode_seconds: float
    probes: LabelProbes | None = None
    probe_seconds: float = 0.0
    held_out: HeldOut | None = None  # the estimate's held-out counts (from the support set and the probes)
    held_out_seconds: float = 0.0
    fixed: dict[str, Predictor] = field(default_factory=dict)
    fixed_seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, dict] = field(default_factory=dict)  # the baselines' cross-validated choices
    # the seed-independent stages of the adaptations (``AdaptResult.stage``), by (row config without seed, start,
    # unlabeled), filled by the first seed and reused by the others
    stages: dict[tuple, TeacherStage] = field(default_factory=dict)


def run_seeds(
    cell: Cell, seeds: list[int], backbones: BackboneCache, log_to: LogTo | None = None
) -> tuple[list[dict], dict[str, Predictor]]:
    """A cell with every adaptation seed: all methods at the first seed, then only the seeded methods (the others
    would give the same numbers). Deterministic methods' rows carry ``seed: None``. Returns the rows and the first
    seed's predictors. ``log_to(name)``: the file each adaptation's training log is appended to (``name`` tells
    the seed and the rows)."""
    unknown = sorted(set(cell.methods) - set(ALL_METHODS))
    if unknown:
        raise DataError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    prep = prepare(cell, backbones)
    rows: list[dict] = []
    predictors: dict[str, Predictor] = {}
    for i, seed in enumerate(seeds):
        methods = cell.methods if i == 0 else cell.seeded_methods()
        if not methods:
            break
        run = dataclasses.replace(cell, adapt_cfg=dataclasses.replace(cell.adapt_cfg, seed=seed), methods=methods)
        seed_log = None if log_to is None else functools.partial(_prefixed, log_to, f"seed{seed}_")
        seed_rows, seed_predictors = run_cell(run, backbones, prep, seed_log)
        rows += seed_rows
        predictors = predictors or seed_predictors
    return rows, predictors


def prepare(cell: Cell, backbones: BackboneCache) -> Prepared:
    """The seed-independent part of a cell (see ``Prepared``)."""
    mcfg, device = cell.model_cfg, backbones.device
    stems = cell.support_stems()
    backbone = backbones.get(mcfg.image_size)
    files = [s.image for s in cell.train.samples if s.stem in stems]
    scale = choose_scale([image_size(f) for f in files], mcfg.image_size, cell.scale)
    images, labels, sources = load_support_tensors(cell.train, stems, mcfg.image_size, scale)
    images, labels = images.to(device), labels.to(device)
    t0 = time.perf_counter()
    support = encode_support(backbone, images, labels, mcfg.num_classes)
    prep = Prepared(stems, scale, images, labels, support, time.perf_counter() - t0)
    wanted = set(cell.methods)
    if "teacher" in wanted and cell.teacher is not None:
        prep.fixed["teacher"] = Predictor(_start(cell.teacher, backbone, cell), mcfg.image_size, support, scale=scale)
        prep.fixed_seconds["teacher"] = 0.0
    for name, cls in (("linear_probe", LinearProbe), ("prototype", PrototypeMatcher)):
        if name in wanted:
            pb = backbones.get(cell.probe_size)
            p_images, p_labels, _ = load_support_tensors(cell.train, stems, cell.probe_size)
            t0 = time.perf_counter()
            model = cls(pb, mcfg.num_classes).to(device)
            model.fit(p_images.to(device), p_labels.to(device))
            prep.fixed_seconds[name] = time.perf_counter() - t0
            prep.settings[name] = model.settings
            prep.fixed[name] = Predictor(model, cell.probe_size)
    if any(m in ROWS for m in wanted):
        # the probe baseline at the model's size is the fast student's full label probe (and the estimate's): fitted
        # once
        same = cell.probe_size == mcfg.image_size and "linear_probe" in prep.fixed
        full = prep.fixed["linear_probe"].model if same else None
        t0 = time.perf_counter()
        prep.probes = fit_label_probes(backbone, support, labels, full)  # type: ignore[arg-type]
        prep.probe_seconds = time.perf_counter() - t0 + (prep.fixed_seconds["linear_probe"] if same else 0.0)
        t0 = time.perf_counter()
        prep.held_out = held_out_counts(support, labels, prep.probes, sources)
        prep.held_out_seconds = time.perf_counter() - t0
    return prep


def run_cell(
    cell: Cell, backbones: BackboneCache, prep: Prepared | None = None, log_to: LogTo | None = None
) -> tuple[list[dict], dict[str, Predictor]]:
    """Adapt and evaluate every method of a cell at ``cell.adapt_cfg.seed`` -> (result rows, predictors by method).
    prep: the cell's ``prepare`` (computed here when None)."""
    prep = prep or prepare(cell, backbones)
    mcfg, device = cell.model_cfg, backbones.device
    backbone = backbones.get(mcfg.image_size)
    seeded_methods = set(cell.seeded_methods())
    predictors = {m: p for m, p in prep.fixed.items() if m in cell.methods}
    seconds = dict(prep.fixed_seconds)
    configs: dict[str, AdaptConfig] = {}
    plateaus: dict[str, tuple[tuple[int, float], ...]] = {}
    unlabeled_counts: dict[str, int] = {}
    estimates: dict[str, dict] = {}  # what adapt estimated from the support set alone, beside the test mIoU
    for m in (m for m in UNTRAINED if m in cell.methods and m not in predictors):  # a seeded random start
        predictors[m] = Predictor(_start(None, backbone, cell), mcfg.image_size, prep.support, scale=prep.scale)
        seconds[m] = 0.0

    # rows that need the same adaptation share one call of adapt()
    groups: dict[tuple, list[str]] = {}
    for m in (m for m in cell.methods if m in ROWS):
        spec = ROWS[m]
        cfg = row_config(cell.adapt_cfg, m)
        groups.setdefault((cfg, spec.start, spec.unlabeled), []).append(m)
    for (cfg, start, unlabeled), names in groups.items():
        if not any(ROWS[m].model == "student" for m in names):
            cfg = dataclasses.replace(cfg, method="transfer")
        pool = _unlabeled_pool(cell, prep.stems, mcfg.image_size, prep.scale) if unlabeled else None
        # a random start is built by adapt itself from the seed, as `distillfss adapt --teacher random` does
        teacher = _start(cell.teacher, backbone, cell) if start == "cell" and cell.teacher is not None else None
        tag = "_".join(names)
        key = (dataclasses.replace(cfg, seed=0), start, unlabeled)
        result = adapt(
            backbone,
            prep.images,
            prep.labels,
            mcfg,
            cfg,
            teacher=teacher,
            unlabeled=None if pool is None else pool.to(device),
            progress=False,
            log_path=None if log_to is None else log_to(tag),
            support=prep.support,
            probes=prep.probes,
            held_out=prep.held_out,
            stage=prep.stages.get(key),
        )
        if result.stage is not None:
            prep.stages[key] = result.stage
        # what adapt would have spent alone: encoding, and the probes and the estimate's counts it shares here
        shared = prep.held_out_seconds + (prep.probe_seconds if result.config.student == "fast" else 0.0)
        extra = prep.encode_seconds + shared
        for m in names:
            is_teacher = ROWS[m].model == "teacher"
            model = result.teacher if is_teacher else result.student
            assert model is not None
            support = prep.support if is_teacher else None
            predictors[m] = Predictor(model, mcfg.image_size, support, vote_chunk=cell.vote_chunk, scale=prep.scale)
            seconds[m] = (result.teacher_seconds + prep.encode_seconds) if is_teacher else (result.seconds + extra)
            configs[m] = result.config
            estimates[m] = result.estimate.to_dict()
            if unlabeled:
                unlabeled_counts[m] = 0 if pool is None else len(pool)
            focal = "focal_teacher" if is_teacher else "focal_student"
            plateaus[m] = tuple(
                (step, round(prep.encode_seconds + at, 2))
                for step, at in (plateau(result.log), plateau(result.log, key=focal))
            )

    base = {
        "dataset": cell.dataset,
        "shots": cell.shots,
        "draw": cell.draw,
        "shots_per_class": cell.per_class,
        "eval_resolution": cell.eval_size or "original",
        "support": prep.stems,
        "model": mcfg.to_dict(),
        "scale": prep.scale,
    }
    rows = []
    for method in cell.methods:
        ev = evaluate_predictor(predictors[method], cell.test, progress=False, eval_size=cell.eval_size)
        is_baseline = method in BASELINES
        rows.append(
            {
                **base,
                "method": method,
                "seed": cell.adapt_cfg.seed if method in seeded_methods else None,
                "miou": ev.miou,
                "miou_with_background": ev.miou_with_background,
                "per_class": ev.per_class,
                "adapt_seconds": round(seconds[method], 2),
                "ms_per_image": round(ev.seconds_per_image * 1000, 1),
                "n_images": ev.n_images,
                "adapt": configs[method].to_dict() if method in configs else None,
                "estimate": estimates.get(method),
                "unlabeled_images": unlabeled_counts.get(method),
                "baseline_settings": prep.settings.get(method),
                "image_size": cell.probe_size if is_baseline else mcfg.image_size,
                "teacher_init": None if is_baseline else (cell.teacher_label if "random" not in method else "random"),
                "vote_chunk": cell.vote_chunk if method.startswith(("teacher", "transferfss")) else None,
                # when the total loss, and the method's own segmentation (focal) loss, reached their plateau
                "plateau_step": plateaus[method][0][0] if method in plateaus else None,
                "plateau_seconds": plateaus[method][0][1] if method in plateaus else None,
                "plateau_step_segmentation": plateaus[method][1][0] if method in plateaus else None,
                "plateau_seconds_segmentation": plateaus[method][1][1] if method in plateaus else None,
            }
        )
    return rows, predictors


def _prefixed(log_to: LogTo, prefix: str, name: str) -> Path:
    return log_to(prefix + name)


def _unlabeled_pool(cell: Cell, support_stems: list[str], size: int, scale: float | None) -> torch.Tensor | None:
    """The train split's images outside the support set, as unlabeled images (masks never read); None when the
    support set took them all."""
    files = [s.image for s in cell.train.samples if s.stem in support_stems]
    if len(files) == len(cell.train.samples):
        return None
    folder = cell.train.samples[0].image.parent
    return load_unlabeled(folder, size, cell.max_unlabeled, exclude=files, scale=scale)[0]


def _start(folder: Path | None, backbone: FrozenBackbone, cell: Cell) -> Teacher:
    """A fresh copy of the cell's starting teacher: loaded from ``folder``, or randomly initialised from the seed
    (what ``adapt`` builds itself when given no teacher)."""
    device = next(backbone.parameters()).device
    if folder is not None:
        return load_teacher_weights(folder, backbone, cell.model_cfg).to(device)
    with seeded(cell.adapt_cfg.seed, device):
        return build_teacher(backbone, cell.model_cfg).to(device)
