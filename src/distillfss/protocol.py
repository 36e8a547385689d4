"""One evaluation cell of the protocol: a dataset, a fixed support set of K images, every method adapted on it
and evaluated on every test image. Shared by ``demo`` and ``benchmark``."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapt import AdaptResult, adapt, distill_fast, plateau, refine, seeded
from .backbones import FrozenBackbone, build_backbone
from .baselines import LinearProbe, PrototypeMatcher
from .config import REFINE_ITERATIONS, AdaptConfig, ModelConfig, model_config
from .data import DataError, Split, class_sets, load_support_tensors, load_unlabeled
from .evaluate import evaluate_predictor
from .model_io import load_teacher_weights
from .predictor import VOTE_CHUNK, Predictor
from .sampling import sample_support
from .teacher import Teacher, build_teacher, encode_support

METHODS = ("teacher", "transferfss", "distillfss", "linear_probe", "prototype")
# The same three methods started from a randomly initialised teacher (the comparison for a meta-trained start).
RANDOM_START = ("teacher_random", "transferfss_random", "distillfss_random")
# Ablations as their own rows (one table): suffix -> the adaptation settings it changes.
ABLATIONS: dict[str, dict] = {
    "_setB": {"trainable": "B"},
    "_setC": {"trainable": "C"},
    "_two_stage": {"mode": "two_stage"},
    "_nodistill": {"distill_weight": 0.0},
    "_coarsedrop": {"coarse_dropout": 0.3},
    # the training step with one of its fixes undone (config.LEGACY_STEPS): what each fix changed on its own
    "_old_shots": {"legacy": ("shots_without_class",)},
    "_old_self": {"legacy": ("self_in_softmax",)},
    "_old_target": {"legacy": ("student_relabelled",)},
    "_old_mse": {"legacy": ("mse_per_pair",)},
}
# The student refined after adaptation (adapt.refine): on augmented support views only (--views, "flips" when that
# says none), and on the support images plus the train split's images outside the support set as unlabeled images
# (their masks are never read; test images are never used).
# The fast student (--student fast) distilled from the same adapted teacher: on augmented support views, and on
# those plus the unlabeled train images as above; _teacheronly / _joint distil it from a teacher adapted alone / beside
# the paper's student, whatever --fast-teacher-stage says; _labelmean: with --label-views mean; _ema: with --fast-ema;
# _probelabels / _teacherlabels: with --fast-labels teacher+probe / teacher.
FAST = (
    "distillfss_fast",
    "distillfss_fast_unlabeled",
    "distillfss_fast_crops",
    "distillfss_fast_teacheronly",
    "distillfss_fast_joint",
    "distillfss_fast_labelmean",
    "distillfss_fast_unlabeled_labelmean",
    "distillfss_fast_ema",
    "distillfss_fast_unlabeled_ema",
    "distillfss_fast_probelabels",
    "distillfss_fast_unlabeled_probelabels",
    "distillfss_fast_teacherlabels",
    "distillfss_fast_unlabeled_teacherlabels",
)
FAST_CROPS = 4  # distillfss_fast_crops: random crops per support image when --fast-crops says none
FAST_EMA = 0.98  # distillfss_fast_ema, _fast_unlabeled_ema: the weights' moving average when --fast-ema says none
# What a fast-student row's suffix sets, whatever the flags say.
FAST_SUFFIXES: dict[str, dict] = {
    "_labelmean": {"label_views": "mean"},
    "_probelabels": {"fast_labels": "teacher+probe"},
    "_teacherlabels": {"fast_labels": "teacher"},
}


def takes_unlabeled(method: str) -> bool:
    """Whether a benchmark row learns from the train split's images outside the support set as unlabeled images."""
    return "_unlabeled" in method


REFINED = ("distillfss_views", "distillfss_unlabeled", *FAST)
# Test-time augmentation rows: the model of the row named before "_tta", evaluated with ``Predictor.with_tta(TTA)``
# (the class probabilities averaged over the image's flips, mapped back); the probe's for a like-for-like comparison.
TTA = "flips"
TTA_ROWS = ("distillfss_fast_tta", "distillfss_fast_unlabeled_tta", "linear_probe_tta")
ALL_METHODS = (
    METHODS
    + RANDOM_START
    + tuple(f"{m}{suffix}" for suffix in ABLATIONS for m in ("transferfss", "distillfss"))
    + REFINED
    + TTA_ROWS
)


def untta(method: str) -> str:
    """The row whose model a test-time-augmentation row evaluates (the method itself for any other row)."""
    return method.removesuffix("_tta") if method in TTA_ROWS else method


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
    adapt_cfg: AdaptConfig
    probe_size: int  # working size of the linear probe and prototype baselines
    methods: tuple[str, ...] = METHODS
    per_class: bool = False  # shots = K images per foreground class (K x C in all) instead of K in all
    eval_size: int | None = None  # None: score at original resolution; N: ground truth resized to N x N
    teacher: Path | None = None  # starting teacher folder (meta-trained); None: random initialisation (seeded)
    teacher_label: str = "random"  # how results name that start
    draw: int = 0  # support draw: 0 = the protocol's midpoint set, 1.. = seeded random nested sets
    vote_chunk: int = VOTE_CHUNK  # teacher predictors vote over chunks of this many shots per class (0: all at once)
    max_unlabeled: int = 64  # distillfss_unlabeled: at most this many train images outside the support

    def seeded_methods(self) -> tuple[str, ...]:
        """The methods whose result depends on the adaptation seed (the others are deterministic given the support:
        the baselines, and the teacher before adaptation when it starts from a saved one)."""
        fixed = {"linear_probe", "prototype"} | ({"teacher"} if self.teacher is not None else set())
        return tuple(m for m in self.methods if untta(m) not in fixed)


def run_seeds(
    cell: Cell, seeds: list[int], backbones: BackboneCache, log_path: Path | None = None
) -> tuple[list[dict], dict[str, Predictor]]:
    """A cell with every adaptation seed: all methods at the first seed, then only the seeded methods (the others
    would give the same numbers). Deterministic methods' rows carry ``seed: None``. Returns the rows and the first
    seed's predictors."""
    rows: list[dict] = []
    predictors: dict[str, Predictor] = {}
    for i, seed in enumerate(seeds):
        methods = cell.methods if i == 0 else cell.seeded_methods()
        if not methods:
            break
        run = dataclasses.replace(cell, adapt_cfg=dataclasses.replace(cell.adapt_cfg, seed=seed), methods=methods)
        log = _log_file(log_path, f"_seed{seed}")
        seed_rows, seed_predictors = run_cell(run, backbones, log_path=log)
        rows += seed_rows
        predictors = predictors or seed_predictors
    return rows, predictors


def run_cell(cell: Cell, backbones: BackboneCache, log_path: Path | None = None) -> tuple[list[dict], dict]:
    """Adapt and evaluate every method of a cell -> (result rows, predictors by method)."""
    unknown = sorted(set(cell.methods) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    mcfg, acfg, device = cell.model_cfg, cell.adapt_cfg, backbones.device
    total = cell.shots * cell.train.num_classes if cell.per_class else cell.shots
    # The alternating, class-stratified sampler gives every class one image per round: its first K x C picks
    # hold K images of each class (while a class has images left), nested in K like the rest.
    stems = sample_support([s.stem for s in cell.train.samples], total, class_sets(cell.train), cell.draw)
    seeded_methods = set(cell.seeded_methods())
    base = {
        "dataset": cell.dataset,
        "shots": cell.shots,
        "draw": cell.draw,
        "shots_per_class": cell.per_class,
        "eval_resolution": cell.eval_size or "original",
        "support": stems,
        "model": mcfg.to_dict(),
    }
    predictors: dict[str, Predictor] = {}
    seconds: dict[str, float] = {}
    sizes: dict[str, int] = {}
    inits: dict[str, str] = {}  # where each teacher-based method started
    wanted = {untta(m) for m in cell.methods}  # a _tta row needs its model

    plateaus: dict[str, tuple[tuple[int, float], ...]] = {}
    unlabeled_counts: dict[str, int] = {}
    adapt_cfgs: dict[str, AdaptConfig] = {}
    variants = {"": (cell.teacher, cell.teacher_label, {}), "_random": (None, "random", {})}
    variants.update({suffix: (cell.teacher, cell.teacher_label, change) for suffix, change in ABLATIONS.items()})
    encoded = None
    for suffix, (start, label, change) in variants.items():
        names = {f"teacher{suffix}", f"transferfss{suffix}", f"distillfss{suffix}"} & set(ALL_METHODS)
        refined = wanted & set(REFINED) if suffix == "" else set()
        if not wanted & names and not refined:
            continue
        backbone = backbones.get(mcfg.image_size)
        if encoded is None:
            images, labels = load_support_tensors(cell.train, stems, mcfg.image_size)
            images, labels = images.to(device), labels.to(device)
            t0 = time.perf_counter()
            support = encode_support(backbone, images, labels, mcfg.num_classes)  # shared by the teacher and adapt
            encoded = (images, labels, support, time.perf_counter() - t0)
        images, labels, support, encode_seconds = encoded

        for m in names:
            inits[m] = label
            sizes[m] = mcfg.image_size
        if f"teacher{suffix}" in wanted:
            predictors[f"teacher{suffix}"] = Predictor(
                _start(start, backbone, cell), mcfg.image_size, support, vote_chunk=cell.vote_chunk
            )
            seconds[f"teacher{suffix}"] = 0.0
        if wanted & {f"transferfss{suffix}", f"distillfss{suffix}"} or refined:
            # which teacher each fast row distils from: the joint stage's (beside the paper's student) or one
            # trained alone (a transfer adaptation); the paper's rows and the refined ones need the joint stage
            fast_stage = {n: _fast_teacher_stage(n, acfg) for n in refined & set(FAST)}
            joint = f"distillfss{suffix}" in wanted or bool(refined - set(FAST)) or "joint" in fast_stage.values()
            method = "distill" if joint else "transfer"
            # the paper's rows have no refinement; the refined rows continue from their student
            cfg = AdaptConfig.from_dict({**acfg.to_dict(), **change, "method": method, "refine_iterations": 0})
            adapt_cfgs[f"transferfss{suffix}"] = adapt_cfgs[f"distillfss{suffix}"] = cfg
            result = _adapt_from(start, cell, backbone, encoded, cfg, _log_file(log_path, suffix))
            predictors[f"transferfss{suffix}"] = Predictor(
                result.teacher, mcfg.image_size, support, vote_chunk=cell.vote_chunk
            )
            if result.student is not None:
                predictors[f"distillfss{suffix}"] = Predictor(result.student, mcfg.image_size)
            seconds[f"transferfss{suffix}"] = seconds[f"distillfss{suffix}"] = encode_seconds + result.seconds
            teachers = {method: (result.teacher, seconds[f"distillfss{suffix}"])}  # the fast rows' starting points
            if "teacher" in fast_stage.values() and "transfer" not in teachers:
                solo_cfg = dataclasses.replace(cfg, method="transfer")
                solo = _adapt_from(start, cell, backbone, encoded, solo_cfg, _log_file(log_path, "_teacheronly"))
                teachers["transfer"] = (solo.teacher, encode_seconds + solo.seconds)
            for name in sorted(refined):
                t0 = time.perf_counter()
                pool = None
                if takes_unlabeled(name):
                    pool = _unlabeled_pool(cell, stems, mcfg.image_size)
                    unlabeled_counts[name] = 0 if pool is None else len(pool)
                    pool = None if pool is None else pool.to(device)
                log_file = _log_file(log_path, f"_{name}")
                start_seconds = seconds["distillfss"]
                if name in FAST:
                    rcfg = dataclasses.replace(
                        acfg,
                        student="fast",
                        method="distill",
                        refine_iterations=0,
                        fast_teacher_stage=fast_stage[name],
                    )
                    if name == "distillfss_fast_crops" and rcfg.fast_crops == 0:
                        rcfg = dataclasses.replace(rcfg, fast_crops=FAST_CROPS)  # the row's point: crops
                    if name.endswith("_ema") and rcfg.fast_ema == 0:
                        rcfg = dataclasses.replace(rcfg, fast_ema=FAST_EMA)
                    for suffix, change in FAST_SUFFIXES.items():
                        if name.endswith(suffix):
                            rcfg = dataclasses.replace(rcfg, **change)
                    stage_method = "distill" if fast_stage[name] == "joint" else "transfer"
                    fast_teacher, start_seconds = teachers[stage_method]
                    student, rlog = distill_fast(
                        fast_teacher, support, images, labels, rcfg, pool, progress=False, log_path=log_file
                    )
                else:
                    assert result.student is not None
                    rcfg = dataclasses.replace(
                        acfg, refine_iterations=acfg.refine_iterations or REFINE_ITERATIONS, method="distill"
                    )
                    if name == "distillfss_views" and rcfg.views == "none":
                        rcfg = dataclasses.replace(rcfg, views="flips")  # the row's point: augmented support views
                    student, rlog = refine(
                        result.teacher,
                        result.student,  # type: ignore[arg-type]
                        support,
                        images,
                        labels,
                        rcfg,
                        pool,
                        progress=False,
                        log_path=log_file,
                    )
                predictors[name] = Predictor(student, mcfg.image_size)
                seconds[name] = start_seconds + time.perf_counter() - t0
                adapt_cfgs[name] = rcfg
                inits[name], sizes[name] = label, mcfg.image_size
                plateaus[name] = tuple(
                    (step, round(start_seconds + at, 2))
                    for step, at in (plateau(rlog), plateau(rlog, key="focal_student"))
                )
            for m, seg_key in ((f"transferfss{suffix}", "focal_teacher"), (f"distillfss{suffix}", "focal_student")):
                plateaus[m] = tuple(
                    (step, round(encode_seconds + at, 2))
                    for step, at in (plateau(result.log), plateau(result.log, key=seg_key))
                )

    settings: dict[str, dict] = {}  # the baselines' cross-validated choices
    if wanted & {"linear_probe", "prototype"}:
        pb = backbones.get(cell.probe_size)
        p_images, p_labels = load_support_tensors(cell.train, stems, cell.probe_size)
        p_images, p_labels = p_images.to(device), p_labels.to(device)
        for name, cls in (("linear_probe", LinearProbe), ("prototype", PrototypeMatcher)):
            if name in wanted:
                t0 = time.perf_counter()
                model = cls(pb, mcfg.num_classes).to(device)
                model.fit(p_images, p_labels)
                seconds[name] = time.perf_counter() - t0
                settings[name] = model.settings
                predictors[name] = Predictor(model, cell.probe_size)
                sizes[name] = cell.probe_size

    for method in [m for m in cell.methods if m in TTA_ROWS]:  # the same model, evaluated with test-time augmentation
        of = untta(method)
        predictors[method] = predictors[of].with_tta(TTA)
        for record in (seconds, adapt_cfgs, inits, sizes, settings, plateaus, unlabeled_counts):
            if of in record:
                record[method] = record[of]  # type: ignore[index]

    rows = []
    for method in cell.methods:
        ev = evaluate_predictor(predictors[method], cell.test, progress=False, eval_size=cell.eval_size)
        rows.append(
            {
                **base,
                "method": method,
                "seed": acfg.seed if method in seeded_methods else None,
                "miou": ev.miou,
                "miou_with_background": ev.miou_with_background,
                "per_class": ev.per_class,
                "adapt_seconds": round(seconds[method], 2),
                "ms_per_image": round(ev.seconds_per_image * 1000, 1),
                "n_images": ev.n_images,
                "adapt": adapt_cfgs[method].to_dict() if method in adapt_cfgs else None,
                "unlabeled_images": unlabeled_counts.get(method),
                "baseline_settings": settings.get(method),
                "image_size": sizes[method],
                "teacher_init": inits.get(method),
                "vote_chunk": cell.vote_chunk if method.startswith(("teacher", "transferfss")) else None,
                "tta": predictors[method].tta,
                # when the total loss, and the method's own segmentation (focal) loss, reached their plateau
                "plateau_step": plateaus[method][0][0] if method in plateaus else None,
                "plateau_seconds": plateaus[method][0][1] if method in plateaus else None,
                "plateau_step_segmentation": plateaus[method][1][0] if method in plateaus else None,
                "plateau_seconds_segmentation": plateaus[method][1][1] if method in plateaus else None,
            }
        )
    return rows, predictors


def _log_file(log_path: Path | None, suffix: str) -> Path | None:
    """The training log of one adaptation in a cell: ``log_path`` with ``suffix`` after its stem."""
    return log_path.with_name(f"{log_path.stem}{suffix}{log_path.suffix}") if log_path else None


def _adapt_from(
    start: Path | None,
    cell: Cell,
    backbone: FrozenBackbone,
    encoded: tuple,
    cfg: AdaptConfig,
    log_file: Path | None,
) -> AdaptResult:
    """Adapt a fresh copy of the cell's starting teacher on its support set (``encoded``: images, labels, their
    encoding, its seconds)."""
    images, labels, support, _ = encoded
    teacher = _start(start, backbone, cell)
    return adapt(backbone, images, labels, cell.model_cfg, cfg, teacher=teacher, log_path=log_file, support=support)


def _fast_teacher_stage(name: str, acfg: AdaptConfig) -> str:
    """What trains before a fast row's distillation: ``distillfss_fast_teacheronly`` the teacher alone,
    ``distillfss_fast_joint`` the teacher beside the paper's student, the other fast rows what ``--fast-teacher-stage``
    says."""
    named = {"distillfss_fast_teacheronly": "teacher", "distillfss_fast_joint": "joint"}
    return named.get(name, acfg.fast_teacher_stage)


def _unlabeled_pool(cell: Cell, support_stems: list[str], size: int) -> torch.Tensor | None:
    """The train split's images outside the support set, as unlabeled images (masks never read); None when the
    support set took them all."""
    files = [s.image for s in cell.train.samples if s.stem in support_stems]
    if len(files) == len(cell.train.samples):
        return None
    folder = cell.train.samples[0].image.parent
    return load_unlabeled(folder, size, cell.max_unlabeled, exclude=files)[0]


def _start(folder: Path | None, backbone: FrozenBackbone, cell: Cell) -> Teacher:
    """A fresh copy of the cell's starting teacher: loaded from ``folder``, or randomly initialised from the seed."""
    device = next(backbone.parameters()).device
    if folder is not None:
        return load_teacher_weights(folder, backbone, cell.model_cfg).to(device)
    with seeded(cell.adapt_cfg.seed, device):
        return build_teacher(backbone, cell.model_cfg).to(device)
