"""The ``autoseg`` command line: a thin layer over the Python API.

Each sub-command parses its flags, builds a :class:`~AutoSegLib.events.Reporter` and calls
one API function; heavy modules (torch, SimpleITK, scipy) are imported inside the command so
``autoseg --help`` is instant. Exit status: 0 on success, 1 on a reported failure, 2 on a
usage error, 130 when interrupted.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from AutoSegLib.cli_parser import FAST_STEP, FAST_TTA_AXES, build_parser
from AutoSegLib.errors import ReportedFailure
from AutoSegLib.events import Reporter
from AutoSegLib.names import DATASET_FILE, MODEL_DIR, STUDY_DIR, WORK_SUFFIX


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


COMMANDS = {
    "make-phantoms": cmd_make_phantoms,
    "verify": cmd_verify,
    "plan": cmd_plan,
    "preprocess": cmd_preprocess,
    "plan-and-preprocess": cmd_plan_and_preprocess,
    "train": cmd_train,
    "predict": cmd_predict,
    "engine": cmd_engine,
    "evaluate": cmd_evaluate,
    "find-best": cmd_find_best,
    "compare-architectures": cmd_compare_architectures,
    "demo": cmd_demo,
    "export-model": cmd_export_model,
    "import-model": cmd_import_model,
}


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
        COMMANDS[args.stage](args, reporter)
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
