"""TransferFSS (teacher fine-tuning on the support set) and DistillFSS (student distillation).

The frozen backbone's features of every support image are computed **once** and reused by every step: a step then
costs only the attention, the decoder and the ConvDist heads. When the attention is frozen (trainable set A, or the
second stage of two-stage distillation) its coarse masks are constant and are computed once too.

Episodes (one optimizer step = one pass over all episodes, batched into a single forward):

* ``leave_one_out`` (default): every support image is the query once, with all the other images as its shots
  (a single support image is its own shot; with ``cfg.one_shot_grid`` > 1 each of its positions attends only to
  the image's cells of a grid other than its own, see ``_own_cell_excluded``).
  The original plain builder used a single other image per query (``subsample: 1``); using all others trains the
  teacher in the regime it meets at test time (K shots). With more than ``cfg.max_shots`` others (default 10, the
  paper's chunk size at inference), each episode draws that many of them and attends over their keys only
  (gathered per episode), so a step costs O(K) rather than O(K^2): afresh every step when the attention trains
  (sets B, C, or dropout), once when it is frozen (set A: its coarse masks are then computed once).
* ``paired``: episode t targets class (t mod C) + 1; its query and one shot are two random images containing that
  class, plus up to two random other shots (the original PairedSubstitutor with subsample 3).

Train as you infer: in every episode, class c attends only to the episode's shots that contain c, and the query's
own image is never among its keys (removed from the softmax, see ``attention``). The teacher's target sets classes
with no shot in the episode to background (the teacher cannot know them); the student takes no support, so its
focal loss uses the query's full labels. The distillation MSE is averaged over the classes present per episode,
then over episodes (the original's weighting).

Student refinement (``cfg.refine_iterations`` > 0, after the joint stage; ``refine``): the adapted teacher, now
frozen, labels a bank of views -- augmented copies of the support images (``cfg.views``: flips / the dihedral
group) and, when given, unlabeled images of the target domain with their augmented copies -- each encoded once by
the frozen backbone. The student (its ConvDist heads and its own copy of the decoder's set-A modules; the
teacher's decoder is untouched) then learns from minibatches of that bank: on support views the focal loss on
their true (transformed) labels, on unlabeled views the teacher's soft labels (cross-entropy to its merged
probabilities, each pixel weighted by the teacher's confidence, its top probability), and on every view the
coarse-map MSE to the teacher's coarse masks. Support views are labelled by the teacher without their own source
image among the shots (train as you infer); unlabeled views use every shot, with voting as at inference. Masks of
unlabeled images are never read.

The fast student (``cfg.student == 'fast'``, ``distill_fast``): after the teacher's stage (the teacher alone by
default, ``cfg.fast_teacher_stage``; "joint" trains the paper's student beside it, then drops it), a fresh
``FastStudent`` (classes as channels, its own slim decoder) learns from the same kind of bank -- the support images
and any unlabeled images, each under ``cfg.fast_views`` -- for ``cfg.fast_iterations`` steps, with the teacher's
soft labels on every view (its decoder starts from scratch and needs the teacher's full output, not only five masks),
the focal loss on the support views' true labels and the coarse-map MSE. It replaces the paper's student and its
refinement.

Nothing the caller passes in is changed: the starting teacher is copied (its backbone shared, frozen), and the
seed drives initialisation, episodes and dropout through a private random state, so a run does not depend on what
ran before it in the process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .backbones import FrozenBackbone, Pyramid
from .baselines import LinearProbe
from .config import AdaptConfig, ModelConfig
from .losses import balanced_weights, coarse_mse, focal_loss
from .predictor import VOTE_CHUNK
from .student import FastStudent, Student, build_fast_student, build_student
from .symmetry import VIEWS, dihedral, undo_dihedral
from .teacher import EncodedSupport, Teacher, build_teacher, encode_support

log = logging.getLogger(__name__)

TRAINABLE_SETS: dict[str, tuple[str, ...]] = {
    "A": ("decoder.conv1", "decoder.conv2", "decoder.conv3", "decoder.mixer"),
    "B": ("decoder.", "attention."),
    "C": ("decoder.conv1", "decoder.conv2", "decoder.conv3", "decoder.mixer", "attention."),
}
ENCODE_CHUNK = 16  # images per backbone call when encoding a view bank


@dataclass
class AdaptResult:
    teacher: Teacher
    student: Student | FastStudent | None
    log: list[dict]
    seconds: float  # wall time of adaptation, support encoding included


def trainable_parameters(teacher: Teacher, which: str) -> list[nn.Parameter]:
    prefixes = TRAINABLE_SETS[which]
    return [p for n, p in teacher.named_parameters() if not n.startswith("backbone.") and n.startswith(prefixes)]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block from a private random state seeded with ``seed``; the caller's state is restored after.

    Module initialisation and dropout draw from torch's default generator; forking it keeps them reproducible from
    the seed alone without touching the process's random state.
    """
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def private_copy(teacher: Teacher) -> Teacher:
    """A deep copy of a teacher that shares its (frozen, read-only) backbone."""
    return copy.deepcopy(teacher, memo={id(teacher.backbone): teacher.backbone})


def _episodes(cfg: AdaptConfig, flags: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """One step's episodes -> (shot_valid (M, C, M) bool: episode t may use shot k for class c, only where shot k
    contains c; queries (M,) long: the support image that is episode t's query)."""
    valid, queries = _episode_shots(cfg, flags, gen)
    if "shots_without_class" in cfg.legacy:
        return valid, queries
    return valid & flags.T.unsqueeze(0), queries  # (M, C, M): a shot serves only the classes it contains


def _episode_shots(cfg: AdaptConfig, flags: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Which images are each episode's shots, before the per-class filter."""
    m, n_cls = flags.shape
    if m == 1:  # a single support image is its own shot: the only episode there is
        return torch.ones(1, n_cls, 1, dtype=torch.bool), torch.arange(1)
    if cfg.episodes == "leave_one_out":
        valid = (~torch.eye(m, dtype=torch.bool)).unsqueeze(1).expand(-1, n_cls, -1).clone()
        return valid, torch.arange(m)
    valid = torch.zeros(m, n_cls, m, dtype=torch.bool)
    queries = torch.zeros(m, dtype=torch.long)
    for t in range(m):
        c = t % n_cls
        holders = flags[:, c].nonzero().flatten()
        if len(holders) < 2:  # a class with fewer than two images cannot form a pair: plain episode instead
            q = t
            others = [k for k in range(m) if k != q]
        else:
            pick = holders[torch.randperm(len(holders), generator=gen)[:2]]
            q, first = int(pick[0]), int(pick[1])
            rest = [k for k in torch.randperm(m, generator=gen).tolist() if k not in (q, first)]
            others = [first, *rest[:2]]
        queries[t] = q
        valid[t, :, others] = True
    return valid, queries


def teacher_targets(labels: Tensor, shot_valid: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's targets: each episode's labels (M, S, S) with classes that have no shot in the episode set to
    background -> (labels, present (M, C) bool). ``shot_valid`` (M, C, K) as from ``_episodes``."""
    present = shot_valid.any(dim=2)  # (M, C)
    classes = torch.arange(1, present.shape[1] + 1, device=labels.device)
    absent = classes.view(1, -1).expand_as(present).masked_fill(present, -1)  # (M, C): absent class ids
    hidden = (labels.unsqueeze(1) == absent[:, :, None, None]).any(dim=1)  # (M, S, S)
    return labels.masked_fill(hidden, 0), present


def adapt(
    backbone: FrozenBackbone,
    images: Tensor,
    labels: Tensor,
    model_cfg: ModelConfig,
    cfg: AdaptConfig,
    teacher: Teacher | None = None,
    progress: bool = True,
    log_path: Path | None = None,
    on_step: Callable[[dict], None] | None = None,
    support: EncodedSupport | None = None,
    unlabeled: Tensor | None = None,
) -> AdaptResult:
    """Fine-tune a teacher on a support set and (``cfg.method == 'distill'``) distill a student.

    Args:
        backbone: the frozen backbone (shared by teacher and student).
        images: (M, 3, S, S) support images in [0, 1]; labels: (M, S, S) long, 255 = ignore.
        teacher: a starting teacher (e.g. meta-trained); a fresh one from ``cfg.seed`` when None.
        log_path: where to append one JSON line per step.
        support: the same images already encoded by ``backbone`` (saves recomputing their features); encoded
            here when None. The reported seconds then exclude that encoding.
        unlabeled: (U, 3, S, S) images of the target domain without masks, for the student's refinement
            (``cfg.refine_iterations`` > 0 and a student); their encoding is included in the seconds.
    """
    t0 = time.perf_counter()
    with seeded(cfg.seed, images.device):
        return _adapt(
            backbone, images, labels, model_cfg, cfg, teacher, progress, log_path, on_step, support, unlabeled, t0
        )


def _adapt(
    backbone: FrozenBackbone,
    images: Tensor,
    labels: Tensor,
    model_cfg: ModelConfig,
    cfg: AdaptConfig,
    teacher: Teacher | None,
    progress: bool,
    log_path: Path | None,
    on_step: Callable[[dict], None] | None,
    support: EncodedSupport | None,
    unlabeled: Tensor | None,
    t0: float,
) -> AdaptResult:
    gen = torch.Generator().manual_seed(cfg.seed)
    device = images.device
    # The caller's teacher is never trained in place: a cell's later methods (and a caller's own use) see it unchanged.
    teacher = build_teacher(backbone, model_cfg) if teacher is None else private_copy(teacher)
    teacher.to(device)
    if support is None:
        support = encode_support(backbone, images, labels, model_cfg.num_classes)  # once, reused by every step
    fast = cfg.method == "distill" and cfg.student == "fast"
    student = None  # the paper's student, trained beside the teacher (for the fast student only with "joint")
    if cfg.method == "distill" and (not fast or cfg.fast_teacher_stage == "joint"):
        student = build_student(backbone, teacher.decoder, model_cfg.num_classes).to(device)
    with _step_log(log_path, t0, on_step) as (record, log_rows):
        if fast and student is None:
            _train(teacher, None, support, labels, cfg, cfg.iterations, "teacher", gen, progress, record)
        elif cfg.method == "transfer" or cfg.mode == "joint":
            _train(teacher, student, support, labels, cfg, cfg.iterations, "joint", gen, progress, record)
        else:
            _train(teacher, None, support, labels, cfg, cfg.iterations, "teacher", gen, progress, record)
            steps = cfg.student_iterations or cfg.iterations
            _train(teacher, student, support, labels, cfg, steps, "student", gen, progress, record)
        if fast:
            teacher.eval()
            student = _distill_fast(teacher, support, images, labels, cfg, unlabeled, gen, progress, record)
        elif student is not None and cfg.refine_iterations > 0:
            student = _refine(teacher, student, support, images, labels, cfg, unlabeled, gen, progress, record)
    teacher.eval()
    if student is not None:
        student.eval()
    return AdaptResult(teacher, student, log_rows, time.perf_counter() - t0)


def _train(
    teacher: Teacher,
    student: Student | None,
    support: EncodedSupport,
    labels: Tensor,
    cfg: AdaptConfig,
    steps: int,
    stage: str,
    gen: torch.Generator,
    progress: bool,
    record: Callable[[dict], None],
) -> None:
    """One training stage. ``stage``: 'joint' (teacher, and student if given), 'teacher', or 'student'
    (teacher frozen, only the ConvDist heads learn, decoder shared and frozen)."""
    flags = support.flags
    train_teacher = stage in ("joint", "teacher")
    params: list[nn.Parameter] = trainable_parameters(teacher, cfg.trainable) if train_teacher else []
    if student is not None:
        params += list(student.heads.parameters())
    frozen_attention = not any(n.startswith("attention.") for n in _names(teacher, params))
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_cls = flags.shape[1]
    weights = balanced_weights(labels, n_cls) if cfg.class_weights == "balanced" else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, cfg.schedule, steps))
    teacher.train(train_teacher)
    if student is not None:
        student.train()
    capped = cfg.episodes == "leave_one_out" and 0 < cfg.max_shots < flags.shape[0] - 1
    # A frozen attention without dropout gives constant coarse masks for fixed episodes: then capped episodes are
    # drawn once too (their attention runs once); a trainable attention draws them afresh every step.
    static_attention = frozen_attention and not _has_dropout(teacher)
    fixed_episodes = flags.shape[0] < 2 or (cfg.episodes == "leave_one_out" and (not capped or static_attention))
    # bfloat16 autocast runs the convolutions ~1.8x faster on CPUs with AVX512-BF16/AMX; weights, the attention
    # (outside this context) and the losses stay float32.
    autocast = torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    # Fixed episodes are built once; with a frozen attention and no dropout their coarse masks are constant too.
    reuse = static_attention and fixed_episodes
    episode: tuple | None = None
    coarse: list[Tensor] | None = None
    bar = tqdm(range(steps), desc=f"adapt ({stage})", disable=not progress, leave=False)
    for step in bar:
        if episode is None or not fixed_episodes:
            picks = None
            if capped:  # (M, max_shots): each episode's shots, then validity over those shots only
                picks = capped_shots(flags.shape[0], cfg.max_shots, gen).to(flags.device)
                shot_valid, queries = flags[picks].transpose(1, 2), torch.arange(len(picks), device=flags.device)
                if "shots_without_class" in cfg.legacy:
                    shot_valid = torch.ones_like(shot_valid)
            else:
                shot_valid, queries = _episodes(cfg, flags.cpu(), gen)
                shot_valid, queries = shot_valid.to(flags.device), queries.to(flags.device)
            target, present = teacher_targets(labels[queries], shot_valid)
            episode = (shot_valid, target, labels[queries], present, _select(support.pyramid, queries), picks)
        shot_valid, target, full_target, present, query, picks = episode
        if coarse is None or not reuse:
            with torch.set_grad_enabled(not frozen_attention):
                coarse = _coarse(
                    teacher, support, query, shot_valid, picks, cfg.one_shot_grid, "self_in_softmax" not in cfg.legacy
                )
        row: dict = {"step": step + 1, "stage": stage}
        loss = torch.zeros((), device=labels.device)
        with autocast:
            if train_teacher:
                t_out = teacher.decode(coarse_dropout(coarse, cfg.coarse_dropout, gen), query, present)
                f_t = focal_loss(t_out.logits, target, cfg.focal_gamma, weights)
                loss = loss + f_t
                row["focal_teacher"] = round(f_t.item(), 5)
            if student is not None:
                s_out = student.forward_features(query)
                s_target = target if "student_relabelled" in cfg.legacy else full_target  # no support: every class
                f_s = focal_loss(s_out.logits, s_target, cfg.focal_gamma, weights)
                d = coarse_mse(
                    coarse, [c.float() for c in s_out.coarse], teacher.strides, present, "mse_per_pair" in cfg.legacy
                )
                loss = loss + f_s + cfg.distill_weight * d
                row["focal_student"] = round(f_s.item(), 5)
                row["distill"] = round(d.item(), 5)
        n_terms = int(train_teacher) + (2 if student is not None else 0)
        loss = loss / n_terms
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        row["loss"] = round(loss.item(), 5)
        record(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
    for p in params:
        p.requires_grad_(False)


def coarse_dropout(coarse: list[Tensor], p: float, gen: torch.Generator) -> list[Tensor]:
    """New tensors with every layer's coarse mask of an (episode, class) zeroed with probability ``p`` (one draw per
    (episode, class) for all layers, from ``gen``); ``coarse`` is returned unchanged when ``p`` is 0. No rescaling:
    a coarse mask is a foreground share, and 0 reads as "no support token matched"."""
    if p == 0:
        return coarse
    b, c = coarse[0].shape[:2]
    keep = (torch.rand(b, c, 1, 1, generator=gen) >= p).to(coarse[0].device)
    return [x * keep.to(x.dtype) for x in coarse]


def capped_shots(m: int, cap: int, gen: torch.Generator) -> Tensor:
    """(m, cap) long: for every support image t, ``cap`` distinct other images, a seeded random draw."""
    noise = torch.rand(m, m, generator=gen).fill_diagonal_(2.0)  # the query itself sorts last: never picked
    return noise.argsort(dim=1)[:, :cap]


def _coarse(
    teacher: Teacher,
    support: EncodedSupport,
    query: Pyramid,
    shot_valid: Tensor,
    picks: Tensor | None,
    grid: int = 1,
    exclude_unusable: bool = True,
) -> list[Tensor]:
    """The teacher's coarse masks per layer for a batch of episodes. ``picks`` None: every episode attends over the
    whole support set (``shot_valid`` (B, C, K)); else (B, n) the shots of each episode, whose keys and masks are
    gathered per episode (``shot_valid`` (B, C, n)), so the cost grows with n, not K. ``grid`` > 1 with a single
    support image (its own query): see ``_own_cell_excluded``. ``exclude_unusable`` False keeps the query's own
    tokens in the softmax (the step before its fix, for the per-fix ablation; see ``attention``)."""
    out = []
    for i, (g, q, feats) in enumerate(zip(teacher.groups, query.layers, support.pyramid.layers)):
        block = teacher.attention[g]
        keys, masks = block.keys(feats), support.masks[i]  # (heads, K*hw, d), (C, K*hw)
        valid = support.token_valid(shot_valid, i)
        if picks is not None:
            hw = feats.shape[-2] * feats.shape[-1]
            keys = keys.unflatten(1, (-1, hw))[:, picks].transpose(0, 1).flatten(2, 3)  # (B, heads, n*hw, d)
            masks = masks.unflatten(1, (-1, hw))[:, picks].transpose(0, 1).flatten(2, 3)  # (B, C, n*hw)
        if grid > 1 and support.shots == 1:
            out.append(_own_cell_excluded(block, q, keys, masks, valid, grid))
        else:
            out.append(block(q, keys, masks, valid, exclude_unusable))
    return out


def grid_cells(h: int, w: int, grid: int, device: torch.device | str = "cpu") -> Tensor:
    """(h, w) long: the cell (0 .. grid*grid - 1, row-major) of a grid x grid partition each position lies in."""
    ys = torch.arange(h, device=device) * grid // h
    xs = torch.arange(w, device=device) * grid // w
    return ys.view(-1, 1) * grid + xs.view(1, -1)


def _own_cell_excluded(
    block: nn.Module, q: Tensor, keys: Tensor, masks: Tensor, valid: Tensor, grid: int, symmetry: int = 0
) -> Tensor:
    """One support image that is also the query (K = 1): each query token attends only to the image's tokens
    outside its own cell of a ``grid`` x ``grid`` partition -- the spatial counterpart of leave-one-out. Without it
    the image is its own shot, every token finds itself, and the coarse masks the decoder trains on are a look-up
    of the query's own mask, far better than any the teacher meets at test time. q (1, ch, h, w): the image's
    features, or those of its ``symmetry``-th view (see ``dihedral``; a query position's cell is then that of the
    image position it shows); keys, masks and valid as for the block, over the image's h*w tokens -> (1, C, h, w)."""
    h, w = q.shape[-2:]
    key_cells = grid_cells(h, w, grid, q.device)  # (h, w), the image's own orientation (h == w for a view)
    cells = dihedral(key_cells, symmetry)  # the cell each query position shows
    n = grid * grid
    outside = (key_cells.flatten().view(1, -1) != torch.arange(n, device=q.device).view(-1, 1)).to(valid.dtype)
    per_cell = block(q.expand(n, -1, -1, -1), keys, masks, valid * outside.unsqueeze(1))  # (n, C, h, w)
    index = cells.reshape(1, 1, h, w).expand(1, per_cell.shape[1], h, w)
    return per_cell.gather(0, index)  # each position from the episode that left its own cell out


def view_mean(x: Tensor, views: tuple[int, ...]) -> Tensor:
    """``x`` (len(views) * N, ..., S, S), view-major (the v-th block of N holds ``dihedral(image, views[v])``) -> the
    same shape, each view replaced by the mean of the image's views mapped back to it; a new tensor."""
    per_view = x.float().unflatten(0, (len(views), -1))
    mean = torch.stack([undo_dihedral(per_view[j], k) for j, k in enumerate(views)]).mean(dim=0)
    return torch.cat([dihedral(mean, k) for k in views]).to(x.dtype)


def refine(
    teacher: Teacher,
    student: Student,
    support: EncodedSupport,
    images: Tensor,
    labels: Tensor,
    cfg: AdaptConfig,
    unlabeled: Tensor | None = None,
    progress: bool = True,
    log_path: Path | None = None,
) -> tuple[Student, list[dict]]:
    """Refine an adapted student on the view bank (see the module docstring) -> (a new student, log rows).

    The teacher and the student passed in are not changed; the new student shares only the frozen backbone.
    Seeded by ``cfg.seed`` through a private random state, as ``adapt``.
    """
    with _step_log(log_path, time.perf_counter()) as (record, rows), seeded(cfg.seed, images.device):
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        new = _refine(teacher, student, support, images, labels, cfg, unlabeled, gen, progress, record)
    return new.eval(), rows


@contextlib.contextmanager
def _step_log(
    log_path: Path | None, t0: float, on_step: Callable[[dict], None] | None = None
) -> Iterator[tuple[Callable[[dict], None], list[dict]]]:
    """-> (record, rows): ``record(row)`` stamps the seconds since ``t0``, keeps the row, appends it as one JSON
    line to ``log_path`` (closed on exit) and passes it to ``on_step``."""
    rows: list[dict] = []
    log_file = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed in finally

    def record(row: dict) -> None:
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        if log_file:
            log_file.write(json.dumps(row) + "\n")
        if on_step:
            on_step(row)

    try:
        yield record, rows
    finally:
        if log_file:
            log_file.close()


def _encode_views(backbone: FrozenBackbone, images: Tensor, views: tuple[int, ...]) -> Pyramid:
    """Backbone features of every (view, image) pair, view-major -> a Pyramid of len(views) * N images."""
    parts = []
    with torch.no_grad():
        for k in views:
            x = dihedral(images, k)
            for i in range(0, len(x), ENCODE_CHUNK):
                parts.append(backbone(x[i : i + ENCODE_CHUNK].contiguous(memory_format=torch.channels_last)))
    return _cat(parts)


@dataclass
class ViewBank:
    """Views the frozen teacher has labelled, each encoded once by the backbone.

    source: (N,) the support image a view comes from, -1 for an unlabeled one; hard: (N, S, S) its true labels
    (-1 where unlabeled); coarse / soft / present: the teacher's outputs (see ``_teacher_labels``)."""

    pyramid: Pyramid
    source: Tensor
    hard: Tensor
    coarse: list[Tensor]
    soft: Tensor
    present: Tensor


def _view_bank(
    teacher: Teacher,
    support: EncodedSupport,
    images: Tensor,
    labels: Tensor,
    views: tuple[int, ...],
    unlabeled: Tensor | None,
    unlabeled_views: tuple[int, ...],
    crops: int = 0,
    gen: torch.Generator | None = None,
    grid: int = 1,
    label_views: str = "view",
) -> ViewBank:
    """Support views (hard labels, their source image left out of the teacher's shots; with one support image and
    ``grid`` > 1, each position's own cell of it), then ``crops`` random crops of each support image (see
    ``random_crops``; with one support image they see it whole), then unlabeled views. ``label_views`` "mean": the
    teacher's labels of each support or unlabeled view are the mean over that image's views (``view_mean``)."""
    device = images.device
    m = len(images)
    sources = [torch.arange(m, device=device)] * len(views)
    symmetry = [torch.full((m,), k, device=device) for k in views]  # -1: not a symmetry of a support image
    hard = [dihedral(labels, k) for k in views]
    banks = [_encode_views(teacher.backbone, images, views)]
    if crops:
        c_images, c_labels, c_source = random_crops(images, labels, crops, gen, views)
        banks.append(_encode_views(teacher.backbone, c_images, (0,)))
        sources.append(c_source.to(device))
        symmetry.append(torch.full((len(c_source),), -1, device=device))
        hard.append(c_labels)
    if unlabeled is not None and len(unlabeled):
        banks.append(_encode_views(teacher.backbone, unlabeled, unlabeled_views))
        n_u = len(unlabeled) * len(unlabeled_views)
        sources.append(torch.full((n_u,), -1, device=device))
        symmetry.append(torch.full((n_u,), -1, device=device))
        hard.append(torch.full((n_u, *labels.shape[1:]), -1, device=device))
    bank = _cat(banks)
    source = torch.cat(sources)
    cells = torch.cat(symmetry) if grid > 1 and m == 1 else None
    coarse, soft, present = _teacher_labels(teacher, support, bank, source, cells, grid)
    if label_views == "mean":
        blocks = [(0, views, m)]  # (first index, symmetries, images) of each block of symmetric views
        if unlabeled is not None and len(unlabeled):
            blocks.append((len(source) - len(unlabeled) * len(unlabeled_views), unlabeled_views, len(unlabeled)))
        for start, syms, n in blocks:
            block = slice(start, start + len(syms) * n)
            soft[block] = view_mean(soft[block], syms)
            for c in coarse:
                c[block] = view_mean(c[block], syms)
    return ViewBank(bank, source, torch.cat(hard), coarse, soft, present)


def random_crops(
    images: Tensor,
    labels: Tensor,
    n: int,
    gen: torch.Generator | None,
    symmetries: tuple[int, ...] = (0,),
    scale: tuple[float, float] = (0.5, 0.9),
) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` seeded random square crops of every image (side a uniform fraction in ``scale`` of the image's, at a
    uniform position), resized back to the image size (bilinear; labels nearest), each under one of ``symmetries``
    (see ``dihedral``) at random -> (images (N*n, 3, S, S), labels (N*n, S, S), source (N*n,) each crop's image)."""
    m, size = len(images), images.shape[-1]
    out_i, out_l, source = [], [], []
    for i in range(m):
        for _ in range(n):
            side = int(size * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=gen).item()))
            y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
            k = symmetries[int(torch.randint(0, len(symmetries), (), generator=gen))]
            img = images[i : i + 1, :, y : y + side, x : x + side]
            lab = labels[i : i + 1, None, y : y + side, x : x + side].float()
            img = nn.functional.interpolate(
                img, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
            lab = nn.functional.interpolate(lab, size=(size, size), mode="nearest")
            out_i.append(dihedral(img, k))
            out_l.append(dihedral(lab[:, 0].to(labels.dtype), k))
            source.append(i)
    return torch.cat(out_i), torch.cat(out_l), torch.tensor(source, dtype=torch.long)


def _fit_on_bank(
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
    record: Callable[[dict], None],
) -> None:
    """Train ``params`` of a student on minibatches of the bank: the focal loss on support views' true labels, the
    teacher's soft labels (cross-entropy to its merged probabilities, each pixel weighted by the teacher's
    confidence) on unlabeled views -- and on support views too when ``soft_on_support`` -- and the coarse-map MSE
    to the teacher on every view. ``labels``: the support labels (class weights). With ``cfg.fast_ema`` > 0 the fast
    stage ends with the moving average of its weights over the steps (decay ``cfg.fast_ema`` per step)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = cfg.fast_schedule if stage == "fast" else cfg.schedule
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, schedule, steps))
    weights = balanced_weights(labels, bank.present.shape[1]) if cfg.class_weights == "balanced" else None
    model.train()
    # the fast student's weights averaged over its steps (an exponential moving average) when cfg.fast_ema > 0
    ema = get_ema_multi_avg_fn(cfg.fast_ema) if stage == "fast" and cfg.fast_ema > 0 else None
    averaged: list[Tensor] = []
    order = torch.zeros(0, dtype=torch.long)
    n = len(bank.source)
    bar = tqdm(range(steps), desc=f"{stage} (student)", disable=not progress, leave=False)
    for step in bar:
        if len(order) < cfg.view_batch:  # an epoch over the bank in a seeded order, then the next
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[: cfg.view_batch].to(labels.device), order[cfg.view_batch :]
        out = model.forward_features(_select(bank.pyramid, idx))
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
            conf = p.amax(dim=1)  # (B, S, S) the teacher's confidence
            ce = -(p * torch.log_softmax(out.logits[soft_rows].float(), dim=1)).sum(dim=1)
            s_loss = (conf * ce).sum() / conf.sum().clamp_min(1e-8)
            seg.append(s_loss)
            row["soft"] = round(s_loss.item(), 5)
        d = coarse_mse([c[idx] for c in bank.coarse], [c.float() for c in out.coarse], model.strides, bank.present[idx])
        loss = (torch.stack(seg).mean() + cfg.distill_weight * d) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            current = [p.detach() for p in params]
            if averaged:
                ema(averaged, current, step)
            else:
                averaged = [p.clone() for p in current]
        row["distill"] = round(d.item(), 5)
        row["loss"] = round(loss.item(), 5)
        record(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
    with torch.no_grad():
        for p, a in zip(params, averaged):
            p.copy_(a)
    for p in params:
        p.requires_grad_(False)
    model.eval()


def _refine(
    teacher: Teacher,
    student: Student,
    support: EncodedSupport,
    images: Tensor,
    labels: Tensor,
    cfg: AdaptConfig,
    unlabeled: Tensor | None,
    gen: torch.Generator,
    progress: bool,
    record: Callable[[dict], None],
) -> Student:
    views, u_views = VIEWS[cfg.views], VIEWS[cfg.unlabeled_views]
    bank = _view_bank(teacher, support, images, labels, views, unlabeled, u_views, grid=cfg.one_shot_grid)
    new = Student(student.backbone, copy.deepcopy(student.heads), copy.deepcopy(student.decoder))
    params = [p for n, p in new.named_parameters() if n.startswith(("heads.", *TRAINABLE_SETS["A"]))]
    _fit_on_bank(new, params, bank, labels, cfg, cfg.refine_iterations, "refine", False, gen, progress, record)
    return new


def _distill_fast(
    teacher: Teacher,
    support: EncodedSupport,
    images: Tensor,
    labels: Tensor,
    cfg: AdaptConfig,
    unlabeled: Tensor | None,
    gen: torch.Generator,
    progress: bool,
    record: Callable[[dict], None],
) -> FastStudent:
    """A fresh fast student distilled from the frozen, adapted teacher on the bank of support views (and unlabeled
    views) under ``cfg.fast_views``; soft labels on every view, since its decoder starts from scratch."""
    views = VIEWS[cfg.fast_views]
    bank = _view_bank(
        teacher,
        support,
        images,
        labels,
        views,
        unlabeled,
        views,
        cfg.fast_crops,
        gen,
        cfg.one_shot_grid,
        cfg.label_views,
    )
    if cfg.fast_labels == "teacher+probe":
        probe_soft, settings = probe_labels(teacher.backbone, bank, labels, views, support.flags.shape[1])
        bank = replace(bank, soft=((bank.soft.float() + probe_soft) / 2).half())
        record = _first_row_with(record, {"probe": settings})
    fast = build_fast_student(teacher.backbone, support.flags.shape[1], labels.shape[-1]).to(images.device)
    params = [p for n, p in fast.named_parameters() if not n.startswith("backbone.")]
    _fit_on_bank(fast, params, bank, labels, cfg, cfg.fast_iterations, "fast", True, gen, progress, record)
    return fast


def _first_row_with(record: Callable[[dict], None], extra: dict) -> Callable[[dict], None]:
    """``record`` that adds ``extra`` to the first row it is given (every row stays a step's row)."""
    pending = [extra]

    def wrapped(row: dict) -> None:
        record({**row, **pending.pop()} if pending else row)

    return wrapped


@torch.no_grad()
def probe_labels(
    backbone: FrozenBackbone, bank: ViewBank, labels: Tensor, views: tuple[int, ...], num_classes: int
) -> tuple[Tensor, dict]:
    """A linear probe's class probabilities on every view of the bank -> ((N, C+1, S, S) float32, the probe's
    settings). The probe is the ``linear_probe`` baseline (feature levels, L2 strength and class weighting chosen by
    cross-validation on the support set), fitted on the support images' own views (the first ``m`` of the bank, at
    the model's size). A view of support image i (a symmetry or a crop of it) is labelled by a probe fitted without
    image i, the settings chosen on all of them kept -- no support view's label comes from weights fitted to its
    mask, as the teacher's labels leave the view's own image out of the shots; an unlabeled view by the probe fitted
    on them all.
    With a single support image there is no other to fit on: its views are labelled by the probe fitted on it."""
    if views[0] != 0:
        raise ValueError(f"the bank's first views must be the support images themselves, got symmetries {views}")
    m = len(labels)
    full = LinearProbe(backbone, num_classes).to(labels.device)
    full.fit_features(_select(bank.pyramid, slice(0, m)), labels)
    fixed = {k: full.settings[k] for k in ("l2", "levels", "balanced")}
    probes = {-1: full} | {i: full for i in range(m)}
    for i in range(m if m > 1 else 0):
        keep = torch.tensor([j for j in range(m) if j != i], device=labels.device)
        probes[i] = LinearProbe(backbone, num_classes, **fixed).to(labels.device)
        probes[i].fit_features(_select(bank.pyramid, keep), labels[keep])
    size = tuple(labels.shape[-2:])
    out = torch.empty(len(bank.source), num_classes + 1, *size, device=labels.device)
    for source, probe in probes.items():
        for chunk in (bank.source == source).nonzero().flatten().split(ENCODE_CHUNK):
            out[chunk] = probe.forward_features(_select(bank.pyramid, chunk), size).float().softmax(dim=1)
    return out, full.settings


def distill_fast(
    teacher: Teacher,
    support: EncodedSupport,
    images: Tensor,
    labels: Tensor,
    cfg: AdaptConfig,
    unlabeled: Tensor | None = None,
    progress: bool = True,
    log_path: Path | None = None,
) -> tuple[FastStudent, list[dict]]:
    """Distil a fast student from an adapted teacher (left unchanged) -> (the student, log rows); seeded by
    ``cfg.seed`` as ``adapt``."""
    with _step_log(log_path, time.perf_counter()) as (record, rows), seeded(cfg.seed, images.device):
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        fast = _distill_fast(teacher, support, images, labels, cfg, unlabeled, gen, progress, record)
    return fast, rows


@torch.no_grad()
def _teacher_labels(
    teacher: Teacher,
    support: EncodedSupport,
    bank: Pyramid,
    source: Tensor,
    symmetry: Tensor | None = None,
    grid: int = 1,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The frozen teacher on every view of the bank -> (coarse masks per layer (N, C, h, w), merged probabilities
    (N, C+1, S, S) as float16, present (N, C): the classes with shots for that view). A support view (source >= 0)
    does not see its own source image among the shots (unless it is the only one: then, with ``symmetry`` (N,) the
    view's symmetry of it, -1 for none, each position sees the image outside its own cell of a ``grid`` x ``grid``
    partition, see ``_own_cell_excluded``); an unlabeled view sees every shot, and votes over chunks when a class
    has more than ``VOTE_CHUNK`` shots, as a predictor does."""
    was_training = teacher.training
    teacher.eval()
    m = support.shots
    voting = int(support.flags.sum(dim=0).max()) > VOTE_CHUNK
    coarse: list[list[Tensor]] = []
    soft, present = [], []
    for i in range(0, len(source), ENCODE_CHUNK):
        sl = slice(i, i + ENCODE_CHUNK)
        q = _select(bank, sl)
        src = source[sl]
        own = src.view(-1, 1) == torch.arange(m, device=src.device).view(1, -1)  # (B, K)
        valid = ~own if m > 1 else torch.ones_like(own)
        shot_valid = valid.unsqueeze(1) & support.flags.T.unsqueeze(0)  # (B, C, K)
        if symmetry is not None and bool((symmetry[sl] >= 0).any()):
            out = teacher.decode(
                _cells_coarse(teacher, support, q, shot_valid, symmetry[sl], grid), q, shot_valid.any(2)
            )
        else:
            out = teacher.forward_features(q, support, shot_valid)
        logits = out.logits
        if voting and bool((src < 0).any()):
            u = src < 0
            q_u = _select(q, u)
            logits = logits.clone()
            logits[u] = teacher.forward_voting(q_u, support, VOTE_CHUNK)
        coarse.append([c.detach() for c in out.coarse])
        soft.append(torch.softmax(logits.float(), dim=1).half())
        present.append(shot_valid.any(dim=2))
    teacher.train(was_training)
    return [torch.cat(c) for c in zip(*coarse)], torch.cat(soft), torch.cat(present)


def _cells_coarse(
    teacher: Teacher, support: EncodedSupport, q: Pyramid, shot_valid: Tensor, symmetry: Tensor, grid: int
) -> list[Tensor]:
    """The teacher's coarse masks per layer, (B, C, h, w), for a batch of views (``shot_valid`` (B, C, K)): each
    view that is a symmetry of the single support image (``symmetry`` >= 0) by ``_own_cell_excluded``, the others
    by the plain attention."""
    picks = (symmetry >= 0).nonzero().flatten().tolist()
    rest = symmetry < 0
    out = []
    for i, (g, layer, feats) in enumerate(zip(teacher.groups, q.layers, support.pyramid.layers)):
        block, masks = teacher.attention[g], support.masks[i]
        keys, valid = block.keys(feats), support.token_valid(shot_valid, i)
        c = layer.new_zeros(len(symmetry), masks.shape[0], *layer.shape[-2:])
        if bool(rest.any()):
            c[rest] = block(layer[rest], keys, masks, valid[rest])
        for j in picks:
            c[j] = _own_cell_excluded(block, layer[j : j + 1], keys, masks, valid[j : j + 1], grid, int(symmetry[j]))[0]
        out.append(c)
    return out


def plateau(rows: list[dict], window: int = 10, fraction: float = 0.9, key: str = "loss") -> tuple[int, float]:
    """When training reached its final loss plateau -> (step, seconds since the start of adaptation).

    key: which logged loss (``loss`` the total; ``focal_teacher`` / ``focal_student`` the segmentation terms).
    The loss is smoothed by a trailing mean over ``window`` steps; the plateau starts at the first step from which
    the smoothed loss stays within ``1 - fraction`` of its range (highest smoothed value minus the final one) above
    the final value. "Stays" makes early spikes (a fresh student's first steps) irrelevant.
    """
    rows = [r for r in rows if key in r]
    if not rows:
        return 0, 0.0
    loss = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    smooth = torch.stack([loss[max(0, i - window + 1) : i + 1].mean() for i in range(len(loss))])
    last = smooth[-1]
    above = smooth > last + (1 - fraction) * (smooth.max() - last) + 1e-9  # 1e-9: rounding of the means
    i = int(torch.nonzero(above)[-1]) + 1 if above.any() else 0
    return rows[i]["step"], rows[i]["seconds"]


def lr_factor(schedule: str, steps: int, step: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if schedule == "constant":
        return 1.0
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _names(module: nn.Module, params: list[nn.Parameter]) -> list[str]:
    ids = {id(p) for p in params}
    return [n for n, p in module.named_parameters() if id(p) in ids]


def _has_dropout(teacher: Teacher) -> bool:
    return any(a.attn_dropout > 0 or a.pe_dropout.p > 0 for a in teacher.attention)


def _select(p: Pyramid, idx: Tensor | slice) -> Pyramid:
    """The images of a Pyramid at ``idx`` (indices, a boolean mask or a slice)."""
    return Pyramid(p.skip4[idx], tuple(t[idx] for t in p.layers))


def _cat(parts: list[Pyramid]) -> Pyramid:
    """Pyramids of several image batches -> one Pyramid, in order."""
    return Pyramid(torch.cat([p.skip4 for p in parts]), tuple(torch.cat(t) for t in zip(*(p.layers for p in parts))))
