"""Canonical orientation: every case's arrays seen along the same anatomical axes, exactly.

Scanners and converters store volumes in many orientations: the same abdomen arrives with x
running to the patient's left in one file and to the right in the next (RAS- against
LPS-stored NIfTI), with rows and columns swapped, or upside down. nnU-Net reads arrays as
stored, so a network trained on a mixed dataset sees the spleen on both sides of the array
and must learn every orientation from few cases; nnU-Net v2 offers a reorienting reader
(``NibabelIOWithReorient``) for this. A plan with ``orientation: "canonical"`` views every
case, before anything else, with its array axes (z, y, x) running towards the patient's
superior, posterior and left (ITK's LPS: an identity direction matrix), the closest such
axes for an oblique scan. Only axes are permuted and reversed - numpy views, no resampling -
so the way back to the stored grid is exact: restoring writes through the same view.

Example:
    >>> o = canonical_orientation([-1, 0, 0, 0, -1, 0, 0, 0, 1])   # an RAS-stored axial scan
    >>> o.axes, o.flip
    ((0, 1, 2), (False, True, True))
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CANONICAL = "canonical"  # plans.json "orientation"; absent: arrays as stored (nnU-Net's way)


@dataclass(frozen=True)
class Orientation:
    """Canonical array axis ``c`` is stored axis ``axes[c]``, reversed when ``flip[c]``."""

    axes: tuple[int, ...] = (0, 1, 2)
    flip: tuple[bool, ...] = (False, False, False)

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flip)

    def spacing(self, stored_spacing: Sequence[float]) -> tuple[float, ...]:
        """Spacing (z, y, x order) of the canonical view."""
        return tuple(float(stored_spacing[a]) for a in self.axes)

    def shape(self, stored_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(stored_shape[a]) for a in self.axes)

    def to_dict(self) -> dict:
        return {"axes": list(self.axes), "flip": list(self.flip)}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Orientation":
        if not data:
            return cls()
        return cls(tuple(int(a) for a in data["axes"]), tuple(bool(f) for f in data["flip"]))


STORED = Orientation()


def canonical_orientation(direction: Sequence[float]) -> Orientation:
    """The axis permutation and reversals that bring a stored volume closest to LPS.

    ``direction``: ITK's row-major direction matrix (rows world x, y, z; columns the index
    axes i, j, k). Each world axis gets the index axis most aligned with it (the permutation
    with the largest sum of |cosines|, so an oblique scan gets its nearest axes), reversed
    when it points the other way.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(matrix[w, p[w]]) for w in range(3)))
    # array axes (z, y, x) are index axes (k, j, i); canonical array axis c looks along world axis 2 - c
    axes = tuple(2 - best[2 - c] for c in range(3))
    flip = tuple(bool(matrix[2 - c, best[2 - c]] < 0) for c in range(3))
    return Orientation(axes, flip)


def left_right_axis(direction: Sequence[float]) -> int:
    """Array axis (z, y, x order) closest to the patient's left-right, from an ITK direction.

    ``direction`` is row-major, its columns the world directions of the x, y, z index axes;
    ITK's world x runs right to left.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(matrix[0])))


def canonical_view(array: np.ndarray, orientation: Orientation) -> np.ndarray:
    """``array`` (leading axes kept, the last three spatial, stored order) seen canonically: a view."""
    lead = array.ndim - 3
    view = array.transpose(tuple(range(lead)) + tuple(lead + a for a in orientation.axes))
    return view[(slice(None),) * lead + tuple(slice(None, None, -1) if f else slice(None) for f in orientation.flip)]


def stored_array(canonical: np.ndarray, orientation: Orientation) -> np.ndarray:
    """The inverse of :func:`canonical_view`: a canonical array seen in stored order (a view)."""
    lead = canonical.ndim - 3
    unflipped = canonical[(slice(None),) * lead
                          + tuple(slice(None, None, -1) if f else slice(None) for f in orientation.flip)]
    inverse = tuple(int(i) for i in np.argsort(orientation.axes))
    return unflipped.transpose(tuple(range(lead)) + tuple(lead + a for a in inverse))


def canonical_index(index: Sequence[float], stored_shape: Sequence[int], orientation: Orientation) -> np.ndarray:
    """A (z, y, x) voxel index of the stored array, in the canonical view (floats kept)."""
    index = np.asarray(index, dtype=float)
    out = np.array([index[a] for a in orientation.axes])
    for c, (a, f) in enumerate(zip(orientation.axes, orientation.flip)):
        if f:
            out[c] = stored_shape[a] - 1 - out[c]
    return out
