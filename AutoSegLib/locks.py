"""One process per folder: an OS lock on a file inside the folder, released when its holder dies.

Training holds its fold folder (``WORK/model/{configuration}/fold_{k}``), preprocessing each
configuration folder (``WORK/preprocessed/{data folder}``), prediction its output folder. A
second process is refused at once with a message naming the holder, before it writes
anything, instead of both running and mixing their logs, checkpoints or arrays.

Why an OS lock and not a "busy" file: ``flock`` (``msvcrt.locking`` on Windows) belongs to
the open file, so the kernel drops it when the holder exits, however it exits (``kill -9``,
out of memory, power loss). A lock never goes stale and is never broken by guessing. The
file, :data:`LOCK_FILE`, only carries the holder's pid, host and start time for the message.

Within one process a lock is re-entrant: stages that run in one process (the demo, a
script using the Python API, validation writing into the fold a training run holds) take
the locks of the folders they write without knowing who else holds them, and ``flock``
would refuse a second ``open()`` of the same file even in the same process. A process-wide
registry counts the holds; the OS lock goes when the last one is released. Worker processes
forked while a lock is held share it (the lock belongs to the open file they inherit), so a
run counts as finished only when its workers have ended too; they cannot take or release it
themselves.

When the first hold of a folder is taken, temporary files a dead run left in it
(:func:`AutoSegLib.fileutil.remove_stale_temps`) are removed: with the lock held, no live
process can be writing them.

Example:
    >>> with lock_folder(work / "model" / "3d_fullres" / "fold_0", "training this fold"):  # doctest: +SKIP
    ...     train()
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import weakref
from datetime import datetime
from pathlib import Path
from typing import Iterable

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.fileutil import remove_stale_temps

LOCK_FILE = ".autoseg.lock"
# Windows locks byte ranges, and a locked range cannot be read by others: lock one byte far
# past the holder's JSON so the refused process can still read who holds it.
_WINDOWS_LOCK_OFFSET = 1 << 30


class FolderBusy(ReportedFailure):
    """Another process holds the folder; the message names it (pid, start time) and what it does."""


class LockFileError(ReportedFailure):
    """The folder or its lock file cannot be made (read-only, not permitted, disk full); one line."""


# -- the OS lock -------------------------------------------------------------------------
if sys.platform == "win32":
    import msvcrt

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


# -- the process-wide registry -------------------------------------------------------------
class _Held:
    """The OS lock this process holds on one folder, and how many holds share it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd, self.count, self.owner = path, fd, 0, os.getpid()


_registry: dict[str, _Held] = {}
_registry_lock = threading.Lock()


def _forget_in_child() -> None:
    # A forked worker shares its parent's lock through the inherited file (released when both
    # have ended) but is not its holder: it must neither re-enter nor release it.
    global _registry_lock
    _registry.clear()
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _key(folder: Path) -> str:
    return os.path.normcase(str(folder.resolve()))


def _open_locked(path: Path) -> int | None:
    """Open and lock ``path`` (created if missing); None when another process holds it."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)  # O_BINARY: Windows
        if not _try_lock(fd):
            os.close(fd)
            return None
        # The previous holder may have removed the file between our open and our lock: a lock
        # on a file that is no longer the folder's lock file excludes no one. Take the new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise OSError(f"{path}: the lock file keeps being replaced; is another program deleting it?")


def _write_holder(fd: int, doing: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "doing": doing,
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())


def read_holder(folder: str | os.PathLike) -> dict | None:
    """What the lock file of ``folder`` says about its (last) holder; None if unreadable.

    The file outlives a killed holder: whether the folder is held is the OS lock's answer,
    not this file's.
    """
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":
        return True  # no cheap check; the message then just names the pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def busy_message(folder: Path, holder: dict | None, doing: str) -> str:
    """``FOLDER: another autoseg (pid P, started T) is DOING; wait for it or stop it``."""
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):  # unreadable, or not ours
        return f"{folder}: another autoseg process is {doing}; wait for it or stop it"
    who = f"pid {holder['pid']}"
    if holder.get("host") and holder["host"] != socket.gethostname():
        who += f" on {holder['host']}"
    with contextlib.suppress(TypeError, ValueError):
        who += f", started {datetime.fromisoformat(holder['started']).strftime('%Y-%m-%d %H:%M:%S')}"
    note = ""
    if holder.get("host") == socket.gethostname() and not _pid_alive(holder["pid"]):
        note = " (that process has ended; its worker processes are still finishing)"
    return f"{folder}: another autoseg ({who}) is {holder.get('doing', doing)}{note}; wait for it or stop it"


# -- holds --------------------------------------------------------------------------------
class FolderLock:
    """One hold on a folder's lock; :meth:`release` it (or leave a ``with`` block).

    A hold that is dropped without release is released when garbage-collected, and the OS
    releases everything when the process ends.
    """

    def __init__(self, folder: Path, key: str, created: list[Path]):
        self.folder = folder
        self._key = key
        self._created = created  # folders this hold made, deepest last (see release(tidy=True))
        self._finalizer = weakref.finalize(self, _release, key, [])
        self._finalizer.atexit = False  # at exit the OS releases; a forked child must not unlock

    @property
    def held(self) -> bool:
        return self._finalizer.alive

    def release(self, tidy: bool = False) -> None:
        """Give this hold back; the OS lock goes with the last hold of the process.

        ``tidy``: also remove the folders this hold created, if they are empty by then (a run
        refused after taking its lock leaves no trace). Releasing twice does nothing.
        """
        if self._finalizer.alive:
            self._finalizer.detach()
            _release(self._key, self._created if tidy else [])

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"FolderLock({str(self.folder)!r}, held={self.held})"


def _release(key: str, created: list[Path]) -> None:
    with _registry_lock:
        held = _registry.get(key)
        if held is None or held.owner != os.getpid():
            return
        held.count -= 1
        if held.count > 0:
            return
        del _registry[key]
        # Removed while still locked, so a process that opened the old file before its removal
        # notices (see _open_locked) and never holds a lock no one else checks.
        with contextlib.suppress(OSError):
            held.path.unlink()
        with contextlib.suppress(OSError):
            _unlock(held.fd)
        os.close(held.fd)
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


def lock_folder(folder: str | os.PathLike, doing: str, clean_temps: bool = True,
                recursive: bool = False) -> FolderLock:
    """Take ``folder``'s lock for this process (creating the folder), or raise :class:`FolderBusy`.

    Args:
        folder: the folder this run writes.
        doing: what the holder does, for the refusal message: "training this fold".
        clean_temps: on the process's first hold, remove temporary files dead runs left.
        recursive: clean sub-folders too (a fold folder's ``validation/``).

    Raises:
        FolderBusy: another process holds it; nothing was created or changed.
        LockFileError: the folder or the lock file cannot be made.
    """
    folder = Path(folder)
    created = [p for p in (*reversed(folder.parents), folder) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LockFileError(f"{folder}: cannot make this folder ({exc.strerror or exc}); choose another "
                            "folder or fix its permissions") from None
    key = _key(folder)
    with _registry_lock:
        held = _registry.get(key)
        if held is None:
            path = folder / LOCK_FILE
            try:
                fd = _open_locked(path)
            except OSError as exc:
                raise LockFileError(f"{folder}: cannot write the lock file {LOCK_FILE} ({exc.strerror or exc}): "
                                    "read-only, not permitted or full; choose another folder or fix it") from None
            if fd is not None:
                _write_holder(fd, doing)
                held = _registry[key] = _Held(path, fd)
                if clean_temps:
                    remove_stale_temps(folder, recursive=recursive)
        if held is not None:
            held.count += 1
            return FolderLock(folder, key, created)
    for made in reversed(created):  # only in a race: a held folder existed before we looked
        with contextlib.suppress(OSError):
            made.rmdir()
    raise FolderBusy(busy_message(folder, _read_holder_retrying(folder), doing))


def _read_holder_retrying(folder: Path) -> dict | None:
    # The holder writes its JSON right after locking: a refused process can land in between.
    for _ in range(20):
        holder = read_holder(folder)
        if holder is not None:
            return holder
        time.sleep(0.05)
    return None


def lock_folders(folders: Iterable[str | os.PathLike], doing: str, **options) -> contextlib.ExitStack:
    """Hold several folders, all or none: a refusal releases those already taken.

    ``doing`` may contain ``{name}``, the folder's name. Close the returned stack to release.
    """
    stack, taken = contextlib.ExitStack(), []
    try:
        for folder in folders:
            taken.append(lock_folder(folder, doing.format(name=Path(folder).name), **options))
            stack.callback(taken[-1].release)
    except BaseException:
        stack.pop_all()
        for lock in reversed(taken):
            lock.release(tidy=True)  # leaves no folder it made
        raise
    return stack
