"""``autoseg import-model``: a model zip, checked entry by entry, becomes a model folder.

Order: refuse an existing target; check every entry's name, type and declared size and the
manifest (:mod:`.rules`) before reading any data; extract into ``.tmp-XXXXXXXX-{name}`` beside
the target, counting and hashing bytes as they come; turn each safetensors weights file into
a checkpoint; open the result as a model folder and load every fold's weights into the
network its plans describe; then rename the folder into place. Any failure removes the
temporary folder, so a refused archive leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from AutoSegLib.events import Reporter
from AutoSegLib.fileutil import TMP_PREFIX, read_json
from AutoSegLib.models.folder import ModelFolder, ModelFolderError
from AutoSegLib.names import CHECKPOINT_FILES, INFERENCE_PLAN_FILE, PLANS_FILE
from AutoSegLib.sharing.rules import (CARD_FILE, MANIFEST_FILE, MAX_MANIFEST_BYTES, SharingError, check_declared_sizes,
                                      check_entries, check_entry_sizes, check_listing, check_manifest,
                                      parse_weights_name, safetensors_torch, weights_name)

STAGE = "import-model"
CHUNK = 1 << 20
# What reading a damaged or hostile entry raises, depending on where the damage is.
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError)


def default_target(archive: Path) -> Path:
    """``models/liver.zip`` -> ``models/liver``."""
    return archive.with_suffix("") if archive.suffix.lower() == ".zip" else archive.with_name(archive.name + ".model")


def import_model(archive: str | Path, target: str | Path | None = None, reporter: Reporter | None = None) -> dict:
    """Check ``archive`` and unpack it into the new model folder ``target``.

    Returns:
        What the ``done`` event reports: the model folder, its configurations and folds.

    Raises:
        SharingError: ``target`` exists, or the archive is refused; one line naming the entry.

    Example:
        >>> import_model("mr-model.zip", "models/mr")  # doctest: +SKIP
        >>> Predictor.from_model_dir("models/mr")  # doctest: +SKIP
    """
    reporter = reporter or Reporter(quiet=True)
    archive = Path(archive)
    target = Path(target) if target is not None else default_target(archive)
    _refuse_existing(target)
    if not archive.is_file():
        raise SharingError(f"{archive}: no such file")
    with _about(archive), zipfile.ZipFile(archive) as zf:
        files, checkpoint = _check_archive(zf, archive.stat().st_size)
        made = [p for p in reversed(target.parents) if not p.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}"
        staging.mkdir()
        try:
            _extract(zf, files, staging)
            _convert_weights(staging, files, checkpoint)
            selection = _check_model(staging, files, checkpoint)
            _refuse_existing(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    _fsync_dir(target.parent)
    reporter.log(STAGE, f"Imported {archive} -> {target}: "
                        + ", ".join(f"{name} folds {', '.join(map(str, f))}" for name, f in selection.items())
                        + f" (checkpoint {checkpoint}; every file's size and SHA-256 checked)")
    return {"model": str(target), "configurations": selection, "checkpoint": checkpoint}


@contextlib.contextmanager
def _about(archive: Path):
    """Prefix refusals with the archive's path; a file that is no zip at all is one line too."""
    try:
        yield
    except SharingError as exc:
        if str(exc).startswith(str(archive)):
            raise
        raise SharingError(f"{archive}: {exc}") from None
    except zipfile.BadZipFile as exc:
        raise SharingError(f"{archive}: not a readable zip file ({exc})") from None


def _refuse_existing(target: Path) -> None:
    if target.exists() or target.is_symlink():
        raise SharingError(f"{target}: already exists; import never overwrites a model folder: choose another "
                           "-o or remove it")


def _check_archive(zf: zipfile.ZipFile, archive_bytes: int) -> tuple[dict, str]:
    entries = zf.infolist()
    check_entries(entries)
    check_declared_sizes(entries, archive_bytes)
    info = next((entry for entry in entries if entry.filename == MANIFEST_FILE), None)
    if info is None:
        raise SharingError(f"no {MANIFEST_FILE}: not an AutoSeg model zip")
    if info.file_size > MAX_MANIFEST_BYTES:
        raise SharingError(f"entry {MANIFEST_FILE!r}: {info.file_size} bytes; a manifest has at most "
                           f"{MAX_MANIFEST_BYTES}")
    try:
        with zf.open(info) as handle:
            manifest = json.loads(handle.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    except READ_ERRORS as exc:  # json's and UTF-8's errors are ValueErrors
        raise SharingError(f"entry {MANIFEST_FILE!r}: not readable JSON ({_first_line(exc)})") from None
    files, checkpoint = check_manifest(manifest)
    check_listing([entry.filename for entry in entries], files)
    check_entry_sizes(entries, files)
    return files, checkpoint


def copy_counted(source: BinaryIO, destination: BinaryIO, size: int, name: str) -> str:
    """Copy exactly ``size`` bytes, refusing more (the zip may lie about its sizes); the SHA-256."""
    digest, count = hashlib.sha256(), 0
    while chunk := source.read(CHUNK):
        count += len(chunk)
        if count > size:
            raise SharingError(f"entry {name!r}: holds more than the {size} bytes {MANIFEST_FILE} lists")
        digest.update(chunk)
        destination.write(chunk)
    if count != size:
        raise SharingError(f"entry {name!r}: holds {count} bytes, but {MANIFEST_FILE} says {size}")
    return digest.hexdigest()


def _extract(zf: zipfile.ZipFile, files: dict, staging: Path) -> None:
    root = staging.resolve()
    for name, (size, expected) in files.items():
        path = staging.joinpath(*name.split("/"))
        if not path.resolve().is_relative_to(root):  # the names were checked; this is the second lock
            raise SharingError(f"entry {name!r}: would be written outside the model folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(name) as source, open(path, "xb") as out:
                actual = copy_counted(source, out, size, name)
                out.flush()
                os.fsync(out.fileno())
        except READ_ERRORS as exc:
            raise SharingError(f"entry {name!r}: cannot be read ({_first_line(exc)})") from None
        if actual != expected:
            raise SharingError(f"entry {name!r}: SHA-256 {actual} differs from {MANIFEST_FILE}'s {expected}: the "
                               "file was changed or damaged")


def _convert_weights(staging: Path, files: dict, checkpoint: str) -> None:
    """Each ``weights.safetensors`` becomes ``checkpoint_{kind}.pt`` (what the engine loads)."""
    from AutoSegLib.models.checkpoint import save_checkpoint

    load = safetensors_torch().load

    for name in files:
        if parse_weights_name(name) is None:
            continue
        path = staging.joinpath(*name.split("/"))
        try:
            # From bytes, not a memory map, so the file can be removed at once on any system.
            weights = load(path.read_bytes())
        except Exception as exc:  # safetensors raises its own SafetensorError for any malformed file
            raise SharingError(f"entry {name!r}: not a safetensors weights file ({_first_line(exc)})") from None
        save_checkpoint(path.parent / CHECKPOINT_FILES[checkpoint], {"network_weights": weights}, keep_previous=False)
        path.unlink()


def _check_model(staging: Path, files: dict, checkpoint: str) -> dict[str, list]:
    """Open the unpacked folder as a model and load each fold's weights into its network."""
    from AutoSegLib.network import build_network

    selection: dict[str, list] = {}
    for name in files:
        if (parsed := parse_weights_name(name)) is not None:
            selection.setdefault(parsed[0], []).append(parsed[1])
    try:
        if not isinstance(read_json(staging / CARD_FILE), dict):
            raise SharingError(f"entry {CARD_FILE!r}: must be a JSON object")
        model = ModelFolder.open(staging)
        for name, folds in selection.items():
            config = model.configuration(name)
            previous = config.get("previous_stage")
            if previous and previous not in selection:
                raise SharingError(f"{name} needs its first stage {previous}, which the archive does not hold")
            network = build_network(config, model.network_input_channels(config), model.n_classes,
                                    deep_supervision=False)
            for fold in folds:
                try:
                    network.load_state_dict(model.load_weights(name, fold, checkpoint))
                except RuntimeError as exc:
                    raise SharingError(f"entry {weights_name(name, fold)!r}: does not fit the network of "
                                       f"{PLANS_FILE} ({_first_line(exc)})") from None
        plan = model.inference_plan
        if plan and not all(c in selection and set(plan["folds"]) <= set(selection[c]) for c in plan["configurations"]):
            raise SharingError(f"entry {INFERENCE_PLAN_FILE!r}: predicts with {plan['configurations']} folds "
                               f"{plan['folds']}, which the archive does not all hold")
    except (ModelFolderError, ValueError) as exc:
        # Name the entry, not the temporary folder that is about to be removed.
        message = str(exc).replace(f"{staging}{os.sep}", "").replace(str(staging), "the archived model")
        raise SharingError(message) from None
    return selection


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200] or type(exc).__name__


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable where the system allows opening a folder (not on Windows).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
