"""The engine commands behind the module's buttons: Train, Predict, Fine-tune.

Plain argument lists (``autoseg`` flags, see ``autoseg COMMAND --help``), built from settings
and checked against the engine that is actually installed, so a button never starts a command
the engine does not have.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from AutoSegLib.models import choice as modelchoice
from AutoSegLib.dataset import load_spec
from AutoSegLib.fileutil import read_json
from AutoSegLib.names import (ARCHITECTURES, CONFIGURATIONS, CPU_CONFIGURATION, DEFAULT_ARCHITECTURE, DEFAULT_PRESET,
                              DEVICES, GPU_CONFIGURATION, MODEL_DIR, PLANS_FILE, PRESETS, TRAINABLE_CONFIGURATIONS,
                              WORK_SUFFIX, listing)
from AutoSegLib.training.schedule import get_preset, preset_for_device, seconds_per_epoch

from AutoSegLogic.jobs import Step

AUTO = "auto"  # the configuration picker's device-aware choice (see resolve_configuration)
TRAIN_CHOICES = (AUTO, *TRAINABLE_CONFIGURATIONS)
PREDICT_CHOICES = (AUTO, *CONFIGURATIONS)  # auto: the engine's rule (AutoSegLib.models.choice)
FINE_TUNE_DIR = "fine_tune"
# A short schedule for fine-tuning from trained weights (250 iterations, an eighth of the quick
# preset's): the paper's 1000 epochs are far more than corrections need.
FINE_TUNE_EPOCHS, FINE_TUNE_ITERATIONS = 10, 25


class EngineFeatureMissing(RuntimeError):
    """The installed engine lacks a command or flag this action needs."""


def work_folder(dataset, work=None) -> Path:
    """The engine's default: ``<dataset folder name>.autoseg`` beside the dataset (as
    ``AutoSegLib.cli.default_work_dir``, without importing the CLI in the GUI process)."""
    if work:
        return Path(work)
    dataset = Path(dataset).resolve()
    return dataset.parent / f"{dataset.name}{WORK_SUFFIX}"


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
    from AutoSegLib.cli_parser import build_parser

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
    configuration: str = CPU_CONFIGURATION
    folds: list[str] = field(default_factory=lambda: ["0"])
    preset: str = DEFAULT_PRESET
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    time_budget_min: float | None = None
    device: str = "auto"
    overwrite: bool = False
    architecture: str = DEFAULT_ARCHITECTURE  # the "Advanced" section's network design (docs/architectures.md)

    def check(self) -> None:
        for name, value, allowed in [("configuration", self.configuration, TRAINABLE_CONFIGURATIONS),
                                     ("preset", self.preset, PRESETS), ("device", self.device, DEVICES),
                                     ("architecture", self.architecture, ARCHITECTURES)]:
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}"
                                 + (" (resolve 'auto' with resolve_configuration first)" if value == AUTO else ""))


def training_steps(settings: TrainSettings) -> list[Step]:
    """verify -> plan-and-preprocess -> one training run per fold."""
    settings.check()
    dataset, work = str(settings.dataset), str(work_folder(settings.dataset, settings.work))
    # weights: each step's rough share of the chain's time, for one progress bar that never moves back
    # The design is planned into plans.json; the default adds no flag, so older engines run the chain too.
    design = [] if settings.architecture == DEFAULT_ARCHITECTURE else ["--architecture", settings.architecture]
    steps = [Step(["verify", dataset], "check the dataset", weight=0.2),
             Step(["plan-and-preprocess", dataset, "-w", work, "-c", settings.configuration, *design],
                  "plan and preprocess", weight=1.0)]
    for fold in settings.folds:
        steps.append(Step(["train", dataset, settings.configuration, fold, "-w", work, *_train_flags(settings)],
                          f"train {settings.configuration} fold {fold}", weight=20.0))
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
    """Folds of ``configuration`` in a model folder that finished training (the engine's rule)."""
    return [str(f) for f in modelchoice.trained_folds(model, configuration)]


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


# -- choosing a configuration -----------------------------------------------------------------------
def is_gpu(device_type: str | None) -> bool:
    return device_type in ("cuda", "mps")


def resolve_configuration(configuration: str, device_type: str | None) -> str:
    """``auto`` -> the configuration for the device: 3d_fullres on a GPU (the paper's), 3d_cpu on a CPU.

    3d_fullres on a CPU costs 14-25 s per iteration on 2 cores (53.7 s reported on a user's
    CPU); 3d_cpu is the same method sized for a CPU (AutoSegLib/planning/cpu.py), ~0.45 s.
    """
    if configuration != AUTO:
        return configuration
    if device_type is None:
        raise ValueError("the device is not known yet (still checking for a GPU); try again in a moment, or choose "
                         "a configuration and a device")
    return GPU_CONFIGURATION if is_gpu(device_type) else CPU_CONFIGURATION


def describe_auto(device_type: str | None) -> str:
    """What ``auto`` means on this machine, in words for the picker."""
    if device_type is None:
        return "auto: checking for a GPU..."
    configuration = resolve_configuration(AUTO, device_type)
    preset, _ = preset_for_device(AUTO, device_type)
    where = f"the {device_type.upper()} GPU" if is_gpu(device_type) else "the CPU (no GPU found)"
    return f"auto: {configuration} with the {preset} schedule on {where}"


# Seconds per training iteration measured on this project's 2-core CI CPU (benchmarks/bench_training.py,
# AutoSegLib/planning/cpu.py): 3d_cpu of the CT phantoms ~0.45 s (patch 24x48x56, batch 2, 16 base
# features), 3d_fullres ~19.5 s (14-25 s; patch 40x80x96, batch 2, 32 features). Time grows faster than
# the convolutions' arithmetic (memory traffic), so the estimate is a power law through those two points.
# Work counts kernel taps: a 3d_cpu planned in 2D (detailed phantoms: batch 12 of 96x96) is estimated at
# 0.29 s and measured at 0.25 s bare (0.35-0.45 s with loading); priced as 3x3x3 it would have said 1.2 s.
_CPU_REFERENCE_S, _CPU_REFERENCE_WORK, _CPU_EXPONENT = 0.45, 33.0e6, 1.3


def convolution_work(configuration: dict) -> float:
    """Per-sample convolution work of a planned network: sum over stages of voxels x features^2 x the
    kernel's taps relative to 3x3x3 (a 2D or in-plane 3x3 kernel does a third of the work per voxel)."""
    patch = [float(p) for p in configuration["patch_size"]]
    kernels = configuration.get("kernel_sizes") or [[3, 3, 3]] * len(configuration["strides"])
    work, scale = 0.0, [1.0] * len(patch)
    for stride, features, kernel in zip(configuration["strides"], configuration["features_per_stage"], kernels):
        scale = [s * st for s, st in zip(scale, stride)]
        voxels = 1.0
        for p, s in zip(patch, scale):
            voxels *= max(1.0, p / s)
        work += voxels * features * features * math.prod(kernel) / 27.0
    return work


def cpu_seconds_per_iteration(configuration: dict) -> float:
    """Rough CPU time of one training iteration of a planned configuration (2-core reference, +-2x)."""
    work = convolution_work(configuration) * int(configuration.get("batch_size", 2)) / 2
    return _CPU_REFERENCE_S * (work / _CPU_REFERENCE_WORK) ** _CPU_EXPONENT


@dataclass(frozen=True)
class PlanOffer:
    """One trainable configuration of a plan, as the picker shows it."""

    configuration: str
    patch_size: list
    batch_size: int
    cpu_seconds_per_epoch: float  # the quick schedule's epoch on the reference CPU

    def describe(self) -> str:
        patch = " x ".join(str(p) for p in self.patch_size)
        return (f"{self.configuration}: patch {patch}, batch {self.batch_size}, about "
                f"{_duration(self.cpu_seconds_per_epoch)} per quick epoch on a 2-core CPU")


def plan_offers(work) -> list[PlanOffer]:
    """The trainable configurations ``WORK/plans.json`` holds, with an epoch-time estimate each.

    Empty before the dataset has been planned (the first Start training plans it).
    """
    path = Path(work) / PLANS_FILE
    if not path.is_file():
        return []
    planned = read_json(path).get("configurations", {})
    quick = get_preset("quick")
    offers = []
    for name in TRAINABLE_CONFIGURATIONS:
        configuration = planned.get(name)
        if not configuration or "patch_size" not in configuration:
            continue
        per_iteration = cpu_seconds_per_iteration(configuration)
        offers.append(PlanOffer(name, list(configuration["patch_size"]), int(configuration.get("batch_size", 2)),
                                seconds_per_epoch(quick, per_iteration)))
    return offers


def predict_choice(model, configuration: str | None = None, folds=None) -> modelchoice.ModelChoice:
    """What ``autoseg predict`` will use (the engine's rule), known before a process starts.

    Raises:
        ValueError: the model folder cannot predict as asked (no trained fold, several
            configurations without an inference plan, ...), in the engine's words.
    """
    if configuration == AUTO:
        configuration = None
    if configuration and configuration not in CONFIGURATIONS:
        raise ValueError(f"configuration {configuration!r} is not one of {listing(CONFIGURATIONS)}")
    try:
        return modelchoice.choose(model, configuration, folds)
    except modelchoice.ModelFolderError as exc:
        raise ValueError(str(exc)) from None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
