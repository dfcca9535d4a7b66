"""Volume nodes <-> numpy arrays with AutoSegLib geometry: the one place RAS meets LPS.

MRML places a volume with its IJKToRAS matrix: column ``c`` is the direction of index axis
``c`` (i, j, k = x, y, z) scaled by its spacing, the last column the RAS position of voxel
(0, 0, 0). ITK, and so every file AutoSegLib writes, uses LPS: the same physical point with x
and y negated. With ``F = diag(-1, -1, 1)``::

    direction_LPS = F @ direction_RAS        origin_LPS = F @ origin_RAS

AutoSegLib's :class:`~AutoSegLib.imageio.Geometry` keeps spacing in numpy's (z, y, x) order,
and the origin and row-major direction in ITK's order; arrays are (k, j, i) = (z, y, x), as
``arrayFromVolume`` returns them. So an array read from a file written here lands on exactly
the voxels it came from.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import vtk
from vtk.util import numpy_support

from AutoSegLib.imageio import Geometry
from AutoSegLib.verify_checks import DIRECTION_ATOL, ORIGIN_ATOL_MM, ORTHONORMAL_ATOL, SPACING_RTOL

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


class GeometryError(ValueError):
    """A node's placement in space cannot be written as an image file; the message names it."""


def ijk_to_ras(node) -> np.ndarray:
    """The node's IJKToRAS matrix as a 4x4 numpy array."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def geometry_from_matrix(ijk_to_ras_matrix: np.ndarray, what: str = "volume") -> Geometry:
    """AutoSegLib geometry (LPS, spacing z,y,x) of an IJKToRAS matrix.

    Raises:
        GeometryError: a zero-length axis, or axes that are not orthonormal (a sheared grid
            cannot be stored in NIfTI/ITK files, which would silently change it).
    """
    scaled = np.asarray(ijk_to_ras_matrix, float)[:3, :3]
    spacing_xyz = np.linalg.norm(scaled, axis=0)
    if not np.all(spacing_xyz > 0):
        raise GeometryError(f"{what}: voxel spacing {_vec(spacing_xyz)} has a zero axis")
    direction_ras = scaled / spacing_xyz
    deviation = float(np.abs(direction_ras.T @ direction_ras - np.eye(3)).max())
    if deviation > ORTHONORMAL_ATOL:
        raise GeometryError(f"{what}: its IJK-to-RAS directions {_vec(direction_ras.ravel())} are not orthonormal "
                            f"(deviation {deviation:.3g}, tolerance {ORTHONORMAL_ATOL:g}); resample it onto a "
                            "regular grid first (e.g. Resample Scalar/Vector/DWI Volume)")
    origin_lps = _LPS_FROM_RAS @ np.asarray(ijk_to_ras_matrix, float)[:3, 3]
    direction_lps = _LPS_FROM_RAS @ direction_ras
    return Geometry(tuple(float(s) for s in spacing_xyz[::-1]), tuple(float(o) for o in origin_lps),
                    tuple(float(d) for d in direction_lps.ravel()))


def matrix_from_geometry(geometry: Geometry) -> np.ndarray:
    """The IJKToRAS matrix of an AutoSegLib (3D) geometry; inverse of :func:`geometry_from_matrix`."""
    if geometry.ndim != 3:
        raise GeometryError(f"only 3D images can become volume nodes, got a {geometry.ndim}D geometry")
    direction_ras = _LPS_FROM_RAS @ np.asarray(geometry.direction, float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction_ras * np.asarray(geometry.spacing[::-1], float)
    matrix[:3, 3] = _LPS_FROM_RAS @ np.asarray(geometry.origin, float)
    return matrix


def node_geometry(node) -> Geometry:
    """Geometry of a volume node, refusing what a file cannot hold (see :func:`geometry_from_matrix`)."""
    if node.GetParentTransformNode() is not None:
        raise GeometryError(f"volume '{node.GetName()}' is under transform '{node.GetParentTransformNode().GetName()}'; "
                            "harden the transform first (Data module: right-click > Harden transform)")
    return geometry_from_matrix(ijk_to_ras(node), f"volume '{node.GetName()}'")


def set_node_geometry(node, geometry: Geometry) -> None:
    node.SetIJKToRASMatrix(_vtk_matrix(matrix_from_geometry(geometry)))


def _scalar_voxels(node):
    """The node's VTK scalar array and a (z, y, x) numpy view of it, no copy (raises GeometryError
    for no or multi-component data)."""
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise GeometryError(f"volume '{node.GetName()}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise GeometryError(f"volume '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components per "
                            "voxel (e.g. RGB); convert it to a scalar (greyscale) volume first")
    nx, ny, nz = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    return scalars, numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx)


def array_from_node(node) -> np.ndarray:
    """A copy of the voxels as a (z, y, x) array (raises GeometryError for no or multi-component data)."""
    return _scalar_voxels(node)[1].copy()


class VoxelSnapshot:
    """A volume's voxels as they are now, copied later in any thread (a worker writing files).

    Made on the GUI thread (it only takes a reference to the node's voxel array, no copy);
    :meth:`array` copies them. A change of the voxels in place in between (rare for volumes:
    filters make new voxel arrays, which leave this one as it was) is detected and refused
    rather than written half old, half new.
    """

    def __init__(self, node):
        self.name = node.GetName()
        self._scalars, self._view = _scalar_voxels(node)  # the reference keeps the array alive
        self._mtime = self._scalars.GetMTime()
        self.shape, self.dtype = self._view.shape, self._view.dtype

    def array(self) -> np.ndarray:
        """The voxels as a (z, y, x) array of their own (thread-safe)."""
        out = self._view.copy()
        if self._scalars.GetMTime() != self._mtime:
            raise GeometryError(f"volume '{self.name}' was changed while it was being saved; try again")
        return out


def materialise(image) -> np.ndarray:
    """An array, or a :class:`VoxelSnapshot`'s voxels."""
    return image.array() if isinstance(image, VoxelSnapshot) else image


def set_node_array(node, array: np.ndarray) -> None:
    """Give the node new voxels (a (z, y, x) array); its geometry is left as it is."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)


def add_volume(scene, array: np.ndarray, geometry: Geometry, name: str, labelmap: bool = False):
    """A new scalar (or labelmap) volume node in ``scene`` holding ``array`` at ``geometry``."""
    import slicer  # the MRML classes; the wheel and the application both provide them

    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    set_node_array(node, array)
    set_node_geometry(node, geometry)
    node.CreateDefaultDisplayNodes()
    return node


def same_grid(a: Geometry, shape_a, b: Geometry, shape_b) -> bool:
    """True when two images share a voxel grid, within the tolerances ``autoseg verify`` uses."""
    return (tuple(shape_a) == tuple(shape_b)
            and np.allclose(a.spacing, b.spacing, rtol=SPACING_RTOL, atol=0)
            and np.allclose(a.origin, b.origin, rtol=0, atol=ORIGIN_ATOL_MM)
            and np.allclose(a.direction, b.direction, rtol=0, atol=DIRECTION_ATOL))


def resample_onto(array: np.ndarray, geometry: Geometry, reference: Geometry, reference_shape) -> np.ndarray:
    """``array`` linearly resampled onto the reference grid (voxels outside it: the array's minimum).

    A case's channels must share one grid (the dataset layout requires it); a second series
    scanned at another resolution is brought onto the first one's grid this way.
    """
    import SimpleITK as sitk

    def image(values, geom):
        img = sitk.GetImageFromArray(values)
        img.SetSpacing(tuple(reversed(geom.spacing)))
        img.SetOrigin(geom.origin)
        img.SetDirection(geom.direction)
        return img

    moving = image(array.astype(np.float32), geometry)
    target = image(np.zeros(tuple(reference_shape), np.float32), reference)
    out = sitk.Resample(moving, target, sitk.Transform(), sitk.sitkLinear, float(array.min()), sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(out)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(array.dtype)


def _vtk_matrix(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r, c]))
    return out


def _vec(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@contextlib.contextmanager
def temporary_nodes(scene) -> Iterator[list]:
    """Remove every node added to ``scene`` inside the block, except those appended to the yielded list.

    Slicer's segmentation export and import add display and colour-table nodes of their own for
    the helper nodes they work on; this takes all of them away again (kept nodes keep their
    display nodes).
    """
    before = _node_ids(scene)
    keep: list = []
    try:
        yield keep
    finally:
        kept = set()
        for node in keep:
            kept.add(node.GetID())
            for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
                kept.add(node.GetNthDisplayNodeID(i))
        for node_id in _node_ids(scene) - before - kept:
            node = scene.GetNodeByID(node_id)
            if node is not None:
                scene.RemoveNode(node)


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
