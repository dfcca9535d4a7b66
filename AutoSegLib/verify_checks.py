"""Content checks of one case: headers first, then voxels. One implementation, two entry points.

* :func:`check_case` is ``verify``'s: it never raises on bad data, keeps one file in memory at
  a time and returns every problem as plain picklable values.
* :func:`read_case` is the fingerprint's and preprocessing's: it runs the same checks on the
  arrays it reads for them, and raises :class:`CaseError` on the first case error, so no
  command accepts a case that ``verify`` rejects (and none allocates by a label's value).

Every message starts with the file (relative to the dataset folder) and states the offending
values, so a user can act on it without opening the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.imageio import Geometry, ImageHeader, NonFiniteVoxelsError, read_header, read_image

# Tolerances for "the label lies on the image grid". NIfTI stores spacing, origin and the
# direction (as a quaternion) in float32, so files written by different tools from the same
# grid differ by ~1e-7 relative; these bounds sit well above that and well below anything that
# would misplace a voxel (a 1e-3 mm shift is a thousandth of a typical voxel).
SPACING_RTOL = 1e-4  # relative, per axis
ORIGIN_ATOL_MM = 1e-3  # absolute, per coordinate
DIRECTION_ATOL = 1e-4  # absolute, per matrix element
# Looser than DIRECTION_ATOL because it judges one matrix against the ideal rather than two
# copies of one matrix; float32 round-off in NIfTI's quaternion/sform stays far below it.
ORTHONORMAL_ATOL = 1e-3  # max |D @ D.T - I|
# Spacings outside this range are usually a units mistake (metres or micrometres stored as mm);
# clinical CT and MR lie well inside it. Only a warning: micro-CT legitimately goes below.
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0
_MAX_LISTED = 12  # values listed in one message before "..."
# Label values are gathered this many voxels at a time, so the check's memory is a few MiB
# whatever the volume (np.unique of a whole 400x512x512 label would sort a full copy).
_SLAB_VOXELS = 1 << 22
# Bump when a check is added, so fingerprints made before it are not reused unchecked.
CHECKS_VERSION = 2


@dataclass(frozen=True)
class Problem:
    """One finding of ``verify``.

    Attributes:
        severity: "error" (the dataset cannot be used) or "warning" (usable, but check it).
        message: plain language, starting with the file or case, stating the offending values.
        file: the file concerned (for a missing file, the path where it was expected).
        case: the case id, when the problem belongs to one case.
        check: short id of the check that found it (e.g. "shape"), for grouping and tests.
    """

    severity: str
    message: str
    file: Path | None = None
    case: str | None = None
    check: str = ""

    def to_dict(self) -> dict:
        return {"severity": self.severity, "check": self.check, "message": self.message,
                "file": None if self.file is None else str(self.file), "case": self.case}


@dataclass(frozen=True)
class CaseJob:
    """What a worker needs to check one case (picklable)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None  # None for test cases
    root: Path  # the dataset folder; messages name files relative to it
    declared_labels: tuple[int, ...] = ()
    ignore_value: int | None = None


@dataclass
class CaseResult:
    problems: list[Problem]
    reference: ImageHeader | None  # header of the first usable channel, for cross-case checks


@dataclass
class _Findings:
    job: CaseJob
    problems: list[Problem] = field(default_factory=list)

    def name(self, path: Path) -> str:
        try:
            return path.relative_to(self.job.root).as_posix()
        except ValueError:
            return str(path)

    def add(self, severity: str, check: str, path: Path, text: str) -> None:
        self.problems.append(Problem(severity, f"{self.name(path)}: {text}", path, self.job.case_id, check))

    def error(self, check: str, path: Path, text: str) -> None:
        self.add("error", check, path, text)

    def warning(self, check: str, path: Path, text: str) -> None:
        self.add("warning", check, path, text)

    def has_errors(self) -> bool:
        return any(p.severity == "error" for p in self.problems)


class CaseError(ReportedFailure, ValueError):
    """A case fails the content checks; the message names each file and its offending values."""

    def __init__(self, case_id: str, messages: list[str]):
        self.case_id, self.messages = case_id, list(messages)
        # Each message starts with its file (imagesTr/..., labelsTr/...), which names the case;
        # the caller says which case and stage it was.
        super().__init__("; ".join(messages))

    def __reduce__(self):  # rebuilt from its own arguments when it crosses a process boundary
        return type(self), (self.case_id, self.messages)


@dataclass
class LoadedCase:
    """A case that passed the checks, as read: channels (z, y, x) and label, geometry of channel 0."""

    channels: list[np.ndarray]
    label: np.ndarray | None
    geometry: Geometry
    warnings: list[Problem]


def check_case(job: CaseJob) -> CaseResult:
    """Check one case's files alone and against each other; never raises on bad data."""
    return _inspect(job, keep=False)[0]


def read_case(job: CaseJob) -> LoadedCase:
    """Read one case for training use, checked exactly as ``verify`` checks it.

    Headers are checked before any voxel is read, and label values before anything is sized
    by them.

    Raises:
        CaseError: the case has errors; its message lists each one with its file and values.
    """
    result, channels, label = _inspect(job, keep=True)
    errors = [p.message for p in result.problems if p.severity == "error"]
    if errors:
        raise CaseError(job.case_id, errors)
    warnings = [p for p in result.problems if p.severity == "warning"]
    return LoadedCase(channels, label, result.reference.geometry, warnings)


def _inspect(job: CaseJob, keep: bool) -> tuple[CaseResult, list[np.ndarray], np.ndarray | None]:
    """Every check of one case; with ``keep``, also the arrays read (and no voxels after a header error)."""
    out = _Findings(job)
    files = [*job.images, *([job.label] if job.label else [])]
    headers = {path: _read_header(path, out) for path in files}
    for path, header in headers.items():
        if header is not None:
            _check_header(header, path == job.label, out)
    usable = {p: h for p, h in headers.items() if h is not None and _ndim_ok(h)}
    images = [usable[p] for p in job.images if p in usable]
    reference = images[0] if images else None
    if reference is not None:
        for header in images[1:]:
            _compare(reference, header, "channel", out)
        if job.label in usable:
            _compare(reference, usable[job.label], "label", out)
        _check_spacing_range(reference, out)
    channels, label = [], None
    if keep and out.has_errors():
        return CaseResult(out.problems, reference), channels, label
    for path in job.images:
        if headers[path] is not None:
            # read_image refuses NaN/Inf voxels in every format, NIfTI included (where ITK
            # itself would silently turn them into 0), so they are reported here.
            array = _read_voxels(path, out)
            if keep:
                channels.append(array)
            del array  # verify holds one file at a time
    if job.label is not None and headers[job.label] is not None:
        label = _check_label_voxels(headers[job.label], out)
    return CaseResult(out.problems, reference), channels, (label if keep else None)


# -- headers ---------------------------------------------------------------------------------
def _read_header(path: Path, out: _Findings) -> ImageHeader | None:
    try:
        return read_header(path)
    except OSError as exc:
        out.error("unreadable", path, _reason(exc, path))
        return None


def _ndim(header: ImageHeader) -> int:
    return len(header.shape)


def _ndim_ok(header: ImageHeader) -> bool:
    # Fingerprint, planning and preprocessing work on (z, y, x) volumes; the 2d configuration
    # trains on slices of them. A 2D file (PNG-like) would be refused by planning: say so here.
    return _ndim(header) == 3


def _check_header(header: ImageHeader, is_label: bool, out: _Findings) -> None:
    what, path, ndim = ("label" if is_label else "image"), header.path, _ndim(header)
    if not _ndim_ok(header):
        hints = {2: " - save a 2D image as a 3D volume of one slice (shape 1xHxW)",
                 4: " - store each volume of a series as its own channel file (_0000, _0001, ...)"}
        out.error("dimension", path, f"{what} is {ndim}D (shape {_shape(header.shape)}); "
                                     f"AutoSeg takes 3D images{hints.get(ndim, '')}")
    if header.components > 1:
        out.error("components", path, f"{what} has {header.components} components per voxel "
                                      f"({header.pixel_type}), e.g. RGB; convert it to a single-component "
                                      "(greyscale) image")
    spacing = np.asarray(header.geometry.spacing)
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        out.error("geometry", path, f"spacing {_vec(spacing)} (z,y,x) must be positive")
    direction = np.asarray(header.geometry.direction)
    if direction.size == ndim * ndim:
        matrix = direction.reshape(ndim, ndim)
        deviation = float(np.abs(matrix @ matrix.T - np.eye(ndim)).max())
        if not deviation <= ORTHONORMAL_ATOL:
            out.error("direction", path, f"direction matrix {_vec(direction)} is not orthonormal (D·Dᵀ deviates "
                                         f"from identity by {deviation:.3g}, tolerance {ORTHONORMAL_ATOL:g})")


def _compare(reference: ImageHeader, other: ImageHeader, role: str, out: _Findings) -> None:
    """``other`` (a further channel or the label) must lie on the grid of the first channel."""
    ref_name, path = out.name(reference.path), other.path
    if _ndim(other) != _ndim(reference):
        out.error("dimension", path, f"{role} is {_ndim(other)}D (shape {_shape(other.shape)}) but "
                                     f"{ref_name} is {_ndim(reference)}D (shape {_shape(reference.shape)})")
        return
    if other.shape != reference.shape:
        out.error("shape", path, f"{role} shape {_shape(other.shape)} differs from shape "
                                 f"{_shape(reference.shape)} of {ref_name}")
    a, b = other.geometry, reference.geometry
    if not np.allclose(a.spacing, b.spacing, rtol=SPACING_RTOL, atol=0):
        out.error("geometry", path, f"{role} spacing {_vec(a.spacing)} (z,y,x) differs from {_vec(b.spacing)} "
                                    f"of {ref_name} (relative tolerance {SPACING_RTOL:g})")
    if not np.allclose(a.origin, b.origin, rtol=0, atol=ORIGIN_ATOL_MM):
        out.error("geometry", path, f"{role} origin {_vec(a.origin)} (x,y,z) differs from {_vec(b.origin)} "
                                    f"of {ref_name} (tolerance {ORIGIN_ATOL_MM:g} mm)")
    if not np.allclose(a.direction, b.direction, rtol=0, atol=DIRECTION_ATOL):
        out.error("geometry", path, f"{role} direction {_vec(a.direction)} differs from {_vec(b.direction)} "
                                    f"of {ref_name} (tolerance {DIRECTION_ATOL:g})")


def _check_spacing_range(header: ImageHeader, out: _Findings) -> None:
    spacing = np.asarray(header.geometry.spacing)
    if np.all(spacing > 0) and (spacing.min() < MIN_SPACING_MM or spacing.max() > MAX_SPACING_MM):
        out.warning("spacing", header.path, f"spacing {_vec(spacing)} mm (z,y,x) is outside the usual "
                                            f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm; check the header's units")


# -- voxels ----------------------------------------------------------------------------------
def _read_voxels(path: Path, out: _Findings) -> np.ndarray | None:
    try:
        return read_image(path)[0]
    except NonFiniteVoxelsError as exc:
        out.error("nan", path, f"{exc.nan} NaN and {exc.inf} infinite voxel(s) of {exc.size}; "
                               "replace them (e.g. with the image minimum) before training")
        return None
    except OSError as exc:
        out.error("unreadable", path, _reason(exc, path))
        return None


def _check_label_voxels(header: ImageHeader, out: _Findings) -> np.ndarray | None:
    """Check a label's values against dataset.json; return the array as read (None if unreadable)."""
    path = header.path
    array = _read_voxels(path, out)
    if array is None or header.components > 1:
        return array  # a multi-component label was reported from its header; its values mean nothing
    values = _distinct_values(array)
    if array.dtype.kind in "fc":
        found = _whole_values_of_float_label(array, values, header, out)
    else:
        found = [int(v) for v in values]
    declared = set(out.job.declared_labels)
    undeclared = [v for v in found if v not in declared]
    if undeclared:
        hint = " (a mask saved as 0/255? store it as 0/1)" if 255 in undeclared else ""
        hint += " (label values are never negative)" if undeclared[0] < 0 else ""
        out.error("label_values", path, f"label value(s) {_values(undeclared)} not declared in dataset.json "
                                        f"'labels' (found: {_values(found)}; declared: {_values(sorted(declared))})"
                                        + hint)
    elif not set(found) - {0, out.job.ignore_value}:
        out.warning("empty_label", path, f"label has no foreground voxel (values found: {_values(found)}); "
                                         "the case teaches background only")
    return array


def _slabs(shape) -> list[slice]:
    """Slices along axis 0 of about ``_SLAB_VOXELS`` voxels each (checks sit below preprocessing.slabs)."""
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
    return [slice(z, z + step) for z in range(0, shape[0], step)]


def _distinct_values(array: np.ndarray) -> np.ndarray:
    """Sorted distinct values, a slab at a time: memory is bounded by a slab, never by a value."""
    parts = [np.unique(array[s]) for s in _slabs(array.shape)]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, array.dtype)


def _whole_values_of_float_label(array: np.ndarray, values: np.ndarray, header: ImageHeader,
                                 out: _Findings) -> list[int]:
    """Report a float label (error with non-integer values, else a warning); return its whole values."""
    path = header.path
    values = values[np.isfinite(values)]  # read_image has already refused non-finite voxels
    fractional = values[values != np.round(values)]
    if fractional.size:
        count = sum(int(np.count_nonzero(array[s] != np.round(array[s]))) for s in _slabs(array.shape))
        examples = ", ".join(f"{v:g}" for v in fractional[:5])
        out.error("label_type", path, f"label has float pixel type ({header.pixel_type}) and {count} "
                                      f"voxel(s) with non-integer values (e.g. {examples}); labels must be whole "
                                      "numbers - was it resampled with linear interpolation?")
    else:
        out.warning("label_type", path, f"label is stored as {header.pixel_type}; its values are whole numbers, "
                                        "so it can be used, but save labels with an integer pixel type")
    return [int(v) for v in values[values == np.round(values)]]


# -- formatting ------------------------------------------------------------------------------
def _reason(exc: OSError, path: Path) -> str:
    # imageio's messages start with the absolute path; the Problem already names the file.
    return str(exc).replace(f"{path}: ", "", 1)


def _shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def _vec(values) -> str:
    # + 0.0 turns ITK's -0.0 direction entries into 0.
    return "[" + ", ".join(np.format_float_positional(float(v) + 0.0, precision=6, trim="-") for v in values) + "]"


def _values(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} values)" if len(values) > _MAX_LISTED else "")
