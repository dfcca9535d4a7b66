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
"""

from __future__ import annotations

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


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def write_case(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray | None, foreground: np.ndarray,
               properties: dict) -> None:
    """Write a case; the properties file last, so a half-written case never looks complete."""
    p = paths(folder, case_id)
    p["properties"].unlink(missing_ok=True)  # from here until the end the case is incomplete
    for name in ("data", "seg", "foreground", "properties"):  # debris of a write that was killed
        for stray in Path(folder).glob(f"{TMP_PREFIX}*-{p[name].name}"):
            stray.unlink(missing_ok=True)
    _save(p["data"], data)
    if seg is not None:
        _save(p["seg"], seg)
    _save(p["foreground"], foreground)
    write_json(p["properties"], {**properties, "has_seg": seg is not None})


def _load(path: Path, mmap: bool) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def is_current(folder: Path, case_id: str, signature: str) -> bool:
    """True when the case was written completely for this exact plan and these source files."""
    p = paths(folder, case_id)
    try:
        properties = read_json(p["properties"])
        if properties.get("signature") != signature:
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
    """Open a preprocessed case (memory-mapped by default); errors name the case and file."""
    p = paths(folder, case_id)
    try:
        properties = read_json(p["properties"])
        data = _load(p["data"], mmap)
        seg = _load(p["seg"], mmap) if properties.get("has_seg") else None
        foreground = _load(p["foreground"], False)
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
