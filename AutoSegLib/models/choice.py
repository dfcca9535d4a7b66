"""Which configuration(s), folds and checkpoint of a model folder a prediction uses: one rule.

``autoseg predict``, :meth:`Predictor.from_model_dir`, the Slicer module and anything that
consumes find-best's result call :func:`choose`; the rule, in order:

1. what the caller asked for (``-c``/``configuration=``, ``-f``/``folds=``);
2. else ``inference_plan.json`` (written by ``autoseg find-best``) with its folds, checkpoint
   and postprocessing;
3. else the one configuration that has finished folds (a model trained only as ``3d_cpu``
   predicts as ``3d_cpu`` without being told);
4. else a one-line error that lists what is trained and the exact flag to add.

Folds follow the same rule: those asked for, else the plan's, else every finished one.
Torch-free (the Slicer module imports it in its GUI process); files are only listed and the
small inference plan read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.fileutil import read_json
from AutoSegLib.names import (CHECKPOINT_FILES, CONFIGURATIONS, INFERENCE_PLAN_FILE, PLANS_FILE, fold_dir_name,
                              listing)
from AutoSegLib.training.splits import ALL_FOLDS, SplitsError, parse_fold

INFERENCE_PLAN_VERSION = 1
DEFAULT_CHECKPOINT = "final"


class ModelFolderError(ReportedFailure):
    """The model folder cannot be used as asked; the message names the file and what exists."""


@dataclass(frozen=True)
class ModelChoice:
    """What a prediction runs: configuration names (two = an ensemble), folds, checkpoint."""

    configurations: list[str]
    folds: list | None  # None: every fold of each configuration that has the checkpoint
    checkpoint: str
    postprocessing: dict = field(default_factory=dict)
    reason: str = ""  # how it was chosen, for the log line

    def describe(self) -> str:
        folds = "every finished fold" if self.folds is None else f"folds {', '.join(map(str, self.folds))}"
        return f"{' + '.join(self.configurations)}, {folds}, checkpoint {self.checkpoint} ({self.reason})"


def fold_sort_key(fold) -> tuple:
    return (1, 0) if fold == ALL_FOLDS else (0, int(fold))


def parse_folds(folds) -> list:
    """Fold numbers or ``"all"`` from ints or strings (``[0, "1", "all"]``), in order, each once."""
    try:
        parsed = [parse_fold(f) for f in ([folds] if isinstance(folds, (int, str)) else folds)]
    except SplitsError as exc:
        raise ModelFolderError(str(exc)) from None
    return sorted(set(parsed), key=fold_sort_key)


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
    elif any(n not in CONFIGURATIONS for n in names):
        problems.append(f"'configurations' {names!r}: known configurations are {listing(CONFIGURATIONS)}")
    elif len(set(names)) != len(names):
        problems.append(f"'configurations' {names!r}: an ensemble needs two different configurations")
    folds = plan.get("folds")
    if not isinstance(folds, list) or not folds:
        problems.append(f"'folds' must be a non-empty list like [0, 1, 2, 3, 4] or [\"all\"], found {folds!r}")
    else:
        try:
            folds = parse_folds(folds)
        except ModelFolderError as exc:
            problems.append(f"'folds' {plan['folds']!r}: {exc}")
    if plan.get("checkpoint", DEFAULT_CHECKPOINT) not in CHECKPOINT_FILES:
        problems.append(f"'checkpoint' {plan.get('checkpoint')!r}; allowed: {', '.join(CHECKPOINT_FILES)}")
    if not isinstance(plan.get("postprocessing", {}), dict):
        problems.append("'postprocessing' must be an object")
    if problems:
        raise ModelFolderError(f"{path}: " + "; ".join(problems))
    return {**plan, "folds": folds, "checkpoint": plan.get("checkpoint", DEFAULT_CHECKPOINT),
            "postprocessing": plan.get("postprocessing", {})}


def folds_holding(folder: Path, file_name: str) -> list:
    """The folds ``folder/fold_*`` whose folder holds ``file_name``, in fold order (any layout)."""
    found = []
    for entry in sorted(folder.glob("fold_*")) if folder.is_dir() else []:
        try:
            fold = parse_fold(entry.name[len("fold_"):])
        except SplitsError:
            continue
        if (entry / file_name).is_file():
            found.append(fold)
    return sorted(found, key=fold_sort_key)


def trained_folds(model_dir: str | Path, configuration: str, checkpoint: str = DEFAULT_CHECKPOINT) -> list:
    """Folds of ``configuration`` whose folder holds ``checkpoint`` (``final``: finished training)."""
    return folds_holding(Path(model_dir) / configuration, CHECKPOINT_FILES[checkpoint])


def trained_configurations(model_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT) -> dict[str, list]:
    """``{configuration: finished folds}`` for every configuration with at least one."""
    found = {name: trained_folds(model_dir, name, checkpoint) for name in CONFIGURATIONS}
    return {name: folds for name, folds in found.items() if folds}


def describe_trained(trained: dict[str, list]) -> str:
    """``2d (folds 0, 1), 3d_cpu (fold all)``."""
    def folds(fs):
        return f"fold{'s' if len(fs) > 1 else ''} {', '.join(map(str, fs))}"
    return ", ".join(f"{name} ({folds(fs)})" for name, fs in trained.items())


def check_trained(model_dir: Path, configuration: str, folds: list | None, checkpoint: str) -> None:
    """Refuse a configuration that is not planned, or lacks the folds (any fold) asked for."""
    planned = planned_configurations(model_dir)
    if planned is not None and configuration not in planned:
        raise ModelFolderError(f"{model_dir / PLANS_FILE}: configuration {configuration!r} is not planned; "
                               f"planned: {', '.join(planned)}")
    have = trained_folds(model_dir, configuration, checkpoint)
    missing = [f for f in folds if f not in have] if folds is not None else ([] if have else None)
    if missing is None or missing:
        what = f"fold(s) {missing} of {configuration} have no" if missing else f"no fold of {configuration} has"
        raise ModelFolderError(f"{model_dir}: {what} {CHECKPOINT_FILES[checkpoint]} "
                               f"({describe_checkpoints(model_dir, configuration)})")


def describe_checkpoints(model_dir: str | Path, configuration: str) -> str:
    """What is there, e.g. ``fold_0: final, best; fold_1: latest``, or that nothing is."""
    folder = Path(model_dir) / configuration
    parts = []
    for entry in sorted(folder.glob("fold_*")) if folder.is_dir() else []:
        kinds = [k for k, name in CHECKPOINT_FILES.items() if (entry / name).is_file()]
        parts.append(f"{entry.name}: {', '.join(kinds) or 'no checkpoint'}")
    return "; ".join(parts) if parts else f"nothing trained ({folder} has no fold folders)"


def planned_configurations(model_dir: Path) -> list[str] | None:
    """The configuration names of ``model_dir/plans.json``; None when it is missing or unreadable
    (opening the model folder reports that, with the reason)."""
    try:
        configurations = read_json(Path(model_dir) / PLANS_FILE).get("configurations")
    except (OSError, ValueError, AttributeError):
        return None
    return list(configurations) if isinstance(configurations, dict) else None


def choose(model_dir: str | Path, configuration: str | list[str] | None = None, folds=None,
           checkpoint: str | None = None) -> ModelChoice:
    """Apply the rule of this module's docstring to ``model_dir``.

    Raises:
        ModelFolderError: no configuration given, no inference plan, and not exactly one
            configuration with finished folds; the message lists what is trained and the flag.

    Example:
        >>> choose("Dataset002_MR.autoseg/model").configurations  # doctest: +SKIP
        ['3d_cpu']
    """
    model_dir = Path(model_dir)
    if checkpoint is not None and checkpoint not in CHECKPOINT_FILES:
        raise ModelFolderError(f"checkpoint {checkpoint!r}; allowed: {', '.join(CHECKPOINT_FILES)}")
    wanted_folds = None if folds is None else parse_folds(folds)
    from AutoSegLib.models import nnunet_layout  # nnU-Net v2 folders: .pth files, no inference plan

    if nnunet_layout.is_nnunet_model(model_dir):
        return nnunet_layout.choose(model_dir, configuration, wanted_folds, checkpoint)
    if configuration:
        names = [configuration] if isinstance(configuration, str) else list(configuration)
        for name in names:  # told now, before a process starts or a network is built (the Slicer module)
            check_trained(model_dir, name, wanted_folds, checkpoint or DEFAULT_CHECKPOINT)
        return ModelChoice(names, wanted_folds, checkpoint or DEFAULT_CHECKPOINT, {}, "as asked")
    plan_path = model_dir / INFERENCE_PLAN_FILE
    if plan_path.is_file():
        plan = read_inference_plan(plan_path)
        return ModelChoice(plan["configurations"], plan["folds"] if wanted_folds is None else wanted_folds,
                           checkpoint or plan["checkpoint"], plan["postprocessing"], f"from {INFERENCE_PLAN_FILE}")
    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    trained = trained_configurations(model_dir, checkpoint)
    if len(trained) == 1:
        (name,) = trained
        return ModelChoice([name], wanted_folds, checkpoint, {}, "the only trained configuration")
    if not trained:
        unfinished = trained_configurations(model_dir, "latest")
        hint = (f"; unfinished runs: {describe_trained(unfinished)} (continue them with `autoseg train ... --resume`)"
                if unfinished else "; train one first, e.g. `autoseg train DATASET 3d_cpu 0`")
        raise ModelFolderError(f"{model_dir}: no configuration has a fold with {CHECKPOINT_FILES[checkpoint]}{hint}")
    flags = " or ".join(f"-c {name}" for name in trained)
    raise ModelFolderError(f"{model_dir}: several configurations are trained ({describe_trained(trained)}) and there "
                           f"is no {INFERENCE_PLAN_FILE}; add {flags} (Python: configuration=...), or run "
                           f"`autoseg find-best DATASET` to choose by cross-validation")


def fold_path(model_dir: str | Path, configuration: str, fold) -> Path:
    return Path(model_dir) / configuration / fold_dir_name(fold)
