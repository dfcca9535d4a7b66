"""On-disk form of a preprocessed case, built for fast random patch reads during training.

Per case, in ``WORK/preprocessed/{configuration}/``::

    {case}.npy        float32 (C, ...)  normalized, resampled image channels
    {case}_seg.npy    int16   (1, ...)  label map (-1: background outside the body region)
    {case}_fg.npy     int32   (N, 1+D)  sampled foreground locations: [class, *index]
    {case}.json       properties (geometry, crop, shapes, plan signature); written last

Format: uncompressed ``.npy`` opened memory-mapped. A random patch read touches only the
pages it needs, costs no decompression, and the OS page cache keeps hot cases in memory
without the training process holding them (see benchmarks/bench_storage.py for the figures
against compressed chunked storage). The price is disk space: 4 bytes per voxel and channel.
No pickle anywhere: ``np.load`` runs with ``allow_pickle=False``.

Every file is written under a temporary name and renamed; the properties file goes last and
carries a signature of the plan and the source files, so a case is *current* only when its
properties match and every array file opens with the promised shape.

Integrity: the properties file also records each array file's size and CRC-32
(``"checksums": {"data": {"bytes": n, "crc32": "89abcdef"}, ...}``). It is deleted before
the arrays are rewritten and written after them, so a checksum never describes another
version of a file. :func:`is_current` recomputes them (a mismatch redoes the case);
:func:`open_case` checks them on the first open of each file in a process (training opens a
case once per worker and keeps it memory-mapped, so patches cost nothing extra). CRC-32
streams at about 2 GB/s (0.1 s for a 200 MB array from the page cache; docs/work-folder.md).
Cases written before checksums existed have none and are used as they are.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from AutoSegLib.fileutil import TMP_PREFIX, atomic_path, read_json, write_json


@dataclass(frozen=True)
class PreprocessedCase:
    case_id: str
    data: np.ndarray  # memory-mapped, read-only
    seg: np.ndarray | None
    foreground: np.ndarray
    properties: dict


def paths(folder: Path, case_id: str) -> dict[str, Path]:
    folder = Path(folder)
    return {"data": folder / f"{case_id}.npy", "seg": folder / f"{case_id}_seg.npy",
            "foreground": folder / f"{case_id}_fg.npy", "properties": folder / f"{case_id}.json"}


CHECKSUM = "crc32"
ARRAYS = ("data", "seg", "foreground")
_CHUNK = 1 << 22
# Files whose checksum this process has confirmed, keyed with what a rewrite would change.
_verified: set[tuple] = set()


class DamagedCaseError(OSError):
    """A preprocessed array no longer matches the checksum recorded when it was written."""


def file_checksum(path: str | os.PathLike) -> str:
    """CRC-32 of a file's bytes as 8 hex digits, read in 4 MB chunks."""
    crc, buffer = 0, bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while n := handle.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _save(path: Path, array: np.ndarray) -> dict:
    """Write one array atomically; returns its size and checksum as written."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        return {"bytes": tmp.stat().st_size, CHECKSUM: file_checksum(tmp)}


def write_case(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray | None, foreground: np.ndarray,
               properties: dict) -> None:
    """Write a case; the properties file last, so a half-written case never looks complete."""
    p = paths(folder, case_id)
    p["properties"].unlink(missing_ok=True)  # from here until the end the case is incomplete
    for name in ("data", "seg", "foreground", "properties"):  # debris of a write that was killed
        for stray in Path(folder).glob(f"{TMP_PREFIX}*-{p[name].name}"):
            stray.unlink(missing_ok=True)
    checksums = {"data": _save(p["data"], data)}
    if seg is not None:
        checksums["seg"] = _save(p["seg"], seg)
    checksums["foreground"] = _save(p["foreground"], foreground)
    write_json(p["properties"], {**properties, "has_seg": seg is not None, "checksums": checksums})


def _load(path: Path, mmap: bool) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def damaged_files(folder: Path, case_id: str, properties: dict, use_cache: bool = False) -> list[str]:
    """The case's array files whose size or CRC-32 differs from its properties' record.

    Cases written without checksums (before they existed) have nothing to compare: []. With
    ``use_cache``, a file already confirmed in this process and unchanged since (same size,
    modification time and inode) is not read again.
    """
    recorded = properties.get("checksums")
    if not isinstance(recorded, dict):
        return []
    p, damaged = paths(folder, case_id), []
    for role in ARRAYS:
        expected = recorded.get(role)
        if not isinstance(expected, dict):
            continue
        path = p[role]
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, expected.get(CHECKSUM))
        if use_cache and key in _verified:
            continue
        if stat.st_size != expected.get("bytes"):
            damaged.append(f"{path.name}: {stat.st_size} bytes, {expected.get('bytes')} written")
        elif file_checksum(path) != expected.get(CHECKSUM):
            damaged.append(f"{path.name}: its {CHECKSUM} differs from the one written with it")
        else:
            _verified.add(key)
    return damaged


def is_current(folder: Path, case_id: str, signature: str) -> bool:
    """True when the case was written completely for this exact plan and these source files,
    and its arrays still match their checksums."""
    p = paths(folder, case_id)
    try:
        properties = read_json(p["properties"])
        if properties.get("signature") != signature:
            return False
        if damaged_files(folder, case_id, properties):
            return False
        shape = tuple(properties["shape_after_resampling"])
        if _load(p["data"], True).shape[1:] != shape:
            return False
        if properties.get("has_seg") and _load(p["seg"], True).shape[1:] != shape:
            return False
        _load(p["foreground"], True)
    except (OSError, ValueError, KeyError, EOFError):  # np.load raises EOFError on a zero-byte file
        return False  # missing, truncated or foreign: redo the case
    return True


def open_case(folder: Path, case_id: str, mmap: bool = True) -> PreprocessedCase:
    """Open a preprocessed case (memory-mapped by default); errors name the case and file.

    Raises:
        DamagedCaseError: an array does not match its recorded checksum (checked on the first
            open of each file in this process).
        OSError: a file is missing, truncated or unreadable.
    """
    p = paths(folder, case_id)
    try:
        properties = read_json(p["properties"])
        damaged = damaged_files(folder, case_id, properties, use_cache=True)
        if damaged:
            raise DamagedCaseError(f"preprocessed case '{case_id}' in {folder} is missing or damaged "
                                   f"({'; '.join(damaged)}); rerun `autoseg preprocess` to redo it")
        data = _load(p["data"], mmap)
        seg = _load(p["seg"], mmap) if properties.get("has_seg") else None
        foreground = _load(p["foreground"], False)
    except DamagedCaseError:
        raise
    except (OSError, ValueError, EOFError) as exc:  # EOFError: a zero-byte .npy
        raise OSError(f"preprocessed case '{case_id}' in {folder} is missing or damaged ({exc}); "
                      "rerun `autoseg preprocess`") from exc
    return PreprocessedCase(case_id, data, seg, foreground, properties)


def list_cases(folder: Path) -> list[str]:
    """Case ids with a properties file (complete cases), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if not p.name.startswith("."))
