"""Memory and disk, told before the work starts: what this machine has, and checks against estimates.

A prediction or preprocessing run that is too large for the machine used to fail late: killed by
the out-of-memory killer after a quarter of an hour, or with ``OSError: 2635416 requested and
1100768 written`` when the disk filled, or, for a read-only output folder, after every case had
been predicted. Here are the pieces that let a command say so at the start:

* what the machine has: :func:`available_memory` (Linux ``MemAvailable``, capped by a cgroup
  limit; Windows ``GlobalMemoryStatusEx``; None where unknown), :func:`free_disk`;
* :class:`MemoryEstimate`, the peak of a run told as the arrays alive at its largest moment,
  built by :func:`peak_of` from phases (the estimators: :mod:`AutoSegLib.inference.memory` for
  prediction, :func:`estimate_preprocess_case` here for preprocessing);
* the checks: :func:`check_writable` (a probe file created and removed), :func:`check_disk` and
  :func:`check_memory`, which return a warning or raise :class:`ResourceError` (always for a
  read-only or full disk; for too little memory or room only with ``strict``).

``AUTOSEG_AVAILABLE_MEMORY_MB`` replaces the measured available memory; it is read only at the
command line (:func:`available_memory_override`), for tests and for machines whose limit the
system does not report.

Example:
    >>> estimate = peak_of([("read", {"image": 300 * MiB}), ("labels", {"probabilities": 2 * GiB})])
    >>> estimate.phase, format_bytes(estimate.added)
    ('labels', '2.0 GiB')
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from AutoSegLib.errors import ReportedFailure

MiB = 1 << 20
GiB = 1 << 30
AVAILABLE_MEMORY_ENV = "AUTOSEG_AVAILABLE_MEMORY_MB"
# Below this much free space a failed write is a full disk whatever the writer said (fileutil).
NEARLY_FULL = 1 * MiB
# A forked preprocessing worker's own pages beyond the case arrays (measured RSS growth of an
# idle fork is ~10 MiB; rounded up for the interpreter's allocations while it works).
WORKER_OVERHEAD = 30 * MiB
# No space left, and over the disk quota (EDQUOT exists on POSIX systems only).
FULL_ERRNOS = frozenset({errno.ENOSPC, *([errno.EDQUOT] if hasattr(errno, "EDQUOT") else [])})


class ResourceError(ReportedFailure):
    """The run cannot fit: a read-only or full output folder, or (with --strict) too little memory."""


# -- what the machine has ------------------------------------------------------------------------
def available_memory(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Bytes of memory a new allocation can get without swapping, or None if unknown.

    Linux: ``MemAvailable`` (free plus reclaimable cache), capped by the cgroup v2 limit of a
    container (``memory.max`` - ``memory.current``), which ``MemAvailable`` does not see.
    Elsewhere: Windows' ``GlobalMemoryStatusEx``; ``sysconf`` free pages as a last resort.
    """
    available = _meminfo_available(meminfo)
    if available is None:
        available = _windows_available() if sys.platform == "win32" else _sysconf_available()
    limit = _cgroup_room(cgroup)
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def _meminfo_available(path: str) -> int | None:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(root: str) -> int | None:
    try:
        limit = Path(root, "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path(root, "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def _sysconf_available() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None  # macOS has no SC_AVPHYS_PAGES: unknown, and said so


def _windows_available() -> int | None:
    try:
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                        ("available", ctypes.c_ulonglong), ("page_total", ctypes.c_ulonglong),
                        ("page_available", ctypes.c_ulonglong), ("virtual_total", ctypes.c_ulonglong),
                        ("virtual_available", ctypes.c_ulonglong), ("extended", ctypes.c_ulonglong)]

        status = MemoryStatus()
        status.length = ctypes.sizeof(MemoryStatus)
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return None
        return int(status.available)
    except Exception:  # noqa: BLE001 - any failure here only means "unknown"
        return None


def available_memory_override(environ: Mapping[str, str] | None = None) -> int | None:
    """``AUTOSEG_AVAILABLE_MEMORY_MB`` in bytes, for the command line to pass on; None if unset.

    Raises:
        ValueError: the variable is set but is not a non-negative number.
    """
    text = (os.environ if environ is None else environ).get(AVAILABLE_MEMORY_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value >= 0:
        raise ValueError(f"{AVAILABLE_MEMORY_ENV}={text!r}: give the available memory in MB, e.g. 8000")
    return int(value * MiB)


def process_memory() -> int | None:
    """This process's resident memory now (Linux), or None."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def existing_parent(path: str | os.PathLike) -> Path:
    """``path`` or its nearest parent that exists (where a folder about to be made would live)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point holding ``path``: how messages name the disk."""
    path = existing_parent(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_disk(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the disk holding ``path``, or None if it cannot be asked."""
    try:
        return int(shutil.disk_usage(existing_parent(path)).free)
    except OSError:
        return None


def format_bytes(n: float) -> str:
    """``"12.4 GiB"``, ``"310 MiB"``: memory and disk sizes in messages."""
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB" if abs(n) >= MiB else f"{n / 1024:.0f} KiB"


# -- estimates -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one piece of work, as the arrays alive at its largest moment.

    ``added`` is what the work adds to the process (``parts`` of the peak ``phase`` summed);
    ``base`` what the process held before (interpreter, libraries, model), so ``peak`` is the
    resident size a tool such as ``/usr/bin/time -v`` would report.
    """

    added: int
    phase: str
    parts: dict = field(default_factory=dict)  # name -> bytes, at the peak phase
    base: int = 0
    phases: dict = field(default_factory=dict)  # phase -> bytes added, every phase

    @property
    def peak(self) -> int:
        return self.base + self.added

    def describe(self, top: int = 3) -> str:
        """E.g. ``'at labels: probabilities (input grid) 5.2 GiB, labels 1.3 GiB'``."""
        largest = sorted(self.parts.items(), key=lambda item: -item[1])[:top]
        return f"at {self.phase}: " + ", ".join(f"{name} {format_bytes(size)}" for name, size in largest)


def peak_of(phases: Iterable[tuple[str, Mapping[str, float]]], base: int = 0) -> MemoryEstimate:
    """The phase whose parts sum highest. Parts with the same name within a phase are one array."""
    totals, best = {}, None
    for name, parts in phases:
        parts = {part: int(size) for part, size in parts.items() if size}
        totals[name] = sum(parts.values())
        if best is None or totals[name] > best[0]:
            best = (totals[name], name, parts)
    if best is None:
        return MemoryEstimate(0, "nothing", {}, int(base), {})
    return MemoryEstimate(best[0], best[1], best[2], int(base), totals)


def planning_shape(shape, spacing, config: Mapping, transpose_forward) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape in planning axis order, shape after resampling to the configuration's spacing).

    No cropping is assumed (the header does not say where the body is), so for images with an
    empty surround the estimate errs on the large side.
    """
    from AutoSegLib.preprocessing.case import full_target_spacing
    from AutoSegLib.preprocessing.resampling import target_shape

    transpose = [int(a) for a in transpose_forward]
    shape_t = tuple(int(shape[a]) for a in transpose)
    spacing_t = tuple(float(spacing[a]) for a in transpose)
    return shape_t, tuple(target_shape(shape_t, spacing_t, full_target_spacing(config["spacing"], spacing_t)))


def pixel_bytes(pixel_type: str, components: int = 1) -> int:
    """Bytes per voxel of an ITK pixel type string such as ``"16-bit signed integer"``."""
    digits = pixel_type.split("-bit")[0].split()[-1] if "-bit" in pixel_type else "32"
    bits = int(digits) if digits.isdigit() else 32
    return max(1, bits // 8) * max(1, int(components))


def estimate_preprocess_case(shape, spacing, config: Mapping, transpose_forward, n_channels: int = 1,
                             image_bytes: int = 2, label_bytes: int | None = 1) -> MemoryEstimate:
    """Peak of :func:`AutoSegLib.preprocessing.runner.preprocess_one` for one case: read, preprocess, sample, write.

    Follows :func:`AutoSegLib.preprocessing.case.preprocess_case` (its docstring has the measured
    peaks this reproduces): the nonzero mask (bool) and one float32 scratch channel at the
    cropped size, the float32 result; for the label an int16 copy, then the label resampling's
    int16 result, two float32 score volumes and a boolean one at the new size and a boolean mask
    at the old. ``label_bytes=None``: no label.
    """
    n0 = math.prod(int(s) for s in shape)
    _, new_shape = planning_shape(shape, spacing, config, transpose_forward)
    n1 = math.prod(new_shape)
    resample = n1 != n0 or tuple(new_shape) != tuple(int(shape[int(a)]) for a in transpose_forward)
    inputs = {"images": n_channels * n0 * image_bytes, "label": n0 * (label_bytes or 0)}
    data = {"data (float32)": n_channels * n1 * 4}
    phases = [
        ("read", {**inputs, "reader copy": n0 * max(image_bytes, label_bytes or 0)}),
        ("normalize and resample", {**inputs, "nonzero mask": n0, "scratch (float32)": n0 * 4 * resample, **data}),
    ]
    if label_bytes is not None:
        phases.append(("label", {**inputs, **data, "nonzero mask": n0, "label (int16)": n0 * 2}))
        if resample:
            phases.append(("label resampling", {**inputs, **data, "label (int16)": n0 * 2, "resampled label": n1 * 2,
                                                "scores (float32)": n1 * 8, "masks": n1 + n0}))
        # after the inputs are released: the largest class's voxel indices (int64), up to half the image
        phases.append(("foreground sampling", {**data, "label": n1 * 2, "class mask": n1, "indices": n1 * 4}))
    return peak_of(phases)


# -- checks --------------------------------------------------------------------------------------
def check_writable(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Make ``folder`` if needed and prove it writable by creating and removing a probe file.

    Raises:
        ResourceError: read-only, not permitted, or no space even for the probe; names the folder.
    """
    folder = Path(folder)
    probe = folder / f".tmp-{uuid.uuid4().hex[:8]}-write-probe"  # the name fileutil's cleanup knows
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"autoseg write probe\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in FULL_ERRNOS:
            raise ResourceError(f"{folder}: disk full ({format_bytes(free_disk(folder) or 0)} free on "
                                f"{mount_point(folder)}); free some space or choose another {what}") from None
        raise ResourceError(f"{folder}: {what} is read-only or not writable ({reason}); choose another {what} "
                            "or fix its permissions") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def check_disk(folder: str | os.PathLike, needed: int, what: str, strict: bool = False) -> str | None:
    """Compare an estimate of the bytes to be written with the free space of ``folder``'s disk.

    Returns a warning when the estimate does not fit (None when it does or free space is
    unknown); raises when the disk is full, or when it does not fit and ``strict``.
    """
    free = free_disk(folder)
    if free is None or free >= needed:
        return None
    where = f"{format_bytes(free)} free on {mount_point(folder)}"
    if free < NEARLY_FULL:
        raise ResourceError(f"{folder}: disk full ({where}); {what} need up to {format_bytes(needed)}")
    message = f"{folder}: {what} need up to {format_bytes(needed)} but only {where}; the run may stop with disk full"
    if strict:
        raise ResourceError(message + " (refused: --strict)")
    return message


def check_memory(estimate: MemoryEstimate, available: int | None, what: str, advice: str = "",
                 strict: bool = False) -> str | None:
    """Compare what ``estimate`` adds with the available memory.

    Returns a warning when it does not fit (None when it does or nothing is known); raises
    :class:`ResourceError` instead when ``strict``.
    """
    if available is None or estimate.added <= available:
        return None
    message = (f"{what} needs about {format_bytes(estimate.added)} more memory ({estimate.describe()}) but "
               f"{format_bytes(available)} is available: the out-of-memory killer may end it at that step.")
    if advice:
        message += " " + advice
    if strict:
        raise ResourceError(message + " Refused (--strict).")
    return message



# -- before `autoseg preprocess` starts ----------------------------------------------------------
def check_preprocess_resources(cases, configurations: Mapping[str, tuple[Mapping, Path]], transpose_forward,
                               num_processes: int = 1, reporter=None, strict: bool = False,
                               available: int | None = None, stage: str = "preprocess") -> int | None:
    """Before any case: the preprocessed folders writable with room, and the memory of
    ``num_processes`` workers each holding one of the largest cases told against what is available.

    Args:
        cases: the dataset's cases (``images``, ``label`` paths).
        configurations: name -> (configuration dict, its preprocessed folder).
        available: bytes to compare with (default: :func:`available_memory`).

    Returns:
        The estimated memory of the workers together (None when no header could be read).

    Raises:
        ResourceError: a folder is read-only or its disk full; with ``strict``, also when the
            estimates do not fit.
    """
    from AutoSegLib.events import Reporter
    from AutoSegLib.imageio import read_header

    reporter = reporter or Reporter(quiet=True)
    folders = {}
    for name, (config, folder) in configurations.items():
        folders.setdefault(Path(folder), (name, config))
    for folder in folders:
        check_writable(folder, "preprocessed data folder")
    per_case, needed = [], 0
    for case in cases:
        try:
            image = read_header(case.images[0])
            label = read_header(case.label) if case.label is not None else None
        except OSError:
            continue  # reported with its cause when the case is preprocessed
        spacing = image.geometry.spacing
        worst = None
        for name, config in folders.values():
            estimate = estimate_preprocess_case(image.shape, spacing, config, transpose_forward, len(case.images),
                                                pixel_bytes(image.pixel_type, image.components),
                                                pixel_bytes(label.pixel_type) if label is not None else None)
            if worst is None or estimate.added > worst[0].added:
                worst = (estimate, name)
            n1 = math.prod(planning_shape(image.shape, spacing, config, transpose_forward)[1])
            needed += (len(case.images) * 4 + 2) * n1 + 3 * 4096
        per_case.append((worst[0], worst[1], case.case_id, image.shape))
    existing = sum(p.stat().st_size for folder in folders if folder.is_dir() for p in folder.glob("*.npy"))
    warning = check_disk(next(iter(folders)), needed - existing, f"the preprocessed data of {len(cases)} case(s)",
                         strict) if folders else None
    if warning:
        reporter.warning(stage, warning)
    if not per_case:
        return None
    per_case.sort(key=lambda item: -item[0].added)
    workers = max(1, min(int(num_processes), len(per_case)))
    overhead = WORKER_OVERHEAD if workers > 1 else 0
    total = sum(item[0].added + overhead for item in per_case[:workers])
    largest, name, case_id, shape = per_case[0]
    shape = "x".join(map(str, shape))
    available = available_memory() if available is None else available
    known = f"{format_bytes(available)} available" if available is not None else "available memory unknown"
    which = "the largest case, " if len(per_case) > 1 else ""
    reporter.log(stage, f"Memory: {which}'{case_id}' ({shape}) adds about {format_bytes(largest.added)} to a worker "
                        f"for {name} ({largest.describe()}); {workers} worker(s) at once up to {format_bytes(total)}; "
                        f"{known}", case=case_id, estimate_bytes=total, available_bytes=available)
    combined = MemoryEstimate(total, f"{workers} worker(s)", {f"case '{case_id}' {largest.phase}": largest.added,
                                                              "other workers": total - largest.added})
    fit = 0
    while available is not None and fit < len(per_case) and \
            sum(item[0].added + WORKER_OVERHEAD for item in per_case[:fit + 1]) <= available:
        fit += 1
    if fit >= 1:
        advice = f"Fewer workers lower it: -np {fit} fits."
    else:
        advice = (f"Case '{case_id}' alone needs more than is available: free memory (close other programs) or use a "
                  "machine with more; the worker running it would be killed.")
    warning = check_memory(combined, available, f"Preprocessing with {workers} worker(s)", advice, strict)
    if warning:
        reporter.warning(stage, warning)
    return total
