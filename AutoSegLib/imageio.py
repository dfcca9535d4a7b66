"""Image I/O: the only module that talks to SimpleITK and the only place axes are reordered.

Arrays are numpy's (z, y, x) order as ``sitk.GetArrayFromImage`` returns them, and
:class:`Geometry.spacing` follows the same order. ``origin`` and ``direction`` are
physical-space quantities and are kept exactly as ITK defines them (LPS millimetres; the
direction matrix row-major, its columns the physical directions of the x, y, z index axes),
so writing an array back with its geometry reproduces the file's geometry bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AutoSegLib import niftiraw
from AutoSegLib.fileutil import atomic_path

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass(frozen=True)
class Geometry:
    """Where an array sits in patient space.

    Attributes:
        spacing: voxel size in mm per array axis, (z, y, x) for 3D.
        origin: physical position of voxel (0, 0, 0), ITK order (x, y, z).
        direction: flattened row-major direction matrix, ITK order.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @property
    def index_matrix(self) -> np.ndarray:
        """Physical offset (x, y, z) from the origin per unit of ITK index (i, j, k): direction x spacing."""
        n = self.ndim
        return np.asarray(self.direction, dtype=float).reshape(n, n) * np.asarray(self.spacing[::-1], dtype=float)

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        return cls(tuple(map(float, data["spacing"])), tuple(map(float, data["origin"])),
                   tuple(map(float, data["direction"])))

    @classmethod
    def identity(cls, spacing: tuple[float, ...]) -> "Geometry":
        n = len(spacing)
        return cls(tuple(map(float, spacing)), (0.0,) * n, tuple(np.eye(n).ravel().tolist()))


@dataclass(frozen=True)
class ImageHeader:
    """What a file says about itself, read without loading the voxels."""

    path: Path
    shape: tuple[int, ...]  # numpy order, spatial axes only
    components: int  # > 1 for RGB or vector images
    pixel_type: str  # e.g. "16-bit signed integer"
    geometry: Geometry

    @property
    def is_integer(self) -> bool:
        return "integer" in self.pixel_type


def file_ending(path: str | os.PathLike) -> str | None:
    """The supported ending ``path`` has (``.nii.gz`` counts as one), or None."""
    name = str(path).lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return None


def _geometry_of(spacing_xyz, origin, direction) -> Geometry:
    return Geometry(tuple(float(s) for s in reversed(spacing_xyz)), tuple(map(float, origin)),
                    tuple(map(float, direction)))


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Read shape, pixel type and geometry of an image file without its voxels.

    Raises:
        OSError: the file is missing or ITK cannot read its header; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise OSError(f"{path}: cannot read image header ({_itk_reason(exc)})") from exc
    size_xyz = reader.GetSize()
    return ImageHeader(
        path=path,
        shape=tuple(int(s) for s in reversed(size_xyz)),
        components=int(reader.GetNumberOfComponents()),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        geometry=_geometry_of(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()),
    )


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read an image file into a (z, y, x) numpy array and its geometry.

    Multi-component (RGB, vector) images come back with the components as a trailing axis.

    Raises:
        OSError: the file is missing, unreadable or truncated; the message names the file.
        NonFiniteVoxelsError: the image holds NaN or infinite voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise OSError(f"{path}: cannot read image ({_itk_reason(exc)})") from exc
    array = sitk.GetArrayFromImage(image)
    _check_voxels(path, image, array)
    return array, _geometry_of(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True) -> None:
    """Write a (z, y, x) array with its geometry; atomic, so a kill never leaves a partial file."""
    if array.ndim != geometry.ndim:
        raise ValueError(f"{path}: array has {array.ndim} axes but geometry has {geometry.ndim}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetSpacing(tuple(reversed(geometry.spacing)))
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)


class NonFiniteVoxelsError(ValueError):
    """An image holds NaN or infinite voxels (which would turn training losses into NaN)."""

    def __init__(self, path: Path, nan: int, inf: int, size: int):
        self.path, self.nan, self.inf, self.size = path, nan, inf, size
        super().__init__(f"{path}: {nan} NaN and {inf} infinite voxel(s) of {size}; replace them "
                         "(e.g. with the image minimum) before using this image")


def _check_voxels(path: Path, image: sitk.Image, array: np.ndarray) -> None:
    """Refuse truncated files and non-finite voxels, including those ITK hides in NIfTI files."""
    nan = inf = 0
    if file_ending(path) in (".nii", ".nii.gz"):
        expected = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
        found = niftiraw.check_nifti(path, expected, is_float=array.dtype.kind == "f")
        if not found.complete:
            raise OSError(f"{path}: file is truncated (the compressed stream ends early)")
        if found.data_bytes < expected:
            raise OSError(f"{path}: file is truncated ({found.data_bytes} of {expected} bytes of voxel data present)")
        nan, inf = found.nan, found.inf
    elif array.dtype.kind in "fc":
        nan, inf = int(np.count_nonzero(np.isnan(array))), int(np.count_nonzero(np.isinf(array)))
    if nan or inf:
        raise NonFiniteVoxelsError(path, nan, inf, array.size)


def _itk_reason(exc: RuntimeError) -> str:
    """A short, true reason from an ITK exception (which carries source paths and addresses)."""
    text = str(exc)
    if "Unable to determine ImageIO reader" in text:
        return "not a readable image: empty, corrupt, or not the format its name says"
    if "File cannot be read" in text or "data not read completely" in text:
        # MetaImage reports a short read as 'No such file or directory' (errno left over).
        return "file is truncated or corrupt"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        for marker in ("Description:", "ITK ERROR:", "sitk::ERROR:"):
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return lines[-1] if lines else "unknown ITK error"
