"""Where a refinement predicts and how its result goes back into the label map: pure numpy.

A refine re-predicts only windows (the training patch) centred on the clicks, in the
preprocessed grid of the case (cropped, transposed, resampled: ``properties`` of
:func:`~AutoSegLib.preprocessing.case.preprocess_case`). The inner part of each window
(the patch less an eighth on each side, where the network saw too little context, unless
that side is the image border) is what changes; its voxels are mapped back to the original
grid with the same linear interpolation of class probabilities that
:func:`~AutoSegLib.preprocessing.case.restore_labels` uses, and merged into the previous label
map inside one box (the ``region``). Nothing outside the region changes.

Coordinates: resampling is scipy's ``grid_mode=True`` zoom (voxel centres of the old and new
grids are aligned as ``p = (c + 0.5) * new / old - 0.5`` per axis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from AutoSegLib.inference.clicks import Click, check_click_labels, click_index
from AutoSegLib.imageio import Geometry
from AutoSegLib.preprocessing.orientation import Orientation, canonical_index, stored_array

SCOPES = ("clicked", "all")
INNER_MARGIN = 1 / 8  # of the patch, each side: the window's border is left to the previous labels


@dataclass
class RefineCase:
    """One case preprocessed for one configuration: what refines of the same image share."""

    data: np.ndarray  # (C, ...) float32, the image channels only
    properties: dict
    geometry: Geometry
    configuration: str

    @property
    def original_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.properties["original_shape"])


@dataclass
class RefineResult:
    """The merged label map (original grid, the previous map's dtype) and the box that was re-predicted:
    ``region = (z0, z1, y0, y1, x0, x1)``, end-exclusive indices of the original grid."""

    labels: np.ndarray
    region: tuple[int, int, int, int, int, int]
    windows: int = 0  # network windows predicted
    seconds: float = 0.0
    network_seconds: float = 0.0  # of ``seconds``, in the network (the rest: mapping, merging)

    @property
    def region_slices(self) -> tuple[slice, ...]:
        r = self.region
        return tuple(slice(r[2 * a], r[2 * a + 1]) for a in range(len(r) // 2))


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}; allowed: {', '.join(SCOPES)}")
    return scope


def preprocessed_point(index: Sequence[float], properties: dict) -> np.ndarray:
    """An original-grid index (z, y, x) as a continuous index of the preprocessed grid (planning order):
    cropped, seen along the canonical axes when the plan is canonical, transposed, resampled."""
    transpose = [int(a) for a in properties["transpose_forward"]]
    crop = np.array([int(b[0]) for b in properties["crop_bbox"]])
    crop_shape = [int(b[1]) - int(b[0]) for b in properties["crop_bbox"]]
    old = np.asarray(properties["shape_after_crop"], dtype=float)
    new = np.asarray(properties["shape_after_resampling"], dtype=float)
    oriented = canonical_index(np.asarray(index, dtype=float) - crop, crop_shape, _orientation(properties))
    return (oriented[transpose] + 0.5) * new / old - 0.5


def _orientation(properties: dict) -> Orientation:
    return Orientation.from_dict(properties.get("orientation"))  # absent: preprocessed before orientation


def click_points(clicks: Sequence[Click], case: RefineCase, foreground: Sequence[int]) -> list[tuple]:
    """``(class_position, positive, preprocessed index)`` per click, checked (:class:`ClickError`)."""
    check_click_labels(clicks, foreground)
    points = []
    for click in clicks:
        index = click_index(click, case.geometry, case.original_shape)
        points.append((list(foreground).index(click.label), click.positive,
                       preprocessed_point(index, case.properties)))
    return points


def window_starts_for(points: Sequence[np.ndarray], padded_shape: Sequence[int], patch: Sequence[int]) -> list:
    """One window start per group of clicks: a click inside the central half of a window already
    chosen joins it; otherwise a new window is centred on it (clipped to the padded image; a
    window clipped onto one already chosen is not predicted twice)."""
    patch = np.asarray(patch, dtype=int)
    limit = np.asarray(padded_shape, dtype=int) - patch
    starts: list[tuple] = []
    for point in points:
        centre = np.rint(np.asarray(point, dtype=float)).astype(int)
        if any(np.all(np.abs(centre - (np.asarray(s) + patch // 2)) <= patch // 4) for s in starts):
            continue
        start = tuple(int(v) for v in np.clip(centre - patch // 2, 0, limit))
        if start not in starts:
            starts.append(start)
    return starts


def inner_mask(starts: Sequence[tuple], box_start: Sequence[int], box_shape: Sequence[int],
               patch: Sequence[int], data_begin: Sequence[int], data_end: Sequence[int]) -> np.ndarray:
    """Voxels of the box inside the inner part of at least one window.

    A window side keeps its border when it lies at (or beyond) the image's edge: there is no
    previous prediction with more context to keep.
    """
    covered = np.zeros(tuple(box_shape), dtype=bool)
    for start in starts:
        index = []
        for a, (s, p) in enumerate(zip(start, patch)):
            margin = int(math.floor(p * INNER_MARGIN))
            lo = s if s <= data_begin[a] else s + margin
            hi = s + p if s + p >= data_end[a] else s + p - margin
            index.append(slice(lo - box_start[a], hi - box_start[a]))
        covered[tuple(index)] = True
    return covered


def _axis_sampling(n_old: int, n_new: int, first: int, last: int, box_start: float, box_size: int):
    """For original (cropped, planning-order) voxels first..last-1 of one axis: the two box indices
    and the weight of the second, for linear interpolation in the preprocessed grid."""
    c = np.arange(first, last, dtype=float)
    q = (c + 0.5) * n_new / n_old - 0.5 - box_start
    q = np.clip(q, 0, box_size - 1)
    i0 = np.floor(q).astype(np.intp)
    i1 = np.minimum(i0 + 1, box_size - 1)
    return i0, i1, (q - i0).astype(np.float32)


def original_range(begin: int, end: int, n_old: int, n_new: int) -> tuple[int, int]:
    """Original (cropped) voxels whose centre maps into preprocessed voxels ``begin..end-1``."""
    scale = n_old / n_new
    first = max(0, math.ceil(begin * scale - 0.5))
    last = min(n_old, math.floor(end * scale - 0.5) + 1)
    return first, max(first, last)


def region_labels(probabilities: np.ndarray, covered: np.ndarray, box_start: Sequence[int],
                  properties: dict) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """Labels on the original grid for the covered part of a box of class probabilities.

    Args:
        probabilities: (K, *box) on the preprocessed grid (planning order), box inside the data.
        covered: (*box) the voxels the refine may change.
        box_start: the box's first voxel in the preprocessed grid.

    Returns:
        the region as slices of the original grid (original axis order), the labels there
        (class index = label value) and the mask of voxels to take (the others keep the
        previous labels), both in original axis order.
    """
    transpose = [int(a) for a in properties["transpose_forward"]]
    old, new = properties["shape_after_crop"], properties["shape_after_resampling"]
    found = np.argwhere(covered)
    lo, hi = found.min(0), found.max(0) + 1
    samplers, ranges = [], []
    for k in range(len(transpose)):
        first, last = original_range(box_start[k] + int(lo[k]), box_start[k] + int(hi[k]), old[k], new[k])
        ranges.append((first, last))
        samplers.append(_axis_sampling(old[k], new[k], first, last, box_start[k], covered.shape[k]))
    values = _sample(probabilities, samplers)
    take = _sample(covered[None].astype(np.float32), samplers)[0] > 0.999
    labels = np.argmax(values, axis=0)
    back = np.argsort(transpose)
    crop = [int(b[0]) for b in properties["crop_bbox"]]
    crop_shape = [int(b[1]) - int(b[0]) for b in properties["crop_bbox"]]
    oriented = _orientation(properties)
    region = [None] * len(transpose)
    for k, (first, last) in enumerate(ranges):
        canonical_axis = transpose[k]
        axis = oriented.axes[canonical_axis]  # the stored axis it views
        if oriented.flip[canonical_axis]:
            first, last = crop_shape[axis] - last, crop_shape[axis] - first
        region[axis] = slice(crop[axis] + first, crop[axis] + last)
    labels = np.ascontiguousarray(stored_array(labels.transpose(back), oriented))
    take = np.ascontiguousarray(stored_array(take.transpose(back), oriented))
    return tuple(region), labels, take


def _sample(values: np.ndarray, samplers) -> np.ndarray:
    """Separable linear interpolation of (K, *box) at the samplers' positions, axis by axis."""
    out = values.astype(np.float32, copy=False)
    for k, (i0, i1, w) in enumerate(samplers):
        shape = [1] * out.ndim
        shape[k + 1] = len(w)
        w = w.reshape(shape)
        out = np.take(out, i0, axis=k + 1) * (1 - w) + np.take(out, i1, axis=k + 1) * w
    return out


def merge_labels(previous: np.ndarray, region: tuple[slice, ...], new: np.ndarray, take: np.ndarray,
                 clicked: Sequence[int], scope: str = "clicked") -> np.ndarray:
    """The previous labels with the region's new labels merged in (a copy; the previous dtype).

    ``scope="clicked"``: only voxels that are, or become, one of the clicked labels change, so
    other classes (perhaps edited by hand) stay as they were; ``"all"``: every class in the region.
    """
    merged = np.array(previous, copy=True)
    old = merged[region]
    change = take.copy()
    if check_scope(scope) == "clicked":
        involved = np.isin(old, list(clicked)) | np.isin(new, list(clicked))
        change &= involved
    old[change] = new[change].astype(merged.dtype)
    return merged


def region_box(region: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(int(v) for s in region for v in (s.start, s.stop))
