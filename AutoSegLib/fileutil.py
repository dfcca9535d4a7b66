"""Atomic file writes: a file that matters is complete or absent, never half-written.

Every writer in AutoSegLib goes through :func:`atomic_path`: the content is written to a
temporary name in the destination folder, flushed to disk, renamed over the final name
(``os.replace`` is atomic on one filesystem), and the folder entry is synced. A kill at any
point leaves either the previous file or the new one, plus at worst a stray ``.tmp-*`` file
that no reader looks at.
"""

from __future__ import annotations

import contextlib
import errno
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
    except (OSError, RuntimeError) as exc:
        full = disk_full_error(exc, final)  # asked before the temporary file's space is freed
        if full is None:
            raise
        raise full from exc
    finally:
        if tmp.exists():
            tmp.unlink()


class DiskFullError(OSError):
    """A write failed for lack of disk space (or quota); the message is one line naming file and disk."""

    def __str__(self) -> str:
        return str(self.args[0])  # not OSError's "[Errno 28] ..." form: the message says it all


def disk_full_error(exc: BaseException, path: str | os.PathLike) -> DiskFullError | None:
    """``exc`` restated as a :class:`DiskFullError` when a full disk caused it, else None.

    Writers rarely say so: numpy reports ``2635416 requested and 1100768 written``, torch
    ``unexpected pos 10816256 vs 10816144``, ITK a RuntimeError. An errno of ENOSPC or EDQUOT
    says it outright; any other OSError or RuntimeError while the disk has less than
    :data:`AutoSegLib.resources.NEARLY_FULL` free is taken for one too.
    """
    from AutoSegLib.resources import FULL_ERRNOS, NEARLY_FULL, free_disk, mount_point

    if isinstance(exc, DiskFullError) or not isinstance(exc, (OSError, RuntimeError)):
        return None
    code = exc.errno if isinstance(exc, OSError) else None
    free = free_disk(Path(path).parent)
    if code not in FULL_ERRNOS and (free is None or free >= NEARLY_FULL):
        return None
    what = "disk quota exceeded" if code is not None and code != errno.ENOSPC and code in FULL_ERRNOS else "disk full"
    space = f"{free / (1 << 20):.0f} MB free" if free is not None else "free space unknown"
    reason = f"; {exc.strerror}" if getattr(exc, "strerror", None) else ""  # the system's words, when it gave any
    error = DiskFullError(f"{what} while writing {path} ({space} on {mount_point(Path(path).parent)}{reason})")
    error.errno = code if code in FULL_ERRNOS else errno.ENOSPC
    error.filename = str(path)
    return error


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
