"""How good the model is likely to be on new images of the domain, and whether labelling more is likely to help.

The estimate needs no test images: every support image is predicted by the linear probe fitted on the other support
images (``LabelProbes.without``, which the fast student's distillation fits anyway), and the held-out predictions
are scored as the benchmark scores test images (one confusion matrix over them all; foreground mIoU). Its 95 %
interval is for the model's mIoU on new images, and it has two parts: the support set's own spread (a seeded
bootstrap over the held-out images: ``sample_low``, ``sample_high``), and how far a model's test mIoU has been from
the estimate in the project's benchmark runs (``GAP_SD``: the estimate scores a probe on images like the support
images, not the student on new ones). Each side of the interval is the root of the sum of their squares. The trend
repeats the same with one image fewer (each held-out image predicted by a probe fitted on all others but one): the
change from K-1 to K labelled images, paired over the held-out images, says whether more labels are likely to help.

What it estimates is the probe's accuracy on images like the support images; the benchmark records it beside the
student's test mIoU, and ``docs/results.md`` reports how far apart they are and how often the interval held it.
Support images that are near copies of each other (adjacent slices of one scan, overlapping tiles) would make it
optimistic: a held-out slice predicted by a probe that saw its neighbours. They are recognised by their masks
(``copy_groups``: foregrounds that overlap at the same place far beyond chance) and held out together, as a
patient's slices are in a grouped cross-validation; the bootstrap then resamples the groups. The windows a large
support image is cut into (``tiling.support_windows``) are held out together for the same reason, and the estimate
counts images, not windows. When every image is in one group there is no independent image, and no estimate (the
interval is 0-100), as with one support image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .baselines import LinearProbe
from .data.folder import IGNORE
from .fast import LabelProbes, probe_without
from .teacher import EncodedSupport
from .transfer import select

RESAMPLES = 2000
LEVEL = 0.95
FLAT = 2.0  # a trend whose whole interval lies below this many points: "unlikely to help much"
COPY_IOU = 0.2  # foreground overlap (IoU) of two support masks that makes them near copies, when it is also
COPY_FACTOR = 3.0  # this many times what chance gives two unrelated masks of their coverages
# How far a model's test mIoU lies from the estimate (mIoU points): the root mean square of (test - estimate) over
# every committed benchmark run with an estimate (the headline and the loop runs). `make results` computes it into
# docs/results.md ("The estimate's interval"), and a test checks that this value is the one computed there.
GAP_SD = 8.8
Z = 1.96  # the 95 % normal quantile: the gap's share of the interval is Z * GAP_SD on each side


@dataclass(frozen=True)
class Estimate:
    """Estimated foreground mIoU (%) on new images of the domain, with its 95 % interval (0-100: unknown)."""

    miou: float | None  # None with a single support image
    low: float
    high: float
    images: int  # held-out support images it rests on (a large image's windows count once)
    gain: float | None  # the estimate with K images minus the one with K-1 (None below 3 images)
    gain_low: float | None
    gain_high: float | None
    advice: str  # one line for people: the estimate and whether labelling more is likely to help
    near_copies: bool = False  # some support images are near copies of others (held out together)
    sample_low: float = 0.0  # the support set's own spread: the bootstrap interval over the held-out images
    sample_high: float = 100.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HeldOut:
    """What the estimate rests on, which depends only on the support set and its probes (not on the seed): the
    support images, the windows held out together (near copies, windows of one image) and, per group, the held-out
    (intersection, union) counts (G, n_out) with K images and with one image fewer (None: no estimate, or no
    trend)."""

    images: int
    windows: int
    groups: list[tuple[int, ...]]
    held: tuple[Tensor, Tensor] | None
    one_less: tuple[Tensor, Tensor] | None


@torch.no_grad()
def held_out_counts(
    support: EncodedSupport, labels: Tensor, probes: LabelProbes, sources: Tensor | None = None
) -> HeldOut:
    """The support windows predicted by probes fitted without them, without the other windows of their image and
    without their near copies; ``labels`` (M, S, S), 255 = ignore; ``sources`` (M,) the support image each window
    comes from (None: one window per image)."""
    m = len(labels)
    src = list(range(m)) if sources is None else [int(s) for s in sources.tolist()]
    if len(src) != m:
        raise ValueError(f"sources: one entry per support window expected ({m}), got {len(src)}")
    images = len(set(src))
    groups = independent_groups(labels, src)
    if images < 2 or len(groups) == 1:
        return HeldOut(images, m, groups, None, None)
    group_of = {i: g for g in groups for i in g}
    n_out = probes.full.num_classes + 1
    held = _counts(support, labels, _probes_without(support, labels, probes, group_of, src, 0), n_out)
    one_less = None
    # every held-out group leaves two or more images to drop one from
    if all(len({src[i] for i in g}) <= images - 2 for g in groups):
        one_less = _counts(support, labels, _probes_without(support, labels, probes, group_of, src, 1), n_out)
        one_less = _pooled(one_less, groups)
    return HeldOut(images, m, groups, _pooled(held, groups), one_less)


def estimate_accuracy(
    support: EncodedSupport, labels: Tensor, probes: LabelProbes, seed: int = 0, counts: HeldOut | None = None
) -> Estimate:
    """The estimate from the support set (encoded) and its label probes; ``labels`` (M, S, S), 255 = ignore.
    counts: ``held_out_counts`` of the same support set and probes, if the caller has them (the same result)."""
    c = held_out_counts(support, labels, probes) if counts is None else counts
    m, groups = c.images, c.groups
    if m < 2:
        return Estimate(None, 0.0, 100.0, m, None, None, None, "no estimate from one labelled image: label a second")
    if c.held is None:
        return Estimate(None, 0.0, 100.0, m, None, None, None, ALL_COPIES, True)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(groups), (RESAMPLES, len(groups)), generator=gen)
    miou, sample_low, sample_high = _with_interval(c.held, picks)
    low, high = predictive_interval(miou, sample_low, sample_high)
    gain = gain_low = gain_high = None
    if c.one_less is not None:
        gain = (_miou(*c.held) - _miou(*c.one_less)).item()
        boot = _miou_boot(c.held, picks) - _miou_boot(c.one_less, picks)
        gain_low, gain_high = (float(q) for q in boot.quantile(torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2])))
    advice = _advice(m, c.windows, miou, low, high, gain, gain_low, gain_high)
    copies = len(groups) < m
    if copies:
        advice += f"; near copies held out together ({m} images in {len(groups)} independent groups)"
    return Estimate(
        round(miou, 1),
        round(low, 1),
        round(high, 1),
        m,
        None if gain is None else round(gain, 1),
        None if gain_low is None else round(gain_low, 1),
        None if gain_high is None else round(gain_high, 1),
        advice,
        copies,
        round(sample_low, 1),
        round(sample_high, 1),
    )


def predictive_interval(
    miou: float, sample_low: float, sample_high: float, gap_sd: float = GAP_SD
) -> tuple[float, float]:
    """The interval for a model's mIoU on new images: each side of the support set's bootstrap interval widened by
    the gap between estimates and test mIoUs (root of the sum of squares), clipped to 0-100."""
    low = miou - ((miou - sample_low) ** 2 + (Z * gap_sd) ** 2) ** 0.5
    high = miou + ((sample_high - miou) ** 2 + (Z * gap_sd) ** 2) ** 0.5
    return max(low, 0.0), min(high, 100.0)


ALL_COPIES = (
    "no estimate: every support mask overlaps another at the same place (slices of one scan or overlapping "
    "tiles?), so no image is independent of the others; label images from other scans or scenes"
)


def copy_groups(labels: Tensor) -> list[tuple[int, ...]]:
    """Support images (labels (M, S, S), 255 = ignore) grouped as near copies: the connected components of the
    graph that joins two images whose foregrounds overlap at the same place far beyond chance (IoU at least
    ``COPY_IOU`` and ``COPY_FACTOR`` times what two unrelated masks of their coverages reach), in image order."""
    fg = ((labels > 0) & (labels != IGNORE)).flatten(1).float().cpu()
    inter = fg @ fg.T
    area = fg.sum(1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp_min(1)
    f = area / fg.shape[1]  # coverages; unrelated masks overlap by about fa * fb / (fa + fb - fa * fb)
    chance = f[:, None] * f[None, :] / (f[:, None] + f[None, :] - f[:, None] * f[None, :]).clamp_min(1e-12)
    linked = (iou >= COPY_IOU) & (iou >= COPY_FACTOR * chance)
    return _components(len(labels), linked.triu(1).nonzero().tolist())


def independent_groups(labels: Tensor, sources: list[int]) -> list[tuple[int, ...]]:
    """Support windows (labels (M, S, S)) grouped so that the groups are independent of each other: the windows of
    one image (``sources[i]``: window i's image) and near copies (``copy_groups``) together, in window order."""
    links = [(g[0], i) for g in copy_groups(labels) for i in g[1:]]
    first: dict[int, int] = {}  # each image's first window
    for i, s in enumerate(sources):
        links.append((first.setdefault(s, i), i))
    return _components(len(labels), links)


def _components(n: int, links: list) -> list[tuple[int, ...]]:
    """The connected components of the graph on 0..n-1 with edges ``links`` (pairs), each in order, ordered by their
    first member."""
    parent = list(range(n))  # union-find over the links

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in links:
        parent[root(j)] = root(i)
    roots = [root(i) for i in range(n)]
    return [tuple(i for i in range(n) if roots[i] == r) for r in dict.fromkeys(roots)]


def _probes_without(
    support: EncodedSupport,
    labels: Tensor,
    probes: LabelProbes,
    group_of: dict[int, tuple[int, ...]],
    sources: list[int],
    extra: int,
) -> list[LinearProbe]:
    """For every support window, a probe fitted without its group (the label probes' own when that is the window
    alone) and, with ``extra`` = 1, without the windows of the next image outside the group too (the estimate with
    one image fewer)."""
    m, out, fitted = len(labels), [], {}
    for i in range(m):
        left = set(group_of[i])
        if extra:
            j = next(j for j in (*range(i + 1, m), *range(i)) if j not in group_of[i])
            left.update(k for k in range(m) if sources[k] == sources[j])
        key = tuple(sorted(left))
        if key == (i,):
            out.append(probes.without[i])
            continue
        if key not in fitted:
            fitted[key] = probe_without(support, labels, probes.full, key)
        out.append(fitted[key])
    return out


def _pooled(held: tuple[Tensor, Tensor], groups: list[tuple[int, ...]]) -> tuple[Tensor, Tensor]:
    """Per-image counts (M, n_out) -> per-group counts (G, n_out): the bootstrap resamples independent groups."""
    inter, union = held
    return torch.stack([inter[list(g)].sum(0) for g in groups]), torch.stack([union[list(g)].sum(0) for g in groups])


def _advice(m: int, windows: int, miou, low, high, gain, gain_low, gain_high) -> str:  # noqa: ANN001 - floats/None
    cut = f", {windows} windows" if windows > m else ""
    line = f"estimated mIoU on new images {miou:.1f} [{low:.1f}, {high:.1f}] (from {m} held-out support images{cut})"
    if gain is None:
        return f"{line}; label a third image to see whether more labels help"
    trend = f"{gain:+.1f} [{gain_low:+.1f}, {gain_high:+.1f}] points from {m - 1} to {m} images"
    if gain_high < FLAT:
        return f"{line}; labelling more is unlikely to help much ({trend})"
    if gain_low > 0:
        return f"{line}; labelling more is likely to help ({trend})"
    return f"{line}; whether labelling more helps is unclear ({trend})"


def _counts(support: EncodedSupport, labels: Tensor, probes: list[LinearProbe], n_out: int) -> tuple[Tensor, Tensor]:
    """Support image i predicted by ``probes[i]`` -> per-image (intersection, union) counts, each (M, n_out)."""
    inter, union = torch.zeros(len(labels), n_out), torch.zeros(len(labels), n_out)
    size = tuple(labels.shape[-2:])
    for i, probe in enumerate(probes):
        pred = probe.forward_features(select(support.pyramid, slice(i, i + 1)), size).argmax(1)[0].cpu()
        y = labels[i].cpu()
        valid = y != IGNORE
        for c in range(n_out):
            p, t = (pred == c) & valid, (y == c) & valid
            inter[i, c], union[i, c] = (p & t).sum(), (p | t).sum()
    return inter, union


def _miou(inter: Tensor, union: Tensor) -> Tensor:
    """Foreground mIoU (%) of pooled counts (..., M, n_out) -> (...); a class with no union scores 0 (the
    benchmark's rule)."""
    i, u = inter.sum(-2)[..., 1:], union.sum(-2)[..., 1:]
    return 100 * torch.where(u > 0, i / u.clamp_min(1), torch.zeros_like(u)).mean(-1)


def _miou_boot(held: tuple[Tensor, Tensor], picks: Tensor) -> Tensor:
    return _miou(held[0][picks], held[1][picks])  # (R,)


def _with_interval(held: tuple[Tensor, Tensor], picks: Tensor) -> tuple[float, float, float]:
    boot = _miou_boot(held, picks)
    low, high = boot.quantile(torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2])).tolist()
    return _miou(*held).item(), low, high
