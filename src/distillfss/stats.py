"""Error bars for accuracy claims: mean ± std over runs, and paired comparisons with a bootstrap interval.

A benchmark run is one (dataset, K, support draw, adaptation seed). Two methods are compared on the runs they
share: the difference is taken per run (paired), and the 95 % interval of its mean comes from a paired bootstrap
(resample runs with replacement, seeded, so the same results give the same interval). A difference whose interval
contains 0 is "not distinguishable".
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


def paired_comparison(a: Sequence[float], b: Sequence[float], seed: int = 0) -> Comparison:
    """Compare paired results a[i] vs b[i] (same dataset, K, support draw and seed) by a paired bootstrap."""
    if len(a) != len(b):
        raise ValueError(f"paired results need equal lengths, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2:
        return Comparison(
            float(d.mean()) if d.size else float("nan"), float("nan"), float("nan"), int(d.size), "no interval (n < 2)"
        )
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(BOOTSTRAP_RESAMPLES, d.size))
    means = d[idx].mean(axis=1)
    tail = (1 - LEVEL) / 2
    low, high = (float(x) for x in np.quantile(means, [tail, 1 - tail]))
    verdict = "better" if low > 0 else "worse" if high < 0 else "not distinguishable"
    return Comparison(float(d.mean()), low, high, int(d.size), verdict)
