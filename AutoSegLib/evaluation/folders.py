"""Evaluate a folder of predicted label files against a folder of reference label files.

The thin I/O layer over :mod:`metrics`: find the case pairs, read them, check that both sit on
the same voxel grid, score each case in a worker process and write the summary JSON.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from AutoSegLib.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM, IGNORE_LABEL_NAME, case_metrics, scored_labels
from AutoSegLib.evaluation.summary import summary_document
from AutoSegLib.events import Reporter
from AutoSegLib.fileutil import write_json
from AutoSegLib.imageio import Geometry, file_ending as ending_of, read_image

STAGE = "evaluate"
# Geometry read back from files carries float rounding (NIfTI stores float32); real mismatches
# are far larger than this.
_RTOL, _ATOL = 1e-5, 1e-4


class EvaluationError(ValueError):
    """Evaluation cannot run or a case cannot be scored; the message names the files."""


def check_same_grid(pred_path, pred_shape, pred_geometry: Geometry | None,
                    ref_path, ref_shape, ref_geometry: Geometry | None) -> None:
    """Raise EvaluationError naming both files and the values when the voxel grids differ."""
    problems = []
    if tuple(pred_shape) != tuple(ref_shape):
        problems.append(f"shape {tuple(pred_shape)} vs {tuple(ref_shape)}")
    if pred_geometry is not None and ref_geometry is not None:
        for field in ("spacing", "origin", "direction"):
            a, b = getattr(pred_geometry, field), getattr(ref_geometry, field)
            if len(a) != len(b) or not np.allclose(a, b, rtol=_RTOL, atol=_ATOL):
                problems.append(f"{field} {_fmt(a)} vs {_fmt(b)}")
    if problems:
        raise EvaluationError(f"prediction {pred_path} and reference {ref_path} are not on the same voxel grid: "
                              + "; ".join(problems) + " (prediction vs reference)")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def evaluate_case(pred_path: Path, ref_path: Path, labels: dict[str, int], tolerance_mm: float) -> dict:
    """One ``metric_per_case`` entry: read both files, check their grids, score every label."""
    pred, pred_geometry = read_image(pred_path)
    ref, ref_geometry = read_image(ref_path)
    check_same_grid(pred_path, pred.shape, pred_geometry, ref_path, ref.shape, ref_geometry)
    check_declared_values(pred_path, pred, labels, "prediction")
    metrics = case_metrics(pred, ref, labels, ref_geometry.spacing, labels.get(IGNORE_LABEL_NAME), tolerance_mm)
    return {"case": _case_id(ref_path), "prediction": str(pred_path), "reference": str(ref_path), "metrics": metrics}


def check_declared_values(path: Path, labels_array: np.ndarray, labels: dict[str, int], what: str) -> None:
    """A value the labels do not declare means a label file of another dataset or model: scoring
    it would silently count its voxels as background."""
    found = np.unique(labels_array)
    undeclared = sorted(int(v) for v in found if int(v) not in set(labels.values()))
    if undeclared:
        shown = ", ".join(map(str, undeclared[:10])) + (" ..." if len(undeclared) > 10 else "")
        raise EvaluationError(f"{path}: {what} holds value(s) {shown} that the labels do not declare "
                              f"({', '.join(f'{k}={v}' for k, v in labels.items())}); is it from another dataset "
                              "or model? (give the right labels with --labels)")


def _case_id(path: Path) -> str:
    return path.name[: -len(ending_of(path))]


def infer_file_ending(folder: Path) -> str:
    """The one image file ending used in ``folder``; an error when there is none or several."""
    endings = {ending_of(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")} - {None}
    if len(endings) != 1:
        found = ", ".join(sorted(endings)) or "no image files"
        raise EvaluationError(f"{folder}: cannot tell the file ending of the reference files (found: {found}); "
                              "pass file_ending")
    return endings.pop()


def _pairs(pred_dir: Path, gt_dir: Path, ending: str, case_ids: list[str] | None) -> list[tuple[str, Path, Path]]:
    if case_ids is None:
        case_ids = sorted(_case_id(p) for p in gt_dir.iterdir()
                          if p.is_file() and not p.name.startswith(".") and p.name.endswith(ending))
    if not case_ids:
        raise EvaluationError(f"{gt_dir}: no reference files ending in {ending}")
    missing_ref = [c for c in case_ids if not (gt_dir / f"{c}{ending}").is_file()]
    if missing_ref:
        raise EvaluationError(f"{gt_dir}: no reference file for case(s) {', '.join(missing_ref)}")
    missing = [str(pred_dir / f"{c}{ending}") for c in case_ids if not (pred_dir / f"{c}{ending}").is_file()]
    if missing:
        raise EvaluationError(f"{len(missing)} of {len(case_ids)} prediction(s) missing: " + ", ".join(missing))
    return [(c, pred_dir / f"{c}{ending}", gt_dir / f"{c}{ending}") for c in case_ids]


def evaluate_folders(pred_dir, gt_dir, labels: dict[str, int], output: Path | None = None,
                     case_ids: list[str] | None = None, num_processes: int = 1, reporter: Reporter | None = None,
                     file_ending: str | None = None, tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> dict:
    """Score every prediction ``pred_dir/{case}{ending}`` against ``gt_dir/{case}{ending}``.

    Args:
        labels: label name -> value (dataset.json's ``labels``); background and ``ignore``
            are not scored, and reference voxels labelled ``ignore`` are left out.
        output: where to write the summary JSON (atomically); None writes nothing.
        case_ids: the cases to score (default: every reference file in ``gt_dir``).
        num_processes: worker processes (1 = in this process).
        file_ending: e.g. ``.nii.gz`` (default: the one ending found in ``gt_dir``).
        tolerance_mm: normalized surface Dice tolerance.

    Returns:
        The summary document, exactly as written: ``version``, ``nsd_tolerance_mm``, ``labels``,
        ``metric_per_case``, ``mean`` and ``foreground_mean``, with ``None`` for undefined values.

    Raises:
        EvaluationError: a folder, reference or prediction is missing, or a case cannot be
            scored (e.g. prediction and reference are on different grids); names the files.

    Example:
        >>> summary = evaluate_folders("pred", "Dataset001/labelsTr", {"background": 0, "liver": 1})
        >>> summary["foreground_mean"]["Dice"]
    """
    from AutoSegLib.workers import run_tasks

    reporter = reporter or Reporter(quiet=True)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, what in ((pred_dir, "prediction"), (gt_dir, "reference")):
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: {what} folder not found")
    if not scored_labels(labels):
        raise EvaluationError(f"no label to score in {labels} (background and 'ignore' are not scored)")
    ending = file_ending or infer_file_ending(gt_dir)
    pairs = _pairs(pred_dir, gt_dir, ending, case_ids)
    tasks = [(case, (pred, ref, dict(labels), float(tolerance_mm))) for case, pred, ref in pairs]
    with reporter.task(STAGE, len(tasks), desc="Evaluate") as step:
        results = run_tasks(evaluate_case, tasks, num_processes, on_result=lambda r: step())
    failed = sorted((r.task_id, r.error) for r in results if not r.ok)
    if failed:
        raise EvaluationError(f"{len(failed)} case(s) could not be scored: "
                              + "; ".join(f"{case}: {error}" for case, error in failed))
    by_case = {r.task_id: r.value for r in results}
    per_case = [by_case[case] for case, _, _ in pairs]
    summary = summary_document(per_case, labels, list(scored_labels(labels)), nsd_tolerance_mm=float(tolerance_mm))
    if output is not None:
        write_json(output, summary)
    return summary


def labels_in_references(gt_dir, file_ending: str | None = None) -> dict[str, int]:
    """Labels named after every value found in the reference files (``label_1``, ...), for
    folders without a dataset.json; reads every file once."""
    gt_dir = Path(gt_dir)
    ending = file_ending or infer_file_ending(gt_dir)
    values: set[int] = set()
    for path in sorted(gt_dir.glob(f"*{ending}")):
        values.update(int(v) for v in np.unique(read_image(path)[0]))
    return {"background": 0, **{f"label_{v}": v for v in sorted(values - {0})}}
