"""The ``autoseg`` command line: a thin layer over the Python API.

Each sub-command parses its flags, builds a :class:`~AutoSegLib.events.Reporter` and calls
one API function; heavy modules (torch, SimpleITK, scipy) are imported inside the command so
``autoseg --help`` is instant. Exit status: 0 on success, 1 on a reported failure, 2 on a
usage error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from AutoSegLib import __version__
from AutoSegLib.errors import ReportedFailure
from AutoSegLib.events import Reporter
from AutoSegLib.names import (ARCHITECTURES, CONFIGURATIONS, CPU_CONFIGURATION, DATASET_FILE, DEFAULT_ARCHITECTURE,
                              DEFAULT_PRESET, DEVICES, INFERENCE_PLAN_FILE, MODEL_DIR, PHANTOM_ANATOMIES, PRESETS,
                              STUDY_DIR, TRAINABLE_CONFIGURATIONS, WORK_SUFFIX, listing)


class CommandFailed(ReportedFailure):
    """A command ran but its result is a failure (e.g. verification found errors)."""


def default_work_dir(dataset: Path) -> Path:
    """``<dataset folder name>.autoseg`` beside the dataset folder (docs/work-folder.md)."""
    dataset = Path(dataset).resolve()
    return dataset.parent / f"{dataset.name}{WORK_SUFFIX}"


# -- commands ------------------------------------------------------------------------------
def cmd_make_phantoms(args, reporter: Reporter) -> None:
    from AutoSegLib.synthetic import make_phantom_dataset

    out = make_phantom_dataset(args.out, kind=args.kind, cases=args.cases, seed=args.seed,
                               channels=args.channels, test_cases=args.test_cases, size=args.size,
                               reporter=reporter, anatomy=args.anatomy)
    reporter.log("make-phantoms", f"Wrote {args.cases} {args.kind.upper()} phantom case(s) to {out}")
    reporter.done("make-phantoms", dataset=str(out))


def cmd_verify(args, reporter: Reporter) -> None:
    from AutoSegLib.verify import verify_dataset

    report = verify_dataset(args.dataset, num_processes=args.num_processes, reporter=reporter)
    for problem in report.warnings:
        reporter.emit("warning", "verify", message=problem.message, file=_str(problem.file), case=problem.case)
    for problem in report.errors:
        reporter.emit("error", "verify", message=problem.message, file=_str(problem.file), case=problem.case)
    sys.stderr.write(report.format() + "\n")
    if not report.ok:
        raise CommandFailed(f"{args.dataset}: verification found {len(report.errors)} error(s)")
    reporter.done("verify", errors=0, warnings=len(report.warnings))


def gpu_memory_arg(text: str) -> str | float:
    """``--gpu-memory`` as typed: ``auto`` or a positive number of GB (argparse names the flag)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number of GB (e.g. 8 or 24) or auto, not {text!r}") from None
    if not 0 < value < 10_000:
        raise argparse.ArgumentTypeError(f"must be a positive number of GB below 10000, got {text}")
    return value


def gpu_memory_gb(value: str | float, reporter: Reporter) -> float:
    """``--gpu-memory``: a number of GB, or ``auto`` for the local GPU (8 GB reference if none)."""
    if value != "auto":
        return float(value)
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 1024**3
        reporter.log("plan", f"Planning for {torch.cuda.get_device_name(0)} with {total:.1f} GB")
        return round(total, 1)
    reporter.warning("plan", "--gpu-memory auto: no CUDA GPU found; planning for the 8 GB reference budget")
    return 8.0


def _labels_for(num_labels: int) -> dict[str, int]:
    return {"background": 0, **{f"label_{i}": i for i in range(1, num_labels + 1)}}


def cmd_plan(args, reporter: Reporter, finish: bool = True) -> None:
    from AutoSegLib.fileutil import write_json

    budget = gpu_memory_gb(args.gpu_memory, reporter)
    if args.fingerprint is not None:
        plans = _plan_from_fingerprint(args, budget)
        out = args.output
        write_json(out, plans.to_dict())
    else:
        from AutoSegLib.plan_dataset import PLANS_FILE, plan_dataset

        if args.dataset is None:
            raise ValueError("give a DATASET folder, or --fingerprint FP.json to plan without images")
        work = args.work or default_work_dir(args.dataset)
        plans = plan_dataset(args.dataset, work, gpu_memory_gb=budget, num_processes=args.num_processes,
                             reporter=reporter, force_fingerprint=args.refresh_fingerprint,
                             architecture=args.architecture, guidance=args.guidance)
        out = Path(work) / PLANS_FILE
    text = plans.explain() if args.explain else plans.summary()
    if args.explain:
        from AutoSegLib.network.cost import describe_costs

        text += "\n\n" + describe_costs(plans.to_dict())
    (sys.stderr if args.events else sys.stdout).write(text + "\n")
    if finish:
        reporter.done("plan", plans=str(out), configurations=list(plans.to_dict()["configurations"]))


def _plan_from_fingerprint(args, budget: float):
    from AutoSegLib.dataset import DatasetSpec
    from AutoSegLib.fileutil import read_json
    from AutoSegLib.fingerprint import load_fingerprint
    from AutoSegLib.planning import plan

    if args.output is None:
        raise ValueError("--fingerprint needs -o/--output for the plans file")
    fingerprint = load_fingerprint(args.fingerprint)
    if args.dataset_json is not None:
        spec = DatasetSpec.from_dict(read_json(args.dataset_json), source=str(args.dataset_json))
        channels, labels = spec.channel_names, spec.labels
    elif args.channels and args.num_labels:
        channels = dict(enumerate(c.strip() for c in args.channels.split(",")))
        labels = _labels_for(args.num_labels)
    else:
        raise ValueError("--fingerprint needs the channels and labels: --channels CT[,T2...] --num-labels K, "
                         "or --dataset-json PATH/dataset.json")
    n_intensity = len(fingerprint["foreground_intensity_properties_per_channel"])
    if n_intensity != len(channels):
        raise ValueError(f"{args.fingerprint}: fingerprint has intensity statistics for {n_intensity} channel(s) "
                         f"but {len(channels)} channel name(s) were given ({', '.join(channels.values())})")
    from AutoSegLib.plan_dataset import apply_guidance

    return apply_guidance(plan(fingerprint, channels, labels, gpu_memory_gb=budget,
                               dataset_name=Path(args.fingerprint).stem, architecture=args.architecture), args.guidance)


def cmd_preprocess(args, reporter: Reporter) -> None:
    from AutoSegLib.preprocessing.runner import preprocess_dataset

    work = args.work or default_work_dir(args.dataset)
    summary = preprocess_dataset(args.dataset, work, configurations=args.configurations,
                                 num_processes=args.num_processes, reporter=reporter, strict=args.strict,
                                 available_memory=_available_memory_override())
    for name, counts in summary.items():
        if "shared_with" in counts:
            reporter.log("preprocess", f"{name}: uses the {counts['shared_with']} data")
        else:
            reporter.log("preprocess", f"{name}: {counts['processed']} case(s) preprocessed, "
                                       f"{counts['skipped']} already current -> {counts['folder']}")
    reporter.done("preprocess", configurations=summary)


def cmd_plan_and_preprocess(args, reporter: Reporter) -> None:
    args.fingerprint = None
    args.explain = getattr(args, "explain", False)
    cmd_plan(args, reporter, finish=False)
    cmd_preprocess(args, reporter)


def cmd_train(args, reporter: Reporter) -> None:
    from AutoSegLib.training import launch

    folds = launch.parse_folds(args.fold)
    if len(folds) > 1:  # several folds: child processes over --devices (docs/scaling.md)
        if args.gpus is not None or args.nproc is not None:
            raise launch.LaunchError("--gpus/--nproc train one fold with several ranks; to train several folds "
                                     "side by side give --devices (e.g. --devices 0,1)")
        slots = launch.parse_devices(args.devices) if args.devices else [launch.Slot(args.device)]
        if any(slot.visible is not None for slot in slots):
            import torch

            launch.check_gpus(slots, torch.cuda.device_count())
        statuses = launch.run_folds(args.argv, args.fold, folds, slots, reporter)
        reporter.done("train", folds=statuses)
        return
    if args.devices:
        raise launch.LaunchError(f"--devices places several folds; fold {args.fold} is one (give a list such as "
                                 "0-4, or --gpus/--nproc for one fold on several devices)")
    if args.gpus is not None or args.nproc is not None:  # this command again, as a torchrun group
        import torch

        nproc, device = launch.requested_ranks(args.gpus, args.nproc, args.device, torch.cuda.device_count())
        launch.launch_group(args.argv, nproc, device, reporter)
        return  # rank 0 of the group reported the result
    train_fold(args, reporter)


def train_fold(args, reporter: Reporter) -> None:
    """One fold in this process, or as one rank of a torchrun group (torchrun's environment)."""
    from contextlib import nullcontext

    from AutoSegLib.training.distributed import rank_env, split_description, start_rank_run
    from AutoSegLib.training.setup import TrainOptions, setup_run
    from AutoSegLib.training.trainer import Trainer

    work = args.work or default_work_dir(args.dataset)
    options = TrainOptions(configuration=args.configuration, fold=args.fold, preset=args.preset, epochs=args.epochs,
                           iterations_per_epoch=args.iterations_per_epoch, time_budget_min=args.time_budget,
                           resume=args.resume, overwrite=args.overwrite, device=args.device,
                           num_workers=args.num_workers, seed=args.seed,
                           checkpoint_every_epochs=args.checkpoint_every_epochs, init_from=args.init_from,
                           optimizer=args.optimizer, initial_lr=args.lr)
    env, group = rank_env(os.environ), None
    if env is not None and env.world_size > 1:
        run, group = start_rank_run(args.dataset, work, options, env)
    else:
        run = setup_run(args.dataset, work, options)
    reporter.log("train", f"Training {args.configuration} fold {args.fold} with the {run.preset} schedule "
                          f"[{run.preset_reason}]: {len(run.train_cases)} training, {len(run.val_cases)} validation "
                          f"case(s); {_length_text(run)}, {run.schedule.optimizer} -> {run.run_folder}")
    if group is not None:
        reporter.log("train", f"Data-parallel: {group.world_size} ranks ({run.device.type}, "
                              f"{'NCCL' if run.device.type == 'cuda' else 'gloo'}), pids "
                              f"{', '.join(map(str, group.pids))}; "
                              f"{split_description(run.config['batch_size'], group.world_size)}")
    for note in run.notes:
        reporter.log("train", note)
    # The fold folder's lock (rank 0's in a group), held through validation and given back even
    # in-process (Python API).
    try:
        with run.lock or nullcontext():
            result = Trainer(run, reporter, group).fit()
            if group is not None and not group.primary:
                return  # rank 0 validates and reports
            if args.validate:
                result = _validate_trained(args, work, reporter, result)
    finally:
        if group is not None:
            group.close()
    reporter.done("train", **result)


def _validate_trained(args, work, reporter: Reporter, result: dict) -> dict:
    """The fold's held-out cases through the real predictor, scored in their original geometry:
    the numbers find-best compares (pseudo-Dice only samples patches)."""
    from AutoSegLib.inference.validation import validate_fold

    summary = validate_fold(work, args.dataset, args.configuration, args.fold, reporter, device=args.device)
    warn_never_predicted(summary, reporter, "train")
    dice = (summary.get("foreground_mean") or {}).get("Dice")
    result["validation_dice"] = dice
    report_classes(summary, reporter, result)
    if dice is not None:
        reporter.log("train", f"validation (whole cases, original geometry): mean foreground Dice {dice:.3f}")
    return result


def cmd_predict(args, reporter: Reporter) -> None:
    from AutoSegLib.inference import predict_files
    from AutoSegLib.training.setup import configure_cpu_threads

    if args.device in ("auto", "cpu"):
        configure_cpu_threads()  # honours OMP_NUM_THREADS; only this process's torch is affected
    folds = _fold_list(args.folds)
    num_parts, part_id = _prediction_part(args)
    _use_the_ranks_gpu(args.device)
    tta, tta_axes, step = prediction_speed(args)
    result = predict_files(args.input, args.output, args.model, configuration=args.configuration, folds=folds,
                           checkpoint=args.checkpoint, device=args.device, tta=tta, tta_axes=tta_axes, step=step,
                           save_probabilities=args.save_probabilities, uncertainty=args.uncertainty,
                           reporter=reporter, strict=args.strict, available_memory=_available_memory_override(),
                           num_parts=num_parts, part_id=part_id, skip_existing=args.continue_,
                           pipelined=not args.no_pipeline)
    reporter.done("predict", **result)


def cmd_engine(args, reporter: Reporter) -> None:
    from AutoSegLib.inference.engine_server import serve
    from AutoSegLib.training.setup import configure_cpu_threads

    if args.device in ("auto", "cpu"):
        configure_cpu_threads()
    status = serve(args.model, args.configuration, _fold_list(args.folds), device=args.device, tta=args.tta,
                   checkpoint=args.checkpoint)
    if status:
        raise SystemExit(status)


def _use_the_ranks_gpu(device: str) -> None:
    """Under torchrun, each rank of a node predicts on its own GPU (LOCAL_RANK), not all on GPU 0."""
    from AutoSegLib.training.distributed import rank_env

    env = rank_env(os.environ)
    if env is None or env.world_size == 1 or device not in ("auto", "cuda"):
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())


def _prediction_part(args) -> tuple[int, int]:
    """``(num_parts, part_id)``: from --num-parts/--part-id, else torchrun's ranks, else (1, 0)."""
    from AutoSegLib.training.distributed import rank_env

    env = rank_env(os.environ)
    if args.num_parts is None:
        if args.part_id is not None:
            raise ValueError("--part-id needs --num-parts K")
        return (env.world_size, env.rank) if env is not None else (1, 0)
    if env is not None and env.world_size > 1:
        raise ValueError(f"--num-parts with torchrun: the {env.world_size} ranks already split the cases; give "
                         "one or the other")
    if args.part_id is None:
        raise ValueError(f"--num-parts {args.num_parts} needs --part-id (0 to {args.num_parts - 1})")
    if not 0 <= args.part_id < args.num_parts:
        raise ValueError(f"--part-id {args.part_id} is out of range for --num-parts {args.num_parts} "
                         f"(0 to {args.num_parts - 1})")
    return args.num_parts, args.part_id


def _evaluation_labels(args, reporter: Reporter) -> dict[str, int]:
    """--labels (a dataset.json or a {name: value} object), else GT_DIR/../dataset.json, else the
    values found in the reference files."""
    from AutoSegLib.fileutil import read_json

    path = args.labels
    beside = Path(args.gt_dir).parent / DATASET_FILE
    if path is None and beside.is_file():
        path = beside
        reporter.log("evaluate", f"Labels from {path}")
    if path is None:
        from AutoSegLib.evaluation.folders import labels_in_references

        labels = labels_in_references(args.gt_dir)
        reporter.log("evaluate", f"No --labels and no dataset.json beside {args.gt_dir}: scoring every value "
                                 f"found in the references: {labels}")
        return labels
    data = read_json(path)
    labels = data.get("labels", data) if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not all(type(v) is int for v in labels.values()):
        raise ValueError(f"{path}: expected a dataset.json with integer 'labels', or an object "
                         '{"label name": value, ...}')
    return labels


def _length_text(run) -> str:
    length = f"{run.schedule.epochs} epochs x {run.schedule.iterations_per_epoch} iterations"
    budget = run.options.time_budget_min
    return length if budget is None else f"up to {length}, fitted to the time budget of {budget:g} min"


def report_classes(summary: dict, reporter: Reporter, result: dict) -> None:
    """Validation Dice per class, lowest first, in the log and the done event; a warning names the weak ones."""
    from AutoSegLib.evaluation.summary import class_ranking, ranking_text, weak_classes_warning

    ranking = class_ranking(summary)
    result["validation_dice_per_class"] = dict(ranking)
    if ranking:
        reporter.log("train", f"validation Dice per class, lowest first: {ranking_text(ranking)}")
    message = weak_classes_warning(summary)
    if message:
        reporter.warning("train", message)


def warn_never_predicted(summary: dict, reporter: Reporter, stage: str) -> None:
    """A warning (and ``warning`` event, which the Slicer module shows) per class never predicted."""
    from AutoSegLib.evaluation.summary import never_predicted_warnings

    for message in never_predicted_warnings(summary):
        reporter.warning(stage, message)


def cmd_evaluate(args, reporter: Reporter) -> None:
    from AutoSegLib.evaluation import evaluate_folders
    from AutoSegLib.evaluation.summary import format_table

    labels = _evaluation_labels(args, reporter)
    output = args.output or Path(args.pred_dir) / "summary.json"
    summary = evaluate_folders(args.pred_dir, args.gt_dir, labels, output=output, num_processes=args.num_processes,
                               reporter=reporter, tolerance_mm=args.nsd_tolerance)
    (sys.stderr if args.events else sys.stdout).write(format_table(summary) + "\n")
    warn_never_predicted(summary, reporter, "evaluate")
    reporter.log("evaluate", f"Wrote {output}")
    reporter.done("evaluate", summary=str(output), cases=len(summary["metric_per_case"]),
                  foreground_mean=summary["foreground_mean"])


def cmd_find_best(args, reporter: Reporter) -> None:
    from AutoSegLib.evaluation.selection import PLAN_FILE, find_best, format_candidates
    work = args.work or default_work_dir(args.dataset)
    plan = find_best(work, args.dataset, reporter=reporter, num_processes=args.num_processes)
    (sys.stderr if args.events else sys.stdout).write(format_candidates(plan) + "\n")
    path = Path(work) / MODEL_DIR / PLAN_FILE
    reporter.log("find-best", f"Wrote {path}")
    reporter.done("find-best", inference_plan=str(path), configurations=plan["configurations"],
                  postprocessing=plan["postprocessing"])


def cmd_compare_architectures(args, reporter: Reporter) -> None:
    from AutoSegLib.architecture_study import compare_architectures

    datasets = [Path(d) for d in args.datasets]
    if args.work is not None and len(datasets) > 1:
        raise ValueError("-w/--work names one dataset's work folder; with several datasets use their defaults")
    work_dirs = [args.work] if args.work is not None else None
    study = args.output or (args.work or default_work_dir(datasets[0])) / STUDY_DIR
    compare_architectures(datasets, args.architectures, study, configuration=args.configuration,
                          folds=_fold_list(args.folds), num_folds=args.num_folds, time_budget_min=args.time_budget,
                          baseline=args.baseline, work_dirs=work_dirs, device=args.device, seed=args.seed,
                          epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch, reporter=reporter)


def cmd_demo(args, reporter: Reporter) -> None:
    from AutoSegLib.demo import run_demo

    run_demo(args.work, reporter=reporter, cases=args.cases, seed=args.seed)


def cmd_export_model(args, reporter: Reporter) -> None:
    from AutoSegLib.sharing.exporter import export_model

    folds = _fold_list(args.folds)
    result = export_model(args.model_dir, args.output, configurations=args.configurations, folds=folds,
                          notes=args.notes, reporter=reporter)
    reporter.done("export-model", **result)


def cmd_import_model(args, reporter: Reporter) -> None:
    from AutoSegLib.sharing.importer import import_model

    reporter.done("import-model", **import_model(args.archive, args.output, reporter=reporter))


def _fold_list(values: list[str] | None) -> list[str] | None:
    """``-f 0 1`` or ``-f 0,1`` -> ``["0", "1"]``; None when not given."""
    return None if values is None else [f.strip() for f in ",".join(values).split(",") if f.strip()]


def _str(path) -> str | None:
    return None if path is None else str(path)


# -- parser --------------------------------------------------------------------------------
STRICT_HELP = ("refuse to start when the memory or disk estimate (printed first) does not fit; default: warn. "
               "AUTOSEG_AVAILABLE_MEMORY_MB replaces the measured available memory")


# Speed options of predict. The figures: benchmarks/inference_options.py (BENCHMARKS.md, "Faster CPU
# inference"): the demo's 3d_cpu phantom model, 15 held-out CT phantoms, one CPU thread.
FAST_STEP, FAST_TTA_AXES = 0.75, (1, 2)
NO_TTA_HELP = ("no mirroring test-time augmentation: 8x fewer network passes in 3D; measured 3.4x faster on the "
               "demo's phantoms, held-out Dice per class -0.010 to +0.026, mean +0.001 (2026-12-03)")
TTA_AXES_HELP = ("mirror only along these image axes at test time (0 = slices, 1 = rows, 2 = columns of the input "
                 "as numpy orders it); each axis doubles the network's work. 1 2 (4 mirrors instead of 8): measured "
                 "2.1x faster on the demo's phantoms, held-out Dice per class -0.005 to +0.001, mean -0.001 "
                 "(2026-12-03)")
STEP_HELP = ("window step as a fraction of the patch (default 0.5). 0.75: 2.9x fewer windows on a 512x512x300 CT; "
             "measured 2.3x faster on phantoms twice the demo's size, foreground Dice -0.001 (per class -0.045 to "
             "+0.064: a model outside its training scale) (2026-12-03)")
FAST_HELP = (f"faster on a CPU, slightly less accurate: --step {FAST_STEP} and --tta-axes "
             f"{' '.join(map(str, FAST_TTA_AXES))} unless given (or --no-tta). 5.9x fewer network passes on a "
             "512x512x300 CT; measured 5.5x faster on phantoms twice the demo's size (mean Dice -0.003, per class "
             "-0.031 to +0.041) and 2.1x on the demo's own (one window each; mean Dice -0.001) (2026-12-03, "
             "BENCHMARKS.md)")


def prediction_speed(args) -> tuple[bool, tuple[int, ...] | None, float]:
    """``(tta, tta_axes, step)`` from --no-tta, --tta-axes, --step and --fast (which fills in what
    the others leave unset)."""
    if args.no_tta and args.tta_axes:
        raise ValueError("--no-tta and --tta-axes contradict each other; give one")
    tta_axes = tuple(args.tta_axes) if args.tta_axes else None
    step = args.step
    if args.fast:
        step = FAST_STEP if step is None else step
        if tta_axes is None and not args.no_tta:
            tta_axes = FAST_TTA_AXES
    return not args.no_tta, tta_axes, 0.5 if step is None else step


def _available_memory_override() -> int | None:
    from AutoSegLib.resources import available_memory_override

    return available_memory_override()  # the environment is read here, at the command line only


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", action="store_true",
                   help="print progress as JSON lines on stdout (for the Slicer module and scripts)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoseg",
        description="AutoSeg: self-configuring medical image segmentation (the nnU-Net method).",
    )
    parser.add_argument("--version", action="version", version=f"autoseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("make-phantoms", help="generate a synthetic CT or MR dataset (nnU-Net v2 layout)")
    p.add_argument("out", type=Path, help="output dataset folder (must not exist or be empty)")
    p.add_argument("--kind", choices=["ct", "mr"], default="ct")
    p.add_argument("--cases", type=_positive_int, default=20, help="training cases (default 20)")
    p.add_argument("--test-cases", type=int, default=0, help="extra cases in imagesTs/labelsTs (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=_positive_int, default=None, help="MR channels (default 1; CT has 1)")
    p.add_argument("--size", type=float, default=1.0,
                   help="patient scale, > 0 and <= 4 (default 1): the same patients SIZE times larger, scanned at "
                        "the same spacing with a field of view grown to match, so images have about SIZE times the "
                        "voxels along each axis; organs and labels are unchanged")
    p.add_argument("--anatomy", choices=PHANTOM_ANATOMIES, default="basic",
                   help="basic: 5 labels (liver, spleen, kidneys, aorta, liver lesions); detailed: 31 labels of the same "
                        "patients, with thin vessels (1-3 voxels), lymph nodes, adrenals, spine parts, and ribs, wall, "
                        "kidneys and muscles by side (default basic)")
    _add_common(p)
    p.set_defaults(func=cmd_make_phantoms, stage="make-phantoms")

    p = sub.add_parser("verify", help="check a dataset folder and report every problem at once")
    p.add_argument("dataset", type=Path)
    p.add_argument("-np", "--num-processes", type=_positive_int, default=2)
    _add_common(p)
    p.set_defaults(func=cmd_verify, stage="verify")

    p = sub.add_parser("plan", help="fingerprint a dataset and plan its pipeline by the method's rules",
                       description="Extract the dataset fingerprint (reused when the dataset is unchanged) and "
                                   "write plans.json to the work folder. With --fingerprint, plan from a "
                                   "fingerprint file alone (ours or nnU-Net v2's), without images.")
    p.add_argument("dataset", type=Path, nargs="?", help="dataset folder (nnU-Net v2 raw layout)")
    p.add_argument("-w", "--work", type=Path, default=None, help="work folder (default: <dataset>.autoseg beside it)")
    p.add_argument("--explain", action="store_true", help="explain every planning decision in plain language")
    p.add_argument("--gpu-memory", default=8.0, type=gpu_memory_arg, metavar="GB|auto",
                   help="GPU memory to plan for (default 8, the method's reference; 'auto' = local GPU)")
    p.add_argument("--architecture", default=DEFAULT_ARCHITECTURE, choices=ARCHITECTURES,
                   help=f"network variant: {listing(ARCHITECTURES)} (default: {DEFAULT_ARCHITECTURE}, the plain "
                        "U-Net of the blueprint)")
    p.add_argument("-np", "--num-processes", type=_positive_int, default=2)
    p.add_argument("--guidance", choices=("auto", "on", "off"), default="auto",
                   help="3D networks that also learn to take correction clicks (docs/clicks.md): auto (default) = on "
                        "when this machine has a GPU, off on a CPU, where guided training takes about 1.3x the "
                        "minutes of plain training (measured 2026-12-03)")
    p.add_argument("--refresh-fingerprint", action="store_true", help="re-extract even if the dataset is unchanged")
    p.add_argument("--fingerprint", type=Path, default=None, help="plan from this fingerprint file, no images")
    p.add_argument("--channels", default=None, help="with --fingerprint: channel names in order, e.g. CT or T1,T2")
    p.add_argument("--num-labels", type=_positive_int, default=None,
                   help="with --fingerprint: number of foreground labels (background not counted)")
    p.add_argument("--dataset-json", type=Path, default=None,
                   help="with --fingerprint: take channels and labels from this dataset.json instead")
    p.add_argument("-o", "--output", type=Path, default=None, help="with --fingerprint: plans file to write")
    _add_common(p)
    p.set_defaults(func=cmd_plan, stage="plan")

    def add_preprocess_flags(p):
        p.add_argument("-c", "--configurations", nargs="+", default=None, metavar="CONFIG",
                       help=f"configurations to preprocess, of {listing(CONFIGURATIONS)} as planned "
                            "(default: every planned one)")
        p.add_argument("--strict", action="store_true", help=STRICT_HELP)

    p = sub.add_parser("preprocess", help="crop, normalize and resample every case for the planned configurations")
    p.add_argument("dataset", type=Path)
    p.add_argument("-w", "--work", type=Path, default=None, help="work folder (default: <dataset>.autoseg beside it)")
    add_preprocess_flags(p)
    p.add_argument("-np", "--num-processes", type=_positive_int, default=2,
                   help="worker processes (default 2; 1 runs in this process, for debugging)")
    _add_common(p)
    p.set_defaults(func=cmd_preprocess, stage="preprocess")

    p = sub.add_parser("plan-and-preprocess", help="plan, then preprocess (same flags as both)")
    p.add_argument("dataset", type=Path)
    p.add_argument("-w", "--work", type=Path, default=None)
    p.add_argument("--explain", action="store_true")
    p.add_argument("--gpu-memory", default=8.0, type=gpu_memory_arg, metavar="GB|auto")
    p.add_argument("--architecture", default=DEFAULT_ARCHITECTURE, choices=ARCHITECTURES)
    p.add_argument("--guidance", choices=("auto", "on", "off"), default="auto",
                   help="click-guidance channels: auto (on with a GPU), on, off")
    p.add_argument("--refresh-fingerprint", action="store_true")
    add_preprocess_flags(p)
    p.add_argument("-np", "--num-processes", type=_positive_int, default=2)
    _add_common(p)
    p.set_defaults(func=cmd_plan_and_preprocess, stage="plan-and-preprocess")

    p = sub.add_parser("train", help="train one fold of one configuration (resumable, observable)")
    p.add_argument("dataset", type=Path)
    p.add_argument("configuration", help=f"{listing(TRAINABLE_CONFIGURATIONS)} (as planned); on a CPU train "
                                         f"{CPU_CONFIGURATION}, sized for it")
    p.add_argument("fold", help="0-4, or 'all' to train on every case; a list (0,1,2 or 0-4) trains those folds "
                                "in child processes, one per --devices entry at a time")
    p.add_argument("-w", "--work", type=Path, default=None, help="work folder (default: <dataset>.autoseg beside it)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESETS,
                   help=f"schedule: auto (default) = paper on a GPU, quick on a CPU; paper = 1000 epochs x 250 "
                        f"iterations with SGD; quick = 2,000 iterations with AdamW, minutes on a CPU with the "
                        f"{CPU_CONFIGURATION} configuration. The first log line says which ran")
    p.add_argument("--epochs", type=_positive_int, default=None)
    p.add_argument("--iterations-per-epoch", type=_positive_int, default=None)
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="end training cleanly within this many minutes: fewer epochs, or shorter ones when "
                        "fewer than 10 would fit (checked after 3 iterations); same decay to ~0. AdamW at its default "
                        "rate starts up to 3x higher when the budget holds fewer than the quick preset's 2,000 "
                        "iterations")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run of this fold and start over")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--num-workers", type=int, default=None, help="data-augmentation processes (default: by machine)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--optimizer", default=None, choices=["sgd", "adamw"],
                   help="override the preset's optimizer (paper: SGD; quick: AdamW, see docs/decisions.md)")
    p.add_argument("--lr", type=float, default=None, help="override the initial learning rate (poly decay follows)")
    p.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="start from these network weights (fine-tuning a trained model on a grown dataset); "
                        "the run itself starts at epoch 0")
    p.add_argument("--no-validation", dest="validate", action="store_false",
                   help="skip predicting and scoring the fold's validation cases after training")
    p.add_argument("--checkpoint-every-epochs", type=_positive_int, default=5,
                   help="save checkpoint_latest every N epochs (default 5; also at least every 10 minutes)")
    scale = p.add_argument_group("several devices (docs/scaling.md)")
    scale.add_argument("--gpus", type=_positive_int, default=None, metavar="N",
                       help="train this fold data-parallel on N GPUs of this machine (starts torchrun, NCCL)")
    scale.add_argument("--nproc", type=_positive_int, default=None, metavar="N",
                       help="train this fold data-parallel with N processes on --device (starts torchrun; gloo "
                            "on the CPU)")
    scale.add_argument("--devices", default=None, metavar="LIST",
                       help="with a fold list: where the folds train, one at a time per entry: GPU indices "
                            "(0,1,2,3) or cpu entries (cpu,cpu)")
    _add_common(p)
    p.set_defaults(func=cmd_train, stage="train", ranked=True)

    p = sub.add_parser("predict", help="segment images with a trained model folder",
                       description="Predict label maps in the input's own grid, geometry and file format. "
                                   f"Without -c: the model's {INFERENCE_PLAN_FILE} (from find-best) if present, else "
                                   "the one configuration with finished folds (with every finished fold); with "
                                   "several and no inference plan, it says which -c to add.")
    p.add_argument("-i", "--input", type=Path, required=True,
                   help="folder of {case}_{XXXX}{ending} images (XXXX = channel), or one image file")
    # Kept a string: a trailing "/" (a folder, even if named like a file) would be lost in a Path.
    p.add_argument("-o", "--output", required=True,
                   help="output folder (for one input file, also a file name such as out/case.nii.gz; "
                        "a name ending in / is always a folder)")
    p.add_argument("-m", "--model", type=Path, required=True, help=f"model folder (WORK/{MODEL_DIR})")
    p.add_argument("-c", "--configuration", default=None, choices=CONFIGURATIONS, metavar="CONFIG",
                   help=f"{listing(CONFIGURATIONS)} (default: the inference plan's, else the one trained)")
    p.add_argument("-f", "--folds", nargs="+", default=None, metavar="FOLD",
                   help="folds to ensemble, e.g. 0 1 2 or all (default: the inference plan's, else every "
                        "trained fold)")
    p.add_argument("--checkpoint", default=None, choices=["final", "best", "latest"],
                   help="checkpoint of each fold (default final, or the inference plan's)")
    p.add_argument("--no-tta", action="store_true", help=NO_TTA_HELP)
    p.add_argument("--tta-axes", type=int, nargs="+", choices=[0, 1, 2], default=None, metavar="AXIS",
                   help=TTA_AXES_HELP)
    p.add_argument("--step", type=float, default=None, help=STEP_HELP)
    p.add_argument("--fast", action="store_true", help=FAST_HELP)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write {case}.npz with the class probabilities (float16)")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write {case}_uncertainty{ending}: normalized entropy, 0 = certain, 1 = uniform")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.add_argument("--num-parts", type=_positive_int, default=None, metavar="K",
                   help="split the cases (sorted by name) into K parts and predict one, for job arrays; under "
                        "torchrun the ranks are the parts")
    p.add_argument("--part-id", type=int, default=None, metavar="I", help="with --num-parts: the part, 0 to K-1")
    p.add_argument("--continue", dest="continue_", action="store_true",
                   help="skip cases whose outputs a finished earlier run wrote (partial outputs never count)")
    p.add_argument("--no-pipeline", action="store_true",
                   help="one case at a time; by default the next case is read and the previous one written while "
                        "the network runs (at most 3 cases in memory; on a CPU the network then leaves one core "
                        "to them)")
    _add_common(p)
    p.set_defaults(func=cmd_predict, stage="predict", ranked=True)

    p = sub.add_parser("engine", help="keep a model loaded and answer click refinements over stdin/stdout",
                       description="A persistent process for interactive correction (docs/clicks.md): JSON lines "
                                   "in on stdin, one JSON line out per request on stdout; arrays as .npy files. "
                                   "Python clients use AutoSegLib.inference.engine_process.EngineProcess.")
    p.add_argument("model", type=Path, help=f"model folder (WORK/{MODEL_DIR})")
    p.add_argument("-c", "--configuration", default=None, choices=CONFIGURATIONS, metavar="CONFIG",
                   help="the configuration to refine with (default: the model's choice; refining runs one)")
    p.add_argument("-f", "--folds", nargs="+", default=None, metavar="FOLD")
    p.add_argument("--checkpoint", default=None, choices=["final", "best", "latest"])
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--tta", action="store_true", help="mirror each window (8x the work per click in 3D)")
    p.set_defaults(func=cmd_engine, stage="engine", events=False)

    p = sub.add_parser("evaluate", help="score predicted label files against reference label files",
                       description="Dice, IoU, FP/FN voxels, HD95 and normalized surface Dice per case and class "
                                   "(conventions: docs/evaluation.md). Prints the per-class means.")
    p.add_argument("pred_dir", type=Path, help="folder of predictions {case}{ending}")
    p.add_argument("gt_dir", type=Path, help="folder of references {case}{ending}, e.g. DATASET/labelsTr")
    p.add_argument("-o", "--output", type=Path, default=None, help="summary JSON (default PRED_DIR/summary.json)")
    p.add_argument("--labels", type=Path, default=None,
                   help="dataset.json (or a {name: value} JSON) naming the labels (default: GT_DIR/../dataset.json, "
                        "else every value in the references)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                   help="normalized surface Dice tolerance in mm (default 1)")
    p.add_argument("-np", "--num-processes", type=_positive_int, default=2)
    _add_common(p)
    p.set_defaults(func=cmd_evaluate, stage="evaluate")

    p = sub.add_parser("find-best", help="choose configuration(s) and postprocessing from cross-validation",
                       description="Score every trained configuration and every ensemble of two on the pooled "
                                   "cross-validation predictions, decide the largest-component postprocessing, "
                                   "and write WORK/model/inference_plan.json for `autoseg predict`.")
    p.add_argument("dataset", type=Path)
    p.add_argument("-w", "--work", type=Path, default=None, help="work folder (default: <dataset>.autoseg beside it)")
    p.add_argument("-np", "--num-processes", type=_positive_int, default=2)
    _add_common(p)
    p.set_defaults(func=cmd_find_best, stage="find-best")

    p = sub.add_parser("compare-architectures", help="train several network designs on the same plan and folds, "
                                                     "and report their cross-validation Dice, cost and speed",
                       description="Every design trains on the same plan, splits, schedule and augmentation (only the "
                                   "network changes), is validated on whole cases, and is compared with the baseline: "
                                   "Dice per class (mean and std over folds), fold-wise differences with bootstrap "
                                   "p-values, average rank, parameters, GFLOP, seconds per iteration and per case. "
                                   "Writes report.md, report.json and report.png; finished runs are reused "
                                   "(docs/architectures.md).")
    p.add_argument("datasets", type=Path, nargs="+", metavar="DATASET",
                   help="dataset folder(s); with several, ranks are also averaged over datasets")
    p.add_argument("--architectures", nargs="+", required=True, choices=ARCHITECTURES, metavar="ARCH",
                   help=f"designs to compare, of {listing(ARCHITECTURES)}")
    p.add_argument("--baseline", default=None, choices=ARCHITECTURES, metavar="ARCH",
                   help="design the others are compared with (default: the first of --architectures)")
    p.add_argument("-c", "--configuration", default=CPU_CONFIGURATION, choices=TRAINABLE_CONFIGURATIONS,
                   metavar="CONFIG", help=f"of {listing(TRAINABLE_CONFIGURATIONS)} (default {CPU_CONFIGURATION})")
    p.add_argument("--num-folds", type=_positive_int, default=3,
                   help="folds of the study's own split (default 3; the work folder's splits are not used)")
    p.add_argument("-f", "--folds", nargs="+", default=None, metavar="FOLD",
                   help="folds to run (default: all of --num-folds)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="training time per run: every design gets the same minutes (default: the quick "
                        "schedule's 2,000 iterations)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="fix the schedule instead: epochs per run")
    p.add_argument("--iterations-per-epoch", type=_positive_int, default=None)
    p.add_argument("-w", "--work", type=Path, default=None, help="work folder of a single DATASET (default: "
                                                                "<dataset>.autoseg beside it)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help=f"study folder (default: the first dataset's work folder/{STUDY_DIR})")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--seed", type=int, default=12345)
    _add_common(p)
    p.set_defaults(func=cmd_compare_architectures, stage="compare-architectures")

    p = sub.add_parser("demo", help="run the whole pipeline on embedded phantom data")
    p.add_argument("-w", "--work", type=Path, default=Path("autoseg_demo"),
                   help="work folder (default ./autoseg_demo)")
    p.add_argument("--cases", type=_positive_int, default=12)
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)
    p.set_defaults(func=cmd_demo, stage="demo")

    p = sub.add_parser("export-model", help="write a model folder as a verified zip to share",
                       description="Network weights (safetensors, no optimizer state), plans.json, dataset.json, "
                                   f"{INFERENCE_PLAN_FILE}, a model card (labels, channels, folds, cross-validation "
                                   "Dice) and a manifest of SHA-256 hashes; nothing else (docs/sharing.md).")
    p.add_argument("model_dir", type=Path, help=f"model folder (WORK/{MODEL_DIR})")
    p.add_argument("output", type=Path, help="zip file to write (must not exist)")
    p.add_argument("-c", "--configurations", nargs="+", default=None, choices=CONFIGURATIONS, metavar="CONFIG",
                   help=f"of {listing(CONFIGURATIONS)} (default: every one with a finished fold)")
    p.add_argument("-f", "--folds", nargs="+", default=None, metavar="FOLD",
                   help="folds to export, e.g. 0 1 2 or all (default: every finished fold)")
    p.add_argument("--notes", default="", help="free text for the model card (data, intended use, caveats)")
    _add_common(p)
    p.set_defaults(func=cmd_export_model, stage="export-model")

    p = sub.add_parser("import-model", help="check a model zip from export-model and unpack it as a model folder",
                       description="Checks every entry (names, types, sizes, SHA-256 against the manifest) before "
                                   "anything is kept; a refused archive leaves nothing behind (docs/sharing.md).")
    p.add_argument("archive", type=Path, help="zip file written by `autoseg export-model`")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="model folder to create, for `autoseg predict -m` (must not exist; default: the zip's "
                        "name without .zip, beside it)")
    _add_common(p)
    p.set_defaults(func=cmd_import_model, stage="import-model")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()  # OpenMP's passive waits are set by importing AutoSegLib
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # to start the same command again (torchrun ranks, one fold per device)
    reporter = Reporter(events=args.events)
    if getattr(args, "ranked", False):  # under torchrun: events from rank 0, errors naming the rank
        from AutoSegLib.training.distributed import reporter_for

        reporter = reporter_for(os.environ, args.events)
    try:
        args.func(args, reporter)
    except KeyboardInterrupt:
        reporter.error(args.stage, "interrupted")
        return 130
    except ReportedFailure as exc:
        reporter.error(args.stage, str(exc))
        return 1
    except (OSError, ValueError) as exc:
        # Expected failures (bad input, missing files): the message names the file; no traceback.
        reporter.error(args.stage, str(exc))
        return 1
    except Exception as exc:
        if hasattr(exc, "exit_status"):  # a clean stop on a signal, e.g. training after saving a checkpoint
            reporter.error(args.stage, str(exc))
            return exc.exit_status
        # an engine bug: keep the traceback for the report
        traceback.print_exc(file=sys.stderr)
        reporter.error(args.stage, f"internal error: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
