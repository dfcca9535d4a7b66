"""Which patch axes to mirror: every axis (the method's default), except left-right when labels name a side.

nnU-Net mirrors each patch axis with probability 0.5 in training and averages the mirrored
predictions at test time. Across the patient's left-right axis that turns a left kidney
into a right one while its label still says ``kidney_left``: with labels that name a side
the network is taught both sides for each, and the mirrored test-time passes average the
two. nnU-Net v2 leaves this to the user (a trainer without mirroring, as TotalSegmentator
uses); the planner decides it from the label names and the images' orientation.

The left-right axis of a case is the array axis whose direction is closest to the patient's
left-right (ITK's world x), from the image header (the fingerprint's ``left_right_axes``).
Only that axis stops being mirrored; the others keep the augmentation.

Example:
    >>> side_labels({"background": 0, "kidney_left": 1, "kidney_right": 2, "liver": 3})
    ['kidney_left', 'kidney_right']
    >>> mirror_axes_without({2}, 3), mirror_axes_without({2}, 2)
    ([0, 1], [0])
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

# A side as a word of the name: kidney_left, Left-Hippocampus, lung_upper_lobe_right, iliac_artery_l,
# femur_R, LeftKidney; not "leftover", "bright" or "vertebrae_L1".
_SIDE = re.compile(r"(?:^|[^a-z])(?:left|right|lt|rt|l|r)(?:$|[^a-z0-9])")
_CAMEL = re.compile(r"(?:Left|Right)(?=[A-Z]|$)")
ASSUMED_AXIS = 2  # without headers (an nnU-Net v2 fingerprint): x, the left-right axis of axial scans


def names_a_side(name: str) -> bool:
    """True when the label name says left or right (as a word, a suffix or a CamelCase part)."""
    return bool(_SIDE.search(name.lower()) or _CAMEL.search(name))


def side_labels(labels: dict) -> list[str]:
    """The label names that say a side, in the labels' order (background and ignore never do)."""
    return [name for name in labels if name not in ("background", "ignore") and names_a_side(name)]


def left_right_axis(direction: Sequence[float]) -> int:
    """Array axis (z, y, x order) closest to the patient's left-right, from an ITK direction.

    ``direction`` is row-major, its columns the world directions of the x, y, z index axes;
    ITK's world x runs right to left.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(matrix[0])))


def planning_axes(array_axes: Iterable[int | None], transpose_forward: Sequence[int]) -> tuple[set[int], bool]:
    """The left-right axes in planning order, and whether they were assumed (no headers measured)."""
    measured = {int(a) for a in array_axes if a is not None}
    assumed = not measured
    axes = measured or {ASSUMED_AXIS}
    order = [int(a) for a in transpose_forward]
    return {order.index(a) for a in axes}, assumed


def mirror_axes_without(left_right: set[int], dims: int) -> list[int]:
    """Patch axes to mirror in a ``dims``-D configuration, leaving out the left-right planning axes.

    A 2D configuration's patch axes are planning axes 1 and 2 (slices are cut along axis 0).
    """
    first = 3 - dims
    return [axis - first for axis in range(first, 3) if axis not in left_right]


def mirroring_text(sides: list[str], left_right: set[int], axis_names: Sequence[str], assumed: bool) -> str:
    """The explain note: which labels name a side and which axis is no longer mirrored."""
    shown = ", ".join(sides[:6]) + (f" and {len(sides) - 6} more" if len(sides) > 6 else "")
    axes = " and ".join(axis_names[a] for a in sorted(left_right))
    source = ("assumed: the fingerprint records no image orientation" if assumed
              else "from the images' orientation")
    return (f"{len(sides)} label(s) name a side ({shown}): mirroring across the left-right axis ({axes}, {source}) "
            "would teach each of them on both sides, so training and test-time augmentation do not mirror it; "
            "the other axes are mirrored as the method does.")
