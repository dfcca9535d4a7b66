"""The engine commands behind the module's buttons: Train, Predict, Fine-tune.

Plain argument lists (``autoseg`` flags, see ``autoseg COMMAND --help``), built from settings
and checked against the engine that is actually installed, so a button never starts a command
the engine does not have.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from AutoSegLib.dataset import load_spec
from AutoSegLib.fileutil import read_json

from AutoSegLogic.jobs import Step

CONFIGURATIONS = ("3d_fullres", "2d", "3d_lowres")
PRESETS = ("quick", "paper")
DEVICES = ("auto", "cuda", "mps", "cpu")
MODEL_DIR = "model"
FINE_TUNE_DIR = "fine_tune"
# A short schedule for fine-tuning from trained weights: a tenth of the quick preset's epochs
# would be too few to adapt, the paper's 1000 far more than corrections need.
FINE_TUNE_EPOCHS, FINE_TUNE_ITERATIONS = 10, 25


class EngineFeatureMissing(RuntimeError):
    """The installed engine lacks a command or flag this action needs."""


def work_folder(dataset, work=None) -> Path:
    """The engine's default: ``<dataset folder name>.autoseg`` beside the dataset."""
    if work:
        return Path(work)
    from AutoSegLib.cli import default_work_dir

    return default_work_dir(Path(dataset))


def model_folder(dataset, work=None) -> Path:
    return work_folder(dataset, work) / MODEL_DIR


def parse_folds(text: str) -> list[str]:
    """``"0"``, ``"0,1,2"``, ``"0-4"`` or ``"all"`` -> fold names; empty means fold 0."""
    text = (text or "").strip().lower()
    if not text:
        return ["0"]
    if text == "all":
        return ["all"]
    folds: list[str] = []
    for part in re.split(r"[,\s]+", text):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"folds: '{part}' is not a fold number; write e.g. 0 or 0,1,2 or 0-4 or all")
        first, last = int(match[1]), int(match[2] or match[1])
        folds += [str(f) for f in range(first, last + 1) if str(f) not in folds]
    return folds


def engine_flags(command: str) -> set[str]:
    """The option strings the installed engine's ``command`` accepts (empty if no such command)."""
    from AutoSegLib.cli import build_parser

    parser = build_parser()
    for action in parser._subparsers._group_actions:  # argparse keeps sub-commands here
        sub = action.choices.get(command)
        if sub is not None:
            return {o for a in sub._actions for o in a.option_strings}
    return set()


def require(command: str, *flags: str) -> None:
    available = engine_flags(command)
    if not available:
        raise EngineFeatureMissing(f"this AutoSeg engine has no '{command}' command yet")
    missing = [f for f in flags if f not in available]
    if missing:
        raise EngineFeatureMissing(f"this AutoSeg engine's '{command}' lacks {', '.join(missing)}")


@dataclass
class TrainSettings:
    """What the Train panel asks for."""

    dataset: Path
    work: Path | None = None
    configuration: str = "3d_fullres"
    folds: list[str] = field(default_factory=lambda: ["0"])
    preset: str = "quick"
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    time_budget_min: float | None = None
    device: str = "auto"
    overwrite: bool = False

    def check(self) -> None:
        for name, value, allowed in [("configuration", self.configuration, CONFIGURATIONS),
                                     ("preset", self.preset, PRESETS), ("device", self.device, DEVICES)]:
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")


def training_steps(settings: TrainSettings) -> list[Step]:
    """verify -> plan-and-preprocess -> one training run per fold."""
    settings.check()
    dataset, work = str(settings.dataset), str(work_folder(settings.dataset, settings.work))
    steps = [Step(["verify", dataset], "check the dataset"),
             Step(["plan-and-preprocess", dataset, "-w", work, "-c", settings.configuration],
                  "plan and preprocess")]
    for fold in settings.folds:
        steps.append(Step(["train", dataset, settings.configuration, fold, "-w", work, *_train_flags(settings)],
                          f"train {settings.configuration} fold {fold}"))
    return steps


def _train_flags(settings: TrainSettings) -> list[str]:
    flags = ["--preset", settings.preset, "--device", settings.device]
    if settings.epochs:
        flags += ["--epochs", str(settings.epochs)]
    if settings.iterations_per_epoch:
        flags += ["--iterations-per-epoch", str(settings.iterations_per_epoch)]
    if settings.time_budget_min:
        flags += ["--time-budget", f"{settings.time_budget_min:g}"]
    if settings.overwrite:
        flags.append("--overwrite")
    return flags


def unfinished_folds(model, configuration: str, folds: Sequence[str]) -> list[str]:
    """Folds with a checkpoint to resume from but no final one."""
    out = []
    for fold in folds:
        run = Path(model) / configuration / f"fold_{fold}"
        if any(run.glob("checkpoint_*.pt")) and not (run / "checkpoint_final.pt").is_file():
            out.append(fold)
    return out


def resume_steps(settings: TrainSettings) -> list[Step]:
    """``train ... --resume`` for each of the settings' folds that stopped before the end."""
    settings.check()
    model = model_folder(settings.dataset, settings.work)
    folds = unfinished_folds(model, settings.configuration, settings.folds)
    if not folds:
        raise ValueError(f"{model}: no unfinished {settings.configuration} run among folds "
                         f"{', '.join(settings.folds)} to resume")
    work = str(work_folder(settings.dataset, settings.work))
    flags = [f for f in _train_flags(settings) if f != "--overwrite"]
    return [Step(["train", str(settings.dataset), settings.configuration, fold, "-w", work, *flags, "--resume"],
                 f"resume {settings.configuration} fold {fold}") for fold in folds]


def prediction_step(input_folder, output_folder, model, configuration: str | None = None,
                    folds: Sequence[str] | None = None, tta: bool = True, device: str = "auto",
                    uncertainty: bool = True) -> Step:
    """``autoseg predict`` for one input folder."""
    require("predict", "-i", "-o", "-m")
    args = ["predict", "-i", str(input_folder), "-o", str(output_folder), "-m", str(model), "--device", device]
    if configuration:
        args += ["-c", configuration]
    if folds:
        args += ["-f", *folds]
    if not tta:
        args.append("--no-tta")
    if uncertainty:
        args.append("--uncertainty")
    return Step(args, "predict")


def trained_folds(model, configuration: str) -> list[str]:
    """Folds of ``configuration`` in a model folder that finished training."""
    root = Path(model) / configuration
    if not root.is_dir():
        return []
    found = [p.name[len("fold_"):] for p in sorted(root.glob("fold_*")) if (p / "checkpoint_final.pt").is_file()]
    return sorted(found, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


def fine_tune_steps(dataset, configuration: str, work=None, folds: Sequence[str] | None = None,
                    epochs: int = FINE_TUNE_EPOCHS, iterations_per_epoch: int = FINE_TUNE_ITERATIONS,
                    device: str = "auto") -> list[Step]:
    """Preprocess the new cases, then retrain each trained fold from its current weights.

    The current weights are copied to ``WORK/fine_tune/`` first: the run starts over in its
    fold folder (``--overwrite``) and must not delete the file it starts from. The folds of
    existing cases stay as they are (``splits_final.json`` only grows, see :mod:`.folds`).

    Raises:
        EngineFeatureMissing: the engine cannot start training from given weights.
        ValueError: nothing trained to fine-tune, or the dataset has structures the model lacks.
    """
    require("train", "--init-from")
    work = work_folder(dataset, work)
    model = work / MODEL_DIR
    _check_same_labels(Path(dataset), model)
    folds = list(folds or trained_folds(model, configuration))
    if not folds:
        raise ValueError(f"{model}: no trained {configuration} fold to fine-tune; train a model first")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    steps = [Step(["preprocess", str(dataset), "-w", str(work), "-c", configuration], "preprocess new cases")]
    for fold in folds:
        source = model / configuration / f"fold_{fold}" / "checkpoint_final.pt"
        if not source.is_file():
            raise ValueError(f"{source}: fold {fold} has not finished training; it cannot be fine-tuned")
        start = work / FINE_TUNE_DIR / f"{configuration}_fold_{fold}_{stamp}.pt"
        start.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, start)
        steps.append(Step(["train", str(dataset), configuration, fold, "-w", str(work), "--overwrite",
                           "--init-from", str(start), "--epochs", str(epochs),
                           "--iterations-per-epoch", str(iterations_per_epoch), "--device", device],
                          f"fine-tune {configuration} fold {fold}"))
    return steps


def _check_same_labels(dataset: Path, model: Path) -> None:
    path = model / "dataset.json"
    if not path.is_file():
        raise ValueError(f"{model}: not a trained model folder (no dataset.json)")
    trained = read_json(path)["labels"]
    current = load_spec(dataset).labels
    if current != trained:
        new = sorted(set(current) - set(trained))
        raise ValueError(f"the dataset's labels {current} differ from the model's {trained}"
                         + (f" (new: {new})" if new else "") + "; fine-tuning keeps the model's outputs, so "
                         "train a new model instead")
