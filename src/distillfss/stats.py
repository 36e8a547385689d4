"""Error bars for accuracy claims: mean ± std over runs, and paired comparisons with a bootstrap interval.

A benchmark run is one (dataset, K, support draw, adaptation seed). Two methods are compared on the runs they
share: the difference is taken per run (paired), and the 95 % interval of its mean comes from a paired bootstrap,
seeded, so the same results give the same interval. Runs of one (dataset, K, draw) share their support set (and a
baseline's single run), so they are not independent: with ``groups`` the bootstrap is hierarchical, resampling the
groups and then the runs within each drawn group, which gives the honest, wider interval. A difference whose
interval contains 0 is "not distinguishable".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
LEVEL = 0.95


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


class Comparison(NamedTuple):
    mean: float  # mean paired difference (a - b), in mIoU points
    low: float  # 95 % interval of the mean (nan with fewer than 2 paired runs)
    high: float
    n: int  # paired runs
    verdict: str  # "better", "worse", "not distinguishable", or "no interval (n < 2)"


def paired_comparison(
    a: Sequence[float], b: Sequence[float], groups: Sequence[object] | None = None, seed: int = 0
) -> Comparison:
    """Compare paired results a[i] vs b[i] (same dataset, K, support draw and seed) by a paired bootstrap.

    groups: optional label per pair (e.g. (dataset, K, draw)); pairs of one group are resampled together
    (hierarchical bootstrap: groups with replacement, then pairs within each drawn group).
    """
    if len(a) != len(b) or (groups is not None and len(groups) != len(a)):
        raise ValueError(
            f"paired results need equal lengths, got {len(a)}, {len(b)} and groups {groups and len(groups)}"
        )
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2:
        mean = float(d.mean()) if d.size else float("nan")
        return Comparison(mean, float("nan"), float("nan"), int(d.size), "no interval (n < 2)")
    rng = np.random.default_rng(seed)
    r = BOOTSTRAP_RESAMPLES
    if groups is None:
        means = d[rng.integers(0, d.size, size=(r, d.size))].mean(axis=1)
    else:
        labels = list(dict.fromkeys(groups))
        members = [d[[i for i, g in enumerate(groups) if g == label]] for label in labels]
        # each group's resampled sum in every replicate, (G, R); then groups drawn with replacement, (R, G)
        sums = np.stack([m[rng.integers(0, m.size, size=(r, m.size))].sum(axis=1) for m in members])
        sizes = np.array([m.size for m in members])
        pick = rng.integers(0, len(members), size=(r, len(members)))
        means = sums[pick, np.arange(r)[:, None]].sum(axis=1) / sizes[pick].sum(axis=1)
    tail = (1 - LEVEL) / 2
    low, high = (float(x) for x in np.quantile(means, [tail, 1 - tail]))
    verdict = "better" if low > 0 else "worse" if high < 0 else "not distinguishable"
    return Comparison(float(d.mean()), low, high, int(d.size), verdict)
