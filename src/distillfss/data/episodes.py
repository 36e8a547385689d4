"""Few-shot episodes drawn from a source domain (meta-training): the interface every source implements.

A source has two splits, ``train`` and ``val``, with disjoint classes (PASCAL-5i / COCO-20i folds, or held-out
images for the self-supervised source). Items are integer indices into a split; an episode picks one class and
K+1 distinct items that contain it: the first is the query, the others its shots. Everything is deterministic:
episode ``j`` of optimizer step ``s`` depends only on (seed, s, j), so a resumed run and a run on several processes
draw exactly the episodes of a single uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..losses import IGNORE


class EpisodeSource(Protocol):
    name: str
    size: int  # working resolution: images (3, size, size), masks (size, size)

    def classes(self, split: str) -> list[int]:
        """The classes episodes of ``split`` may target (sorted)."""
        ...

    def items_with(self, split: str, cls: int) -> list[int]:
        """Sorted items of ``split`` in which ``cls`` is visible."""
        ...

    def image(self, split: str, item: int) -> Tensor:
        """(3, size, size) RGB in [0, 1]."""
        ...

    def mask(self, split: str, item: int, cls: int) -> Tensor:
        """(size, size) long: 1 = ``cls``, 0 = anything else, 255 = ignore."""
        ...

    def describe(self) -> dict:
        """What the source is (name, fold, classes per split, image counts): recorded in the checkpoint."""
        ...


@dataclass(frozen=True)
class EpisodeSpec:
    cls: int
    query: int
    support: tuple[int, ...]


def usable_classes(source: EpisodeSource, split: str, shots: int) -> list[int]:
    """Classes with at least shots + 1 items (a query and its shots must be distinct images)."""
    return [c for c in source.classes(split) if len(source.items_with(split, c)) >= shots + 1]


def episode_generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + index) % (2**63))


def sample_episode(
    source: EpisodeSource, split: str, classes: list[int], shots: int, gen: torch.Generator, cls: int | None = None
) -> EpisodeSpec:
    """One episode: class uniform over ``classes`` (or the given one), then K+1 distinct items holding it."""
    if cls is None:
        cls = classes[int(torch.randint(len(classes), (), generator=gen))]
    items = source.items_with(split, cls)
    pick = torch.randperm(len(items), generator=gen)[: shots + 1].tolist()
    return EpisodeSpec(cls, items[pick[0]], tuple(items[i] for i in pick[1:]))


def binary_mask(labels: Tensor, cls: int) -> Tensor:
    """Class-id label map -> 1 where ``cls``, 0 elsewhere, 255 kept as ignore."""
    out = (labels == cls).long()
    return torch.where(labels == IGNORE, torch.full_like(out, IGNORE), out)
