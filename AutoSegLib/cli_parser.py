"""The ``autoseg`` command line's flags: every sub-command, its arguments and their help.

Declarations only, so the flags can be read (``autoseg COMMAND --help``, the Slicer module's
check of what the installed engine accepts) without the commands themselves; each
sub-command's ``stage`` names the function :mod:`AutoSegLib.cli` runs for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from AutoSegLib import __version__
from AutoSegLib.names import (ARCHITECTURES, CONFIGURATIONS, CPU_CONFIGURATION, DEFAULT_ARCHITECTURE,
                              DEFAULT_PRESET, DEVICES, INFERENCE_PLAN_FILE, MODEL_DIR, PHANTOM_ANATOMIES, PRESETS,
                              STUDY_DIR, TRAINABLE_CONFIGURATIONS, listing)

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


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", action="store_true",
                   help="print progress as JSON lines on stdout (for the Slicer module and scripts)")


def positive_int(text: str) -> int:
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
    p.add_argument("--cases", type=positive_int, default=20, help="training cases (default 20)")
    p.add_argument("--test-cases", type=int, default=0, help="extra cases in imagesTs/labelsTs (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=positive_int, default=None, help="MR channels (default 1; CT has 1)")
    p.add_argument("--size", type=float, default=1.0,
                   help="patient scale, > 0 and <= 4 (default 1): the same patients SIZE times larger, scanned at "
                        "the same spacing with a field of view grown to match, so images have about SIZE times the "
                        "voxels along each axis; organs and labels are unchanged")
    p.add_argument("--anatomy", choices=PHANTOM_ANATOMIES, default="basic",
                   help="basic: 5 labels (liver, spleen, kidneys, aorta, liver lesions); detailed: 31 labels of the same "
                        "patients, with thin vessels (1-3 voxels), lymph nodes, adrenals, spine parts, and ribs, wall, "
                        "kidneys and muscles by side (default basic)")
    add_common(p)
    p.set_defaults(stage="make-phantoms")

    p = sub.add_parser("verify", help="check a dataset folder and report every problem at once")
    p.add_argument("dataset", type=Path)
    p.add_argument("-np", "--num-processes", type=positive_int, default=2)
    add_common(p)
    p.set_defaults(stage="verify")

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
    p.add_argument("-np", "--num-processes", type=positive_int, default=2)
    p.add_argument("--guidance", choices=("auto", "on", "off"), default="auto",
                   help="3D networks that also learn to take correction clicks (docs/clicks.md): auto (default) = on "
                        "when this machine has a GPU, off on a CPU, where guided training takes about 1.3x the "
                        "minutes of plain training (measured 2026-12-03)")
    p.add_argument("--refresh-fingerprint", action="store_true", help="re-extract even if the dataset is unchanged")
    p.add_argument("--fingerprint", type=Path, default=None, help="plan from this fingerprint file, no images")
    p.add_argument("--channels", default=None, help="with --fingerprint: channel names in order, e.g. CT or T1,T2")
    p.add_argument("--num-labels", type=positive_int, default=None,
                   help="with --fingerprint: number of foreground labels (background not counted)")
    p.add_argument("--dataset-json", type=Path, default=None,
                   help="with --fingerprint: take channels and labels from this dataset.json instead")
    p.add_argument("-o", "--output", type=Path, default=None, help="with --fingerprint: plans file to write")
    add_common(p)
    p.set_defaults(stage="plan")

    def add_preprocess_flags(p):
        p.add_argument("-c", "--configurations", nargs="+", default=None, metavar="CONFIG",
                       help=f"configurations to preprocess, of {listing(CONFIGURATIONS)} as planned "
                            "(default: every planned one)")
        p.add_argument("--strict", action="store_true", help=STRICT_HELP)

    p = sub.add_parser("preprocess", help="crop, normalize and resample every case for the planned configurations")
    p.add_argument("dataset", type=Path)
    p.add_argument("-w", "--work", type=Path, default=None, help="work folder (default: <dataset>.autoseg beside it)")
    add_preprocess_flags(p)
    p.add_argument("-np", "--num-processes", type=positive_int, default=2,
                   help="worker processes (default 2; 1 runs in this process, for debugging)")
    add_common(p)
    p.set_defaults(stage="preprocess")

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
    p.add_argument("-np", "--num-processes", type=positive_int, default=2)
    add_common(p)
    p.set_defaults(stage="plan-and-preprocess")

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
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--iterations-per-epoch", type=positive_int, default=None)
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
    p.add_argument("--checkpoint-every-epochs", type=positive_int, default=5,
                   help="save checkpoint_latest every N epochs (default 5; also at least every 10 minutes)")
    scale = p.add_argument_group("several devices (docs/scaling.md)")
    scale.add_argument("--gpus", type=positive_int, default=None, metavar="N",
                       help="train this fold data-parallel on N GPUs of this machine (starts torchrun, NCCL)")
    scale.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                       help="train this fold data-parallel with N processes on --device (starts torchrun; gloo "
                            "on the CPU)")
    scale.add_argument("--devices", default=None, metavar="LIST",
                       help="with a fold list: where the folds train, one at a time per entry: GPU indices "
                            "(0,1,2,3) or cpu entries (cpu,cpu)")
    add_common(p)
    p.set_defaults(stage="train", ranked=True)

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
    p.add_argument("--num-parts", type=positive_int, default=None, metavar="K",
                   help="split the cases (sorted by name) into K parts and predict one, for job arrays; under "
                        "torchrun the ranks are the parts")
    p.add_argument("--part-id", type=int, default=None, metavar="I", help="with --num-parts: the part, 0 to K-1")
    p.add_argument("--continue", dest="continue_", action="store_true",
                   help="skip cases whose outputs a finished earlier run wrote (partial outputs never count)")
    p.add_argument("--no-pipeline", action="store_true",
                   help="one case at a time; by default the next case is read and the previous one written while "
                        "the network runs (at most 3 cases in memory; on a CPU the network then leaves one core "
                        "to them)")
    add_common(p)
    p.set_defaults(stage="predict", ranked=True)

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
    p.set_defaults(stage="engine", events=False)

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
    p.add_argument("-np", "--num-processes", type=positive_int, default=2)
    add_common(p)
    p.set_defaults(stage="evaluate")

    p = sub.add_parser("find-best", help="choose configuration(s) and postprocessing from cross-validation",
                       description="Score every trained configuration and every ensemble of two on the pooled "
                                   "cross-validation predictions, decide the largest-component postprocessing, "
                                   "and write WORK/model/inference_plan.json for `autoseg predict`.")
    p.add_argument("dataset", type=Path)
    p.add_argument("-w", "--work", type=Path, default=None, help="work folder (default: <dataset>.autoseg beside it)")
    p.add_argument("-np", "--num-processes", type=positive_int, default=2)
    add_common(p)
    p.set_defaults(stage="find-best")

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
    p.add_argument("--num-folds", type=positive_int, default=3,
                   help="folds of the study's own split (default 3; the work folder's splits are not used)")
    p.add_argument("-f", "--folds", nargs="+", default=None, metavar="FOLD",
                   help="folds to run (default: all of --num-folds)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="training time per run: every design gets the same minutes (default: the quick "
                        "schedule's 2,000 iterations)")
    p.add_argument("--epochs", type=positive_int, default=None, help="fix the schedule instead: epochs per run")
    p.add_argument("--iterations-per-epoch", type=positive_int, default=None)
    p.add_argument("-w", "--work", type=Path, default=None, help="work folder of a single DATASET (default: "
                                                                "<dataset>.autoseg beside it)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help=f"study folder (default: the first dataset's work folder/{STUDY_DIR})")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--seed", type=int, default=12345)
    add_common(p)
    p.set_defaults(stage="compare-architectures")

    p = sub.add_parser("demo", help="run the whole pipeline on embedded phantom data")
    p.add_argument("-w", "--work", type=Path, default=Path("autoseg_demo"),
                   help="work folder (default ./autoseg_demo)")
    p.add_argument("--cases", type=positive_int, default=12)
    p.add_argument("--seed", type=int, default=0)
    add_common(p)
    p.set_defaults(stage="demo")

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
    add_common(p)
    p.set_defaults(stage="export-model")

    p = sub.add_parser("import-model", help="check a model zip from export-model and unpack it as a model folder",
                       description="Checks every entry (names, types, sizes, SHA-256 against the manifest) before "
                                   "anything is kept; a refused archive leaves nothing behind (docs/sharing.md).")
    p.add_argument("archive", type=Path, help="zip file written by `autoseg export-model`")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="model folder to create, for `autoseg predict -m` (must not exist; default: the zip's "
                        "name without .zip, beside it)")
    add_common(p)
    p.set_defaults(stage="import-model")
    return parser
