"""The names the engine, its command line, its files and the Slicer module share: defined once.

Configuration names, network architectures, devices, schedule presets and the file names of a
work or model folder are contracts between processes (the Slicer module starts the engine with
them; a model folder written today must be read next year). Every other module imports them
from here, so a new configuration shows up in the CLI's choices, its help texts, the inference
plan and the Slicer pickers at once (docs/architecture.md, "Names").

Nothing here imports numpy or torch: the Slicer module reads it inside Slicer's GUI process.
"""

from __future__ import annotations

from typing import Iterable

# -- configurations --------------------------------------------------------------------------
CPU_CONFIGURATION = "3d_cpu"  # AutoSeg's configuration sized for CPUs, 3D or 2D by the data (planning/cpu.py)
GPU_CONFIGURATION = "3d_fullres"  # the method's main configuration
CASCADE_CONFIGURATION = "3d_cascade_fullres"  # needs 3d_lowres predictions as input
# Every configuration a plan may hold, in the order plans list them.
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", CASCADE_CONFIGURATION, CPU_CONFIGURATION)
# What `autoseg train` takes (the cascade's second stage is not trained on its own yet), CPU first.
TRAINABLE_CONFIGURATIONS = (CPU_CONFIGURATION, "2d", "3d_fullres", "3d_lowres")

# -- networks, devices, schedules --------------------------------------------------------------
# The blueprint, nnU-Net's residual encoder, and the U-Net family of the architecture study
# (docs/architectures.md). SwinUNETR needs the optional MONAI extra.
ARCHITECTURES = ("PlainConvUNet", "ResidualEncoderUNet", "ConvSkipUNet", "ResBlockUNet", "ResBlock3UNet",
                 "ConvNeXtUNet", "ConvSkipResBlockUNet", "AttentionSkipUNet", "HalfUNet", "UNetPlusPlus",
                 "SwinUNETR")
DEFAULT_ARCHITECTURE = "PlainConvUNet"
STUDY_DIR = "architecture_study"  # compare-architectures' default report folder, in the work folder
DEVICES = ("auto", "cuda", "mps", "cpu")
# "auto": the paper's recipe on a GPU, the quick recipe on a CPU (training/schedule.py).
PRESETS = ("auto", "paper", "quick")
PHANTOM_ANATOMIES = ("basic", "detailed")  # make-phantoms --anatomy: 5 or 31 labelled structures
DEFAULT_PRESET = "auto"

# -- folders and files -------------------------------------------------------------------------
WORK_SUFFIX = ".autoseg"  # the work folder is <dataset folder name>.autoseg beside the dataset
FINGERPRINT_FILE = "dataset_fingerprint.json"
PLANS_FILE = "plans.json"
DATASET_FILE = "dataset.json"
SPLITS_FILE = "splits_final.json"
PREPROCESSED_DIR = "preprocessed"
MODEL_DIR = "model"
INFERENCE_PLAN_FILE = "inference_plan.json"
CHECKPOINT_FILES = {"final": "checkpoint_final.pt", "best": "checkpoint_best.pt", "latest": "checkpoint_latest.pt"}
TRAINING_LOG_FILE = "training_log.jsonl"
PROGRESS_PLOT_FILE = "progress.png"
VALIDATION_DIR = "validation"
SUMMARY_FILE = "summary.json"
CROSSVAL_DIR = "crossval"  # find-best's pooled cross-validation scores, in the model folder
ENSEMBLE_SEPARATOR = "+"  # "2d+3d_fullres": an ensemble of two configurations


def fold_dir_name(fold) -> str:
    """``fold_0`` ... ``fold_4``, ``fold_all``."""
    return f"fold_{fold}"


def listing(names: Iterable[str], last: str = "or") -> str:
    """``"a, b or c"``: how help texts and messages list names."""
    names = list(names)
    if len(names) < 2:
        return "".join(names)
    return f"{', '.join(names[:-1])} {last} {names[-1]}"
