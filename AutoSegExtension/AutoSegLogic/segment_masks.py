"""Segments as masks on a volume's voxel grid: read them, write them, change one class in a box.

A click's answer from the engine is a label map on the input volume's grid; the segmentation
the user reviews holds segments (one shared labelmap layer after Predict; more layers after
some Segment Editor work). This module is the exchange between the two, exact to the voxel:

- :func:`segment_mask` reads a segment as a boolean (z, y, x) array on the grid;
  :func:`set_segment_mask` writes one back (Slicer's own ``SetBinaryLabelmapToSegment``, so
  shared layers stay shared and the views update).
- :func:`apply_class_change` applies the engine's answer to ONE segment inside the answered
  region. The rule (the same as the benchmark's ``merge_class``): voxels the engine now calls
  this class join the segment and are taken from any other segment that had them (as the
  Segment Editor's "overwrite other segments" does); voxels the segment loses become
  unsegmented - they are never handed to another segment, so a click for one structure never
  grows another. Outside the region nothing changes. It returns an :class:`UndoStep` that
  restores the touched segments exactly.

Every function takes the nodes it works on; MRML calls only (GUI thread in Slicer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from vtk.util import numpy_support

from AutoSegLogic import labels as label_rules
from AutoSegLogic.volumes import _vtk_matrix

_GRID_ATOL = 1e-4  # mm: a layer on the volume's grid has the very same image-to-world matrix


class SegmentGridError(ValueError):
    """A segmentation cannot be exchanged voxel for voxel with the volume; the message says why."""


@dataclass(frozen=True)
class Grid:
    """A volume's voxel grid: its (z, y, x) shape and IJK-to-RAS matrix (4x4)."""

    shape: tuple[int, int, int]
    ijk_to_ras: np.ndarray
    name: str = "volume"

    @classmethod
    def of_volume(cls, volume) -> "Grid":
        from AutoSegLogic.volumes import ijk_to_ras

        if volume.GetImageData() is None:
            raise SegmentGridError(f"volume '{volume.GetName()}' has no voxels")
        nx, ny, nz = volume.GetImageData().GetDimensions()
        return cls((nz, ny, nx), ijk_to_ras(volume), volume.GetName())

    def slices(self, region) -> tuple[slice, ...]:
        """``(z0, z1, y0, y1, x0, x1)`` as slices, checked against the grid."""
        if len(region) != 6:
            raise SegmentGridError(f"a region is (z0, z1, y0, y1, x0, x1), got {tuple(region)}")
        box = tuple(slice(int(region[2 * a]), int(region[2 * a + 1])) for a in range(3))
        if any(not 0 <= s.start <= s.stop <= n for s, n in zip(box, self.shape)):
            raise SegmentGridError(f"region {tuple(region)} is not inside {self.name}'s {self.shape} voxels")
        return box


def binary_labelmap_name() -> str:
    import slicer

    return slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def check_segmentation(segmentation, grid: Grid) -> None:
    """Refuse a segmentation the click logic cannot edit exactly (transform, representation)."""
    if segmentation.GetParentTransformNode() is not None:
        raise SegmentGridError(f"segmentation '{segmentation.GetName()}' is under transform "
                               f"'{segmentation.GetParentTransformNode().GetName()}'; harden the transform first")
    content = segmentation.GetSegmentation()
    master = content.GetSourceRepresentationName() if hasattr(content, "GetSourceRepresentationName") \
        else content.GetMasterRepresentationName()
    if master != binary_labelmap_name():
        raise SegmentGridError(f"segmentation '{segmentation.GetName()}' is edited as '{master}', not as a binary "
                               "labelmap; convert it in the Segmentations module first")
    for i in range(content.GetNumberOfSegments()):
        _layer(segmentation, content.GetNthSegmentID(i), grid)  # raises for a layer off the grid


def segment_ids(segmentation) -> list[str]:
    content = segmentation.GetSegmentation()
    return [content.GetNthSegmentID(i) for i in range(content.GetNumberOfSegments())]


def segment_name(segmentation, segment_id: str) -> str:
    return segmentation.GetSegmentation().GetSegment(segment_id).GetName()


def _layer(segmentation, segment_id: str, grid: Grid):
    """The segment's labelmap layer, its extent and label value; refused if it is not on the grid."""
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise SegmentGridError(f"segmentation '{segmentation.GetName()}' has no segment '{segment_id}'")
    image = segment.GetRepresentation(binary_labelmap_name())
    if image is None:
        return None, None, segment.GetLabelValue()
    extent = image.GetExtent()
    if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
        return None, None, segment.GetLabelValue()
    import vtk

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    layer = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    if not np.allclose(layer, grid.ijk_to_ras, atol=_GRID_ATOL, rtol=0):
        raise SegmentGridError(f"segment '{segment.GetName()}' of '{segmentation.GetName()}' is not on the voxel "
                               f"grid of '{grid.name}' (a different spacing, origin or orientation); correcting "
                               "with clicks needs the segmentation made on that volume (as Predict makes it)")
    return image, extent, segment.GetLabelValue()


def segment_mask(segmentation, segment_id: str, grid: Grid, region=None) -> np.ndarray:
    """The segment as a boolean (z, y, x) array on ``grid`` (voxels beyond the grid are left out);
    with ``region`` ``(z0, z1, y0, y1, x0, x1)``, only that box of it."""
    image, extent, value = _layer(segmentation, segment_id, grid)
    values, lo, mask = _layer_values(image, extent, grid, region)
    if values is not None:
        mask[lo] = values == value
    return mask


def _layer_values(image, extent, grid: Grid, region):
    """The layer's voxel values inside the grid (and ``region``): (values or None, where they go in
    the output, an all-False output of the grid's or the region's shape)."""
    box = grid.slices(region) if region is not None else tuple(slice(0, n) for n in grid.shape)
    out = np.zeros(tuple(s.stop - s.start for s in box), bool)
    if image is None:
        return None, None, out
    x0, x1, y0, y1, z0, z1 = extent
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    values = values.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
    dst, src = [], []
    for (lo, hi), wanted in zip(((z0, z1), (y0, y1), (x0, x1)), box):
        a, b = max(lo, wanted.start), min(hi + 1, wanted.stop)
        if a >= b:
            return None, None, out
        dst.append(slice(a - wanted.start, b - wanted.start))
        src.append(slice(a - lo, b - lo))
    return values[tuple(src)], tuple(dst), out


def set_segment_mask(segmentation, segment_id: str, mask: np.ndarray, grid: Grid) -> None:
    """Make the segment exactly ``mask`` (a (z, y, x) boolean array on ``grid``).

    Only the box holding the segment before and after is handed to Slicer (outside it the
    segment is empty either way): on a 300x512x512 volume that is what keeps a click's update
    well under a second.
    """
    import slicer

    if mask.shape != grid.shape:
        raise SegmentGridError(f"a mask of {mask.shape} voxels cannot be written on {grid.name}'s {grid.shape}")
    box = _bounding_box(mask | segment_mask(segmentation, segment_id, grid))
    image = slicer.vtkOrientedImageData()
    image.SetExtent(box[2].start, box[2].stop - 1, box[1].start, box[1].stop - 1, box[0].start, box[0].stop - 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(mask[box], np.uint8).ravel(),
                                                               deep=True))
    image.SetImageToWorldMatrix(_vtk_matrix(grid.ijk_to_ras))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE):
        raise SegmentGridError(f"Slicer refused to update segment '{segment_name(segmentation, segment_id)}'")


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel (one voxel at the origin when there is none)."""
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 1))
    return tuple(box)


def label_map(segmentation, grid: Grid, labels: dict[str, int]) -> np.ndarray:
    """The segments as one label map (uint8/uint16) with the values of ``labels`` (matched by name,
    :func:`.labels.value_of`); segments of other names are left out; on overlaps the later layer wins.

    Segments sharing a layer (as Predict makes them) are translated in one pass over it.
    """
    top = max(labels.values(), default=0)
    out = np.zeros(grid.shape, np.uint8 if top < 256 else np.uint16)
    layers: dict[int, list] = {}  # id of the layer image -> [image, extent, {segment value: label value}]
    for segment_id in segment_ids(segmentation):
        value = label_rules.value_of(labels, segment_name(segmentation, segment_id))
        image, extent, segment_value = _layer(segmentation, segment_id, grid)
        if value and image is not None:
            layers.setdefault(id(image), [image, extent, {}])[2][int(segment_value)] = value
    for image, extent, translation in layers.values():
        values, where, _ = _layer_values(image, extent, grid, None)
        if values is None:
            continue
        if values.dtype.kind in "ui" and values.size and 0 <= int(values.min()) and int(values.max()) < 65536:
            table = np.zeros(int(values.max()) + 1, out.dtype)
            for segment_value, value in translation.items():
                if 0 < segment_value < len(table):
                    table[segment_value] = value
            mapped = table[values]
        else:  # an unusual layer type: segment by segment
            mapped = np.zeros(values.shape, out.dtype)
            for segment_value, value in translation.items():
                mapped[values == segment_value] = value
        target = out[where]
        target[mapped != 0] = mapped[mapped != 0]
    return out


@dataclass
class UndoStep:
    """What one applied answer changed: per segment, its voxels in the region before and after."""

    segment_id: str
    region: tuple[int, ...]
    before: dict[str, np.ndarray] = field(default_factory=dict)
    after: dict[str, np.ndarray] = field(default_factory=dict)
    point_ids: list = field(default_factory=list)  # the clicks' points, as the caller names them

    @property
    def changed_voxels(self) -> int:
        return int(sum(np.count_nonzero(self.before[s] != self.after[s]) for s in self.before))


def apply_class_change(segmentation, segment_id: str, value: int, answer: np.ndarray, region, grid: Grid) -> UndoStep:
    """Apply the engine's answer (a label map on ``grid``) to segment ``segment_id`` (label ``value``)
    inside ``region`` by the module's rule (module docstring); returns how to undo it."""
    if answer.shape != grid.shape:
        raise SegmentGridError(f"the engine answered {answer.shape} voxels for {grid.name}'s {grid.shape}")
    box = grid.slices(region)
    step = UndoStep(segment_id, tuple(int(v) for v in region))
    mask = segment_mask(segmentation, segment_id, grid)
    new = np.asarray(answer)[box] == value
    gained = new & ~mask[box]
    for other in segment_ids(segmentation):
        if other == segment_id or not gained.any():
            continue
        if not (segment_mask(segmentation, other, grid, region) & gained).any():
            continue  # the usual case: a look at the box only
        theirs = segment_mask(segmentation, other, grid)
        step.before[other] = theirs[box].copy()
        theirs[box] &= ~gained
        step.after[other] = theirs[box].copy()
        set_segment_mask(segmentation, other, theirs, grid)
    step.before[segment_id] = mask[box].copy()
    step.after[segment_id] = new.copy()
    if not np.array_equal(step.before[segment_id], new):
        mask[box] = new
        set_segment_mask(segmentation, segment_id, mask, grid)
    return step


def edited_since(segmentation, step: UndoStep, grid: Grid) -> list[str]:
    """Names of the segments of ``step`` whose voxels in its region are no longer as it left them."""
    names = []
    for segment_id, after in step.after.items():
        if segmentation.GetSegmentation().GetSegment(segment_id) is None:
            names.append(segment_id)
        elif not np.array_equal(segment_mask(segmentation, segment_id, grid, step.region), after):
            names.append(segment_name(segmentation, segment_id))
    return names


def undo_step(segmentation, step: UndoStep, grid: Grid) -> None:
    """Put every segment of ``step`` back as it was in the region before the step (exactly).

    Raises:
        SegmentGridError: a segment was changed in the region since (a Segment Editor edit):
            undoing would also throw that edit away, so it is refused, naming the segments.
    """
    edited = edited_since(segmentation, step, grid)
    if edited:
        raise SegmentGridError(f"segment(s) {', '.join(edited)} were edited after this click; undo that edit in the "
                               "Segment Editor first (its Undo button), or keep the click")
    box = grid.slices(step.region)
    for segment_id, before in step.before.items():
        mask = segment_mask(segmentation, segment_id, grid)
        if not np.array_equal(mask[box], before):
            mask[box] = before
            set_segment_mask(segmentation, segment_id, mask, grid)
