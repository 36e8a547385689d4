"""Deterministic, nested, class-stratified support sampling.

The original code takes ``hierarchical_uniform_sampling(N-1, K)``: start with {0, N-1}, insert midpoints between
neighbours level by level, sort, keep the first K. Keeping the first K *sorted* indices breaks nesting (K=10 is not
a superset of K=5 once a level is split). Here the same midpoint levels define an **order** over all indices
(endpoints, then each level's midpoints, spread within the level), and the K-shot set is the first K of that order:
nested by construction, and equal to the original whenever K fills whole levels (e.g. N=100, K=5 ->
[0, 24, 49, 74, 99]).

Further support draws (``draw`` >= 1, for error bars over support sets) replace the midpoint order by a seeded random
permutation of the sorted pool: still nested in K, still alternating between classes, reproducible from the draw
number alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .data.folder import DataError


def _spread(n: int) -> list[int]:
    """An order over range(n) that keeps any prefix evenly spread (recursive middles)."""
    order: list[int] = []
    queue = [(0, n)]
    while queue:
        nxt = []
        for lo, hi in queue:
            if lo >= hi:
                continue
            mid = (lo + hi) // 2
            order.append(mid)
            nxt += [(lo, mid), (mid + 1, hi)]
        queue = nxt
    return order


def midpoint_order(n: int) -> list[int]:
    """All indices 0..n-1 in midpoint-sampler order."""
    if n <= 0:
        return []
    if n == 1:
        return [0]
    order = [0, n - 1]
    seen = set(order)
    level = [(0, n - 1)]
    while level:
        mids, nxt = [], []
        for lo, hi in level:
            mid = (lo + hi) // 2
            if mid not in seen and lo < mid < hi:
                mids.append(mid)
                seen.add(mid)
                nxt += [(lo, mid), (mid, hi)]
        order += [mids[i] for i in _spread(len(mids))]
        level = nxt
    order += [i for i in range(n) if i not in seen]  # gaps of width 1 leave nothing: this is a no-op guard
    return order


def draw_order(n: int, draw: int) -> list[int]:
    """All indices 0..n-1 in the order support draw ``draw`` takes them: 0 = midpoint order, else a permutation
    seeded by ``draw``."""
    if draw < 0:
        raise ValueError(f"draw must be >= 0, got {draw}")
    return midpoint_order(n) if draw == 0 else np.random.default_rng(draw).permutation(n).tolist()


def sample_support(
    stems: Sequence[str], k: int, class_sets: Sequence[set[int]] | None = None, draw: int = 0
) -> list[str]:
    """Pick K support images, deterministically.

    Args:
        stems: the pool's file stems (sorted here, so the result does not depend on listing order).
        k: number of support images.
        class_sets: per stem (same order as ``stems``), the foreground classes it contains. With several classes
            the picks alternate between classes (each class drawing from the images that contain it, in midpoint
            order), so every class is represented as early as possible; nested in K all the same.
        draw: 0 = the protocol's midpoint sampler; 1, 2, ... = further nested sets in a seeded random order.

    Returns:
        the chosen stems, sorted.
    """
    if k < 1:
        raise DataError(f"shots must be >= 1, got {k}")
    if k > len(stems):
        raise DataError(f"{k} shots requested but the pool has only {len(stems)} images")
    order_idx = sorted(range(len(stems)), key=lambda i: stems[i])
    sorted_stems = [stems[i] for i in order_idx]
    overall = draw_order(len(stems), draw)
    if class_sets is None:
        return sorted(sorted_stems[i] for i in overall[:k])
    sets = [class_sets[i] for i in order_idx]
    classes = sorted(set().union(*sets))
    if len(classes) <= 1:
        return sorted(sorted_stems[i] for i in overall[:k])
    rank = {i: r for r, i in enumerate(overall)}
    queues = {}
    for c in classes:
        members = [i for i, s in enumerate(sets) if c in s]
        # draw 0: each class's own midpoint order; other draws: the members in the draw's random order
        queues[c] = [members[j] for j in midpoint_order(len(members))] if draw == 0 else sorted(members, key=rank.get)
    rest = overall  # images with no foreground fill up at the end
    picked: list[int] = []
    chosen: set[int] = set()
    while len(picked) < k:
        progressed = False
        for c in classes:
            while queues[c] and queues[c][0] in chosen:
                queues[c].pop(0)
            if queues[c] and len(picked) < k:
                i = queues[c].pop(0)
                picked.append(i)
                chosen.add(i)
                progressed = True
        if not progressed:
            i = next(i for i in rest if i not in chosen)
            picked.append(i)
            chosen.add(i)
    return sorted(sorted_stems[i] for i in picked)
