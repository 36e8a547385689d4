"""``adapt``: the one function that turns a support set and an ``AdaptConfig`` into an adapted teacher and a
student. ``distillfss adapt``, ``FewShotSegmenter.fit``, the app and every benchmark row call it.

Stages, all from one seeded random state (so a run depends on its inputs and ``cfg.seed`` only):

1. **TransferFSS** (``transfer``): the teacher is fine-tuned on episodes built from the support images; with the
   paper's student, that student trains beside it (``mode`` joint, the original's loss) or after it (two_stage).
2. **DistillFSS**: the fast student (default, ``fast``) is distilled from the frozen, adapted teacher on a bank of
   views of the support and unlabeled images; or the paper's student is refined on unlabeled images (``refine``).
3. **The estimate** of the model's mIoU on new images, from the support set alone (``estimate``).

A warm start (``adapt --from``) passes the earlier adaptation's teacher, student and probe settings.

With the defaults (a saved starting teacher, fixed leave-one-out episodes, no dropout) nothing before the student's
first step draws a random number: the adapted teacher and the fast student's labelled bank are the same for every
seed. ``AdaptResult.stage`` then holds them, and a call that differs only in its seed reuses them (``stage=``) with
bit-identical results: the demo and the benchmark adapt a support set once per seed that way.

Nothing the caller passes in is changed: the starting teacher is copied (its backbone shared, frozen, never moved:
it must already be on the images' device), and the run's random state and deterministic-algorithms setting are
private to it (``seeded``), whichever entry point calls it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from .backbones import FrozenBackbone, check_on, place
from .baselines import QUICK
from .config import AdaptConfig, ModelConfig
from .errors import UserError
from .estimate import Estimate, HeldOut, estimate_accuracy, held_out_counts
from .fast import LabelProbes, distill_fast, fast_bank, fit_label_probes
from .model_io import own_state
from .refine import refine
from .student import FastStudent, Student, build_student
from .teacher import EncodedSupport, Teacher, build_teacher, encode_support
from .transfer import private_copy, seeded, step_log, train_stage
from .views import ViewBank


@dataclass
class AdaptResult:
    teacher: Teacher  # the adapted teacher (eval mode)
    student: Student | FastStudent | None  # None for method "transfer"
    log: list[dict]  # one row per optimizer step
    seconds: float  # wall time of the whole adaptation, support encoding included (a reused stage: as it ran)
    teacher_seconds: float  # ... until the teacher's stage ended (what TransferFSS alone costs)
    config: AdaptConfig  # the config as run (``AdaptConfig.for_unlabeled`` applied)
    estimate: Estimate  # the expected mIoU on new images, from the support set alone (``estimate``)
    probe_settings: dict  # the label probe's settings (chosen by cross-validation on the support set)
    stage: TeacherStage | None = None  # what another seed may reuse; None when the stage drew random numbers


@dataclass(frozen=True)
class TeacherStage:
    """An adaptation's seed-independent part (see the module docstring): its adapted teacher, that stage's log
    rows and seconds, the fast student's bank and the seconds it took (None for other students), and what it was
    computed from, so that ``adapt(stage=...)`` refuses other inputs."""

    config: AdaptConfig  # seed 0
    inputs: tuple[Tensor | None, ...]  # support images, labels, unlabeled images
    start: dict[str, Tensor]  # the starting teacher's state
    probe_settings: dict | None  # the label probes' (the bank's second labeller), None without a bank
    teacher: Teacher
    rows: tuple[dict, ...]
    teacher_seconds: float
    bank: ViewBank | None
    bank_seconds: float

    def check(self, cfg: AdaptConfig, inputs: tuple[Tensor | None, ...], start: Teacher | None) -> None:
        """Raise ``ValueError`` unless a call with these arguments would compute this stage (the probes are
        checked by ``check_probes`` once known)."""
        same = (
            replace(cfg, seed=0) == self.config
            and start is not None
            and _same_state(own_state(start), self.start)
            and all(_same(a, b) for a, b in zip(inputs, self.inputs, strict=True))
        )
        if not same:
            raise ValueError("stage: computed from other inputs, config or starting teacher than this call's")

    def check_probes(self, probes: LabelProbes) -> None:
        """Raise ``ValueError`` unless the bank's second labeller had these probes' settings."""
        if self.bank is not None and probes.full.settings != self.probe_settings:
            raise ValueError("stage: its bank was labelled with other inputs (probe settings) than this call's")


def adapt(
    backbone: FrozenBackbone,
    images: Tensor,
    labels: Tensor,
    model_cfg: ModelConfig,
    cfg: AdaptConfig,
    teacher: Teacher | None = None,
    unlabeled: Tensor | None = None,
    progress: bool = True,
    log_path: Path | None = None,
    on_step: Callable[[dict], None] | None = None,
    support: EncodedSupport | None = None,
    probes: LabelProbes | None = None,
    student_init: FastStudent | None = None,
    probe_settings: dict | None = None,
    held_out: HeldOut | None = None,
    stage: TeacherStage | None = None,
    sources: Tensor | None = None,
) -> AdaptResult:
    """Fine-tune a teacher on a support set and (``cfg.method == 'distill'``) distil a student.

    Args:
        backbone: the frozen backbone (shared by teacher and student).
        images: (M, 3, S, S) support images in [0, 1]; labels: (M, S, S) long, 0 = background, 255 = ignore.
        sources: (M,) long, the support image each of them is a window of (``load_support_tensors``), when large
            images were cut into windows: the estimate holds out an image's windows together and counts images.
            None: every entry is an image of its own.
        teacher: the starting teacher (e.g. the shipped meta-trained one; copied, never changed); a fresh one
            initialised from ``cfg.seed`` when None.
        unlabeled: (U, 3, S, S) images of the target domain without masks; the student learns from the adapted
            teacher's labels of them.
        log_path: where to append one JSON line per step; on_step: called with each row (an exception stops the run).
        support, probes: the support images already encoded by ``backbone`` (``encode_support``) and the fast
            student's label probes fitted on them (``fit_label_probes``); both depend on the support set only, so a
            caller adapting the same set several times computes them once. Computed here when None; the result is
            the same either way.
        student_init: warm start (``adapt --from``): the fast student distils from a copy of this one (an earlier
            adaptation's, same classes) instead of a fresh one; ``teacher`` is then that adaptation's teacher, and
            ``probe_settings`` its label probe's settings (``AdaptResult.probe_settings``: no new search).
        held_out: the estimate's held-out counts (``estimate.held_out_counts``) from the same support, sources and
            probes, which do not depend on the seed either (computed here when None; the same result).
        stage: ``AdaptResult.stage`` of a call with the same arguments but the seed: its adapted teacher and bank
            are used instead of computing them again (the same result; ``seconds`` and the log count the stage's
            seconds as measured when it ran, its log rows are marked ``reused``).
    """
    cfg = cfg.for_unlabeled(unlabeled is not None)
    if student_init is not None:
        if cfg.method != "distill" or cfg.student != "fast":
            raise UserError("a warm start continues the fast student: use method distill with student fast")
        if student_init.num_classes != model_cfg.num_classes:
            raise UserError(
                f"warm start: the earlier model has {student_init.num_classes} class(es), this support set "
                f"{model_cfg.num_classes}; adapt from the starting teacher instead"
            )
    clock = Clock()
    start = teacher
    device = images.device
    check_on(backbone, device)
    fast = cfg.method == "distill" and cfg.student == "fast"
    inputs = (images, labels, unlabeled)
    if stage is not None:  # refused before anything is logged; probes fitted below are checked once they exist
        stage.check(cfg, inputs, teacher)
        if probes is not None:
            stage.check_probes(probes)
    with seeded(cfg.seed, device), step_log(log_path, clock, on_step) as (record, rows):
        gen = torch.Generator().manual_seed(cfg.seed)
        draws = _random_states(gen, device)
        if support is None:  # deterministic: draws no random number
            support = encode_support(backbone, images, labels, model_cfg.num_classes)
        paper = None
        if stage is not None:  # the same teacher stage, computed by an earlier call
            teacher = private_copy(stage.teacher)
            clock.credit += stage.teacher_seconds
            for row in stage.rows:
                record({**row, "reused": True}, stamp=False)
        else:
            teacher = place(build_teacher(backbone, model_cfg) if teacher is None else private_copy(teacher), device)
            if cfg.method == "distill" and cfg.student == "paper":
                paper = place(build_student(backbone, teacher.decoder, model_cfg.num_classes), device)
            joint = paper if cfg.mode == "joint" else None
            train_stage(teacher, joint, support, labels, cfg, cfg.iterations, "teacher", gen, progress, record)
            if paper is not None and cfg.mode == "two_stage":
                steps = cfg.iterations if cfg.student_iterations is None else cfg.student_iterations
                train_stage(teacher, paper, support, labels, cfg, steps, "student", gen, progress, record)
            teacher.eval()
        teacher_seconds = clock()
        stage_rows = tuple(rows)
        student: Student | FastStudent | None = paper
        if probes is None:  # the fast student's labellers (their settings searched), else the estimate's (fixed)
            probes = fit_label_probes(backbone, support, labels, settings=probe_settings or (None if fast else QUICK))
        bank, bank_seconds = None, 0.0
        if fast and stage is not None:
            stage.check_probes(probes)
            bank, bank_seconds = stage.bank, stage.bank_seconds
            clock.credit += bank_seconds
        elif fast:
            t_bank = clock()
            bank = fast_bank(teacher, support, images, labels, cfg, unlabeled, probes)
            bank_seconds = clock() - t_bank
        if stage is None and start is not None and _same_all(_random_states(gen, device), draws):
            stage = TeacherStage(
                replace(cfg, seed=0),
                tuple(None if t is None else t.clone() for t in inputs),  # copies: the caller may change its own
                {k: v.clone() for k, v in own_state(start).items()},
                probes.full.settings if fast else None,
                private_copy(teacher),
                stage_rows,
                teacher_seconds,
                bank,
                bank_seconds,
            )
        if fast:
            assert bank is not None
            student = distill_fast(teacher, bank, labels, cfg, probes, gen, progress, record, student_init)
        elif paper is not None and cfg.refine_iterations:
            student = refine(teacher, paper, support, images, labels, cfg, unlabeled, gen, progress, record)
        if held_out is None:
            held_out = held_out_counts(support, labels, probes, sources)
        estimate = estimate_accuracy(support, labels, probes, cfg.seed, held_out)
    if student is not None:
        student.eval()
    return AdaptResult(teacher, student, rows, clock(), teacher_seconds, cfg, estimate, probes.full.settings, stage)


class Clock:
    """Seconds since it was made, plus ``credit``: the seconds of work an adaptation reused instead of redoing."""

    def __init__(self) -> None:
        self.t0, self.credit = time.perf_counter(), 0.0

    def __call__(self) -> float:
        return time.perf_counter() - self.t0 + self.credit


def _random_states(gen: torch.Generator, device: torch.device) -> list[Tensor]:
    """The states of every generator an adaptation draws from (its own, torch's default, the device's)."""
    states = [gen.get_state(), torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    """Both None, or equal tensors (shape and values)."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def _same_all(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
