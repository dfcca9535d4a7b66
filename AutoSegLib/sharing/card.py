"""The model card of an exported model: what it segments, from what, and how well: pure functions.

The card is plain JSON (``model_card.json``) with a short Markdown rendering
(``MODEL_CARD.md``) for people. Its numbers are copied from the model folder's own files:
each fold's ``validation/summary.json`` (Dice per class on the fold's held-out cases, in
their original geometry) and the pooled cross-validation of ``crossval/`` or the inference
plan (``autoseg find-best``).
"""

from __future__ import annotations

import math

CARD_VERSION = 1


def dice_scores(summary: dict) -> dict | None:
    """``{"mean_foreground_dice": x, "per_class": {label: Dice}}`` of a summary document, or None."""
    means = summary.get("mean") if isinstance(summary, dict) else None
    if not isinstance(means, dict):
        return None
    per_class = {str(name): _number(values.get("Dice")) for name, values in means.items() if isinstance(values, dict)}
    foreground = summary.get("foreground_mean") or {}
    overall = _number(foreground.get("Dice")) if isinstance(foreground, dict) else None
    return {"mean_foreground_dice": overall if overall is not None else _mean(per_class.values()),
            "per_class": per_class}


def mean_over_folds(per_fold: dict[str, dict]) -> dict:
    """Per-class and overall Dice averaged over folds (a fold without a value is left out)."""
    classes = list(dict.fromkeys(name for scores in per_fold.values() for name in scores["per_class"]))
    return {"mean_foreground_dice": _mean(s["mean_foreground_dice"] for s in per_fold.values()),
            "per_class": {name: _mean(s["per_class"].get(name) for s in per_fold.values()) for name in classes}}


def build_card(plans: dict, dataset: dict, selection: dict[str, list], checkpoint: str, *,
               fold_summaries: dict[tuple[str, str], dict], pooled: dict[str, dict], inference_plan: dict | None,
               engine_version: str, created: str, notes: str) -> dict:
    """The card's content.

    Args:
        plans, dataset: the model folder's ``plans.json`` and ``dataset.json``.
        selection: configuration -> exported folds.
        fold_summaries: ``(configuration, str(fold))`` -> that fold's ``validation/summary.json``.
        pooled: candidate (``3d_fullres``, ``2d+3d_fullres``) -> pooled cross-validation scores.
        inference_plan: the exported ``inference_plan.json``, or None.

    Example:
        >>> card = build_card(plans, dataset, {"3d_cpu": [0]}, "final", fold_summaries={}, pooled={},
        ...                   inference_plan=None, engine_version="0.1.0", created="2026-12-03T03:00:00Z",
        ...                   notes="")  # doctest: +SKIP
    """
    configurations = {}
    for name, folds in selection.items():
        planned = plans.get("configurations", {}).get(name, {})
        per_fold = {str(f): scores for f in folds
                    if (scores := dice_scores(fold_summaries.get((name, str(f)), {}))) is not None}
        entry = {"folds": list(folds), "spacing": planned.get("spacing"), "patch_size": planned.get("patch_size"),
                 "network": (planned.get("network") or {}).get("architecture")}
        if planned.get("previous_stage"):
            entry["previous_stage"] = planned["previous_stage"]
        if per_fold:
            entry["cross_validation"] = {"per_fold": per_fold, "mean_over_folds": mean_over_folds(per_fold)}
        configurations[name] = entry
    card = {"card_version": CARD_VERSION, "name": plans.get("dataset_name"), "created": created,
            "engine": {"name": "AutoSegLib", "version": engine_version}, "notes": notes,
            "channels": dataset.get("channel_names"), "labels": dataset.get("labels"),
            "file_ending": dataset.get("file_ending"), "training_cases": dataset.get("numTraining"),
            "checkpoint": checkpoint, "configurations": configurations}
    if "terminology" in dataset:  # SNOMED CT codes per label, kept as the Slicer module wrote them
        card["terminology"] = dataset["terminology"]
    if inference_plan is not None:
        card["inference_plan"] = {key: inference_plan.get(key) for key in ("configurations", "folds", "postprocessing")}
    if pooled:
        card["pooled_cross_validation"] = pooled
    return card


def card_markdown(card: dict) -> str:
    """A short human-readable rendering of :func:`build_card`'s result."""
    lines = [f"# Model card: {card.get('name') or 'AutoSeg model'}", "",
             f"Exported {card['created']} with {card['engine']['name']} {card['engine']['version']}.", ""]
    if card.get("notes"):
        lines += [card["notes"], ""]
    channels = card.get("channels") or {}
    labels = card.get("labels") or {}
    lines += [f"- Channels: {', '.join(f'{k}: {v}' for k, v in channels.items())}",
              f"- Labels: {', '.join(f'{name} ({value})' for name, value in labels.items())}",
              f"- Checkpoint: {card['checkpoint']}; trained on {card.get('training_cases')} case(s)"]
    plan = card.get("inference_plan")
    if plan:
        lines.append(f"- Predicts with: {' + '.join(plan['configurations'])}, folds "
                     f"{', '.join(map(str, plan['folds']))} (inference_plan.json)")
    lines += ["", "## Configurations", "", "| configuration | folds | spacing | patch | network |",
              "|---|---|---|---|---|"]
    for name, entry in card["configurations"].items():
        lines.append(f"| {name} | {', '.join(map(str, entry['folds']))} | {_dims(entry['spacing'])} | "
                     f"{_dims(entry['patch_size'])} | {entry.get('network') or '-'} |")
    rows = [(f"{name} fold {fold}", scores) for name, entry in card["configurations"].items()
            for fold, scores in entry.get("cross_validation", {}).get("per_fold", {}).items()]
    rows += [(f"{name} (pooled)", scores) for name, scores in (card.get("pooled_cross_validation") or {}).items()]
    if rows:
        classes = list(dict.fromkeys(c for _, scores in rows for c in scores.get("per_class", {})))
        lines += ["", "## Cross-validation Dice", "", "| | " + " | ".join(classes) + " | foreground mean |",
                  "|---|" + "---|" * (len(classes) + 1)]
        for what, scores in rows:
            cells = [_cell(scores.get("per_class", {}).get(c)) for c in classes]
            lines.append(f"| {what} | " + " | ".join(cells) + f" | {_cell(scores.get('mean_foreground_dice'))} |")
    else:
        lines += ["", "No cross-validation scores were found in the model folder."]
    return "\n".join(lines) + "\n"


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _dims(values) -> str:
    return " x ".join(f"{v:g}" for v in values) if values else "-"
