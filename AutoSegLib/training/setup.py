"""Everything a training run needs before its first iteration, resolved from files and flags.

Kept apart from the loop so each decision (device, folds, schedule, folders) is a small
function that can be tested without training anything.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from AutoSegLib.dataset import DatasetSpec, open_dataset
from AutoSegLib.fileutil import write_json
from AutoSegLib.locks import LOCK_FILE, FolderLock, lock_folder
from AutoSegLib.models.device import resolve_device
from AutoSegLib.planning import Plans
from AutoSegLib.planning.guidance import guidance_channels, guidance_of
from AutoSegLib.preprocessing import storage
from AutoSegLib.preprocessing.runner import load_plans, preprocessed_folder
from AutoSegLib.training.schedule import PAPER, Schedule, preset_for_device, resolve_schedule
from AutoSegLib.training import splits as splitting

from AutoSegLib.names import (CASCADE_CONFIGURATION, DATASET_FILE, DEFAULT_PRESET, MODEL_DIR, PLANS_FILE,
                              fold_dir_name)


class TrainingSetupError(ValueError):
    """The run cannot start; the message says what is missing and how to get it."""


@dataclass
class TrainOptions:
    """What the user asked for (``autoseg train`` flags)."""

    configuration: str
    fold: str  # "0".."4" or "all"
    preset: str = DEFAULT_PRESET  # "auto": by device (schedule.preset_for_device)
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    time_budget_min: float | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    num_workers: int | None = None
    seed: int = 12345
    checkpoint_every_epochs: int = 5
    checkpoint_every_s: float = 600.0  # at most 10 minutes of work lost to a crash
    init_from: Path | None = None  # start from these network weights (fine-tuning), epoch 0
    optimizer: str | None = None  # None: the preset's
    initial_lr: float | None = None  # None: the preset's (or the optimizer's default)


@dataclass
class RunSetup:
    """Resolved inputs of one fold's training run."""

    options: TrainOptions
    spec: DatasetSpec
    plans: Plans
    config: dict
    data_folder: Path
    run_folder: Path
    model_folder: Path
    train_cases: list[str]
    val_cases: list[str]
    schedule: Schedule
    n_input_channels: int
    n_classes: int
    ignore_label: int | None
    notes: list[str] = field(default_factory=list)
    preset: str = "paper"  # the preset actually used ("auto" resolved)
    preset_reason: str = ""
    device: object = None  # the torch.device the run trains on (models/device.py), resolved once
    lock: FolderLock | None = None  # the fold folder's, held as long as this object (AutoSegLib/locks.py)
    guidance: object = None  # the configuration's GuidanceSpec (planning/guidance.py), None: no click channels
    foreground: list[int] = field(default_factory=list)  # foreground label values, in guidance channel order


def fold_cases(work_dir: Path, case_ids: list[str], fold: str, spec: DatasetSpec,
               log=None) -> tuple[list[str], list[str]]:
    """Training and validation case ids of a fold; fold ``all`` validates on its training cases.

    ``splits_final.json`` is made once and reused, so retraining never reshuffles the folds.
    """
    fold = splitting.parse_fold(fold)
    if fold == splitting.ALL_FOLDS:
        return splitting.fold_cases(None, fold, case_ids)
    splits = splitting.load_or_create_splits(work_dir, case_ids, groups=splitting.groups_from_spec(spec.extra),
                                             log=log)
    return splitting.fold_cases(splits, fold, case_ids)


def check_preprocessed(folder: Path, case_ids: list[str], configuration: str, dataset: Path) -> None:
    missing = [c for c in case_ids if not storage.paths(folder, c)["properties"].is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TrainingSetupError(f"{folder}: {len(missing)} case(s) not preprocessed for {configuration} "
                                 f"({shown}); run `autoseg preprocess {dataset} -c {configuration}` first")


def prepare_model_folder(work_dir: Path, dataset_folder: Path, plans: Plans, spec: DatasetSpec) -> Path:
    """The self-contained model folder: plans.json and dataset.json travel with the weights."""
    model = Path(work_dir) / MODEL_DIR
    model.mkdir(parents=True, exist_ok=True)
    write_json(model / PLANS_FILE, plans.to_dict())
    write_json(model / DATASET_FILE, spec.to_dict())
    return model


def check_run_folder(run_folder: Path, options: TrainOptions) -> None:
    """Never overwrite a trained model by accident, never start fresh when asked to resume."""
    existing = sorted(p.name for p in run_folder.glob("checkpoint_*.pt")) if run_folder.is_dir() else []
    if options.resume and options.init_from is not None:
        raise TrainingSetupError("--resume continues a run from its own checkpoint; --init-from starts a new run "
                                 "from given weights: use one of them")
    if options.init_from is not None and not Path(options.init_from).is_file():
        raise TrainingSetupError(f"--init-from {options.init_from}: no such checkpoint file")
    if options.resume:
        if not existing:
            raise TrainingSetupError(f"{run_folder}: nothing to resume (no checkpoint); run without --resume "
                                     "to start training")
        return
    if existing and not options.overwrite:
        raise TrainingSetupError(f"{run_folder} already holds a training run ({', '.join(existing)}); continue it "
                                 "with --resume, or start over with --overwrite (deletes it)")
    if run_folder.exists():
        remove_run(run_folder)


def setup_run(dataset_folder: str | Path, work_dir: str | Path, options: TrainOptions,
              primary: bool = True) -> RunSetup:
    # Messages of the setup (e.g. "splits created") go to ``RunSetup.notes``, for the caller to log
    # after its first line, which names the schedule.
    """Resolve plans, folds, schedule and folders; nothing is trained or written but the model files.

    The returned run holds its fold folder's lock (``run.lock``, AutoSegLib/locks.py) until
    ``run.lock.release()``, garbage collection or the end of the process.

    ``primary=False``: a data-parallel rank other than 0 (AutoSegLib/training/distributed.py),
    which only reads what rank 0 prepared: no lock, no check or change of the fold folder, no
    model files written.

    Raises:
        FolderBusy: another process trains this fold (nothing was touched).
        TrainingSetupError: the run cannot start as asked.
    """
    dataset_folder, work_dir = Path(dataset_folder), Path(work_dir)
    dataset = open_dataset(dataset_folder)
    plans = load_plans(work_dir)
    # Checked before "is it planned": the phantom plans have no cascade, and the reason matters more.
    if options.configuration == CASCADE_CONFIGURATION:
        raise TrainingSetupError("3d_cascade_fullres training needs the 3d_lowres predictions as input, which "
                                 "arrives with the inference stage; train 3d_fullres or 3d_lowres for now")
    if options.configuration not in plans.configurations:
        raise TrainingSetupError(f"configuration {options.configuration!r} is not in the plans; planned: "
                                 f"{', '.join(plans.configurations)}")
    config = plans.configurations[options.configuration].to_dict()
    fold = splitting.parse_fold(options.fold)
    notes: list[str] = []
    train_cases, val_cases = fold_cases(work_dir, dataset.case_ids, options.fold, dataset.spec, notes.append)
    data_folder = preprocessed_folder(work_dir, options.configuration, plans)
    check_preprocessed(data_folder, sorted(set(train_cases) | set(val_cases)), options.configuration, dataset_folder)
    # The run folder is judged before anything is written: a refused run (a trained fold without
    # --resume/--overwrite) must leave the model folder exactly as it was, plans.json included.
    run_folder = Path(work_dir) / MODEL_DIR / options.configuration / fold_dir_name(fold)
    # Locked first: a second trainer of this fold is refused before it judges, deletes
    # (--overwrite) or resumes anything of the running one's; a dead run's temp files go.
    lock = lock_folder(run_folder, "training this fold", recursive=True) if primary else None
    try:
        if primary:
            check_run_folder(run_folder, options)
            model = prepare_model_folder(work_dir, dataset_folder, plans, dataset.spec)
            run_folder.mkdir(parents=True, exist_ok=True)
        else:
            model = Path(work_dir) / MODEL_DIR
        device = resolve_device(options.device)
        preset, preset_reason = preset_for_device(options.preset, device.type)
        schedule = resolve_schedule(preset, budget_epochs(preset, options), options.iterations_per_epoch,
                                    optimizer=options.optimizer, initial_lr=options.initial_lr)
    except BaseException:
        if lock is not None:
            lock.release(tidy=True)  # a refused run leaves no fold folder it made
        raise
    n_classes = len(dataset.spec.labels) - (dataset.spec.ignore_value is not None)
    foreground = sorted(dataset.spec.foreground_labels.values())
    guidance = guidance_of(config)
    n_input = dataset.spec.num_channels + guidance_channels(config, len(foreground))
    return RunSetup(options, dataset.spec, plans, config, data_folder, run_folder, model, train_cases, val_cases,
                    schedule, n_input, n_classes, dataset.spec.ignore_value,
                    notes=notes, preset=preset, preset_reason=preset_reason, device=device, lock=lock,
                    guidance=guidance, foreground=foreground)


def budget_epochs(preset: str, options: TrainOptions) -> int | None:
    """The epoch count to start from: ``--epochs``, else the preset's - or, for the quick preset
    with ``--time-budget``, as many as the budget holds.

    The quick preset's 2,000 iterations are its length on any machine; a user who gives it ten
    minutes wants ten minutes of training, however many iterations that is. So it starts from
    the paper's epoch count and the trainer fits it to the budget after its first iterations
    (``fit_first_epoch_to_budget``), the poly decay ending at the budget's end. The paper's
    preset is longer than any budget already; ``--epochs`` is always kept as given.
    """
    if options.epochs is not None or options.time_budget_min is None or preset != "quick":
        return options.epochs
    return PAPER.epochs


def configure_cpu_threads() -> int:
    """Use every core for the network on the CPU (data workers sleep while the network runs).

    An explicit ``OMP_NUM_THREADS`` wins: people set it to share a machine (a cluster job, the
    Slicer GUI beside training), and on a loaded machine fewer threads are much faster
    (benchmarks/bench_training.py: OpenMP threads spin waiting for a core another job holds).
    Returns the number of threads the network uses.
    """
    import torch

    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) >= 1:
        torch.set_num_threads(int(explicit))
        return int(explicit)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores))
    return cores


def remove_run(run_folder: Path) -> None:
    """Start a fold over: only ever called for a fresh (not resumed) run.

    The lock file stays: deleting it would let another process lock a new one while this
    run still holds the old.
    """
    if run_folder.exists():
        for entry in run_folder.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    run_folder.mkdir(parents=True, exist_ok=True)
