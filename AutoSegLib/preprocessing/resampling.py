"""Resampling between voxel grids: pure array functions, no I/O.

Conventions shared by every function here:

* Shapes and spacings are (z, y, x). A new shape is ``round(shape * spacing / new_spacing)``,
  so the physical extent of the image is kept.
* Grids are aligned at voxel *edges* (scipy's ``grid_mode=True``, the same mapping as
  skimage's ``resize``): resampling there and back again returns to the same physical grid,
  which is what makes :func:`AutoSegLib.preprocessing.restore` exact in geometry.
* Images come back as float32. Spline prefiltering is done in float32 too: scipy's default
  makes a float64 copy of the whole volume, which for a 400x512x512 CT is 840 MB extra.
* Anisotropic data (largest/smallest spacing > 3) is resampled in-plane with the requested
  order and with nearest neighbour across slices, because contours can jump between distant
  slices and interpolating across them invents tissue that is not there.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0


def target_shape(shape, spacing, new_spacing) -> tuple[int, ...]:
    """Shape that keeps the physical extent when going from ``spacing`` to ``new_spacing``."""
    return tuple(max(1, int(round(s * sp / nsp))) for s, sp, nsp in zip(shape, spacing, new_spacing))


def out_of_plane_axis(spacing, threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The axis to treat separately (the coarsest), or None when spacing is not anisotropic."""
    spacing = np.asarray(spacing, dtype=float)
    if spacing.max() / spacing.min() > threshold:
        return int(np.argmax(spacing))
    return None


def separate_axis_for(old_spacing, new_spacing, threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """Separate-axis decision for a resampling step: look at the source, then the target grid.

    A case that is itself isotropic but is going to an anisotropic target (or the reverse when
    restoring a prediction) still has an axis whose slices must not be blended.
    """
    axis = out_of_plane_axis(old_spacing, threshold)
    return axis if axis is not None else out_of_plane_axis(new_spacing, threshold)


def _zoom(array: np.ndarray, new_shape, order: int) -> np.ndarray:
    factors = [n / o for n, o in zip(new_shape, array.shape)]
    if all(f == 1 for f in factors):
        return array.astype(np.float32, copy=True)
    if order > 1:
        filtered = ndimage.spline_filter(array.astype(np.float32, copy=False), order=order,
                                         output=np.float32, mode="mirror")
        return ndimage.zoom(filtered, factors, order=order, output=np.float32, mode="mirror",
                            grid_mode=True, prefilter=False)
    return ndimage.zoom(array.astype(np.float32, copy=False), factors, order=order, output=np.float32,
                        mode="nearest", grid_mode=True)


def _zoom_separate(array: np.ndarray, new_shape, order: int, axis: int, order_axis: int) -> np.ndarray:
    # In-plane first, slice by slice (2D work, small temporaries), then across slices.
    moved = np.moveaxis(array, axis, 0)
    plane_shape = tuple(s for i, s in enumerate(new_shape) if i != axis)
    inplane = np.empty((moved.shape[0], *plane_shape), dtype=np.float32)
    for k in range(moved.shape[0]):
        inplane[k] = _zoom(moved[k], plane_shape, order)
    result = _zoom(inplane, (new_shape[axis], *plane_shape), order_axis)
    return np.moveaxis(result, 0, axis)


def resample_image(array: np.ndarray, new_shape, order: int = 3, separate_axis: int | None = None,
                   order_separate: int = 0) -> np.ndarray:
    """Resample one image channel (z, y, x) to ``new_shape`` as float32.

    Args:
        order: spline order in-plane (3 for images).
        separate_axis: axis resampled on its own with ``order_separate`` (None: all together).
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(array.shape) == new_shape:
        return array.astype(np.float32, copy=True)
    if separate_axis is None:
        return _zoom(array, new_shape, order)
    return _zoom_separate(array, new_shape, order, separate_axis, order_separate)


def resample_label(label: np.ndarray, new_shape, order: int = 1, separate_axis: int | None = None,
                   order_separate: int = 0) -> np.ndarray:
    """Resample a label map without inventing label values at boundaries.

    Each label's mask is interpolated on its own (one-hot, linear by default) and every voxel
    takes the label with the highest interpolated value (argmax). Done one label at a time
    with a running maximum, so memory is two float32 volumes at the new size, not one per
    label; interpolating the integer map directly would create a '1.5' between labels 1 and 2.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(label.shape) == new_shape:
        return label.copy()
    values = np.unique(label)
    out = np.full(new_shape, values[0], dtype=label.dtype)
    if len(values) == 1:
        return out
    best = np.full(new_shape, -np.inf, dtype=np.float32)
    for value in values:
        mask = (label == value).astype(np.float32)
        score = resample_image(mask, new_shape, order, separate_axis, order_separate)
        better = score > best
        out[better] = value
        best = np.maximum(best, score, out=best)
    return out
