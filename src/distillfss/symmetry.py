"""The 8 symmetries of the square, used for the augmented views the students learn from."""

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
