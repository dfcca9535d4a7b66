"""The cross-validation predictions of trained configurations: which are complete, and where they are.

Validation writes, for every case a fold held out::

    WORK/model/{configuration}/fold_{k}/validation/{case}{ending}   label map, original geometry
    WORK/model/{configuration}/fold_{k}/validation/{case}.npz       float16 softmax, key "probabilities",
                                                                    shape (classes, z, y, x)

A configuration takes part in the selection only when every fold of ``splits_final.json`` has
both files for every one of its validation cases: pooled over the folds, every training case
is then predicted exactly once, by the model that never saw it.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from AutoSegLib.names import VALIDATION_DIR  # noqa: F401 (re-exported)

PROBABILITIES_KEY = "probabilities"


@dataclass(frozen=True)
class ValidatedConfiguration:
    """A configuration whose cross-validation predictions cover every case of the splits."""

    name: str
    label_files: dict[str, Path]  # case -> predicted label map
    probability_files: dict[str, Path]  # case -> .npz with the softmax probabilities


def _show(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def configuration_folders(model_dir: Path) -> list[Path]:
    """Sub-folders of the model folder that hold at least one ``fold_*`` run, by name."""
    if not model_dir.is_dir():
        return []
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and any(p.glob("fold_*"))), key=lambda p: p.name)


def check_configuration(folder: Path, splits: list[dict],
                        ending: str) -> tuple[ValidatedConfiguration | None, list[str]]:
    """The configuration's validation files, or None and what is missing, one message per fold."""
    problems, label_files, probability_files = [], {}, {}
    for k, fold in enumerate(splits):
        validation = folder / f"fold_{k}" / VALIDATION_DIR
        if not validation.parent.is_dir():
            problems.append(f"fold_{k}: not trained ({validation.parent} missing)")
            continue
        if not validation.is_dir():
            problems.append(f"fold_{k}: trained but not validated ({validation} missing)")
            continue
        absent = []
        for case in fold["val"]:
            label_files[case] = validation / f"{case}{ending}"
            probability_files[case] = validation / f"{case}.npz"
            absent += [p.name for p in (label_files[case], probability_files[case]) if not p.is_file()]
        if absent:
            problems.append(f"fold_{k}: {validation} lacks {len(absent)} file(s): {_show(absent)}")
    if problems:
        return None, problems
    return ValidatedConfiguration(folder.name, label_files, probability_files), []


def validated_configurations(model_dir: Path, splits: list[dict],
                             ending: str) -> tuple[list[ValidatedConfiguration], dict[str, list[str]]]:
    """Complete configurations, and for every incomplete one what it lacks."""
    complete, incomplete = [], {}
    for folder in configuration_folders(model_dir):
        configuration, problems = check_configuration(folder, splits, ending)
        if configuration is None:
            incomplete[folder.name] = problems
        else:
            complete.append(configuration)
    return complete, incomplete


def load_probabilities(path: Path, shape: tuple[int, ...], n_classes: int) -> np.ndarray:
    """The ``(n_classes, *shape)`` probabilities of a validation ``.npz``, as stored (float16).

    Raises:
        OSError: the file is unreadable or corrupt.
        ValueError: the key is missing or the array has the wrong shape; names the file.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if PROBABILITIES_KEY not in data:
                raise ValueError(f"{path}: no array '{PROBABILITIES_KEY}' (found {', '.join(data.files) or 'none'})")
            probabilities = data[PROBABILITIES_KEY]
    except (zipfile.BadZipFile, EOFError) as exc:
        raise OSError(f"{path}: cannot read probabilities ({exc})") from exc
    expected = (n_classes, *shape)
    if probabilities.shape != expected:
        raise ValueError(f"{path}: probabilities have shape {probabilities.shape}, expected {expected} "
                         f"({n_classes} classes on the reference grid {tuple(shape)})")
    return probabilities
