"""The model folder a prediction runs from: plans, labels, folds, checkpoints, the inference plan.

::

    MODEL_DIR/
      plans.json  dataset.json  [inference_plan.json]
      {configuration}/fold_{k}/checkpoint_{final,best,latest}.pt

Every problem is a :class:`ModelFolderError` naming the file and, for a missing fold or
checkpoint, what does exist, so the user can pick another one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from AutoSegLib.dataset import DatasetError, DatasetSpec
from AutoSegLib.errors import ReportedFailure
from AutoSegLib.fileutil import read_json
from AutoSegLib.planning import Plans, PlanningError
from AutoSegLib.training.checkpoint import BEST, FINAL, LATEST, CheckpointError, load_checkpoint
from AutoSegLib.training.splits import ALL_FOLDS, SplitsError, parse_fold

PLANS_FILE = "plans.json"
DATASET_FILE = "dataset.json"
INFERENCE_PLAN_FILE = "inference_plan.json"
INFERENCE_PLAN_VERSION = 1
CHECKPOINTS = {"final": FINAL, "best": BEST, "latest": LATEST}
DEFAULT_CONFIGURATION = "3d_fullres"


class ModelFolderError(ReportedFailure):
    """The model folder cannot be used as asked; the message names the file and what exists."""


class ModelCheckpointError(ModelFolderError, CheckpointError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the plans' network."""


def _fold_key(fold) -> tuple:
    return (1, 0) if fold == ALL_FOLDS else (0, int(fold))


def parse_folds(folds) -> list:
    """Fold numbers or ``"all"`` from ints or strings (``[0, "1", "all"]``), in order, each once."""
    try:
        parsed = [parse_fold(f) for f in ([folds] if isinstance(folds, (int, str)) else folds)]
    except SplitsError as exc:
        raise ModelFolderError(str(exc)) from None
    return sorted(set(parsed), key=_fold_key)


def read_inference_plan(path: Path) -> dict:
    """Read and check ``inference_plan.json`` (written by find-best); unknown keys are ignored."""
    try:
        plan = read_json(path)
    except ValueError as exc:
        raise ModelFolderError(str(exc)) from None
    problems = []
    if not isinstance(plan, dict):
        raise ModelFolderError(f"{path}: must be a JSON object")
    if plan.get("version") != INFERENCE_PLAN_VERSION:
        problems.append(f"version {plan.get('version')!r} is not supported (expected {INFERENCE_PLAN_VERSION})")
    names = plan.get("configurations")
    if not (isinstance(names, list) and 1 <= len(names) <= 2 and all(isinstance(n, str) for n in names)):
        problems.append(f"'configurations' must list one or two configuration names, found {names!r}")
    if not isinstance(plan.get("folds"), list) or not plan.get("folds"):
        problems.append(f"'folds' must be a non-empty list like [0, 1, 2, 3, 4] or [\"all\"], "
                        f"found {plan.get('folds')!r}")
    if plan.get("checkpoint", "final") not in CHECKPOINTS:
        problems.append(f"'checkpoint' {plan.get('checkpoint')!r}; allowed: {', '.join(CHECKPOINTS)}")
    if not isinstance(plan.get("postprocessing", {}), dict):
        problems.append("'postprocessing' must be an object")
    if problems:
        raise ModelFolderError(f"{path}: " + "; ".join(problems))
    return {**plan, "folds": parse_folds(plan["folds"]), "checkpoint": plan.get("checkpoint", "final"),
            "postprocessing": plan.get("postprocessing", {})}


@dataclass
class ModelFolder:
    """An opened model folder (nothing loaded but its JSON files)."""

    path: Path
    plans: Plans
    spec: DatasetSpec
    raw_configurations: dict
    inference_plan: dict | None

    @classmethod
    def open(cls, path: str | Path) -> "ModelFolder":
        path = Path(path)
        if not path.is_dir():
            raise ModelFolderError(f"{path}: model folder not found")
        missing = [name for name in (PLANS_FILE, DATASET_FILE) if not (path / name).is_file()]
        if missing:
            raise ModelFolderError(f"{path}: not a model folder: {' and '.join(missing)} missing (a model folder is "
                                   "WORK/model, made by `autoseg train`)")
        try:
            raw = read_json(path / PLANS_FILE)
            plans = Plans.from_dict(raw)
        except (ValueError, PlanningError) as exc:
            raise ModelFolderError(f"{path / PLANS_FILE}: {exc}") from None
        try:
            spec = DatasetSpec.from_dict(read_json(path / DATASET_FILE), source=str(path / DATASET_FILE))
        except (ValueError, DatasetError) as exc:
            raise ModelFolderError(str(exc)) from None
        plan_path = path / INFERENCE_PLAN_FILE
        inference_plan = read_inference_plan(plan_path) if plan_path.is_file() else None
        return cls(path, plans, spec, raw.get("configurations", {}), inference_plan)

    @property
    def n_channels(self) -> int:
        return self.spec.num_channels

    @property
    def n_classes(self) -> int:
        """Network outputs: every label but ``ignore``, background included."""
        return len(self.spec.labels) - (self.spec.ignore_value is not None)

    @property
    def foreground_values(self) -> list[int]:
        return sorted(self.spec.foreground_labels.values())

    def configuration(self, name: str) -> dict:
        """One configuration of the plans, checked; keeps an optional ``mirror_axes`` entry."""
        if name not in self.plans.configurations:
            raise ModelFolderError(f"{self.path / PLANS_FILE}: configuration {name!r} is not planned; planned: "
                                   f"{', '.join(self.plans.configurations)}")
        config = self.plans.configurations[name].to_dict()
        if "mirror_axes" in self.raw_configurations.get(name, {}):
            config["mirror_axes"] = self.raw_configurations[name]["mirror_axes"]
        return config

    def network_input_channels(self, config: dict) -> int:
        """Image channels, plus one per foreground class for a cascade's second stage (nnU-Net v2)."""
        return self.n_channels + (len(self.foreground_values) if config.get("previous_stage") else 0)

    def fold_dir(self, configuration: str, fold) -> Path:
        return self.path / configuration / f"fold_{fold}"

    def trained_folds(self, configuration: str, checkpoint: str = "final") -> list:
        """Folds of ``configuration`` whose folder holds ``checkpoint``."""
        folder = self.path / configuration
        found = []
        for entry in sorted(folder.glob("fold_*")) if folder.is_dir() else []:
            try:
                fold = parse_fold(entry.name[len("fold_"):])
            except SplitsError:
                continue
            if (entry / CHECKPOINTS[checkpoint]).is_file():
                found.append(fold)
        return sorted(found, key=_fold_key)

    def describe_checkpoints(self, configuration: str) -> str:
        """What is there, e.g. ``fold_0: final, best; fold_1: latest``, or that nothing is."""
        folder = self.path / configuration
        parts = []
        for entry in sorted(folder.glob("fold_*")) if folder.is_dir() else []:
            kinds = [k for k, name in CHECKPOINTS.items() if (entry / name).is_file()]
            parts.append(f"{entry.name}: {', '.join(kinds) or 'no checkpoint'}")
        return "; ".join(parts) if parts else f"nothing trained ({folder} has no fold folders)"

    def resolve_folds(self, configuration: str, folds, checkpoint: str) -> list:
        """The folds to use: those asked for (each must hold ``checkpoint``), else every trained one."""
        if checkpoint not in CHECKPOINTS:
            raise ModelFolderError(f"checkpoint {checkpoint!r}; allowed: {', '.join(CHECKPOINTS)}")
        trained = self.trained_folds(configuration, checkpoint)
        if folds is None:
            if not trained:
                raise ModelFolderError(f"{self.path}: no fold of {configuration} has {CHECKPOINTS[checkpoint]} "
                                       f"({self.describe_checkpoints(configuration)})")
            return trained
        wanted = parse_folds(folds)
        missing = [f for f in wanted if f not in trained]
        if missing:
            raise ModelFolderError(f"{self.path}: fold(s) {missing} of {configuration} have no "
                                   f"{CHECKPOINTS[checkpoint]} ({self.describe_checkpoints(configuration)})")
        return wanted

    def load_weights(self, configuration: str, fold, checkpoint: str) -> dict:
        """The network weights of one fold's checkpoint, loaded safely on the CPU."""
        path = self.fold_dir(configuration, fold) / CHECKPOINTS[checkpoint]
        try:
            return load_checkpoint(path, required=("network_weights",))["network_weights"]
        except CheckpointError as exc:
            raise ModelCheckpointError(str(exc)) from None
