"""``autoseg compare-architectures``: train every design on the same plan, folds and schedule.

Only the network changes between runs. Each design gets a work folder of its own inside the
study folder, holding the dataset's plans with the design's name (``planning/architectures.py``:
Swin-UNETR's patch is also rounded to multiples of 32), the study's ``splits_final.json``
(one copy for all designs) and a link to the dataset's ``preprocessed/`` data (the network is
not part of the preprocessing signature, so every design reads the same arrays)::

    STUDY/splits_<dataset>.json
    STUDY/<dataset>/<architecture>/{plans.json, splits_final.json, preprocessed -> WORK/preprocessed,
                                    model/<configuration>/fold_<k>/{..., validation/, study_run.json}}
    STUDY/report.{md,json,png}

Validation predicts without mirroring (test-time augmentation), for every design alike.
A fold whose ``study_run.json`` exists is finished and reused, so an interrupted study
continues where it stopped; a fold that stopped half-way is trained again from the start.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Sequence

from AutoSegLib.dataset import open_dataset
from AutoSegLib.events import Reporter
from AutoSegLib.fileutil import atomic_path, read_json, write_json
from AutoSegLib.names import (CPU_CONFIGURATION, MODEL_DIR, PLANS_FILE, PREPROCESSED_DIR, SPLITS_FILE, SUMMARY_FILE,
                              VALIDATION_DIR, WORK_SUFFIX, fold_dir_name)

STAGE = "compare-architectures"
RUN_FILE = "study_run.json"
DEFAULT_FOLDS = 3
STUDY_PRESET = "quick"


def compare_architectures(datasets: Sequence[Path], architectures: Sequence[str], study_dir: Path,
                          configuration: str = CPU_CONFIGURATION, folds: Sequence[str] | None = None,
                          num_folds: int = DEFAULT_FOLDS, time_budget_min: float | None = None,
                          baseline: str | None = None, work_dirs: Sequence[Path] | None = None,
                          device: str = "auto", seed: int = 12345, epochs: int | None = None,
                          iterations_per_epoch: int | None = None, reporter: Reporter | None = None) -> dict:
    """Train and validate every (dataset, design, fold) not done yet, then write the report.

    ``time_budget_min`` gives every run the same wall-clock time (cheaper designs then train
    more iterations); ``epochs`` and ``iterations_per_epoch`` fix the schedule instead (the
    same iterations for all). Both may be given, as for ``autoseg train``.

    Returns:
        The report (also in ``study_dir/report.json``, ``report.md``, ``report.png``).
    """
    from AutoSegLib.evaluation.study_report import build_report, plot, to_markdown

    reporter = reporter or Reporter(quiet=True)
    architectures = list(dict.fromkeys(architectures))
    baseline = baseline or architectures[0]
    if baseline not in architectures:
        raise ValueError(f"--baseline {baseline} is not among --architectures ({', '.join(architectures)})")
    folds = [str(f) for f in (folds if folds is not None else range(num_folds))]
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    work_dirs = list(work_dirs) if work_dirs else [default_work(d) for d in datasets]
    jobs = [(Path(d), Path(w), a, f) for d, w in zip(datasets, work_dirs) for a in architectures for f in folds]
    reporter.start(STAGE, of=len(jobs))
    records, started = [], time.monotonic()
    prepared: set[Path] = set()
    for done, (dataset, work, architecture, fold) in enumerate(jobs):
        if dataset not in prepared:
            prepare_dataset(dataset, work, configuration, study_dir, num_folds, reporter)
            prepared.add(dataset)
        run_work = prepare_design(study_dir, dataset, work, architecture)
        schedule = {"time_budget_min": time_budget_min, "epochs": epochs, "iterations_per_epoch": iterations_per_epoch}
        records.append(run_fold(dataset, run_work, architecture, configuration, fold, schedule, device, seed,
                                reporter))
        reporter.emit("progress", STAGE, done=done + 1, of=len(jobs), dataset=dataset.name,
                      architecture=architecture, fold=fold, elapsed_s=round(time.monotonic() - started, 1))
    settings = {"configuration": configuration, "folds": folds, "num_folds": num_folds,
                "time_budget_min": time_budget_min, "epochs": epochs, "iterations_per_epoch": iterations_per_epoch,
                "preset": STUDY_PRESET, "seed": seed,
                "threads": os.environ.get("OMP_NUM_THREADS", "all cores"),
                "datasets": [str(d) for d in datasets]}
    report = build_report(records, architectures, baseline, settings)
    write_json(study_dir / "report.json", report)
    with atomic_path(study_dir / "report.md") as tmp:
        tmp.write_text(to_markdown(report), encoding="utf-8")
    plot(report, study_dir / "report.png")
    reporter.log(STAGE, f"Wrote {study_dir / 'report.md'}, report.json and report.png")
    reporter.done(STAGE, report=str(study_dir / "report.json"), runs=len(records))
    return report


def default_work(dataset: Path) -> Path:
    """``<dataset folder name>.autoseg`` beside the dataset folder (docs/work-folder.md)."""
    dataset = Path(dataset).resolve()
    return dataset.parent / f"{dataset.name}{WORK_SUFFIX}"


def prepare_dataset(dataset: Path, work: Path, configuration: str, study_dir: Path, num_folds: int,
                    reporter: Reporter) -> None:
    """Plan (if not planned) and preprocess the configuration once; make the study's folds once."""
    from AutoSegLib.plan_dataset import plan_dataset
    from AutoSegLib.preprocessing.runner import preprocess_dataset
    from AutoSegLib.training import splits as splitting

    if not (work / PLANS_FILE).is_file():
        plan_dataset(dataset, work, reporter=reporter)
    preprocess_dataset(dataset, work, configurations=[configuration], reporter=reporter)
    spec = open_dataset(dataset)
    (study_dir / dataset.name).mkdir(parents=True, exist_ok=True)
    # The study's own splits (num_folds, default 3) beside its runs; the work folder's are not touched.
    splitting.load_or_create_splits(study_dir / dataset.name, spec.case_ids, n_folds=num_folds,
                                    groups=splitting.groups_from_spec(spec.spec.extra), log=lambda m: reporter.log(STAGE, m))


def prepare_design(study_dir: Path, dataset: Path, work: Path, architecture: str) -> Path:
    """The design's work folder: the dataset's plans for this design, the study's splits, the data."""
    from AutoSegLib.planning.architectures import plans_for_architecture

    run_work = study_dir / dataset.name / architecture
    run_work.mkdir(parents=True, exist_ok=True)
    plans = plans_for_architecture(read_json(work / PLANS_FILE), architecture)
    if not (run_work / PLANS_FILE).is_file() or read_json(run_work / PLANS_FILE) != plans:
        write_json(run_work / PLANS_FILE, plans)
    write_json(run_work / SPLITS_FILE, read_json(study_dir / dataset.name / SPLITS_FILE))
    link = run_work / PREPROCESSED_DIR
    if not link.exists():
        link.symlink_to((work / PREPROCESSED_DIR).resolve(), target_is_directory=True)
    return run_work


def run_fold(dataset: Path, run_work: Path, architecture: str, configuration: str, fold: str, schedule: dict,
             device: str, seed: int, reporter: Reporter) -> dict:
    """Train and validate one fold unless its record exists; returns the record."""
    fold_dir = run_work / MODEL_DIR / configuration / fold_dir_name(fold)
    if (fold_dir / RUN_FILE).is_file():
        reporter.log(STAGE, f"{dataset.name} {architecture} fold {fold}: finished before, reused")
        return read_json(fold_dir / RUN_FILE)
    from AutoSegLib.inference.validation import validate_fold
    from AutoSegLib.network.cost import network_cost
    from AutoSegLib.training.setup import TrainOptions, setup_run
    from AutoSegLib.training.trainer import Trainer

    reporter.log(STAGE, f"{dataset.name} {architecture} fold {fold}: training")
    options = TrainOptions(configuration=configuration, fold=fold, preset=STUDY_PRESET, overwrite=True, device=device,
                           seed=seed, **schedule)
    run = setup_run(dataset, run_work, options)
    with run.lock:
        trainer = Trainer(run, reporter)
        train_started = time.monotonic()
        trainer.fit()
        train_s = time.monotonic() - train_started
        iterations = len(trainer.step_seconds)
        predict_started = time.monotonic()
        # Without mirroring: 8x faster, and the same for every design.
        summary = validate_fold(run_work, dataset, configuration, fold, reporter, device=device, tta=False)
        predict_s = time.monotonic() - predict_started
    n_classes = len(run.spec.labels) - (run.spec.ignore_value is not None)
    cost = network_cost(run.config, run.n_input_channels, n_classes)
    record = {"dataset": dataset.name, "architecture": architecture, "fold": fold,
              "dice": {name: values.get("Dice") for name, values in summary["mean"].items()},
              "parameters": cost["parameters"], "gflop": cost["gflop"], "patch_size": run.config["patch_size"],
              "iterations": iterations, "train_s": round(train_s, 2),
              # median forward-backward-step time (data loading and validation patches apart)
              "seconds_per_iteration": statistics.median(trainer.step_seconds) if trainer.step_seconds else None,
              "seconds_per_case": predict_s / max(1, len(summary.get("metric_per_case", []))),
              "validation_summary": str(fold_dir / VALIDATION_DIR / SUMMARY_FILE)}
    write_json(fold_dir / RUN_FILE, record)
    return record
