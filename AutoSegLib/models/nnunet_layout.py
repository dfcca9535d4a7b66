"""Recognising nnU-Net v2 model folders and listing what is trained in them (torch-free).

Two layouts are accepted (``nnUNet_results/DatasetXXX_Name/`` is nnU-Net v2's results folder)::

    TRAINER__PLANS__CONFIGURATION/            a trained model folder: one configuration
      plans.json  dataset.json  fold_{k}/checkpoint_{final,best,latest}.pth
    DatasetXXX_Name/                          the dataset's results folder: several of them
      nnUNetTrainer__nnUNetPlans__2d/  nnUNetTrainer__nnUNetPlans__3d_fullres/ ...

Configurations are named as in nnU-Net (``2d``, ``3d_fullres``, ...), so ``-c`` and
:func:`AutoSegLib.models.choice.choose` work as for AutoSeg's own model folders. A results
folder with two trained folders of one configuration (other trainer or plans) is ambiguous:
the user is told to pass the trained model folder itself.
"""

from __future__ import annotations

from pathlib import Path

from AutoSegLib.names import PLANS_FILE, fold_dir_name  # noqa: F401 (fold_dir_name re-exported)

CHECKPOINT_FILES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth",
                    "latest": "checkpoint_latest.pth"}
SEPARATOR = "__"


def parse_folder_name(name: str) -> tuple[str, str, str] | None:
    """``("nnUNetTrainer", "nnUNetPlans", "3d_fullres")`` from a trained model folder's name, else None."""
    parts = name.split(SEPARATOR)
    return tuple(parts) if len(parts) == 3 and all(parts) else None


def _trained_model_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir()
                  if p.is_dir() and parse_folder_name(p.name) and (p / PLANS_FILE).is_file())


def is_nnunet_model(path: str | Path) -> bool:
    """A trained model folder (``T__P__C`` with plans.json) or a results folder holding some."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / PLANS_FILE).is_file():
        return parse_folder_name(path.name) is not None
    return bool(_trained_model_folders(path))


def model_folders(path: str | Path) -> dict[str, list[Path]]:
    """Configuration name -> the trained model folder(s) of it (more than one: ambiguous)."""
    path = Path(path)
    folders = [path] if (path / PLANS_FILE).is_file() else _trained_model_folders(path)
    found: dict[str, list[Path]] = {}
    for folder in folders:
        found.setdefault(parse_folder_name(folder.name)[2], []).append(folder)
    return found


def ambiguity(path: str | Path, found: dict[str, list[Path]], names=None) -> str | None:
    """The message for a configuration trained in several folders (among ``names``), else None."""
    for name, folders in found.items():
        if len(folders) > 1 and (names is None or name in names):
            return (f"{path}: {name} is trained in {len(folders)} folders ({', '.join(f.name for f in folders)}); "
                    f"pass one of them with -m (e.g. -m {folders[0]})")
    return None


def trained_folds(folder: str | Path, checkpoint: str = "final") -> list:
    """Folds of one trained model folder whose ``fold_*`` holds ``checkpoint`` (``.pth``)."""
    from AutoSegLib.models.choice import folds_holding

    return folds_holding(Path(folder), CHECKPOINT_FILES[checkpoint])


def trained_configurations(path: str | Path, checkpoint: str = "final") -> dict[str, list]:
    """``{configuration: finished folds}`` over the unambiguous trained model folders of ``path``."""
    found = {}
    for name, folders in model_folders(path).items():
        folds = trained_folds(folders[0], checkpoint) if len(folders) == 1 else []
        if folds:
            found[name] = folds
    return found


def choose(path: str | Path, configuration, folds, checkpoint: str | None):
    """:func:`AutoSegLib.models.choice.choose`'s rule for an nnU-Net v2 folder (it has no inference plan).

    ``folds`` are already parsed. Asked-for configurations must be trained here; without one,
    the only trained configuration is used, else the error lists them with the flag to add.
    """
    from AutoSegLib.models.choice import (
        DEFAULT_CHECKPOINT,
        ModelChoice,
        ModelFolderError,
        describe_trained,
    )

    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    found = model_folders(path)
    if configuration:
        names = [configuration] if isinstance(configuration, str) else list(configuration)
        missing = [n for n in names if n not in found]
        if missing:
            have = ", ".join(found) or "none"
            raise ModelFolderError(f"{path}: configuration(s) {missing} not trained in this nnU-Net v2 folder "
                                   f"(trained: {have})")
        problem = ambiguity(path, found, names)
        if problem:
            raise ModelFolderError(problem)
        return ModelChoice(names, folds, checkpoint, {}, "as asked")
    problem = ambiguity(path, found)
    if problem:
        raise ModelFolderError(problem)
    trained = trained_configurations(path, checkpoint)
    if len(trained) == 1:
        return ModelChoice(list(trained), folds, checkpoint, {}, "the only trained configuration")
    if not trained:
        raise ModelFolderError(f"{path}: no nnU-Net v2 configuration has a fold with {CHECKPOINT_FILES[checkpoint]}")
    flags = " or ".join(f"-c {name}" for name in trained)
    raise ModelFolderError(f"{path}: several configurations are trained ({describe_trained(trained)}); "
                           f"add {flags} (Python: configuration=...)")
