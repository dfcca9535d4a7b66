"""Atomic file writes: a file that matters is complete or absent, never half-written.

Every writer in AutoSegLib goes through :func:`atomic_path`: the content is written to a
temporary name in the destination folder, flushed to disk, renamed over the final name
(``os.replace`` is atomic on one filesystem), and the folder entry is synced. A kill at any
point leaves either the previous file or the new one, plus at worst a stray ``.tmp-*`` file
that no reader looks at.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

TMP_PREFIX = ".tmp-"
# Exactly the names atomic_path makes: other files that happen to start with ".tmp-" are not ours.
_TMP_NAME = re.compile(rf"^{re.escape(TMP_PREFIX)}[0-9a-f]{{8}}-.")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    # Directory fsync makes the rename itself durable; not supported on every platform.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success, move it into place.

    The temporary name keeps the final name's suffixes (``.nii.gz`` stays ``.nii.gz``) so
    writers that choose a format by extension, such as SimpleITK, write the right format.
    On any exception the temporary file is removed and ``final`` is left untouched.

    Example:
        >>> with atomic_path("out/plans.json") as tmp:
        ...     tmp.write_text("{}")
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{final.name}"
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` that a killed writer left in ``folder``.

    Only safe when no live process writes there: call it holding the folder's lock
    (:func:`AutoSegLib.locks.lock_folder` does). Returns the files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.rglob(f"{TMP_PREFIX}*") if recursive else folder.glob(f"{TMP_PREFIX}*")):
        if _TMP_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, human-readable JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a parse error names the file and the position."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from exc
