"""How good the model is likely to be on new images of the domain, and whether labelling more is likely to help.

The estimate needs no test images: every support image is predicted by the linear probe fitted on the other support
images (``LabelProbes.without``, which the fast student's distillation fits anyway), and the held-out predictions
are scored as the benchmark scores test images (one confusion matrix over them all; foreground mIoU). Its 95 %
interval comes from a seeded bootstrap over the held-out images. The trend repeats the same with one image fewer
(each held-out image predicted by a probe fitted on all others but one): the change from K-1 to K labelled images,
paired over the held-out images, says whether more labels are likely to help.

What it estimates is the probe's accuracy on images like the support images; the benchmark records it beside the
student's test mIoU, and ``docs/results.md`` reports how far apart they are. Support images that are near copies of
each other (adjacent slices of one scan, overlapping tiles) make it optimistic: a held-out slice is predicted by a
probe that saw its neighbours. Such a set is recognised by its masks: when most support images have a partner whose
foreground overlaps theirs at the same place far beyond chance (IoU >= ``COPY_IOU``; two unrelated masks covering a
fraction f each overlap by about f / (2 - f)), the estimate says so and its interval reaches down to 0. With one
support image there is no estimate (the interval is 0-100).
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
COPY_IOU = 0.5  # foreground overlap of two support masks that chance reaches only above 2/3 coverage


@dataclass(frozen=True)
class Estimate:
    """Estimated foreground mIoU (%) on new images of the domain, with its 95 % interval (0-100: unknown)."""

    miou: float | None  # None with a single support image
    low: float
    high: float
    images: int  # held-out support images it rests on
    gain: float | None  # the estimate with K images minus the one with K-1 (None below 3 images)
    gain_low: float | None
    gain_high: float | None
    advice: str  # one line for people: the estimate and whether labelling more is likely to help
    near_copies: bool = False  # the support images look like near copies: the estimate is optimistic

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def estimate_accuracy(support: EncodedSupport, labels: Tensor, probes: LabelProbes, seed: int = 0) -> Estimate:
    """The estimate from the support set (encoded) and its label probes; ``labels`` (M, S, S), 255 = ignore."""
    m = len(labels)
    if m < 2:
        return Estimate(None, 0.0, 100.0, m, None, None, None, "no estimate from one labelled image: label a second")
    n_out = probes.full.num_classes + 1
    held = _held_out(support, labels, probes.without, n_out)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, m, (RESAMPLES, m), generator=gen)
    miou, low, high = _with_interval(held, picks)
    gain = gain_low = gain_high = None
    if m >= 3:
        fewer = [probe_without(support, labels, probes.full, (i, (i + 1) % m)) for i in range(m)]
        one_less = _held_out(support, labels, fewer, n_out)
        diff = (_miou(*held) - _miou(*one_less)).item(), _miou_boot(held, picks) - _miou_boot(one_less, picks)
        gain = diff[0]
        gain_low, gain_high = (float(q) for q in diff[1].quantile(torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2])))
    copies = near_copies(labels)
    if copies:
        low = 0.0
    advice = _advice(m, miou, low, high, gain, gain_low, gain_high)
    if copies:
        advice += (
            "; the support masks overlap at the same place (slices of one scan or overlapping tiles?): the estimate "
            "is optimistic, label images from other scans or scenes"
        )
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
    )


def near_copies(labels: Tensor) -> bool:
    """Whether most support images (labels (M, S, S), 255 = ignore) have a partner whose foreground overlaps theirs
    with IoU >= ``COPY_IOU``: the same structure at the same place, as in neighbouring slices of one scan."""
    fg = ((labels > 0) & (labels != IGNORE)).flatten(1).float().cpu()
    inter = fg @ fg.T
    area = fg.sum(1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp_min(1)
    iou.fill_diagonal_(0)
    return bool((iou.amax(1) >= COPY_IOU).float().mean() > 0.5)


def _advice(m: int, miou, low, high, gain, gain_low, gain_high) -> str:  # noqa: ANN001 - floats or None
    line = f"estimated mIoU on new images {miou:.1f} [{low:.1f}, {high:.1f}] (from {m} held-out support images)"
    if gain is None:
        return f"{line}; label a third image to see whether more labels help"
    trend = f"{gain:+.1f} [{gain_low:+.1f}, {gain_high:+.1f}] points from {m - 1} to {m} images"
    if gain_high < FLAT:
        return f"{line}; labelling more is unlikely to help much ({trend})"
    if gain_low > 0:
        return f"{line}; labelling more is likely to help ({trend})"
    return f"{line}; whether labelling more helps is unclear ({trend})"


def _held_out(support: EncodedSupport, labels: Tensor, probes: list[LinearProbe], n_out: int) -> tuple[Tensor, Tensor]:
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
