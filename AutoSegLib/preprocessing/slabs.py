"""Blocks of slices along the first axis, for work that would otherwise need a full-size temporary.

A boolean test or a float64 sum over a whole 400x512x512 volume allocates 100 to 800 MiB for a
moment; done a slab at a time the same work needs a few MiB, and the result is identical
wherever the operation is elementwise.
"""

from __future__ import annotations

import math

SLAB_VOXELS = 1 << 22  # 4 Mi voxels: 16 slices of 512x512, 16 MiB as float32


def slabs(shape, voxels: int = SLAB_VOXELS) -> list[slice]:
    """Slices along axis 0 of an array of ``shape``, each covering about ``voxels`` voxels.

    Example:
        >>> slabs((5, 2, 2), voxels=8)
        [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    per_slice = math.prod(int(s) for s in shape[1:])
    step = max(1, voxels // max(1, per_slice))
    return [slice(z, min(z + step, shape[0])) for z in range(0, shape[0], step)]
