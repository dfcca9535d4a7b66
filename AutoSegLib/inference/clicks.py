"""Clicks that correct a prediction: the value type, its JSON form, guidance maps and simulated clicks.

A :class:`Click` says "this point is (not) class ``label``" at a physical point (mm, LPS, as
ITK/SimpleITK and AutoSeg's :class:`~AutoSegLib.imageio.Geometry` use; Slicer's RAS points
are ``(-r, -a, s)`` here). Everything in this module is pure: no torch, no files.

Guidance maps (DeepEdit's scheme, docs/clicks.md): a guided network takes, after the image
channels, two channels per foreground class in the order of the label values: the positive
clicks of that class, then its negative clicks, each click a ball of ``radius`` voxels of
value 1 at the network's input resolution. All zero is automatic prediction.

Simulated clicks (training and the benchmark): at the centre - the maximum of the Euclidean
distance transform - of the largest connected error component of a class; positive on a false
negative, negative on a false positive.

Example:
    >>> c = Click(label=2, positive=True, point=(10.0, -4.5, 30.0))
    >>> click_from_json(click_to_json(c)) == c
    True
    >>> g = encode_guidance([(0, True, (2, 2, 2))], (5, 5, 5), n_foreground=1, radius=1)
    >>> g.shape, int(g[0].sum()), int(g[1].sum())
    ((2, 5, 5, 5), 7, 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.imageio import Geometry


class ClickError(ReportedFailure, ValueError):
    """A click cannot be used (outside the image, unknown label, malformed); the message names it."""


@dataclass(frozen=True)
class Click:
    """One correction click.

    Attributes:
        label: class value as in dataset.json ``labels`` (>= 1).
        positive: True: "this point is ``label``"; False: "this point is not ``label``".
        point: physical point in mm, LPS (ITK convention), ``(x, y, z)``.
    """

    label: int
    positive: bool
    point: tuple[float, float, float]

    def describe(self) -> str:
        x, y, z = self.point
        return f"{'positive' if self.positive else 'negative'} click for label {self.label} at " \
               f"({x:.1f}, {y:.1f}, {z:.1f}) mm"


def click_to_json(click: Click) -> dict:
    return {"label": int(click.label), "positive": bool(click.positive), "point": [float(v) for v in click.point]}


def click_from_json(data) -> Click:
    """A :class:`Click` from its JSON object; :class:`ClickError` naming what is wrong."""
    if not isinstance(data, dict) or set(data) != {"label", "positive", "point"}:
        raise ClickError(f"a click is an object with exactly label, positive and point; got {data!r}")
    label, positive, point = data["label"], data["positive"], data["point"]
    if isinstance(label, bool) or not isinstance(label, int) or label < 1:
        raise ClickError(f"click label must be an integer >= 1 (a foreground label value); got {label!r}")
    if not isinstance(positive, bool):
        raise ClickError(f"click positive must be true or false; got {positive!r}")
    if (not isinstance(point, (list, tuple)) or len(point) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point)):
        raise ClickError(f"click point must be three finite numbers (x, y, z in mm, LPS); got {point!r}")
    return Click(label, positive, tuple(float(v) for v in point))


# -- geometry -------------------------------------------------------------------------------------
def physical_to_index(point: Sequence[float], geometry: Geometry) -> np.ndarray:
    """Continuous array index (z, y, x) of a physical point (x, y, z); voxel centres are integers."""
    offset = np.asarray(point, dtype=float) - np.asarray(geometry.origin, dtype=float)
    return np.linalg.solve(geometry.index_matrix, offset)[::-1]


def index_to_physical(index: Sequence[float], geometry: Geometry) -> tuple[float, ...]:
    """Physical point (x, y, z) of an array index (z, y, x)."""
    xyz = geometry.index_matrix @ np.asarray(index, dtype=float)[::-1] + np.asarray(geometry.origin, dtype=float)
    return tuple(float(v) for v in xyz)


def click_index(click: Click, geometry: Geometry, shape: Sequence[int]) -> tuple[int, ...]:
    """The voxel (z, y, x) a click falls in; :class:`ClickError` when it is outside the image."""
    index = np.rint(physical_to_index(click.point, geometry)).astype(int)
    if any(i < 0 or i >= s for i, s in zip(index, shape)):
        raise ClickError(f"{click.describe()} is outside the image (voxel {tuple(int(i) for i in index)} of an "
                         f"image of {tuple(int(s) for s in shape)} voxels, z y x)")
    return tuple(int(i) for i in index)


def check_click_labels(clicks: Iterable[Click], foreground: Sequence[int]) -> None:
    for click in clicks:
        if click.label not in foreground:
            raise ClickError(f"{click.describe()}: the model has no label {click.label}; its labels are "
                             f"{', '.join(str(v) for v in foreground)}")


# -- guidance maps --------------------------------------------------------------------------------
def guidance_channel(class_position: int, positive: bool) -> int:
    """Channel of the guidance block for the ``class_position``-th foreground class (0-based)."""
    return 2 * class_position + (0 if positive else 1)


def ball_offsets(radius: float, dims: int) -> np.ndarray:
    """Integer offsets within ``radius`` voxels of the centre, (n, dims)."""
    r = int(math.floor(radius))
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * dims, indexing="ij"), -1).reshape(-1, dims)
    return grid[(grid ** 2).sum(1) <= radius * radius + 1e-9]


def encode_guidance(points: Iterable[tuple[int, bool, Sequence[float]]], shape: Sequence[int], n_foreground: int,
                    radius: float = 2.0, out: np.ndarray | None = None) -> np.ndarray:
    """Guidance maps (2 x n_foreground, *shape) float32 for clicks on this grid.

    Args:
        points: ``(class_position, positive, index)``: the class's position among the
            foreground labels (0-based), the click's sign, its (continuous) grid index; the
            index is rounded, and the part of its ball inside the grid is drawn.
        shape: the grid (spatial axes).
        radius: ball radius in voxels of this grid.
        out: an array to draw into (zeroed by the caller), e.g. a slice of a batch.
    """
    shape = tuple(int(s) for s in shape)
    if out is None:
        out = np.zeros((2 * n_foreground, *shape), dtype=np.float32)
    offsets = ball_offsets(radius, len(shape))
    for position, positive, index in points:
        if not 0 <= position < n_foreground:
            raise ValueError(f"class position {position} is not one of the {n_foreground} foreground classes")
        voxels = offsets + np.rint(np.asarray(index, dtype=float)).astype(int)
        inside = np.all((voxels >= 0) & (voxels < np.asarray(shape)), axis=1)
        voxels = voxels[inside]
        out[(guidance_channel(position, positive), *voxels.T)] = 1.0
    return out


# -- simulated clicks -----------------------------------------------------------------------------
def component_centre(component: np.ndarray, spacing: Sequence[float] | None = None) -> tuple[int, ...]:
    """The voxel of a (boolean) component farthest from its border: the maximum of its distance
    transform. A slab has many such voxels: of those, the one nearest their mean (the first in
    C order on a tie), i.e. the middle of the ridge. ``spacing`` makes the distance physical."""
    box = ndimage.find_objects(component.astype(np.uint8))[0]
    padded = np.pad(component[box], 1)
    distance = ndimage.distance_transform_edt(padded, sampling=spacing)
    peaks = np.argwhere(distance == distance.max())
    scale = np.ones(peaks.shape[1]) if spacing is None else np.asarray(spacing, dtype=float)
    offsets = ((peaks - peaks.mean(0)) * scale) ** 2
    peak = peaks[int(np.argmin(offsets.sum(1)))]
    return tuple(int(p - 1 + s.start) for p, s in zip(peak, box))


def largest_component(mask: np.ndarray) -> tuple[np.ndarray | None, int]:
    """The largest face-connected component of ``mask`` (the lowest-numbered on ties), and its size."""
    labelled, n = ndimage.label(mask)
    if n == 0:
        return None, 0
    sizes = np.bincount(labelled.ravel())[1:]
    best = int(np.argmax(sizes)) + 1
    return labelled == best, int(sizes[best - 1])


def error_click(predicted: np.ndarray, truth: np.ndarray,
                spacing: Sequence[float] | None = None) -> tuple[bool, tuple[int, ...], int] | None:
    """The click that fixes the largest error of one class: ``(positive, index, error size)``.

    ``predicted`` and ``truth`` are boolean masks of the class. The largest face-connected
    component among false negatives (positive click) and false positives (negative click)
    wins, a false negative on a tie; the click goes to its centre (:func:`component_centre`).
    None when the masks agree.
    """
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    missed, missed_size = largest_component(truth & ~predicted)
    extra, extra_size = largest_component(predicted & ~truth)
    if missed is None and extra is None:
        return None
    if missed_size >= extra_size:
        return True, component_centre(missed, spacing), missed_size
    return False, component_centre(extra, spacing), extra_size
