"""Segmentation metrics on arrays: overlap counts, Dice, IoU, HD95 and normalized surface Dice.

Pure functions: arrays and spacing in, numbers out; no files. Conventions (docs/evaluation.md):

* A class absent from both prediction and reference has no Dice and no IoU (NaN, written as
  JSON ``null``), and is left out of every mean. This is nnU-Net v2's convention: a perfect
  "nothing there" neither rewards nor punishes a model.
* HD95 needs a surface on both sides: NaN when either side is empty (Dice, FP and FN already
  say how badly a missed or hallucinated structure scores).
* NSD is NaN when both sides are empty and 0 when exactly one is (none of the existing
  surface lies within tolerance of a surface that does not exist).
* Voxels the reference marks with the ignore label are left out of every metric; predictions
  there count neither for nor against.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from AutoSegLib.dataset import IGNORE_LABEL_NAME

DEFAULT_NSD_TOLERANCE_MM = 1.0
OVERLAP_KEYS = ("Dice", "IoU", "TP", "FP", "FN", "n_pred", "n_ref")
SURFACE_KEYS = ("HD95", "NSD")
_TOLERANCE_SLACK_MM = 1e-6  # a distance of exactly the tolerance counts, despite rounding in sqrt


def scored_labels(labels: dict[str, int]) -> dict[str, int]:
    """The labels that are scored: every label except background (0) and ``ignore``."""
    return {name: int(value) for name, value in labels.items() if value != 0 and name != IGNORE_LABEL_NAME}


def overlap_from_counts(tp: int, n_pred: int, n_ref: int) -> dict:
    """Dice, IoU and the voxel counts from true positives and the two mask sizes."""
    fp, fn = n_pred - tp, n_ref - tp
    union = tp + fp + fn
    return {
        "Dice": 2 * tp / (2 * tp + fp + fn) if union else math.nan,
        "IoU": tp / union if union else math.nan,
        "TP": int(tp), "FP": int(fp), "FN": int(fn), "n_pred": int(n_pred), "n_ref": int(n_ref),
    }


def overlap_metrics(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """Overlap metrics of two boolean masks, counting only ``valid`` voxels when given.

    Example:
        >>> overlap_metrics(np.array([1, 1, 0], bool), np.array([0, 1, 1], bool))["Dice"]
        0.5
    """
    if valid is not None:
        pred, ref = pred & valid, ref & valid
    return overlap_from_counts(int(np.count_nonzero(pred & ref)), int(np.count_nonzero(pred)),
                               int(np.count_nonzero(ref)))


def _surface(mask: np.ndarray) -> np.ndarray:
    # A surface voxel has a face neighbour outside the mask; voxels on the array border count
    # as surface (border_value=0), so an object cut by the field of view keeps its cut face.
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    coords = np.nonzero(mask)
    return tuple(slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, size))
                 for c, size in zip(coords, mask.shape))


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from every surface voxel of ``pred`` to the surface of ``ref``, and back.

    Both masks must be non-empty. Distances are between voxel centres, using ``spacing``
    (mm per array axis), so anisotropic voxels are measured correctly.
    """
    # Every surface voxel lies inside the joint bounding box, so the exact distance transform
    # of the crop equals that of the whole image; the crop only saves time.
    box = _bounding_box(pred | ref)
    surface_pred, surface_ref = _surface(pred[box]), _surface(ref[box])
    sampling = tuple(float(s) for s in spacing)
    to_ref = ndimage.distance_transform_edt(~surface_ref, sampling=sampling)[surface_pred]
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=sampling)[surface_ref]
    return to_ref, to_pred


def hd95(to_ref: np.ndarray, to_pred: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance: the larger of the two directed ones."""
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def normalized_surface_dice(to_ref: np.ndarray, to_pred: np.ndarray, tolerance_mm: float) -> float:
    """Share of both surfaces lying within ``tolerance_mm`` of the other surface."""
    limit = tolerance_mm + _TOLERANCE_SLACK_MM
    within = np.count_nonzero(to_ref <= limit) + np.count_nonzero(to_pred <= limit)
    return float(within / (to_ref.size + to_pred.size))


def surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                    valid: np.ndarray | None = None) -> dict:
    """HD95 (mm) and NSD at ``tolerance_mm`` of two boolean masks, with the empty-mask conventions."""
    if valid is not None:
        pred, ref = pred & valid, ref & valid
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not (has_pred and has_ref):
        return {"HD95": math.nan, "NSD": 0.0 if has_pred or has_ref else math.nan}
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    return {"HD95": hd95(to_ref, to_pred), "NSD": normalized_surface_dice(to_ref, to_pred, tolerance_mm)}


def _confusion(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """``counts[r, p]``: voxels with reference value r and predicted value p, in one pass."""
    if valid is not None:
        pred, ref = pred[valid], ref[valid]
    pred, ref = pred.ravel().astype(np.int64), ref.ravel().astype(np.int64)
    if pred.size == 0:
        return np.zeros((1, 1), np.int64)
    low = min(int(pred.min()), int(ref.min()))
    if low < 0:
        raise ValueError(f"label maps must not hold negative values, found {low}")
    n = max(int(pred.max()), int(ref.max())) + 1
    return np.bincount(ref * n + pred, minlength=n * n).reshape(n, n)


def case_metrics(pred: np.ndarray, ref: np.ndarray, labels: dict[str, int], spacing=None,
                 ignore_value: int | None = None, tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                 surface: bool = True) -> dict[str, dict]:
    """Metrics per scored label of one case: label name -> {Dice, IoU, TP, FP, FN, n_pred, n_ref[, HD95, NSD]}.

    Args:
        pred, ref: integer label maps of the same shape.
        labels: label name -> value; background (0) and ``ignore`` are not scored.
        spacing: mm per array axis; needed when ``surface`` is True.
        ignore_value: reference value marking unannotated voxels, left out of every metric
            (default: the value of the ``ignore`` label, if ``labels`` has one).
        tolerance_mm: NSD tolerance.
        surface: also compute HD95 and NSD (distance transforms: much slower than the counts).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if ignore_value is None:
        ignore_value = labels.get(IGNORE_LABEL_NAME)
    valid = None if ignore_value is None or not np.any(ref == ignore_value) else ref != ignore_value
    counts = _confusion(pred, ref, valid)
    n = counts.shape[0]
    result = {}
    for name, value in scored_labels(labels).items():
        inside = value < n
        tp = int(counts[value, value]) if inside else 0
        n_pred = int(counts[:, value].sum()) if inside else 0
        n_ref = int(counts[value, :].sum()) if inside else 0
        result[name] = overlap_from_counts(tp, n_pred, n_ref)
        if surface:
            if spacing is None:
                raise ValueError("surface metrics need the voxel spacing")
            result[name].update(surface_metrics(pred == value, ref == value, spacing, tolerance_mm, valid))
    return result
