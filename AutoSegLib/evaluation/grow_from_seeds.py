"""Slicer's "Grow from seeds" as a baseline for click-guided correction (issue 21's benchmark).

"Grow from seeds" is the Segment Editor's interactive tool without anatomy knowledge (the
FastGrowCut method: seeds of every label compete; each voxel takes the label of the seed with
the cheapest path to it, a path's cost being the sum of absolute intensity differences between
neighbours, 26-connected). This module runs Slicer's own filter, ``vtkImageGrowCutSegment``
from the ``slicer-core`` wheel (the MRML classes the Slicer-logic tests use): the baseline is
Slicer's code, not a copy of it. It is the only place the engine touches Slicer code, and only
for this benchmark: importing the module needs nothing, calling :func:`grow_from_seeds` needs
``pip install slicer-core``.

What a Slicer user correcting class ``k`` with that tool does, and :func:`correction_seeds`
reproduces: in a box around the clicks, the automatic result of ``k`` shrunk away from its
border is the seed of ``k``, everything else shrunk likewise is the seed of "other", each click
paints a small disc (positive: ``k``, negative: "other"), and around a click the automatic seeds
it contradicts are erased (the user paints over the wrong region, not a dot inside it).
:func:`grow_correction` grows the seeds and applies the result the way the AutoSeg Slicer
module applies a click (:func:`merge_class`): only class ``k`` changes, only inside the box.

Regions are index boxes ``(z0, z1, y0, y1, x0, x1)``, half-open, as ``Predictor.refine`` returns.

Speed (benchmarks/bench_grow_from_seeds.py, this 2-core CPU shared with other jobs): Slicer's
filter is a Dijkstra search with a Fibonacci heap over every voxel of the box. With the dense
seeds of :func:`correction_seeds` a 100x200x200 box took 2.9 s (best of 2, at load average 3-4
and again at 8), a 26x79x92 phantom 0.14 s. With only a few seed voxels the search visits far
more heap entries: two short seed lines in the 100x200x200 box took 38 s at load 8 (18 s on a
nearly idle machine).

Known weakness of the method, kept as Slicer has it: in a uniform region, paths from seeds of
different labels all cost nothing, so the winner there is the heap's order; any automatic seed
of the wrong side left in such a region (outside ``clear_mm`` of the clicks) competes for it.

Example:
    >>> import numpy as np
    >>> image = np.zeros((5, 6, 8), np.float32); image[:, :, 4:] = 100
    >>> seeds = np.zeros(image.shape, np.uint8); seeds[2, 3, 1] = 1; seeds[2, 3, 6] = 2
    >>> grown = grow_from_seeds(image, seeds)  # doctest: +SKIP
    >>> grown[:, :, :4].min(), grown[:, :, 4:].max()  # doctest: +SKIP
    (1, 2)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

K_SEED, OTHER_SEED = 1, 2
DISC_RADIUS = 2  # voxels, in the slice (y, x): a small Paint brush
EROSION_MM = 2.0  # the automatic result's border band left for the grow to decide
CLEAR_MM = 10.0  # automatic seeds a click contradicts are erased within this distance of it
BOX_MARGIN_MM = 30.0  # the box around the clicks


class GrowFromSeedsError(ValueError):
    """The inputs cannot be grown (shapes, seed values, an empty region); the message says which."""


def available() -> bool:
    """True when Slicer's filter can run here (the ``slicer-core`` wheel is installed)."""
    try:
        import slicer
    except ImportError:
        return False
    return hasattr(slicer, "vtkImageGrowCutSegment")


def grow_from_seeds(image: np.ndarray, seeds: np.ndarray, region: Sequence[int] | None = None,
                    spacing: Sequence[float] = (1.0, 1.0, 1.0), seed_locality: float = 0.0) -> np.ndarray:
    """Slicer's Grow from seeds on arrays.

    Args:
        image: (z, y, x) intensities.
        seeds: (z, y, x) integers, 0 unlabelled, 1.. seed labels (up to 65535).
        region: ``(z0, z1, y0, y1, x0, x1)`` box to grow in (half-open); None: the whole image.
            Seeds outside it are ignored.
        spacing: (z, y, x) mm; matters only with ``seed_locality`` (Slicer's "Seed locality":
            extra cost per mm of path, 0 by default as in Slicer).

    Returns:
        (z, y, x) labels, the image's shape, uint8 or uint16: inside ``region`` the label of the
        cheapest seed for every voxel (0 where none can reach), outside it 0.

    Raises:
        GrowFromSeedsError: mismatched shapes, negative or non-integer seeds, a bad region, or
            no seed inside the region.
        ImportError: the ``slicer-core`` wheel is not installed.
    """
    image, seeds = np.asarray(image), np.asarray(seeds)
    if image.ndim != 3 or image.shape != seeds.shape:
        raise GrowFromSeedsError(f"image {image.shape} and seeds {seeds.shape} must be 3D arrays of one shape")
    if seeds.dtype.kind not in "ui" and not (seeds.dtype.kind == "b"):
        raise GrowFromSeedsError(f"seeds must be integers (0 unlabelled, 1.. labels), got {seeds.dtype}")
    box = _slices(region, image.shape)
    crop = seeds[box]
    if crop.size and (crop.min() < 0 or crop.max() > 65535):
        raise GrowFromSeedsError(f"seed values must be 0..65535, got {int(crop.min())}..{int(crop.max())}")
    if not crop.any():
        raise GrowFromSeedsError(f"no seed inside the region {tuple(region) if region else image.shape}")
    dtype = np.uint8 if crop.max() < 256 else np.uint16
    # Slicer's filter never grows from the outermost voxel layer; one layer of padding (the
    # edge intensities, no seeds) lets the box's own border grow like its inside.
    intensities = np.pad(image[box].astype(np.float32), 1, mode="edge")
    labels = np.pad(crop.astype(dtype), 1)
    grown = _run_filter(intensities, labels, spacing, seed_locality)[1:-1, 1:-1, 1:-1]
    out = np.zeros(image.shape, dtype)
    out[box] = grown
    return out


def _run_filter(intensities: np.ndarray, labels: np.ndarray, spacing, seed_locality: float) -> np.ndarray:
    if not available():
        raise ImportError("Grow from seeds runs Slicer's own filter, which comes with the slicer-core wheel: "
                          "pip install slicer-core")
    import slicer  # the slicer-core wheel (vtkSlicerSegmentationsModuleLogic's vtkImageGrowCutSegment)

    grow = slicer.vtkImageGrowCutSegment()
    grow.SetIntensityVolume(_vtk_image(intensities, spacing))
    grow.SetSeedLabelVolume(_vtk_image(labels, spacing))
    grow.SetDistancePenalty(float(seed_locality))
    grow.Update()
    from vtk.util import numpy_support

    scalars = grow.GetOutput().GetPointData().GetScalars()
    if scalars is None:
        raise GrowFromSeedsError(f"Slicer's grow-from-seeds filter gave no result for a {labels.shape} box")
    return numpy_support.vtk_to_numpy(scalars).reshape(labels.shape).astype(labels.dtype, copy=True)


def _vtk_image(array: np.ndarray, spacing):
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.SetSpacing(*[float(s) for s in spacing[::-1]])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    return image


def _slices(region: Sequence[int] | None, shape) -> tuple[slice, ...]:
    if region is None:
        return tuple(slice(0, s) for s in shape)
    if len(region) != 6:
        raise GrowFromSeedsError(f"a region is (z0, z1, y0, y1, x0, x1), got {tuple(region)}")
    box = tuple(slice(int(region[2 * a]), int(region[2 * a + 1])) for a in range(3))
    if any(not 0 <= s.start < s.stop <= n for s, n in zip(box, shape)):
        raise GrowFromSeedsError(f"region {tuple(region)} is empty or outside the image of {tuple(shape)} voxels")
    return box


# -- what a Slicer user would seed ------------------------------------------------------------------
def click_box(clicks: Sequence[tuple[bool, Sequence[int]]], shape, spacing: Sequence[float],
              margin_mm: float = BOX_MARGIN_MM) -> tuple[int, ...]:
    """The index box ``(z0, z1, y0, y1, x0, x1)`` around the clicks, ``margin_mm`` on every side."""
    if not clicks:
        raise GrowFromSeedsError("no clicks: the box around the clicks is undefined")
    points = np.array([index for _, index in clicks], int)
    margin = np.ceil(margin_mm / np.asarray(spacing, float)).astype(int)
    low = np.maximum(points.min(0) - margin, 0)
    high = np.minimum(points.max(0) + margin + 1, np.asarray(shape))
    return tuple(int(v) for pair in zip(low, high) for v in pair)


def correction_seeds(automatic: np.ndarray, label: int, clicks: Sequence[tuple[bool, Sequence[int]]],
                     spacing: Sequence[float] = (1.0, 1.0, 1.0), region: Sequence[int] | None = None,
                     erosion_mm: float = EROSION_MM, clear_mm: float = CLEAR_MM,
                     disc_radius: int = DISC_RADIUS) -> tuple[np.ndarray, tuple[int, ...]]:
    """The seeds a Slicer user would paint to correct class ``label`` with these clicks.

    Args:
        automatic: the automatic label map (z, y, x).
        label: the class corrected (its value in the label map).
        clicks: ``(positive, (z, y, x) voxel)`` pairs (``AutoSegLib.inference.clicks.click_index``
            turns a physical click into its voxel).
        spacing: (z, y, x) mm.
        region: the box to correct; None: :func:`click_box` of the clicks.
        erosion_mm: the automatic ``label`` and not-``label`` shrink by this much to become the
            seeds :data:`K_SEED` and :data:`OTHER_SEED`.
        clear_mm: around each click, the automatic seeds of the side it contradicts are erased
            within this distance (0: keep them).
        disc_radius: each click paints a disc of this radius (voxels) in its slice (y, x).

    Returns:
        (seeds, region): seeds of the image's shape (uint8; 0 outside the region) and the region.
    """
    automatic = np.asarray(automatic)
    spacing = np.asarray(spacing, float)
    region = tuple(int(v) for v in (region if region is not None else click_box(clicks, automatic.shape, spacing)))
    box = _slices(region, automatic.shape)
    is_k = automatic[box] == label
    seeds_box = np.zeros(is_k.shape, np.uint8)
    seeds_box[_shrunk(is_k, spacing, erosion_mm)] = K_SEED
    seeds_box[_shrunk(~is_k, spacing, erosion_mm)] = OTHER_SEED
    offset = np.array([s.start for s in box])
    grid = np.indices(is_k.shape).reshape(3, -1).T if clear_mm > 0 else None
    for positive, index in clicks:
        local = np.asarray(index, int) - offset
        if clear_mm > 0:
            near = (np.sqrt((((grid - local) * spacing) ** 2).sum(1)) <= clear_mm).reshape(is_k.shape)
            seeds_box[near & (seeds_box == (OTHER_SEED if positive else K_SEED))] = 0
    for positive, index in clicks:  # after every clearing, so no click erases another's disc
        _paint_disc(seeds_box, np.asarray(index, int) - offset, disc_radius, K_SEED if positive else OTHER_SEED)
    seeds = np.zeros(automatic.shape, np.uint8)
    seeds[box] = seeds_box
    return seeds, region


def _shrunk(mask: np.ndarray, spacing: np.ndarray, margin_mm: float) -> np.ndarray:
    """Voxels of ``mask`` more than ``margin_mm`` from its outside (the box's edge is not outside)."""
    if margin_mm <= 0 or not mask.any():
        return mask.copy()
    if mask.all():
        return mask.copy()
    return ndimage.distance_transform_edt(mask, sampling=spacing) > margin_mm


def _paint_disc(seeds: np.ndarray, centre: np.ndarray, radius: int, value: int) -> None:
    z, y, x = (int(c) for c in centre)
    if not 0 <= z < seeds.shape[0]:
        return
    yy, xx = np.ogrid[:seeds.shape[1], :seeds.shape[2]]
    seeds[z][(yy - y) ** 2 + (xx - x) ** 2 <= radius * radius] = value


def merge_class(previous: np.ndarray, proposed: np.ndarray, label: int, region: Sequence[int]) -> np.ndarray:
    """``previous`` with class ``label`` taken from ``proposed`` inside ``region``; nothing else changes.

    Inside the region, voxels ``proposed`` calls ``label`` become ``label`` (taken from whatever
    class had them); voxels that were ``label`` and are not any more become background (0), not
    another class: a correction of one class never grows another. The AutoSeg Slicer module
    applies a click's answer to its segment by the same rule (AutoSegLogic/corrections.py).
    """
    out = np.array(previous, copy=True)
    box = _slices(region, out.shape)
    inside, new = out[box], np.asarray(proposed)[box] == label
    inside[(inside == label) & ~new] = 0
    inside[new] = label
    return out


def grow_correction(image: np.ndarray, automatic: np.ndarray, label: int,
                    clicks: Sequence[tuple[bool, Sequence[int]]], spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    region: Sequence[int] | None = None, **seed_options) -> tuple[np.ndarray, tuple[int, ...]]:
    """The automatic label map corrected for class ``label`` by Grow from seeds with these clicks.

    Returns:
        (labels, region): the whole label map (only ``label`` changed, only inside the region)
        and the region, as ``Predictor.refine`` answers.
    """
    seeds, region = correction_seeds(automatic, label, clicks, spacing, region, **seed_options)
    grown = grow_from_seeds(image, seeds, region, spacing)
    return merge_class(automatic, np.where(grown == K_SEED, label, 0), label, region), region
