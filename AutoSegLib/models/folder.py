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
from AutoSegLib.fileutil import read_json
from AutoSegLib.planning import Plans, PlanningError
from AutoSegLib.planning.validate import configuration_problems, model_folder_problems, summarize
from AutoSegLib.models.choice import (INFERENCE_PLAN_VERSION, ModelFolderError, describe_checkpoints,  # noqa: F401
                                    fold_sort_key, parse_folds, read_inference_plan, trained_folds)
from AutoSegLib.names import (CHECKPOINT_FILES, DATASET_FILE, INFERENCE_PLAN_FILE, PLANS_FILE,
                              fold_dir_name)
from AutoSegLib.models.checkpoint import CheckpointError, load_checkpoint

CHECKPOINTS = CHECKPOINT_FILES


class ModelCheckpointError(ModelFolderError, CheckpointError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the plans' network."""


@dataclass
class ModelFolder:
    """An opened model folder (nothing loaded but its JSON files)."""

    path: Path
    plans: Plans
    spec: DatasetSpec
    inference_plan: dict | None

    @classmethod
    def open(cls, path: str | Path) -> "ModelFolder":
        path = Path(path)
        if not path.is_dir():
            raise ModelFolderError(f"{path}: model folder not found")
        from AutoSegLib.models.nnunet_layout import is_nnunet_model  # docs/nnunet-models.md

        if is_nnunet_model(path):
            from AutoSegLib.models.nnunet_folder import open_nnunet_model
            return open_nnunet_model(path)
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
        mismatch = model_folder_problems(raw, spec.channel_names, spec.labels)
        if mismatch:
            raise ModelFolderError(f"{path / DATASET_FILE}: {summarize(mismatch)}")
        plan_path = path / INFERENCE_PLAN_FILE
        inference_plan = read_inference_plan(plan_path) if plan_path.is_file() else None
        return cls(path, plans, spec, inference_plan)

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
        """One configuration of the plans (its optional ``mirror_axes`` included), checked."""
        if name not in self.plans.configurations:
            raise ModelFolderError(f"{self.path / PLANS_FILE}: configuration {name!r} is not planned; planned: "
                                   f"{', '.join(self.plans.configurations)}")
        config = self.plans.configurations[name].to_dict()
        problems = configuration_problems(name, config, len(self.plans.channel_names),
                                          list(self.plans.configurations), self.n_classes)
        if problems:
            raise ModelFolderError(f"{self.path / PLANS_FILE}: {summarize(problems)}")
        return config

    def network_input_channels(self, config: dict) -> int:
        """Image channels, plus one per foreground class for a cascade's second stage (nnU-Net v2),
        plus two per foreground class for click guidance (planning/guidance.py)."""
        from AutoSegLib.planning.guidance import guidance_channels

        n_foreground = len(self.foreground_values)
        return (self.n_channels + (n_foreground if config.get("previous_stage") else 0)
                + guidance_channels(config, n_foreground))

    def fold_dir(self, configuration: str, fold) -> Path:
        return self.path / configuration / fold_dir_name(fold)

    def trained_folds(self, configuration: str, checkpoint: str = "final") -> list:
        """Folds of ``configuration`` whose folder holds ``checkpoint``."""
        return trained_folds(self.path, configuration, checkpoint)

    def describe_checkpoints(self, configuration: str) -> str:
        """What is there, e.g. ``fold_0: final, best; fold_1: latest``, or that nothing is."""
        return describe_checkpoints(self.path, configuration)

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
