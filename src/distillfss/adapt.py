"""``adapt``: the one function that turns a support set and an ``AdaptConfig`` into an adapted teacher and a
student. ``distillfss adapt``, ``FewShotSegmenter.fit``, the app and every benchmark row call it.

Stages, all from one seeded random state (so a run depends on its inputs and ``cfg.seed`` only):

1. **TransferFSS** (``transfer``): the teacher is fine-tuned on episodes built from the support images; with the
   paper's student, that student trains beside it (``mode`` joint, the original's loss) or after it (two_stage).
2. **DistillFSS**: the fast student (default, ``fast``) is distilled from the frozen, adapted teacher on a bank of
   views of the support and unlabeled images; or the paper's student is refined on unlabeled images (``refine``).
3. **The estimate** of the model's mIoU on new images, from the support set alone (``estimate``).

A warm start (``adapt --from``) passes the earlier adaptation's teacher, student and probe settings.

Nothing the caller passes in is changed: the starting teacher is copied (its backbone shared, frozen, never moved:
it must already be on the images' device), and the run's random state and deterministic-algorithms setting are
private to it (``seeded``), whichever entry point calls it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .backbones import FrozenBackbone, check_on, place
from .baselines import QUICK
from .config import AdaptConfig, ModelConfig
from .errors import UserError
from .estimate import Estimate, HeldOut, estimate_accuracy
from .fast import LabelProbes, distill_fast, fit_label_probes
from .refine import refine
from .student import FastStudent, Student, build_student
from .teacher import EncodedSupport, Teacher, build_teacher, encode_support
from .transfer import private_copy, seeded, step_log, train_stage


@dataclass
class AdaptResult:
    teacher: Teacher  # the adapted teacher (eval mode)
    student: Student | FastStudent | None  # None for method "transfer"
    log: list[dict]  # one row per optimizer step
    seconds: float  # wall time of the whole adaptation, support encoding included
    teacher_seconds: float  # ... until the teacher's stage ended (what TransferFSS alone costs)
    config: AdaptConfig  # the config as run (``AdaptConfig.for_unlabeled`` applied)
    estimate: Estimate  # the expected mIoU on new images, from the support set alone (``estimate``)
    probe_settings: dict  # the label probe's settings (chosen by cross-validation on the support set)


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
) -> AdaptResult:
    """Fine-tune a teacher on a support set and (``cfg.method == 'distill'``) distil a student.

    Args:
        backbone: the frozen backbone (shared by teacher and student).
        images: (M, 3, S, S) support images in [0, 1]; labels: (M, S, S) long, 0 = background, 255 = ignore.
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
        held_out: the estimate's held-out counts (``estimate.held_out_counts``) from the same support and probes,
            which do not depend on the seed either (computed here when None; the same result).
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
    t0 = time.perf_counter()
    device = images.device
    check_on(backbone, device)
    with seeded(cfg.seed, device), step_log(log_path, t0, on_step) as (record, rows):
        gen = torch.Generator().manual_seed(cfg.seed)
        teacher = place(build_teacher(backbone, model_cfg) if teacher is None else private_copy(teacher), device)
        if support is None:
            support = encode_support(backbone, images, labels, model_cfg.num_classes)
        paper = None
        if cfg.method == "distill" and cfg.student == "paper":
            paper = place(build_student(backbone, teacher.decoder, model_cfg.num_classes), device)
        joint = paper if cfg.mode == "joint" else None
        train_stage(teacher, joint, support, labels, cfg, cfg.iterations, "teacher", gen, progress, record)
        if paper is not None and cfg.mode == "two_stage":
            steps = cfg.iterations if cfg.student_iterations is None else cfg.student_iterations
            train_stage(teacher, paper, support, labels, cfg, steps, "student", gen, progress, record)
        teacher.eval()
        teacher_seconds = time.perf_counter() - t0
        student: Student | FastStudent | None = paper
        if probes is None:  # the fast student's labellers (their settings searched), else the estimate's (fixed)
            fast = cfg.method == "distill" and cfg.student == "fast"
            probes = fit_label_probes(backbone, support, labels, settings=probe_settings or (None if fast else QUICK))
        if cfg.method == "distill" and cfg.student == "fast":
            student = distill_fast(
                teacher, support, images, labels, cfg, unlabeled, probes, gen, progress, record, student_init
            )
        elif paper is not None and cfg.refine_iterations:
            student = refine(teacher, paper, support, images, labels, cfg, unlabeled, gen, progress, record)
        estimate = estimate_accuracy(support, labels, probes, cfg.seed, held_out)
    if student is not None:
        student.eval()
    return AdaptResult(
        teacher, student, rows, time.perf_counter() - t0, teacher_seconds, cfg, estimate, probes.full.settings
    )
