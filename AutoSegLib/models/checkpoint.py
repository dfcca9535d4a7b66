"""Checkpoints that survive a kill at any moment and never run code when loaded.

Writing (:func:`save_checkpoint`), for ``checkpoint_latest.pt``:

1. ``torch.save`` to ``.tmp-XXXXXXXX-checkpoint_latest.pt`` in the same folder, flush, fsync;
2. rename the current ``checkpoint_latest.pt`` to ``checkpoint_latest.prev.pt`` (replacing the
   older ``.prev``), but only if it looks complete - a broken file never displaces a good one;
3. rename the temporary file to ``checkpoint_latest.pt`` and fsync the folder.

A kill during 1 leaves latest and prev; between 2 and 3 leaves prev; after 3 leaves the new
latest and prev. So once two saves have completed, at least one complete checkpoint exists
at every instant, and usually two. A disk-full error in 1 leaves the files untouched.
Temporary files left by a kill are never read, and the next save of that name deletes them.

Loading (:func:`load_checkpoint`) uses ``torch.load(weights_only=True, map_location="cpu")``:
tensors, dicts, lists, tuples, numbers, strings and None only. A file holding any other
pickled object is refused, naming the object, and is never retried with unsafe loading.
:func:`check_state` enforces the same rule when saving, so a run cannot write a checkpoint
it would later refuse to resume from (numpy scalars are the usual culprit: ``float(x)``).

State contract (keys the trainer writes; ``REQUIRED_KEYS`` are checked on load):
``network_weights`` (``model.state_dict()``), ``optimizer_state``, ``epoch`` (the number of
completed epochs = the epoch to start from), plus anything plain: grad scaler state, logs as
lists, the schedule as a dict, the best moving-average pseudo-Dice. ``checkpoint_version``
is added on save.

Integrity: the saved payload carries ``content_checksum``, a CRC-32 over every tensor's bytes,
dtype and shape and every plain value, in a fixed order (:func:`content_checksum`). It lives
inside the file, so it is written, renamed and kept as ``.prev`` together with what it
describes. Loading recomputes it; a mismatch (damage that leaves the zip readable, e.g.
flipped bytes inside a tensor) makes the file a damaged checkpoint like a truncated one, so
resuming falls back to the previous valid one and names it. Checkpoints written before the
checksum existed load as they are.

Resuming (:func:`find_resume_checkpoint`) loads every candidate (final, latest, best, and
their ``.prev``), keeps the one with the highest epoch, and reports each broken one with the
reason; finding none is an error, never a fresh start.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import torch

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.fileutil import TMP_PREFIX, atomic_path
from AutoSegLib.names import CHECKPOINT_FILES  # noqa: F401 (re-exported)

CHECKPOINT_VERSION = 1
LATEST = CHECKPOINT_FILES["latest"]
BEST = CHECKPOINT_FILES["best"]
FINAL = CHECKPOINT_FILES["final"]
REQUIRED_KEYS = ("network_weights", "optimizer_state", "epoch")
CHECKSUM_KEY = "content_checksum"
# Preference among equal epochs; the highest epoch wins first.
RESUME_ORDER = (FINAL, LATEST, BEST)


class CheckpointError(ReportedFailure):
    """A checkpoint cannot be written, found or used; the message names the file (no traceback needed)."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects that ``weights_only`` loading refuses (they could run code)."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where the previous version of ``path`` is kept: ``checkpoint_latest.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _walk(value, where: str, bad: list[str]) -> None:
    # Exact types: numpy.float64 is a float subclass, but it pickles as a numpy object.
    if isinstance(value, torch.Tensor) or type(value) in (int, float, bool, str, type(None)):
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                bad.append(f"{where} has a key of type {type(key).__module__}.{type(key).__qualname__}")
            _walk(item, f"{where}[{key!r}]", bad)
    elif type(value) in (list, tuple, torch.Size):
        for i, item in enumerate(value):
            _walk(item, f"{where}[{i}]", bad)
    else:
        bad.append(f"{where} is {type(value).__module__}.{type(value).__qualname__}")


def check_state(state: dict) -> None:
    """Raise CheckpointError if ``state`` holds anything ``weights_only`` loading would refuse."""
    if type(state) is not dict:
        raise CheckpointError(f"checkpoint state must be a dict, got {type(state).__qualname__}")
    bad: list[str] = []
    _walk(state, "state", bad)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError("checkpoint state may hold only tensors, dicts, lists, numbers, strings and None: "
                              + "; ".join(bad[:5]) + more)


def _update(crc: int, value) -> int:
    # Type tags and keys go in too, so moving a value to another key or type changes the sum.
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f"T{tensor.dtype}{tuple(value.shape)}".encode(), crc)
        return zlib.crc32(tensor.view(torch.uint8).numpy(), crc) if tensor.numel() else crc
    if isinstance(value, dict):
        crc = zlib.crc32(f"M{len(value)}".encode(), crc)
        for key in sorted(value, key=repr):
            crc = _update(zlib.crc32(f"K{key!r}".encode(), crc), value[key])
        return crc
    if isinstance(value, (list, tuple)):
        crc = zlib.crc32(f"S{len(value)}".encode(), crc)
        for item in value:
            crc = _update(crc, item)
        return crc
    return zlib.crc32(f"V{type(value).__name__}:{value!r}".encode(), crc)


def content_checksum(state: dict) -> str:
    """CRC-32 (8 hex digits) of a checkpoint's content, ``content_checksum`` itself excluded.

    The same before saving and after loading: dict order, tuple/list and storage layout do
    not enter it. About 2 GB/s of tensor data.
    """
    return f"{_update(0, {k: v for k, v in state.items() if k != CHECKSUM_KEY}):08x}"


def _looks_complete(path: Path) -> bool:
    # torch's format is a zip file; its directory is written last, so a truncated file lacks it.
    try:
        return path.is_file() and path.stat().st_size > 0 and zipfile.is_zipfile(path)
    except OSError:
        return False


def _remove_stale_temps(path: Path) -> None:
    pattern = re.compile(rf"^{re.escape(TMP_PREFIX)}[0-9a-f]{{8}}-{re.escape(path.name)}$")
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            if pattern.match(entry.name):
                entry.unlink(missing_ok=True)


def save_checkpoint(path: str | os.PathLike, state: dict, keep_previous: bool = True) -> None:
    """Write ``state`` atomically to ``path``, keeping the previous version as ``.prev``.

    Example:
        >>> save_checkpoint(fold_dir / LATEST, {"network_weights": net.state_dict(),
        ...     "optimizer_state": opt.state_dict(), "epoch": 12})  # doctest: +SKIP
    """
    check_state(state)
    path = Path(path)
    _remove_stale_temps(path)
    payload = {**state, "checkpoint_version": CHECKPOINT_VERSION}
    payload[CHECKSUM_KEY] = content_checksum(payload)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            if keep_previous and _looks_complete(path):
                os.replace(path, previous_path(path))
    except (OSError, RuntimeError) as exc:
        kept = path if path.exists() else previous_path(path)
        note = f"the newest complete checkpoint is {kept}" if kept.exists() else "no earlier checkpoint exists"
        raise CheckpointError(f"{path}: could not write the checkpoint ({exc}); {note}") from exc


def _refusal(path: Path, exc: Exception) -> CheckpointError:
    # torch's own message advises retrying with weights_only=False; AutoSeg never does that,
    # so only the line naming the offending object or opcode is passed on.
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if found:
        return UnsafeCheckpointError(f"{path}: refused: the file contains a pickled {found.group(1)} object, which "
                                     "could run code when loaded; AutoSeg loads only tensors and plain data")
    detail = re.search(r"(Unsupported operand \S+)", str(exc))
    return CheckpointError(f"{path}: corrupt or not a checkpoint (weights-only loading stopped: "
                           f"{detail.group(1) if detail else 'unsupported pickle content'})")


def _load_problems(state, required) -> list[str]:
    if not isinstance(state, dict):
        return [f"holds a {type(state).__qualname__}, not a dict of training state"]
    problems = []
    missing = [k for k in required if k not in state]
    if missing:
        problems.append(f"missing {missing} (it has {sorted(map(str, state))})")
    weights = state.get("network_weights")
    if "network_weights" in state and not (
            isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())):
        problems.append("'network_weights' is not a dict of tensors")
    optimizer = state.get("optimizer_state")
    if "optimizer_state" in state and not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
        problems.append("'optimizer_state' is not an optimizer state_dict")
    epoch = state.get("epoch")
    if "epoch" in state and (type(epoch) is not int or epoch < 0):
        problems.append(f"'epoch' must be a non-negative integer, found {epoch!r}")
    version = state.get("checkpoint_version", CHECKPOINT_VERSION)
    if type(version) is not int or version > CHECKPOINT_VERSION:
        problems.append(f"checkpoint_version {version!r} is newer than this AutoSeg reads ({CHECKPOINT_VERSION})")
    return problems


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = REQUIRED_KEYS) -> dict:
    """Load and check a checkpoint on the CPU; raises CheckpointError naming the file and the problem.

    ``required`` lists the keys the caller needs (prediction needs only ``network_weights``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); its write was interrupted")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # torch reports damage as RuntimeError, EOFError, KeyError, ... depending on where
        if "weights only load failed" in str(exc).lower():  # torch's UnpicklingError for refused content
            raise _refusal(path, exc) from None
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: corrupt or truncated ({type(exc).__name__}: {first_line})") from None
    if isinstance(state, dict) and CHECKSUM_KEY in state:
        recorded, actual = state.pop(CHECKSUM_KEY), content_checksum(state)
        if recorded != actual:
            raise CheckpointError(f"{path}: damaged: its content does not match the checksum written with it "
                                  f"(crc32 {actual}, written {recorded!r})")
    problems = _load_problems(state, required)
    if problems:
        raise CheckpointError(f"{path}: not a usable checkpoint: " + "; ".join(problems))
    return state


def resume_candidates(folder: str | os.PathLike) -> list[Path]:
    """The files a resume may use, in order of preference among equal epochs."""
    folder = Path(folder)
    return [p for name in RESUME_ORDER for p in (folder / name, previous_path(folder / name))]


def find_resume_checkpoint(folder: str | os.PathLike) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """The valid checkpoint with the most completed epochs, and the broken ones skipped with reasons.

    Raises CheckpointError when no valid checkpoint exists: a run asked to resume must not
    silently start fresh. The caller should report every skipped file.
    """
    best: tuple[Path, dict] | None = None
    skipped: list[tuple[Path, str]] = []
    for path in resume_candidates(folder):
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            continue
        if best is None or state["epoch"] > best[1]["epoch"]:
            best = (path, state)
    if best is None:
        names = ", ".join(p.name for p in resume_candidates(folder))
        reason = "; ".join(r for _, r in skipped) if skipped else f"none of {names} exists"
        raise CheckpointError(f"{folder}: nothing to resume from ({reason}); "
                              "run without --resume to start a new training")
    return best[0], best[1], skipped
