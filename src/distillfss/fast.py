"""The fast student's distillation: a fresh ``FastStudent`` (classes as channels, its own slim decoder) learns from
the frozen, adapted teacher on a bank of views (``views``: the support images and any unlabeled images, each under
the domain's symmetries) for ``AdaptConfig.fast_iterations`` steps.

Its soft labels on every view are the mean of two labellers' class probabilities: the adapted teacher's, and a
linear probe's on the same frozen features (``LabelProbes``: the ``linear_probe`` baseline, its feature levels, L2
strength and class weighting chosen by cross-validation on the support set, at the model's size). A support
image's views are labelled by a probe fitted without that image (its settings kept), as the teacher's labels leave
the image out of the shots; unlabeled views by the probe fitted on them all. It also learns the focal loss on the
support views' true labels and the coarse-map MSE to the teacher."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .backbones import FrozenBackbone, place
from .baselines import LinearProbe, fixed_probe
from .config import AdaptConfig
from .student import FastStudent, build_fast_student
from .symmetry import VIEWS
from .teacher import EncodedSupport, Teacher
from .transfer import Record, select
from .views import ENCODE_CHUNK, ViewBank, fit_on_bank, view_bank


@dataclass
class LabelProbes:
    """The fast student's second labeller, fitted on the support set: ``full`` on every support image, and
    ``without[i]`` on every image but i with ``full``'s settings (``without`` is empty for a single image: its views
    are labelled by ``full``). Depends only on the support set, never on the seed."""

    full: LinearProbe
    without: list[LinearProbe]

    def for_source(self, source: int) -> LinearProbe:
        return self.without[source] if source >= 0 and self.without else self.full


@torch.no_grad()
def fit_label_probes(
    backbone: FrozenBackbone,
    support: EncodedSupport,
    labels: Tensor,
    full: LinearProbe | None = None,
    settings: dict | None = None,
) -> LabelProbes:
    """The probes of ``LabelProbes`` on the encoded support images (``labels`` (M, S, S) long, 255 = ignore).
    full: the probe already fitted (with its cross-validation) on these images at this size, if the caller has it.
    settings: fixed probe settings (``l2``, ``levels``, ``balanced``; a warm start's, chosen by the earlier
    adaptation's cross-validation), which is then skipped."""
    m, num_classes = support.flags.shape
    if full is None and settings:
        full = fixed_probe(backbone, num_classes, settings, support.pyramid, labels)
        full.settings = {**full.settings, "cv": "fixed (kept from an earlier adaptation, or quick)"}
    elif full is None:  # settings chosen by cross-validation on the support set
        full = place(LinearProbe(backbone, num_classes), labels.device)
        full.fit_features(support.pyramid, labels)
    return LabelProbes(full, [probe_without(support, labels, full, (i,)) for i in range(m if m > 1 else 0)])


def probe_without(support: EncodedSupport, labels: Tensor, full: LinearProbe, left_out: tuple[int, ...]) -> LinearProbe:
    """A probe with ``full``'s settings fitted on every encoded support image but those in ``left_out``."""
    keep = torch.tensor([j for j in range(len(labels)) if j not in left_out], device=labels.device)
    return fixed_probe(full.backbone, full.num_classes, full.settings, select(support.pyramid, keep), labels[keep])


@torch.no_grad()
def probe_labels(probes: LabelProbes, bank: ViewBank, size: tuple[int, int]) -> Tensor:
    """Every view's class probabilities from its probe (see ``LabelProbes``) -> (N, C+1, *size) float32."""
    out = torch.empty(len(bank.source), probes.full.num_classes + 1, *size, device=bank.source.device)
    for source in bank.source.unique().tolist():
        probe = probes.for_source(source)
        for chunk in (bank.source == source).nonzero().flatten().split(ENCODE_CHUNK):
            out[chunk] = probe.forward_features(select(bank.pyramid, chunk), size).float().softmax(dim=1)
    return out


def fast_bank(
    teacher: Teacher,
    support: EncodedSupport,
    images: Tensor,
    labels: Tensor,
    cfg: AdaptConfig,
    unlabeled: Tensor | None,
    probes: LabelProbes,
) -> ViewBank:
    """The bank the fast student learns from: the views of the support (and unlabeled) images, their soft labels
    the mean of the frozen, adapted teacher's and the probes' (see the module docstring). No randomness.
    images: (M, 3, S, S) support images; labels: (M, S, S); unlabeled: (U, 3, S, S) or None."""
    views = VIEWS[cfg.views]
    bank = view_bank(teacher, support, images, labels, views, unlabeled, views)
    mixed = (bank.soft.float() + probe_labels(probes, bank, tuple(labels.shape[-2:]))) / 2
    return replace(bank, soft=mixed.half())


def distill_fast(
    teacher: Teacher,
    bank: ViewBank,
    labels: Tensor,
    cfg: AdaptConfig,
    probes: LabelProbes,
    gen: torch.Generator,
    progress: bool,
    record: Record,
    init: FastStudent | None = None,
) -> FastStudent:
    """A fast student distilled from the frozen, adapted teacher (left unchanged) on its bank (``fast_bank``): a
    fresh one, or a copy of ``init`` (a warm start; ``init`` is left unchanged). labels: (M, S, S) support labels."""
    record = _first_row_with(record, {"probe": probes.full.settings})
    if init is None:
        fast = build_fast_student(teacher.backbone, bank.present.shape[1], labels.shape[-1])
    else:
        fast = copy.deepcopy(init, memo={id(init.backbone): init.backbone})
    fast = place(fast, labels.device)
    params = [p for n, p in fast.named_parameters() if not n.startswith("backbone.")]
    fit_on_bank(fast, params, bank, labels, cfg, cfg.fast_iterations, "fast", True, gen, progress, record)
    return fast


def _first_row_with(record: Record, extra: dict) -> Record:
    """``record`` that adds ``extra`` to the first row it is given (every row stays a step's row)."""
    pending = [extra]

    def wrapped(row: dict) -> None:
        record({**row, **pending.pop()} if pending else row)

    return wrapped
