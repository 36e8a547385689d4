"""The paper student's refinement on unlabeled images (``AdaptConfig.refine_iterations`` > 0, after its training
beside the teacher): the adapted teacher, now frozen, labels a bank of the support images and the unlabeled images
under the domain's symmetries (see ``views``); the student -- its ConvDist heads and its own copy of the decoder's
set-A modules, the teacher's decoder untouched -- then learns from minibatches of that bank: the focal loss on
support views' true labels, the teacher's soft labels on unlabeled views, the coarse-map MSE on every view."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .config import AdaptConfig
from .student import Student
from .symmetry import VIEWS
from .teacher import EncodedSupport, Teacher
from .transfer import TRAINABLE_SETS, Record
from .views import fit_on_bank, view_bank


def refine(
    teacher: Teacher,
    student: Student,
    support: EncodedSupport,
    images: Tensor,
    labels: Tensor,
    cfg: AdaptConfig,
    unlabeled: Tensor | None,
    gen: torch.Generator,
    progress: bool,
    record: Record,
) -> Student:
    """A new student refined from ``student`` (left unchanged; the new one shares only the frozen backbone).
    images: (M, 3, S, S) support images; labels: (M, S, S); unlabeled: (U, 3, S, S) or None."""
    bank = view_bank(teacher, support, images, labels, (0,), unlabeled, VIEWS[cfg.views])
    new = Student(student.backbone, copy.deepcopy(student.heads), copy.deepcopy(student.decoder))
    params = [p for n, p in new.named_parameters() if n.startswith(("heads.", *TRAINABLE_SETS["A"]))]
    fit_on_bank(new, params, bank, labels, cfg, cfg.refine_iterations or 0, "refine", False, gen, progress, record)
    return new
