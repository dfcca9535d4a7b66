"""A model folder's cross-validation scores for its model card, read from the files training and
find-best wrote. Torch-free: ``autoseg export-model`` and the Slicer module's model library
(which builds cards of folders inside Slicer's GUI process) both use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from AutoSegLib.fileutil import read_json
from AutoSegLib.models.choice import fold_path
from AutoSegLib.names import CROSSVAL_DIR, ENSEMBLE_SEPARATOR, SUMMARY_FILE, VALIDATION_DIR
from AutoSegLib.sharing.card import dice_scores

POSTPROCESSED = ".postprocessed"  # find-best's suffix of a candidate scored with postprocessing


def fold_summaries(model_dir: str | Path, selection: dict[str, list],
                   on_error: Callable[[Path, Exception], None] | None = None) -> dict:
    """``{(configuration, fold): validation summary}`` of the selected folds that have one.

    ``on_error(path, exc)`` hears of an unreadable summary, which is left out.
    """
    found = {}
    for name, folds in selection.items():
        for fold in folds:
            path = fold_path(model_dir, name, fold) / VALIDATION_DIR / SUMMARY_FILE
            if not path.is_file():
                continue
            try:
                found[(name, str(fold))] = read_json(path)
            except (OSError, ValueError) as exc:
                if on_error is not None:
                    on_error(path, exc)
    return found


def pooled_scores(model_dir: str | Path, selection: dict[str, list], plan: dict | None) -> dict:
    """Pooled cross-validation Dice of find-best's candidates made only of selected configurations;
    without ``crossval/``, the scores the inference plan recorded."""
    pooled = {}
    folder = Path(model_dir) / CROSSVAL_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        candidate = path.name[:-len(".json")]
        members = candidate.replace(POSTPROCESSED, "").split(ENSEMBLE_SEPARATOR)
        if not all(member in selection for member in members):
            continue
        try:
            scores = dice_scores(read_json(path))
        except (OSError, ValueError):
            continue
        if scores is not None:
            pooled[candidate.replace(POSTPROCESSED, " + postprocessing")] = scores
    if not pooled and plan is not None:
        pooled = {name: scores for name, scores in (plan.get("cross_validation") or {}).items()
                  if isinstance(scores, dict) and all(m in selection for m in name.split(ENSEMBLE_SEPARATOR))}
    return pooled
