"""Cropping to the nonzero region, and pasting back: pure array functions, no I/O.

Cropping removes the empty surround (zero-padded borders, air masked to 0 by some exporters)
so the network and the statistics look at the body only. ``paste`` is the exact inverse used
when a prediction goes back to the original grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BBox = tuple[tuple[int, int], ...]


def nonzero_mask(channels: list[np.ndarray]) -> np.ndarray:
    """Voxels where any channel is nonzero, with enclosed holes filled.

    Holes are filled so dark structures inside the body (air in the bowel, fluid) stay
    inside the mask; only the empty surround is cropped away.
    """
    mask = np.zeros(channels[0].shape, dtype=bool)
    for channel in channels:
        mask |= channel != 0
    return ndimage.binary_fill_holes(mask)


def crop_bbox(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box ``((start, stop), ...)`` of a mask; the whole array if the mask is empty."""
    if not mask.any():
        return tuple((0, s) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def crop(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """The part of ``array``'s trailing spatial axes inside ``bbox`` (leading axes kept)."""
    lead = array.ndim - len(bbox)
    return array[(slice(None),) * lead + tuple(slice(a, b) for a, b in bbox)]


def paste(cropped: np.ndarray, bbox: BBox, shape, fill=0) -> np.ndarray:
    """Put a cropped array back into a full array of spatial ``shape`` filled with ``fill``."""
    lead = cropped.shape[: cropped.ndim - len(bbox)]
    expected = tuple(b - a for a, b in bbox)
    if tuple(cropped.shape[len(lead):]) != expected:
        raise ValueError(f"cropped shape {cropped.shape[len(lead):]} does not match bounding box size {expected}")
    out = np.full((*lead, *shape), fill, dtype=cropped.dtype)
    out[(slice(None),) * len(lead) + tuple(slice(a, b) for a, b in bbox)] = cropped
    return out
