"""Resampling between voxel grids: pure array functions, no I/O.

Conventions shared by every function here:

* Shapes and spacings are (z, y, x). A new shape is ``round(shape * spacing / new_spacing)``,
  so the physical extent of the image is kept.
* Grids are aligned at voxel *edges* (scipy's ``grid_mode=True``, the same mapping as
  skimage's ``resize``): resampling there and back again returns to the same physical grid,
  which is what makes :func:`AutoSegLib.preprocessing.restore` exact in geometry.
* Images come back as float32. Spline prefiltering is done in float32 too: scipy's default
  makes a float64 copy of the whole volume, which for a 400x512x512 CT is 840 MB extra.
* Results can be written into a caller's array (``out``), and a caller's float32 scratch can
  be prefiltered in place (``overwrite_input``), so resampling a channel adds no full-size
  copy beyond its result. Labels are resampled with one reused boolean mask and, across
  distant slices, one slice at a time. Restoring a 267x399x399 label to 400x512x512 peaks at
  1149 MiB (was 1663): the int16 result (200) and, at the new size, two float32 volumes and a
  boolean one; across 5 mm slices (80x296x296 to 80x512x512) 46 MiB (was 461). Measured with
  ``benchmarks/bench_preprocess_memory.py`` (cases B and C, restore_label).
* Anisotropic data (largest/smallest spacing > 3) is resampled in-plane with the requested
  order and with nearest neighbour across slices, because contours can jump between distant
  slices and interpolating across them invents tissue that is not there.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from AutoSegLib.preprocessing.slabs import slabs

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


def _zoom_input(array: np.ndarray) -> np.ndarray:
    # scipy converts each line to float64 as it reads it, so values exact in float32 (float32,
    # 8/16-bit integers, a 0/1 mask) are read as they are: no float32 copy of the volume.
    if array.dtype == bool:
        return array.view(np.uint8)
    if array.dtype == np.float32 or (array.dtype.kind in "iu" and array.dtype.itemsize <= 2):
        return array
    return array.astype(np.float32)


def _zoom_into(array: np.ndarray, out: np.ndarray, order: int, overwrite_input: bool = False,
               separable: bool = True) -> np.ndarray:
    factors = [n / o for n, o in zip(out.shape, array.shape)]
    if all(f == 1 for f in factors):
        out[...] = array
        return out
    if order > 1:
        if not (overwrite_input and array.dtype == np.float32):
            array = array.astype(np.float32)  # the prefilter needs a float32 array it may overwrite
        if order == 3 and separable:
            return _cubic_zoom_separable(array, out)
        ndimage.spline_filter(array, order=order, output=array, mode="mirror")
        return ndimage.zoom(array, factors, order=order, output=out, mode="mirror", grid_mode=True,
                            prefilter=False)
    return ndimage.zoom(_zoom_input(array), factors, order=order, output=out, mode="nearest", grid_mode=True)


def _cubic_zoom_separable(coefficients: np.ndarray, out: np.ndarray) -> np.ndarray:
    """scipy's cubic-spline zoom (``mode="mirror"``, ``grid_mode=True``) one axis at a time.

    A tensor-product spline is separable: prefiltering an axis and then evaluating along it
    commutes with the same along another axis, and an axis that keeps its size needs neither
    (evaluating a prefiltered axis at its own nodes gives the samples back). ``ndimage.zoom``
    takes 4^3 = 64 coefficients per output voxel; here each axis costs 4 per voxel, as a banded
    sparse matrix product. Equal to the 3D zoom within float32 rounding (about 1e-7 of the value
    range; tests compare). Volumes go slice by slice in plane (into one float32 volume of the
    old slice count and the new plane), then across slices a block of rows at a time straight
    into ``out``: that volume is the only full-size temporary. A 300x512x512 CT to 1.5 mm
    isotropic: about 3 s instead of 12-15 s on one core. ``coefficients`` (float32) is overwritten.
    """
    c = coefficients
    if c.ndim == 2:
        return _cubic_plane(c, out)
    if c.ndim != 3:
        for axis in [a for a in range(c.ndim) if c.shape[a] != out.shape[a]]:
            ndimage.spline_filter1d(c, 3, axis=axis, output=c, mode="mirror")
            c = _spline_axis(c, axis, _cubic_matrix(c.shape[axis], out.shape[axis]))
        out[...] = c
        return out
    same_slices = c.shape[0] == out.shape[0]
    if c.shape[1:] != out.shape[1:]:
        plane = out if same_slices else np.empty((c.shape[0], *out.shape[1:]), dtype=np.float32)
        for k in range(c.shape[0]):
            _cubic_plane(c[k], plane[k])
        c = plane
    if same_slices:
        if c is not out:
            out[...] = c
        return out
    ndimage.spline_filter1d(c, 3, axis=0, output=c, mode="mirror")
    matrix = _cubic_matrix(c.shape[0], out.shape[0])
    rows = max(1, (1 << 20) // max(1, c.shape[0] * c.shape[2]))  # blocks of about 4 MiB
    for y in range(0, c.shape[1], rows):
        block = c[:, y:y + rows]
        out[:, y:y + rows] = (matrix @ block.reshape(c.shape[0], -1)).reshape(out.shape[0], *block.shape[1:])
    return out


def _cubic_plane(c: np.ndarray, out: np.ndarray) -> np.ndarray:
    """:func:`_cubic_zoom_separable` of one plane (2D), the shrinking axis first."""
    axes = [a for a in range(2) if c.shape[a] != out.shape[a]]
    for axis in sorted(axes, key=lambda a: out.shape[a] / c.shape[a]):
        ndimage.spline_filter1d(c, 3, axis=axis, output=c, mode="mirror")
        c = _spline_axis(c, axis, _cubic_matrix(c.shape[axis], out.shape[axis]))
    out[...] = c
    return out


def _cubic_matrix(n_in: int, n_out: int):
    """Sparse (n_out, n_in) matrix evaluating a cubic spline with mirrored coefficients at scipy's
    ``grid_mode`` sample positions: output voxel o sits at input coordinate (o + 0.5) n_in / n_out - 0.5."""
    from scipy import sparse

    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(x)
    t = x - base
    index = base[:, None].astype(np.intp) + np.arange(-1, 3)
    weight = np.stack([(1 - t) ** 3, 3 * t ** 3 - 6 * t ** 2 + 4, -3 * t ** 3 + 3 * t ** 2 + 3 * t + 1, t ** 3], 1) / 6
    if n_in == 1:
        index[...] = 0
    else:  # mirror about the edge nodes: ... c b | a b c ... x y | z y ...
        period = 2 * n_in - 2
        index = np.abs(index) % period
        index = np.where(index >= n_in, period - index, index)
    rows = np.repeat(np.arange(n_out), 4)
    matrix = sparse.csr_matrix((weight.ravel(), (rows, index.ravel())), shape=(n_out, n_in))
    matrix.sum_duplicates()  # mirrored taps that land on the same coefficient
    return matrix.astype(np.float32)


def _spline_axis(c: np.ndarray, axis: int, matrix) -> np.ndarray:
    """``matrix`` (:func:`_cubic_matrix`) applied along ``axis`` of ``c``, float32."""
    n = matrix.shape[0]
    if axis == 0:
        return (matrix @ c.reshape(c.shape[0], -1)).reshape(n, *c.shape[1:])
    if axis == c.ndim - 1 and c.ndim == 2:
        # along contiguous rows: a transposed copy of one plane is cheap (it stays in cache)
        return (matrix @ c.T).T
    result = np.empty((*c.shape[:axis], n, *c.shape[axis + 1:]), dtype=np.float32)
    lead = min(axis, c.ndim - 2)  # one plane (or one block) at a time
    for i in np.ndindex(*c.shape[:lead]):
        result[i] = _spline_axis(c[i], axis - lead, matrix)
    return result


def slice_sources(n_old: int, n_new: int) -> list[tuple[int, list[int]]]:
    """``(source slice, [output slices])`` of nearest-neighbour resampling along one axis.

    The mapping is scipy's own (an index ramp zoomed with the same order, mode and grid as
    the volume), so resampling slice by slice gives exactly what a whole-volume zoom gives.
    """
    if n_old == n_new:
        return [(k, [k]) for k in range(n_old)]
    ramp = np.arange(n_old, dtype=np.float32)
    source = ndimage.zoom(ramp, n_new / n_old, order=0, mode="nearest", grid_mode=True).astype(np.intp)
    return [(int(k), np.flatnonzero(source == k).tolist()) for k in np.unique(source)]


def _zoom_separate_into(array: np.ndarray, out: np.ndarray, order: int, axis: int, order_axis: int,
                        overwrite_input: bool, separable: bool = True) -> np.ndarray:
    moved, moved_out = np.moveaxis(array, axis, 0), np.moveaxis(out, axis, 0)
    if order_axis == 0:
        # Nearest across slices: every output slice is one source slice resampled in plane, so
        # each source slice is resampled once, straight into its first output slice.
        for k, targets in slice_sources(moved.shape[0], moved_out.shape[0]):
            _zoom_into(moved[k], moved_out[targets[0]], order, overwrite_input, separable)
            for t in targets[1:]:
                moved_out[t] = moved_out[targets[0]]
        return out
    # In-plane first, slice by slice (2D work, small temporaries), then across slices.
    same_slices = moved.shape[0] == moved_out.shape[0]
    inplane = moved_out if same_slices else np.empty((moved.shape[0], *moved_out.shape[1:]), np.float32)
    for k in range(moved.shape[0]):
        _zoom_into(moved[k], inplane[k], order, overwrite_input, separable)
    if not same_slices:
        _zoom_into(inplane, moved_out, order_axis, True, separable)
    return out


def _output(out: np.ndarray | None, shape, dtype) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out must be {np.dtype(dtype)} of shape {tuple(shape)}, got {out.dtype} {out.shape}")
    return out


def resample_image(array: np.ndarray, new_shape, order: int = 3, separate_axis: int | None = None,
                   order_separate: int = 0, out: np.ndarray | None = None,
                   overwrite_input: bool = False, separable: bool = True) -> np.ndarray:
    """Resample one image channel (z, y, x) to ``new_shape`` as float32.

    Args:
        order: spline order in-plane (3 for images).
        separate_axis: axis resampled on its own with ``order_separate`` (None: all together).
        out: float32 array of ``new_shape`` to write into (any strides); a new one if None.
        overwrite_input: ``array`` is float32 scratch the spline prefilter may overwrite,
            which saves a float32 copy of it.
        separable: cubic splines one axis at a time (:func:`_cubic_zoom_separable`, equal within
            float32 rounding and 3-5x faster); False: scipy's 3D zoom, bit for bit as before.

    Example:
        >>> resample_image(np.arange(4, dtype=np.int16).reshape(1, 2, 2), (1, 4, 4), order=0)[0, 0]
        array([0., 0., 1., 1.], dtype=float32)
    """
    new_shape = tuple(int(s) for s in new_shape)
    out = _output(out, new_shape, np.float32)
    if tuple(array.shape) == new_shape:
        out[...] = array
        return out
    if separate_axis is None:
        return _zoom_into(array, out, order, overwrite_input, separable)
    return _zoom_separate_into(array, out, order, separate_axis, order_separate, overwrite_input, separable)


def _label_values(label: np.ndarray) -> list[int]:
    """Sorted values present in a label map, found a slab at a time (``np.unique`` on the
    whole volume sorts a full-size copy of it)."""
    present: set[int] = set()
    for s in slabs(label.shape):
        present.update(int(v) for v in np.unique(label[s]))
    return sorted(present)


def resample_label(label: np.ndarray, new_shape, order: int = 1, separate_axis: int | None = None,
                   order_separate: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Resample a label map without inventing label values at boundaries.

    Each label's mask is interpolated on its own (one-hot, linear by default) and every voxel
    takes the label with the highest interpolated value (argmax, the lowest label on ties);
    interpolating the integer map directly would create a '1.5' between labels 1 and 2.
    Done one label at a time with a running maximum and one reused boolean mask, so memory
    is two float32 volumes at the new size and a boolean one at the old, for any number of
    labels. With nearest neighbour across slices it is done slice by slice: 2D buffers only.

    Args:
        out: array of ``new_shape`` and the label's dtype to write into (any strides).
    """
    new_shape = tuple(int(s) for s in new_shape)
    out = _output(out, new_shape, label.dtype)
    if tuple(label.shape) == new_shape:
        out[...] = label
        return out
    values = _label_values(label)
    if len(values) == 1:
        out[...] = values[0]
        return out
    if separate_axis is not None and order_separate == 0:
        return _resample_label_by_slice(label, out, values, order, separate_axis)
    out[...] = values[0]
    best = np.full(new_shape, -np.inf, dtype=np.float32)
    score = np.empty(new_shape, dtype=np.float32)
    better = np.empty(new_shape, dtype=bool)
    mask = np.empty(label.shape, dtype=bool)
    for value in values:
        np.equal(label, value, out=mask)
        # scipy's own zoom: a label's argmax must not move at exact ties (integers exactly equal)
        resample_image(mask, new_shape, order, separate_axis, order_separate, out=score, separable=False)
        take_better(out, value, score, best, better)
    return out


def take_better(out, value, score, best, better) -> None:
    """Running argmax: where ``score`` beats ``best`` (strictly: ties keep the earlier value), ``out``
    takes ``value`` and ``best`` the score."""
    np.greater(score, best, out=better)
    out[better] = value
    np.maximum(best, score, out=best)


def _resample_label_by_slice(label, out, values, order: int, axis: int) -> np.ndarray:
    moved, moved_out = np.moveaxis(label, axis, 0), np.moveaxis(out, axis, 0)
    plane_shape = moved_out.shape[1:]
    best, score = np.empty(plane_shape, np.float32), np.empty(plane_shape, np.float32)
    better, mask = np.empty(plane_shape, bool), np.empty(moved.shape[1:], bool)
    for k, targets in slice_sources(moved.shape[0], moved_out.shape[0]):
        first = moved_out[targets[0]]
        first[...] = values[0]
        best.fill(-np.inf)
        for value in values:
            np.equal(moved[k], value, out=mask)
            if mask.any():
                _zoom_into(mask, score, order, separable=False)
            else:
                score.fill(0)  # what the zoom of an all-zero plane gives, at no cost
            take_better(first, value, score, best, better)
        for t in targets[1:]:
            moved_out[t] = first
    return out
