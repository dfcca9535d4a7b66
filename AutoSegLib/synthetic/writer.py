"""Write a phantom dataset folder in nnU-Net v2's raw layout.

The folder must be new or empty: a user's data is never overwritten. Every image is written
atomically by ``imageio.write_image`` and ``dataset.json`` is written last, so a folder
without ``dataset.json`` is recognisably unfinished (and ``open_dataset`` refuses it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from AutoSegLib.dataset import DatasetSpec, save_spec
from AutoSegLib.events import Reporter
from AutoSegLib.imageio import write_image
from AutoSegLib.synthetic.cases import (channel_names, check_anatomy, check_channels, check_int, check_kind,
                                        check_size, label_table, make_case)

STAGE = "make-phantoms"
FILE_ENDING = ".nii.gz"
# Bump when the same (kind, seed, index) starts producing different data.
GENERATOR_VERSION = 1
_SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
_MODALITY = {"ct": "abdominal CT (portal-venous phase, Hounsfield units)",
             "mr": "abdominal MR (magnitude images, arbitrary scale, bias field)"}


def make_phantom_dataset(out: str | Path, kind: str = "ct", cases: int = 20, seed: int = 0,
                         channels: int | None = None, test_cases: int = 0, size: float = 1.0,
                         reporter: Reporter | None = None, anatomy: str = "basic") -> Path:
    """Generate ``cases`` labelled training phantoms (plus ``test_cases`` held-out ones).

    Args:
        out: dataset folder to create; must not exist or be empty.
        kind: "ct" or "mr".
        cases: training cases (imagesTr/labelsTr), >= 1.
        seed: dataset seed (>= 0); the same seed gives the same data (bit for bit with the same
            numpy/scipy build; other CPUs' float32 maths may move a few boundary voxels).
        channels: MR contrasts (default 1: T1; 2: T1, T2; ...); CT has exactly 1.
        test_cases: held-out cases in imagesTs/ with ground truth in labelsTs/.
        size: patient scale, 0 < size <= 4 (default 1: the miniature abdomen, about a third of
            adult size). The same patients ``size`` times larger, scanned at the same spacing,
            so each axis has about ``size`` times the voxels (a larger field of view, as a
            larger patient needs); the organs and the label set are the same.
        reporter: progress as stage "make-phantoms", one step per case.
        anatomy: "basic" (5 labels: liver, spleen, kidneys, aorta, liver lesions) or
            "detailed" (31 labels of the same patients: organs, both kidneys and adrenals,
            thin vessels, lymph nodes, spine parts, ribs and wall by side; see
            ``anatomy.DETAILED_LABELS``).

    Returns:
        The dataset folder.

    Raises:
        ValueError: unknown kind, bad counts, channels or size.
        FileExistsError: ``out`` exists and is not an empty folder.

    Example:
        >>> make_phantom_dataset("Dataset900_Phantom", kind="mr", cases=4, channels=2)  # doctest: +SKIP
        PosixPath('Dataset900_Phantom')
    """
    check_kind(kind)
    count = check_channels(kind, channels)
    cases, test_cases = check_int("cases", cases, 1), check_int("test_cases", test_cases, 0)
    seed, size, anatomy = check_int("seed", seed, 0), check_size(size), check_anatomy(anatomy)
    out = Path(out)
    _claim_folder(out)
    work = [("train", i) for i in range(cases)] + [("test", i) for i in range(test_cases)]
    task = reporter.task(STAGE, len(work)) if reporter is not None else contextlib.nullcontext(lambda *a, **k: None)
    with task as step:
        for split, index in work:
            _write_case(out, kind, seed, index, count, split, size, anatomy)
            step()
    spec = DatasetSpec(channel_names(kind, count), label_table(kind, anatomy), cases, FILE_ENDING,
                       _description(kind, seed, count, cases, test_cases, size, anatomy))
    save_spec(out, spec)
    return out


def _claim_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose a new dataset folder")
    if out.is_dir() and any(out.iterdir()):
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        hint = ""
        if set(names) <= set(_SUBFOLDERS):
            hint = " It looks like an interrupted make-phantoms run (no dataset.json): delete it and run again."
        raise FileExistsError(f"{out}: folder is not empty (contains {shown}); refusing to write phantoms "
                              f"into it.{hint}")
    out.mkdir(parents=True, exist_ok=True)


def _write_case(out: Path, kind: str, seed: int, index: int, channels: int, split: str, size: float,
                anatomy: str) -> None:
    case = make_case(kind, seed, index, channels, split=split, size=size, anatomy=anatomy)
    suffix = "Tr" if split == "train" else "Ts"
    for c, image in enumerate(case.images):
        write_image(image, case.geometry, out / f"images{suffix}" / f"{case.case_id}_{c:04d}{FILE_ENDING}")
    write_image(case.label, case.geometry, out / f"labels{suffix}" / f"{case.case_id}{FILE_ENDING}")


def _description(kind: str, seed: int, channels: int, cases: int, test_cases: int, size: float,
                 anatomy: str) -> dict:
    from AutoSegLib import __version__

    synthetic = {"generator": "AutoSegLib.synthetic", "generator_version": GENERATOR_VERSION,
                 "kind": kind, "seed": seed, "channels": channels, "cases": cases,
                 "test_cases": test_cases, "size": size}
    if anatomy != "basic":  # default datasets keep their dataset.json word for word
        synthetic["anatomy"] = anatomy
    return {
        "name": f"AutoSeg phantom {kind.upper()}",
        "description": (f"Synthetic {_MODALITY[kind]} of a miniature abdomen, generated by "
                        f"AutoSegLib.synthetic (kind={kind}, seed={seed}{_size_note(size)}"
                        f"{'' if anatomy == 'basic' else f', anatomy={anatomy}'}). Not patient data."),
        "reference": f"AutoSegLib.synthetic, AutoSeg {__version__}",
        "licence": "CC0-1.0",
        "release": __version__,
        "numTest": test_cases,
        "synthetic": synthetic,
    }


def _size_note(size: float) -> str:
    # Default datasets keep their description word for word.
    return "" if size == 1.0 else f", size={size:g}"
