"""Where the scanner puts its voxels: pose of the patient and the voxel grid of each case.

Three frames are involved:

* **body frame** (mm): the anatomy is defined here, x to the patient's left, y posterior,
  z superior (LPS), origin at the centre of the abdomen;
* **world frame** (mm, LPS): the scanner's patient coordinates that files store. A
  :class:`Pose` places the body in it (a slightly rotated patient, shifted on the table,
  optionally scaled up into a larger patient);
* **index frame**: voxel (i, j, k) sits at ``origin + D @ (spacing_xyz * (i, j, k))``,
  exactly as ITK defines it; numpy arrays are indexed ``[k, j, i]``.

A grid is drawn from one of four acquisition protocols so that every block of four cases
holds each of them: thin axial slices, thick slices (slice spacing 3-6x the pixel size),
stored with flipped or permuted axes, and a small oblique rotation. The field of view is
chosen in the world frame to hold every labelled organ (its closed-form support plus a
margin), so anatomy is never cut away whatever the grid; the body itself may be truncated
at the sides on fine grids, as in real scans.

Spacing and origin are rounded to dyadic fractions of a millimetre so they survive the
float32 fields of a NIfTI header bit for bit. Direction matrices of flipped and permuted
grids are exact; oblique ones are orthonormal to float64 rounding, and NIfTI stores them as
float32, so they read back within ~1e-7 (no NIfTI writer can do better).

Larger scans (:func:`enlarged`): a patient scaled by ``size`` about the body's centre, framed
as the original was at the same spacing, so every axis gets about ``size`` times the voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from AutoSegLib.imageio import Geometry
from AutoSegLib.synthetic.shapes import rotation

PROTOCOLS = ("axial", "thick", "flipped", "oblique")
INPLANE_VOXELS = (64, 112)
SLICE_VOXELS = (24, 48)
_PIXEL_STEP = 1 / 128  # mm; dyadic so float32 headers hold the value exactly
_ORIGIN_STEP = 1 / 64

# Axis-aligned storage orders met in practice: RAS-stored (read as LPS), reversed slice
# order, transposed rows/columns, and combinations; the slice axis stays head-foot.
_AXIS_ORDERS = (
    ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),
    ((1, 0, 0), (0, 1, 0), (0, 0, -1)),
    ((0, 1, 0), (1, 0, 0), (0, 0, 1)),
    ((0, -1, 0), (-1, 0, 0), (0, 0, 1)),
    ((0, -1, 0), (1, 0, 0), (0, 0, 1)),
)


@dataclass(frozen=True)
class Pose:
    """Placement of the body in the world: ``p = scale * rotation @ q + translation``.

    ``scale`` 1 is the phantom's own size; a larger one is a bigger patient (see :func:`enlarged`).
    """

    rotation: np.ndarray
    translation: np.ndarray
    scale: float = 1.0


@dataclass(frozen=True)
class Grid:
    """A voxel grid: array shape (z, y, x) and the geometry files store."""

    shape: tuple[int, int, int]
    geometry: Geometry

    @property
    def direction(self) -> np.ndarray:
        return np.array(self.geometry.direction, float).reshape(3, 3)

    @property
    def index_matrix(self) -> np.ndarray:
        """3x3 matrix taking ITK index (i, j, k) to a world offset from the origin."""
        return self.geometry.index_matrix

    def points(self, pose: Pose | None = None, block=None) -> tuple[np.ndarray, ...]:
        """Body-frame (or, without a pose, world) x, y, z of the voxel centres of ``block``.

        ``block`` is a tuple of three slices in array order; the default is the whole grid.
        Each returned array has the block's shape (float32).
        """
        block = block or tuple(slice(0, n) for n in self.shape)
        rot = np.eye(3) if pose is None else pose.rotation
        shift = np.zeros(3) if pose is None else pose.translation
        scale = 1.0 if pose is None else pose.scale
        m = rot.T @ self.index_matrix / scale
        b = rot.T @ (np.array(self.geometry.origin) - shift) / scale
        k, j, i = (np.arange(s.start, s.stop, dtype=float) for s in block)
        index = (i[None, None, :], j[None, :, None], k[:, None, None])
        return tuple((b[c] + m[c, 0] * index[0]).astype(np.float32)
                     + (m[c, 1] * index[1]).astype(np.float32)
                     + (m[c, 2] * index[2]).astype(np.float32) for c in range(3))

    def block_of(self, pose: Pose, shapes, margin_mm: float = 1.0) -> tuple[slice, ...] | None:
        """The array block that can contain any of ``shapes``; None if it misses the grid."""
        origin = np.array(self.geometry.origin)
        block = []
        for axis in range(3):
            a = 2 - axis
            e = self.direction[:, a]
            lo, hi = _support(pose, e, shapes)
            step = self.geometry.spacing[axis]
            first = int(np.floor((lo - margin_mm - e @ origin) / step))
            last = int(np.ceil((hi + margin_mm - e @ origin) / step))
            first, last = max(first, 0), min(last + 1, self.shape[axis])
            if first >= last:
                return None
            block.append(slice(first, last))
        return tuple(block)


def _support(pose: Pose, e: np.ndarray, shapes) -> tuple[float, float]:
    """Interval of world coordinate ``e . p`` covered by the union of ``shapes``."""
    v = pose.rotation.T @ e
    offset = float(e @ pose.translation)
    spans = [shape.support(v) for shape in shapes]
    return (offset + pose.scale * min(c - h for c, h in spans), offset + pose.scale * max(c + h for c, h in spans))


def sample_grid(rng: np.random.Generator, protocol: str, pose: Pose, organs, body) -> Grid:
    """Draw a grid of the given protocol that holds ``organs`` (all of them) and ``body``.

    Args:
        organs: shapes that must lie inside the field of view (labelled structures).
        body: shapes the in-plane field of view should cover when the voxel budget allows.
    """
    pixel, ratio, direction = _acquisition(rng, protocol)
    axes = [direction[:, a] for a in range(3)]  # world directions of i, j, k
    need = [_support(pose, e, organs) for e in axes]
    want = [_support(pose, e, body) for e in axes[:2]]
    margin = rng.uniform(3.0, 10.0, size=3)
    want = [(min(lo - m, n[0]), max(hi + m, n[1])) for (lo, hi), m, n in zip(want, margin, need)]
    want.append((need[2][0] - margin[2] - 2.0, need[2][1] + margin[2] + 2.0))

    # Square pixels, coarsened if the organs would not fit in the in-plane voxel budget.
    widest = max(need[a][1] - need[a][0] + 4.0 for a in range(2))
    pixel = _round_up(max(pixel, widest / (INPLANE_VOXELS[1] - 1)), _PIXEL_STEP)
    slice_step = _round_up(max(pixel * ratio, (need[2][1] - need[2][0] + 4.0) / (SLICE_VOXELS[1] - 1)),
                           _PIXEL_STEP)
    spacing_xyz = (pixel, pixel, slice_step)
    limits = (INPLANE_VOXELS, INPLANE_VOXELS, SLICE_VOXELS)
    starts, sizes = [], []
    for a in range(3):
        start, n = _window(want[a], need[a], spacing_xyz[a], limits[a])
        starts.append(start)
        sizes.append(n)
    origin = sum(e * s for e, s in zip(axes, starts))
    origin = np.round(origin / _ORIGIN_STEP) * _ORIGIN_STEP + 0.0  # + 0.0 turns -0.0 into 0.0
    geometry = Geometry((slice_step, pixel, pixel), tuple(float(o) for o in origin),
                        tuple(float(d) for d in (direction + 0.0).ravel()))
    return Grid((sizes[2], sizes[1], sizes[0]), geometry)


def enlarged(grid: Grid, pose: Pose, size: float) -> Grid:
    """``grid`` grown to frame the patient of ``pose`` scaled by ``size``, at the same spacing.

    A bigger patient, not a finer scan: spacing, slice thickness and so the scanner's noise
    stay those of ``grid``; the field of view grows about the body's centre, so each axis gets
    about ``size`` times the voxels (rounded up) and the scaled organs sit where the originals
    sat. Render with ``Pose(..., scale=pose.scale * size)``.
    """
    matrix = grid.index_matrix
    counts = np.array(grid.shape[::-1], float)  # voxels along i, j, k
    # Rounded up: the original field of view held every organ, the grown one must hold them scaled.
    new_counts = np.ceil((counts - 1) * size - 1e-9) + 1
    centre = np.array(grid.geometry.origin) + matrix @ ((counts - 1) / 2)
    new_centre = pose.translation + size * (centre - pose.translation)
    origin = new_centre - matrix @ ((new_counts - 1) / 2)
    origin = np.round(origin / _ORIGIN_STEP) * _ORIGIN_STEP + 0.0
    geometry = Geometry(grid.geometry.spacing, tuple(float(o) for o in origin), grid.geometry.direction)
    return Grid(tuple(int(n) for n in new_counts[::-1]), geometry)


def _acquisition(rng: np.random.Generator, protocol: str) -> tuple[float, float, np.ndarray]:
    """(pixel size mm, slice/pixel spacing ratio, direction) typical of ``protocol``."""
    if protocol == "axial":
        return rng.uniform(0.75, 1.5), rng.uniform(1.0, 1.6), np.eye(3)
    if protocol == "thick":
        # Small pixels, so slices of 3-6 pixels stay <= ~5.7 mm and the smallest lesion
        # (4 mm radius) is still cut by at least one slice.
        flip = np.diag([-1.0, -1.0, 1.0]) if rng.random() < 0.5 else np.eye(3)
        return rng.uniform(0.7, 0.95), rng.uniform(3.0, 6.0), flip
    if protocol == "flipped":
        order = np.array(_AXIS_ORDERS[rng.integers(len(_AXIS_ORDERS))], float)
        return rng.uniform(0.75, 1.5), rng.uniform(1.0, 2.0), order
    if protocol == "oblique":
        flip = np.diag([-1.0, -1.0, 1.0]) if rng.random() < 0.5 else np.eye(3)
        angle = rng.uniform(5.0, 15.0) * rng.choice([-1.0, 1.0])
        oblique = rotation(rng.normal(size=3), np.radians(angle))
        return rng.uniform(0.75, 1.5), rng.uniform(1.5, 3.0), oblique @ flip
    raise ValueError(f"unknown acquisition protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")


def _window(want, need, step: float, limits) -> tuple[float, int]:
    """Start coordinate and voxel count of one axis: cover ``want`` if the budget allows,
    always cover ``need`` (the caller made ``step`` coarse enough for that)."""
    n = int(np.clip(np.ceil((want[1] - want[0]) / step) + 1, *limits))
    length = (n - 1) * step
    start = (want[0] + want[1] - length) / 2
    start = max(min(start, need[0]), need[1] - length)
    return start, n


def _round_up(value: float, step: float) -> float:
    return float(np.ceil(value / step - 1e-9) * step)
