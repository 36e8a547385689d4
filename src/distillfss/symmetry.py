"""The 8 symmetries of the square, used for augmented views (the students' banks) and test-time augmentation."""

from __future__ import annotations

from torch import Tensor

# Augmented views: indices into the 8 symmetries of the square (see ``dihedral``); 0 = identity.
VIEWS: dict[str, tuple[int, ...]] = {"none": (0,), "hflip": (0, 1), "flips": (0, 1, 2, 3), "dihedral": tuple(range(8))}


def dihedral(x: Tensor, k: int) -> Tensor:
    """The k-th (0..7) symmetry of the square on the last two dims: bit 2 transposes, bit 0 flips left-right,
    bit 1 flips up-down (0 = identity, 3 = rotation by 180 degrees)."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x


def undo_dihedral(x: Tensor, k: int) -> Tensor:
    """The inverse of ``dihedral(x, k)``."""
    if k & 2:
        x = x.flip(-2)
    if k & 1:
        x = x.flip(-1)
    if k & 4:
        x = x.transpose(-1, -2)
    return x


def tta_probabilities(forward, images: Tensor, views: tuple[int, ...]) -> Tensor:
    """Test-time augmentation: ``forward`` ((B, 3, S, S) -> (B, C+1, S, S) logits) on every view of ``images``,
    its softmax mapped back to the images' frame and averaged over the views -> (B, C+1, S, S) probabilities."""
    total = None
    for k in views:
        p = undo_dihedral(forward(dihedral(images, k)).float().softmax(dim=1), k)
        total = p if total is None else total + p
    assert total is not None, "at least one view"
    return total / len(views)
