"""Means over cases and classes, the summary JSON document and its printed table.

Means skip NaN (a class absent from a case's prediction and reference has no Dice), as
nnU-Net v2's ``nanmean`` does; a mean over nothing but NaN is NaN. The foreground mean is the
mean over classes of the per-class means, so every class weighs the same however many cases
contain it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

SUMMARY_VERSION = 1
TABLE_METRICS = ("Dice", "IoU", "HD95", "NSD", "FP", "FN")


def nanmean(values: Iterable[float | None]) -> float:
    """Mean of the finite values; NaN when there are none (without numpy's warning)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else math.nan


def class_means(per_case: list[dict], label_names: Iterable[str]) -> dict[str, dict]:
    """label name -> metric -> mean over the cases of ``per_case`` (each ``{"metrics": {...}}``)."""
    means = {}
    for name in label_names:
        rows = [entry["metrics"][name] for entry in per_case if name in entry["metrics"]]
        keys = list(rows[0]) if rows else []
        means[name] = {key: nanmean(row[key] for row in rows) for key in keys}
    return means


def foreground_mean(means: dict[str, dict]) -> dict:
    """metric -> mean over classes of the per-class means."""
    keys = list(next(iter(means.values()), {}))
    return {key: nanmean(m.get(key) for m in means.values()) for key in keys}


def never_predicted(per_case: list[dict], label_names: Iterable[str]) -> dict[str, int]:
    """Classes present in some reference but predicted in no case: name -> reference cases holding it.

    A model that never outputs a class scores it 0 wherever it is present; in a mean over
    classes that is easy to miss (issue 13: kidneys at 0.00 inside a mean of 0.65), so the
    summary names them and the commands warn.
    """
    missing = {}
    for name in label_names:
        rows = [entry["metrics"][name] for entry in per_case if name in entry["metrics"]]
        in_references = sum(1 for row in rows if (row.get("n_ref") or 0) > 0)
        if in_references and not any((row.get("n_pred") or 0) > 0 for row in rows):
            missing[name] = in_references
    return missing


WEAK_DICE = 0.5  # below this a class is named as weak at the end of training


def class_ranking(summary: dict) -> list[tuple[str, float]]:
    """(class, mean Dice) of every scored class, lowest first (ties by name); unscored ones left out."""
    scored = [(name, float(m["Dice"])) for name, m in summary.get("mean", {}).items()
              if isinstance(m, dict) and m.get("Dice") is not None and math.isfinite(m["Dice"])]
    return sorted(scored, key=lambda item: (item[1], item[0]))


def ranking_text(ranking: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {dice:.2f}" for name, dice in ranking)


def weak_classes_warning(summary: dict, threshold: float = WEAK_DICE) -> str | None:
    """One message naming the classes under ``threshold`` Dice, lowest first; None when there are none.

    A mean over 30 classes can look fine while a third of them are barely found (issue 14), so
    training ends by naming them, and the Slicer module shows the message.
    """
    ranking = class_ranking(summary)
    weak = [(name, dice) for name, dice in ranking if dice < threshold]
    if not weak:
        return None
    return (f"{len(weak)} of {len(ranking)} class(es) below Dice {threshold:.2f} on validation, lowest first: "
            f"{ranking_text(weak)}. Train longer (--time-budget MIN), on more cases that contain them, or "
            "3d_fullres on a GPU (docs/evaluation.md)")


def never_predicted_warnings(summary: dict) -> list[str]:
    """One message per class of ``summary["never_predicted"]``, for logs and the Slicer module."""
    cases = len(summary.get("metric_per_case", []))
    return [f"class '{name}' was never predicted, though {count} of {cases} reference case(s) contain it: the model "
            "has not learned it (train longer or on more cases with it; docs/evaluation.md)"
            for name, count in summary.get("never_predicted", {}).items()]


def summary_document(per_case: list[dict], labels: dict[str, int], label_names: list[str], **fields: Any) -> dict:
    """The summary file's content (JSON-ready: NaN becomes None)."""
    means = class_means(per_case, label_names)
    return json_ready({"version": SUMMARY_VERSION, **fields, "labels": dict(labels),
                       "metric_per_case": per_case, "mean": means, "foreground_mean": foreground_mean(means),
                       "never_predicted": never_predicted(per_case, label_names)})


def json_ready(value: Any) -> Any:
    """``value`` with NaN/infinity as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cell(value, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(summary: dict) -> str:
    """Per-class means of a summary document as a fixed-width table, foreground mean last."""
    tolerance = summary.get("nsd_tolerance_mm")
    headers = {"HD95": "HD95 mm", "NSD": f"NSD@{tolerance:g}mm" if tolerance is not None else "NSD",
               "FP": "FP mean", "FN": "FN mean"}
    rows = [(name, values) for name, values in summary["mean"].items()]
    rows.append(("foreground mean", summary["foreground_mean"]))
    width = max(len(name) for name, _ in rows)
    columns = [m for m in TABLE_METRICS if any(m in values for _, values in rows)]
    lines = [f"{'class':<{width}}" + "".join(f"{headers.get(m, m):>12}" for m in columns)]
    for name, values in rows:
        digits = {"HD95": 2, "FP": 1, "FN": 1}
        lines.append(f"{name:<{width}}" + "".join(f"{_cell(values.get(m), digits.get(m, 4)):>12}" for m in columns))
    cases = len(summary.get("metric_per_case", []))
    lines.append(f"({cases} case(s); '-' = undefined in every case, e.g. the class is absent from prediction "
                 "and reference; see docs/evaluation.md)")
    return "\n".join(lines)
