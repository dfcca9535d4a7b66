"""An nnU-Net v2 model folder opened as a :class:`~AutoSegLib.models.folder.ModelFolder`: the I/O edge.

:func:`open_nnunet_model` reads ``plans.json`` and ``dataset.json`` of each trained model folder
(``TRAINER__PLANS__CONFIGURATION/``), converts them (:mod:`.nnunet_plans`) and validates the
result like AutoSeg's own plans; :class:`NnUNetModelFolder` then answers the predictor's
questions (configurations, folds, weights) from the ``fold_{k}/checkpoint_*.pth`` files.

Checkpoints are pickles. They are loaded with ``torch.load(weights_only=True)`` plus the
smallest allowlist nnU-Net v2's checkpoints need: numpy scalars (``_best_ema`` and the
training log hold float32/float64 ones), i.e. numpy's scalar constructor, ``numpy.dtype`` and
its float32/float64 dtype classes, none of which runs code. A checkpoint that needs any other
object is refused, naming it (``UnsafeCheckpointError``); unsafe loading is never tried.
The parameter names of nnU-Net v2's networks are AutoSeg's (network/unet.py), so the weights
load unchanged with ``strict=True``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from AutoSegLib.dataset import DatasetError, DatasetSpec
from AutoSegLib.fileutil import read_json
from AutoSegLib.models.folder import ModelCheckpointError, ModelFolder
from AutoSegLib.models.choice import parse_folds
from AutoSegLib.models.nnunet_layout import (
    CHECKPOINT_FILES,
    ambiguity,
    model_folders,
    trained_folds,
)
from AutoSegLib.models.nnunet_plans import (
    NnUNetModelError,
    convert_dataset,
    convert_plans,
)
from AutoSegLib.names import DATASET_FILE, PLANS_FILE, fold_dir_name
from AutoSegLib.planning import PlanningError, Plans
from AutoSegLib.planning.validate import (
    configuration_problems,
    model_folder_problems,
    summarize,
)
from AutoSegLib.models.checkpoint import UnsafeCheckpointError

_SCALAR = np._core.multiarray.scalar
# Exactly what numpy scalars in a pickle need: the constructor (under numpy 2's and numpy 1's
# module names), numpy.dtype, and the dtype classes the unpickler builds state into.
NUMPY_SCALAR_GLOBALS = [_SCALAR, (_SCALAR, "numpy.core.multiarray.scalar"), np.dtype,
                        np.dtypes.Float32DType, np.dtypes.Float64DType]


class NnUNetCheckpointError(ModelCheckpointError):
    """An nnU-Net v2 checkpoint is missing, corrupt, unsafe or does not fit its plans."""


class UnsafeNnUNetCheckpointError(NnUNetCheckpointError, UnsafeCheckpointError):
    """The checkpoint holds a pickled object that could run code; it was not loaded."""


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """The checkpoint's dict, loaded weights-only with :data:`NUMPY_SCALAR_GLOBALS` allowed.

    ``mmap``: map tensors instead of reading them (to look at a small entry cheaply).
    """
    if not path.is_file():
        raise NnUNetCheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 (damage shows as RuntimeError, EOFError, KeyError, ... by where)
        text = str(exc)
        if "weights only load failed" in text.lower():
            found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", text)
            what = next((g for g in found.groups() if g), "object") if found else "unsupported object"
            raise UnsafeNnUNetCheckpointError(
                f"{path}: refused: the file contains a pickled {what}, which could run code when loaded; "
                "AutoSeg loads only tensors, plain values and numpy scalars") from None
        first = (text.splitlines() or [""])[0][:200]
        raise NnUNetCheckpointError(f"{path}: corrupt or not a checkpoint ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise NnUNetCheckpointError(f"{path}: holds a {type(state).__name__}, not nnU-Net v2's checkpoint dict")
    return state


def mirror_axes_of(state: dict, dims: int, path: Path) -> list[int]:
    """``inference_allowed_mirroring_axes`` as a list (None, as nnU-Net's no-mirroring trainers store: [])."""
    if "inference_allowed_mirroring_axes" not in state:
        raise NnUNetCheckpointError(f"{path}: no inference_allowed_mirroring_axes: not an nnU-Net v2 checkpoint "
                                    f"(it has {sorted(map(str, state))[:8]})")
    axes = state["inference_allowed_mirroring_axes"]
    if axes is None:
        return []
    if not (isinstance(axes, (list, tuple)) and all(type(a) is int and 0 <= a < dims for a in axes)
            and len(set(axes)) == len(axes)):
        raise NnUNetCheckpointError(f"{path}: inference_allowed_mirroring_axes {axes!r} must list distinct patch "
                                    f"axes from 0 to {dims - 1}")
    return [int(a) for a in axes]


@dataclass
class NnUNetModelFolder(ModelFolder):
    """An nnU-Net v2 model: configuration name -> its trained model folder (``T__P__C``)."""

    folders: dict[str, Path] = field(default_factory=dict)
    mirror_axes: dict[str, list[int]] = field(default_factory=dict)

    def configuration(self, name: str) -> dict:
        """The converted configuration, with the mirroring axes its trainer allowed (from a checkpoint)."""
        if name not in self.folders:
            raise NnUNetModelError(f"{self.path}: configuration {name!r} is not trained here; trained: "
                                   f"{', '.join(self.folders)}")
        config = self.plans.configurations[name].to_dict()
        config["mirror_axes"] = self._mirror_axes(name, len(config["patch_size"]))
        problems = configuration_problems(name, config, len(self.plans.channel_names), list(self.folders),
                                          self.n_classes)
        if problems:
            raise NnUNetModelError(f"{self.folders[name] / PLANS_FILE}: {summarize(problems)}")
        return config

    def _mirror_axes(self, name: str, dims: int) -> list[int]:
        if name not in self.mirror_axes:
            folder = self.folders[name]
            path = next((folder / fold_dir_name(fold) / file for kind, file in CHECKPOINT_FILES.items()
                         for fold in trained_folds(folder, kind)), None)
            if path is None:
                raise NnUNetModelError(f"{folder}: no fold has a checkpoint ({', '.join(CHECKPOINT_FILES.values())})")
            self.mirror_axes[name] = mirror_axes_of(read_checkpoint(path, mmap=True), dims, path)
        return self.mirror_axes[name]

    def fold_dir(self, configuration: str, fold) -> Path:
        return self.folders[configuration] / fold_dir_name(fold)

    def trained_folds(self, configuration: str, checkpoint: str = "final") -> list:
        folder = self.folders.get(configuration)
        return trained_folds(folder, checkpoint) if folder is not None else []

    def describe_checkpoints(self, configuration: str) -> str:
        folder = self.folders[configuration]
        parts = [f"{entry.name}: {', '.join(k for k, f in CHECKPOINT_FILES.items() if (entry / f).is_file()) or 'none'}"
                 for entry in sorted(folder.glob("fold_*"))]
        return "; ".join(parts) if parts else f"nothing trained ({folder} has no fold folders)"

    def resolve_folds(self, configuration: str, folds, checkpoint: str) -> list:
        if checkpoint not in CHECKPOINT_FILES:
            raise NnUNetModelError(f"checkpoint {checkpoint!r}; allowed: {', '.join(CHECKPOINT_FILES)}")
        trained = self.trained_folds(configuration, checkpoint)
        wanted = trained if folds is None else parse_folds(folds)
        missing = [f for f in wanted if f not in trained]
        if not wanted or missing:
            raise NnUNetModelError(f"{self.folders[configuration]}: fold(s) {missing or 'any'} have no "
                                   f"{CHECKPOINT_FILES[checkpoint]} ({self.describe_checkpoints(configuration)})")
        return wanted

    def load_weights(self, configuration: str, fold, checkpoint: str) -> dict:
        """One fold's network weights; its mirroring axes and configuration must be the folder's."""
        path = self.fold_dir(configuration, fold) / CHECKPOINT_FILES[checkpoint]
        state = read_checkpoint(path)
        weights = state.get("network_weights")
        if not (isinstance(weights, dict) and weights and all(isinstance(v, torch.Tensor) for v in weights.values())):
            raise NnUNetCheckpointError(f"{path}: 'network_weights' is missing or not a dict of tensors")
        dims = len(self.plans.configurations[configuration].patch_size)
        if mirror_axes_of(state, dims, path) != self._mirror_axes(configuration, dims):
            raise NnUNetCheckpointError(f"{path}: inference_allowed_mirroring_axes "
                                        f"{state.get('inference_allowed_mirroring_axes')} differ from the other "
                                        f"folds' {self.mirror_axes[configuration]}")
        trained_as = (state.get("init_args") or {}).get("configuration", configuration)
        if trained_as != configuration:
            raise NnUNetCheckpointError(f"{path}: trained as configuration {trained_as!r}, found in the folder "
                                        f"of {configuration!r}")
        return weights


def open_nnunet_model(path: str | Path) -> NnUNetModelFolder:
    """Open a trained model folder or a dataset's results folder of nnU-Net v2 (JSON files only).

    Raises:
        NnUNetModelError: an ambiguous results folder, a cascade without its first stage, or a
            plans/dataset feature AutoSeg does not reproduce, naming the feature and the file.
    """
    path = Path(path)
    found = model_folders(path)
    problem = ambiguity(path, found)
    if problem:
        raise NnUNetModelError(problem)
    folders = {name: group[0] for name, group in found.items()}
    dataset_path = next(iter(folders.values())) / DATASET_FILE
    try:
        dataset = read_json(dataset_path)
        plans_files = {name: (read_json(folder / PLANS_FILE), str(folder / PLANS_FILE))
                       for name, folder in folders.items()}
    except ValueError as exc:
        raise NnUNetModelError(str(exc)) from None
    for name, folder in folders.items():
        if (folder / DATASET_FILE).is_file() and read_json(folder / DATASET_FILE) != dataset:
            raise NnUNetModelError(f"{folder / DATASET_FILE}: differs from {dataset_path}: not one dataset's folders")
        previous = plans_files[name][0].get("configurations", {}).get(name, {}).get("previous_stage")
        if previous is not None and previous not in folders:
            raise NnUNetModelError(f"{folder}: {name} is a cascade stage that needs {previous} predicted first; pass "
                                   f"the dataset's results folder holding both trained model folders (-m {path.parent})")
    converted = convert_plans(plans_files, convert_dataset(dataset, str(dataset_path)))
    try:
        plans = Plans.from_dict(converted)
        spec = DatasetSpec.from_dict(dataset, source=str(dataset_path))
    except (PlanningError, DatasetError) as exc:
        raise NnUNetModelError(f"{dataset_path.parent}: {exc}") from None
    mismatch = model_folder_problems(converted, spec.channel_names, spec.labels)
    if mismatch:
        raise NnUNetModelError(f"{dataset_path}: {summarize(mismatch)}")
    return NnUNetModelFolder(path, plans, spec, None, folders=folders)
