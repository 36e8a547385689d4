"""The bank of views a student learns from after the teacher's stage, and the loop that fits a student on it.

A bank holds augmented copies (the domain's symmetries, ``AdaptConfig.views``) of the support images and of any
unlabeled images of the target domain, each encoded **once** by the frozen backbone and labelled once by the frozen,
adapted teacher: its coarse masks, its class probabilities, and which classes had shots. A support view is labelled
without its own source image among the shots (train as you infer; a single support image is its own shot); an
unlabeled view sees every shot, and votes over chunks of shots as a predictor does. Masks of unlabeled images are
never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbones import FrozenBackbone, Pyramid
from .config import AdaptConfig
from .losses import balanced_weights, coarse_mse, focal_loss
from .predictor import VOTE_CHUNK
from .student import FastStudent, Student
from .symmetry import dihedral
from .teacher import EncodedSupport, Teacher
from .transfer import Record, select

ENCODE_CHUNK = 16  # images per backbone (and teacher) call when encoding a view bank


@dataclass
class ViewBank:
    """Views the frozen teacher has labelled, each encoded once by the backbone.

    source: (N,) the support image a view comes from, -1 for an unlabeled one; hard: (N, S, S) its true labels
    (-1 where unlabeled); coarse: per teacher layer (N, C, h, w); soft: (N, C+1, S, S) float16, the teacher's
    class probabilities (replaced by a mixture when another labeller joins); present: (N, C) bool, the classes
    with shots for that view."""

    pyramid: Pyramid
    source: Tensor
    hard: Tensor
    coarse: list[Tensor]
    soft: Tensor
    present: Tensor


def encode_views(backbone: FrozenBackbone, images: Tensor, views: tuple[int, ...]) -> Pyramid:
    """Backbone features of every (view, image) pair, view-major -> a Pyramid of len(views) * N images."""
    parts = []
    with torch.no_grad():
        for k in views:
            x = dihedral(images, k)
            for i in range(0, len(x), ENCODE_CHUNK):
                parts.append(backbone(x[i : i + ENCODE_CHUNK].contiguous(memory_format=torch.channels_last)))
    return Pyramid(torch.cat([p.skip4 for p in parts]), tuple(torch.cat(t) for t in zip(*(p.layers for p in parts))))


def view_bank(
    teacher: Teacher,
    support: EncodedSupport,
    images: Tensor,
    labels: Tensor,
    views: tuple[int, ...],
    unlabeled: Tensor | None,
    unlabeled_views: tuple[int, ...],
) -> ViewBank:
    """The support images under ``views`` (view-major, so the first M views are the images themselves), then the
    unlabeled images under ``unlabeled_views``, labelled by the frozen teacher (see the module docstring).
    images: (M, 3, S, S); labels: (M, S, S); unlabeled: (U, 3, S, S) or None."""
    device = images.device
    m = len(images)
    sources = [torch.arange(m, device=device)] * len(views)
    hard = [dihedral(labels, k) for k in views]
    pyramid = encode_views(teacher.backbone, images, views)
    if unlabeled is not None and len(unlabeled):
        u = encode_views(teacher.backbone, unlabeled, unlabeled_views)
        pyramid = Pyramid(
            torch.cat([pyramid.skip4, u.skip4]), tuple(torch.cat(t) for t in zip(pyramid.layers, u.layers))
        )
        n_u = len(unlabeled) * len(unlabeled_views)
        sources.append(torch.full((n_u,), -1, device=device))
        hard.append(torch.full((n_u, *labels.shape[1:]), -1, device=device))
    source = torch.cat(sources)
    coarse, soft, present = teacher_labels(teacher, support, pyramid, source)
    return ViewBank(pyramid, source, torch.cat(hard), coarse, soft, present)


@torch.no_grad()
def teacher_labels(
    teacher: Teacher, support: EncodedSupport, bank: Pyramid, source: Tensor
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The frozen teacher on every view of the bank -> (coarse masks per layer (N, C, h, w), merged probabilities
    (N, C+1, S, S) as float16, present (N, C)). ``source`` (N,): each view's support image, -1 for unlabeled."""
    was_training = teacher.training
    teacher.eval()
    m = support.shots
    voting = int(support.flags.sum(dim=0).max()) > VOTE_CHUNK
    coarse: list[list[Tensor]] = []
    soft, present = [], []
    for i in range(0, len(source), ENCODE_CHUNK):
        sl = slice(i, i + ENCODE_CHUNK)
        q = select(bank, sl)
        src = source[sl]
        own = src.view(-1, 1) == torch.arange(m, device=src.device).view(1, -1)  # (B, K)
        valid = ~own if m > 1 else torch.ones_like(own)
        shot_valid = valid.unsqueeze(1) & support.flags.T.unsqueeze(0)  # (B, C, K)
        out = teacher.forward_features(q, support, shot_valid)
        logits = out.logits
        if voting and bool((src < 0).any()):
            u = src < 0
            logits = logits.clone()
            logits[u] = teacher.forward_voting(select(q, u), support, VOTE_CHUNK)
        coarse.append([c.detach() for c in out.coarse])
        soft.append(torch.softmax(logits.float(), dim=1).half())
        present.append(shot_valid.any(dim=2))
    teacher.train(was_training)
    return [torch.cat(c) for c in zip(*coarse)], torch.cat(soft), torch.cat(present)


def fit_on_bank(
    model: Student | FastStudent,
    params: list[nn.Parameter],
    bank: ViewBank,
    labels: Tensor,
    cfg: AdaptConfig,
    steps: int,
    stage: str,
    soft_on_support: bool,
    gen: torch.Generator,
    progress: bool,
    record: Record,
) -> None:
    """Train ``params`` of a student, in place, on minibatches of the bank: the focal loss on support views' true
    labels, the bank's soft labels (cross-entropy to its probabilities, each pixel weighted by their confidence) on
    unlabeled views -- and on support views too when ``soft_on_support`` -- and the coarse-map MSE to the teacher on
    every view. ``labels``: the support labels (for the class weights)."""
    from tqdm.auto import tqdm

    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = balanced_weights(labels, bank.present.shape[1]) if cfg.class_weights == "balanced" else None
    model.train()
    order = torch.zeros(0, dtype=torch.long)
    n = len(bank.source)
    bar = tqdm(range(steps), desc=f"{stage} (student)", disable=None if progress else True, leave=False)
    for step in bar:
        if len(order) < cfg.view_batch:  # an epoch over the bank in a seeded order, then the next
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[: cfg.view_batch].to(labels.device), order[cfg.view_batch :]
        out = model.forward_features(select(bank.pyramid, idx))
        labelled = bank.source[idx] >= 0
        row: dict = {"step": step + 1, "stage": stage}
        seg = []
        if labelled.any():
            f = focal_loss(out.logits[labelled], bank.hard[idx][labelled], cfg.focal_gamma, weights)
            seg.append(f)
            row["focal_student"] = round(f.item(), 5)
        soft_rows = torch.ones_like(labelled) if soft_on_support else ~labelled
        if soft_rows.any():
            p = bank.soft[idx[soft_rows]].float()
            conf = p.amax(dim=1)  # (B, S, S) the labeller's confidence
            ce = -(p * torch.log_softmax(out.logits[soft_rows].float(), dim=1)).sum(dim=1)
            s_loss = (conf * ce).sum() / conf.sum().clamp_min(1e-8)
            seg.append(s_loss)
            row["soft"] = round(s_loss.item(), 5)
        d = coarse_mse([c[idx] for c in bank.coarse], [c.float() for c in out.coarse], model.strides, bank.present[idx])
        loss = (torch.stack(seg).mean() + cfg.distill_weight * d) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row["distill"] = round(d.item(), 5)
        row["loss"] = round(loss.item(), 5)
        record(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
    for p in params:
        p.requires_grad_(False)
    model.eval()
