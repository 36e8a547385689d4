"""TransferFSS: fine-tuning the teacher on the support set with episodes built from the support images themselves
(and, for the paper's student, training that student beside it or after it).

The frozen backbone's features of every support image are computed **once** and reused by every step: a step then
costs only the attention, the decoder and the ConvDist heads. When the attention is frozen (trainable set A) its
coarse masks are constant for fixed episodes and are computed once too.

Episodes (one optimizer step = one pass over all episodes, batched into a single forward):

* ``leave_one_out`` (default): every support image is the query once, with the other images as its shots (a single
  support image is its own shot). With more than ``cfg.max_shots`` others (default 10, the paper's chunk size at
  inference), each episode draws that many of them and attends over their keys only (gathered per episode), so a
  step costs O(K) rather than O(K^2): afresh every step when the attention trains, once when it is frozen.
* ``paired``: episode t targets class (t mod C) + 1; its query and one shot are two random images containing that
  class, plus up to two random other shots (the original's pairs).

Train as you infer: in every episode class c attends only to the shots that contain c, and the query's own image is
never among its keys (for a large image cut into windows: the query's window; its other windows may be shots). The
teacher's target sets classes with no shot in the episode to background (the teacher
cannot know them); the paper student takes no support, so its focal loss uses the query's full labels. The
distillation MSE is averaged over the classes present per episode, then over episodes (the original's weighting).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .backbones import Pyramid
from .config import AdaptConfig
from .losses import balanced_weights, coarse_mse, focal_loss
from .student import Student
from .teacher import EncodedSupport, Teacher

TRAINABLE_SETS: dict[str, tuple[str, ...]] = {
    "A": ("decoder.conv1", "decoder.conv2", "decoder.conv3", "decoder.mixer"),
    "B": ("decoder.", "attention."),
    "C": ("decoder.conv1", "decoder.conv2", "decoder.conv3", "decoder.mixer", "attention."),
}

Record = Callable[[dict], None]


def trainable_parameters(teacher: Teacher, which: str) -> list[nn.Parameter]:
    prefixes = TRAINABLE_SETS[which]
    return [p for n, p in teacher.named_parameters() if not n.startswith("backbone.") and n.startswith(prefixes)]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block reproducibly: from a private random state seeded with ``seed`` and with torch's deterministic
    algorithms; the caller's random state and determinism setting are restored after.

    Module initialisation and dropout draw from torch's default generator (and the device's, on CUDA); forking them
    keeps runs reproducible from the seed alone, whatever ran before in the process, without touching its state.
    Only the generators of the CPU and of ``device`` are seeded (other GPUs' are left alone).
    """
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        # deterministic kernels wherever torch has them (the CPU kernels used here all do; on CUDA an op without one
        # warns instead of failing)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def private_copy(teacher: Teacher) -> Teacher:
    """A deep copy of a teacher that shares its (frozen, read-only) backbone."""
    return copy.deepcopy(teacher, memo={id(teacher.backbone): teacher.backbone})


def episodes(cfg: AdaptConfig, flags: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """One step's episodes -> (shot_valid (M, C, M) bool: episode t may use shot k for class c, only where shot k
    contains c; queries (M,) long: the support image that is episode t's query)."""
    m, n_cls = flags.shape
    if m == 1:  # a single support image is its own shot: the only episode there is
        valid, queries = torch.ones(1, n_cls, 1, dtype=torch.bool), torch.arange(1)
    elif cfg.episodes == "leave_one_out":
        valid = (~torch.eye(m, dtype=torch.bool)).unsqueeze(1).expand(-1, n_cls, -1).clone()
        queries = torch.arange(m)
    else:
        valid = torch.zeros(m, n_cls, m, dtype=torch.bool)
        queries = torch.zeros(m, dtype=torch.long)
        for t in range(m):
            holders = flags[:, t % n_cls].nonzero().flatten()
            if len(holders) < 2:  # a class with fewer than two images cannot form a pair: plain episode instead
                q, others = t, [k for k in range(m) if k != t]
            else:
                pick = holders[torch.randperm(len(holders), generator=gen)[:2]]
                q, first = int(pick[0]), int(pick[1])
                rest = [k for k in torch.randperm(m, generator=gen).tolist() if k not in (q, first)]
                others = [first, *rest[:2]]
            queries[t] = q
            valid[t, :, others] = True
    return valid & flags.T.unsqueeze(0), queries  # (M, C, M): a shot serves only the classes it contains


def capped_shots(m: int, cap: int, gen: torch.Generator) -> Tensor:
    """(m, cap) long: for every support image t, ``cap`` distinct other images, a seeded random draw."""
    noise = torch.rand(m, m, generator=gen).fill_diagonal_(2.0)  # the query itself sorts last: never picked
    return noise.argsort(dim=1)[:, :cap]


def teacher_targets(labels: Tensor, shot_valid: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's targets: each episode's labels (M, S, S) with classes that have no shot in the episode set to
    background -> (labels, present (M, C) bool). ``shot_valid`` (M, C, K) as from ``episodes``."""
    present = shot_valid.any(dim=2)  # (M, C)
    classes = torch.arange(1, present.shape[1] + 1, device=labels.device)
    absent = classes.view(1, -1).expand_as(present).masked_fill(present, -1)  # (M, C): absent class ids
    hidden = (labels.unsqueeze(1) == absent[:, :, None, None]).any(dim=1)  # (M, S, S)
    return labels.masked_fill(hidden, 0), present


def coarse_masks(
    teacher: Teacher, support: EncodedSupport, query: Pyramid, shot_valid: Tensor, picks: Tensor | None = None
) -> list[Tensor]:
    """The teacher's coarse masks per layer, (B, C, h, w), for a batch of episodes. ``picks`` None: every episode
    attends over the whole support set (``shot_valid`` (B, C, K)); else (B, n) the shots of each episode, whose keys
    and masks are gathered per episode (``shot_valid`` (B, C, n)), so the cost grows with n, not K."""
    out = []
    for i, (g, q, feats) in enumerate(zip(teacher.groups, query.layers, support.pyramid.layers)):
        block = teacher.attention[g]
        keys, masks = block.keys(feats), support.masks[i]  # (heads, K*hw, d), (C, K*hw)
        valid = support.token_valid(shot_valid, i)
        if picks is not None:
            hw = feats.shape[-2] * feats.shape[-1]
            keys = keys.unflatten(1, (-1, hw))[:, picks].transpose(0, 1).flatten(2, 3)  # (B, heads, n*hw, d)
            masks = masks.unflatten(1, (-1, hw))[:, picks].transpose(0, 1).flatten(2, 3)  # (B, C, n*hw)
        out.append(block(q, keys, masks, valid))
    return out


def train_stage(
    teacher: Teacher,
    student: Student | None,
    support: EncodedSupport,
    labels: Tensor,
    cfg: AdaptConfig,
    steps: int,
    stage: str,
    gen: torch.Generator,
    progress: bool,
    record: Record,
) -> None:
    """One episodic training stage, in place. ``stage``: 'teacher' (the teacher, and the paper student beside it
    when one is given: the original's joint loss) or 'student' (teacher frozen, only the student's ConvDist heads
    learn, the decoder shared and frozen). labels: (M, S, S) long, the support labels (255 = ignore)."""
    flags = support.flags
    params: list[nn.Parameter] = trainable_parameters(teacher, cfg.trainable) if stage == "teacher" else []
    if student is not None:
        params += list(student.heads.parameters())
    frozen_attention = not any(n.startswith("attention.") for n in _names(teacher, params))
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = balanced_weights(labels, flags.shape[1]) if cfg.class_weights == "balanced" else None
    teacher.train(stage == "teacher")
    if student is not None:
        student.train()
    capped = cfg.episodes == "leave_one_out" and 0 < cfg.max_shots < flags.shape[0] - 1
    # A frozen attention without dropout gives constant coarse masks for fixed episodes: then capped episodes are
    # drawn once too (their attention runs once); a trainable attention draws them afresh every step.
    static_attention = frozen_attention and not _has_dropout(teacher)
    fixed_episodes = flags.shape[0] < 2 or (cfg.episodes == "leave_one_out" and (not capped or static_attention))
    reuse = static_attention and fixed_episodes
    # bfloat16 autocast runs the convolutions faster on CPUs with AVX512-BF16/AMX; weights, the attention (outside
    # this context) and the losses stay float32.
    autocast = torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    episode: tuple | None = None
    coarse: list[Tensor] | None = None
    name = "joint" if stage == "teacher" and student is not None else stage  # how the log names the stage
    bar = tqdm(range(steps), desc=f"adapt ({name})", disable=None if progress else True, leave=False)
    for step in bar:
        if episode is None or not fixed_episodes:
            picks = None
            if capped:  # (M, max_shots): each episode's shots, then validity over those shots only
                picks = capped_shots(flags.shape[0], cfg.max_shots, gen).to(flags.device)
                shot_valid, queries = flags[picks].transpose(1, 2), torch.arange(len(picks), device=flags.device)
            else:
                shot_valid, queries = episodes(cfg, flags.cpu(), gen)
                shot_valid, queries = shot_valid.to(flags.device), queries.to(flags.device)
            target, present = teacher_targets(labels[queries], shot_valid)
            episode = (shot_valid, target, labels[queries], present, select(support.pyramid, queries), picks)
        shot_valid, target, full_target, present, query, picks = episode
        if coarse is None or not reuse:
            with torch.set_grad_enabled(not frozen_attention):
                coarse = coarse_masks(teacher, support, query, shot_valid, picks)
        row: dict = {"step": step + 1, "stage": name}
        terms = []
        with autocast:
            if stage == "teacher":
                t_out = teacher.decode(coarse, query, present)
                f_t = focal_loss(t_out.logits, target, cfg.focal_gamma, weights)
                terms.append(f_t)
                row["focal_teacher"] = round(f_t.item(), 5)
            if student is not None:
                s_out = student.forward_features(query)
                f_s = focal_loss(s_out.logits, full_target, cfg.focal_gamma, weights)  # no support: every class
                d = coarse_mse(coarse, [c.float() for c in s_out.coarse], teacher.strides, present)
                terms += [f_s, cfg.distill_weight * d]
                row["focal_student"] = round(f_s.item(), 5)
                row["distill"] = round(d.item(), 5)
        loss = torch.stack(terms).sum() / len(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row["loss"] = round(loss.item(), 5)
        record(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
    for p in params:
        p.requires_grad_(False)


@contextlib.contextmanager
def step_log(
    log_path: Path | None, clock: Callable[[], float], on_step: Callable[[dict], None] | None = None
) -> Iterator[tuple[Callable[..., None], list[dict]]]:
    """-> (record, rows): ``record(row)`` stamps ``clock()`` (seconds since the adaptation started) as the row's
    ``seconds`` (unless ``stamp=False``: a row that has them), keeps the row, appends it as one JSON line to
    ``log_path`` (closed on exit) and passes it to ``on_step``."""
    rows: list[dict] = []
    log_file = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed in finally

    def record(row: dict, stamp: bool = True) -> None:
        if stamp:
            row["seconds"] = round(clock(), 3)
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


def select(p: Pyramid, idx: Tensor | slice) -> Pyramid:
    """The images of a Pyramid at ``idx`` (indices, a boolean mask or a slice)."""
    return Pyramid(p.skip4[idx], tuple(t[idx] for t in p.layers))


def _names(module: nn.Module, params: list[nn.Parameter]) -> list[str]:
    ids = {id(p) for p in params}
    return [n for n, p in module.named_parameters() if id(p) in ids]


def _has_dropout(teacher: Teacher) -> bool:
    return any(a.attn_dropout > 0 or a.pe_dropout.p > 0 for a in teacher.attention)
