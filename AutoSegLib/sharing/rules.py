"""What a model zip may hold, and the checks on its entries and manifest: pure functions.

Nothing here opens a file. The checks take zip entries as objects with ``ZipInfo``'s
attributes (``filename``, ``file_size``, ``compress_size``, ``external_attr``, ``flag_bits``)
and raise :class:`SharingError` with one line naming the offending entry.
"""

from __future__ import annotations

import hashlib
import re
import stat
from collections import Counter
from collections.abc import Iterable

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.names import (CHECKPOINT_FILES, CONFIGURATIONS, DATASET_FILE, INFERENCE_PLAN_FILE, PLANS_FILE,
                              fold_dir_name)

FORMAT = "autoseg-model"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CARD_FILE = "model_card.json"
CARD_MARKDOWN_FILE = "MODEL_CARD.md"
WEIGHTS_FILE = "weights.safetensors"
MODEL_JSON_FILES = (PLANS_FILE, DATASET_FILE, INFERENCE_PLAN_FILE)
FIXED_FILES = (*MODEL_JSON_FILES, CARD_FILE, CARD_MARKDOWN_FILE)
REQUIRED_FILES = (PLANS_FILE, DATASET_FILE, CARD_FILE)

# Limits against zip bombs. A model's weights are stored uncompressed and float weights barely
# deflate (~1.1x), so a real archive unpacks to about its own size; JSON deflates ~5-10x but is
# small. 50x the archive (at least 16 MiB, so tiny models never trip it) leaves wide room, and
# 16 GiB is four times the largest model we know of (5 folds x 2 configurations of a 100M-weight
# network, 4 GB).
MAX_RATIO = 50
RATIO_FLOOR_BYTES = 16 << 20
MAX_TOTAL_BYTES = 16 << 30
MAX_ENTRIES = 1000
MAX_MANIFEST_BYTES = 1 << 20

_WEIGHTS_NAME = re.compile(r"^([^/]+)/fold_(0|[1-9][0-9]*|all)/" + re.escape(WEIGHTS_FILE) + "$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DRIVE = re.compile(r"^[A-Za-z]:")


class SharingError(ReportedFailure):
    """A model cannot be exported or an archive is refused; one line naming the file or entry."""


def safetensors_torch():
    """The ``safetensors.torch`` module (a dependency; imported on use, it loads torch)."""
    try:
        import safetensors.torch
    except ImportError:
        raise SharingError("model zips need the safetensors package: pip install safetensors") from None
    return safetensors.torch


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_name(configuration: str, fold) -> str:
    """``3d_fullres/fold_0/weights.safetensors``."""
    return f"{configuration}/{fold_dir_name(fold)}/{WEIGHTS_FILE}"


def parse_weights_name(name: str) -> tuple[str, int | str] | None:
    """``(configuration, fold)`` of a weights entry, or None if ``name`` is not one."""
    found = _WEIGHTS_NAME.match(name)
    if not found or found.group(1) not in CONFIGURATIONS:
        return None
    fold = found.group(2)
    return found.group(1), (fold if fold == "all" else int(fold))


def path_problem(name: str) -> str | None:
    """Why ``name`` must not be extracted (it could land outside the target folder), or None."""
    if not name:
        return "empty name"
    if "\x00" in name:
        return "NUL character in the name"
    if "\\" in name:
        return "backslash in the name (a Windows path separator)"
    if name.startswith("/") or _DRIVE.match(name):
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "path traversal ('..')"
    if any(part in ("", ".") for part in parts):
        return "empty or '.' path component (a directory entry or a non-normalized path)"
    return None


def allowed_name(name: str) -> bool:
    """The files a model zip holds: the fixed ones and one weights file per configuration and fold."""
    return name in FIXED_FILES or parse_weights_name(name) is not None


def check_entries(entries: list) -> None:
    """Names and types of the archive's entries, before any data is read.

    Refuses: too many entries, unsafe paths, duplicate names (also ones differing only in
    case, which collide on Windows and macOS), symbolic links and other special files, and
    encrypted entries.
    """
    if len(entries) > MAX_ENTRIES:
        raise SharingError(f"{len(entries)} entries; a model zip has at most {MAX_ENTRIES}")
    for entry in entries:
        problem = path_problem(entry.filename)
        if problem:
            raise SharingError(f"entry {entry.filename!r}: {problem}")
        kind = stat.S_IFMT(entry.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise SharingError(f"entry {entry.filename!r}: a symbolic link; a model zip holds regular files only")
        if kind not in (0, stat.S_IFREG):
            raise SharingError(f"entry {entry.filename!r}: not a regular file (mode {oct(entry.external_attr >> 16)})")
        if entry.flag_bits & 0x1:
            raise SharingError(f"entry {entry.filename!r}: encrypted; a model zip is not encrypted")
    counts = Counter(entry.filename.casefold() for entry in entries)
    for entry in entries:
        if counts[entry.filename.casefold()] > 1:
            raise SharingError(f"entry {entry.filename!r}: appears {counts[entry.filename.casefold()]} times "
                               "(duplicate names, possibly differing only in case)")


def size_limit(archive_bytes: int) -> int:
    """Most bytes an archive of ``archive_bytes`` may unpack to."""
    return min(MAX_TOTAL_BYTES, max(RATIO_FLOOR_BYTES, MAX_RATIO * archive_bytes))


def check_declared_sizes(entries: list, archive_bytes: int) -> None:
    """Refuse an archive whose entries declare more data than :func:`size_limit` (a zip bomb)."""
    total = sum(entry.file_size for entry in entries)
    limit = size_limit(archive_bytes)
    if total > limit:
        largest = max(entries, key=lambda entry: entry.file_size)
        raise SharingError(f"entry {largest.filename!r}: would unpack to {largest.file_size} bytes from "
                           f"{largest.compress_size} (all entries: {total} bytes from an archive of {archive_bytes}); "
                           f"the limit is {limit} bytes ({MAX_RATIO}x the archive, at least {RATIO_FLOOR_BYTES}, "
                           f"at most {MAX_TOTAL_BYTES}): refused as a possible zip bomb")


def build_manifest(files: dict[str, tuple[int, str]], checkpoint: str, engine_version: str, created: str) -> dict:
    """The manifest of ``files`` (name -> (size, sha256)), in the order given."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "engine_version": engine_version,
            "created": created, "checkpoint": checkpoint,
            "files": [{"path": name, "size": size, "sha256": digest} for name, (size, digest) in files.items()]}


def check_manifest(manifest) -> tuple[dict[str, tuple[int, str]], str]:
    """``(files: name -> (size, sha256), checkpoint kind)`` from a parsed manifest, or SharingError."""
    where = f"{MANIFEST_FILE}:"
    if not isinstance(manifest, dict):
        raise SharingError(f"{where} must be a JSON object")
    if manifest.get("format") != FORMAT:
        raise SharingError(f"{where} format {manifest.get('format')!r} is not {FORMAT!r}: not an AutoSeg model zip")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise SharingError(f"{where} format version {version!r} is not supported (this AutoSeg reads version "
                           f"{FORMAT_VERSION}; a newer AutoSeg may read it)")
    checkpoint = manifest.get("checkpoint")
    if checkpoint not in CHECKPOINT_FILES:
        raise SharingError(f"{where} checkpoint {checkpoint!r}; allowed: {', '.join(CHECKPOINT_FILES)}")
    entries = manifest.get("files")
    if not isinstance(entries, list):
        raise SharingError(f"{where} 'files' must be a list")
    files: dict[str, tuple[int, str]] = {}
    for item in entries:
        name = item.get("path") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise SharingError(f"{where} every file needs a 'path' string, found {item!r:.100}")
        problem = path_problem(name) or (None if allowed_name(name) else "not a file an AutoSeg model zip holds")
        if problem:
            raise SharingError(f"{where} entry {name!r}: {problem}")
        size, digest = item.get("size"), item.get("sha256")
        if type(size) is not int or size < 0 or not (isinstance(digest, str) and _SHA256.match(digest)):
            raise SharingError(f"{where} entry {name!r}: needs a 'size' (bytes) and a 'sha256' (64 hex digits)")
        if name in files:
            raise SharingError(f"{where} entry {name!r}: listed twice")
        files[name] = (size, digest)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise SharingError(f"{where} does not list {', '.join(missing)}")
    if not any(parse_weights_name(name) for name in files):
        raise SharingError(f"{where} lists no weights ({weights_name('CONFIG', 0)})")
    return files, checkpoint


def check_listing(entry_names: Iterable[str], files: dict) -> None:
    """Every entry (but the manifest) is listed, and every listed file is an entry."""
    names = [name for name in entry_names if name != MANIFEST_FILE]
    for name in names:
        if name not in files:
            raise SharingError(f"entry {name!r}: not listed in {MANIFEST_FILE}")
    present = set(names)
    for name in files:
        if name not in present:
            raise SharingError(f"entry {name!r}: listed in {MANIFEST_FILE} but missing from the archive")


def check_entry_sizes(entries: list, files: dict) -> None:
    """Each entry's declared size is the manifest's (before extracting; extraction counts too)."""
    for entry in entries:
        if entry.filename in files and entry.file_size != files[entry.filename][0]:
            raise SharingError(f"entry {entry.filename!r}: size {entry.file_size} bytes, but {MANIFEST_FILE} "
                               f"says {files[entry.filename][0]}")
