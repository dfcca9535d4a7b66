"""New cases join the cross-validation folds without moving the old ones.

When a reviewed case is added to a dataset that has been trained on, its work folder already
holds ``splits_final.json``. Reshuffling the folds would move cases a model trained on into
validation and inflate its scores (MONAI Label users' complaint), so the file only grows:
every existing case keeps its fold, each new case goes to the fold with the fewest validation
cases (patient groups of ``dataset.json`` kept together). The engine's own rule
(:func:`AutoSegLib.training.splits.load_or_create_splits`) does exactly this and writes the file
atomically; it is applied here as soon as a case is added, so the user sees where it went, and
the engine reuses the file when it trains.
"""

from __future__ import annotations

from pathlib import Path

from AutoSegLib.dataset import open_dataset
from AutoSegLib.fileutil import read_json
from AutoSegLib.training import splits as engine_splits


def splits_path(work) -> Path:
    return Path(work) / engine_splits.SPLITS_FILE


def add_new_cases(dataset, work) -> dict[str, int]:
    """Place the dataset's cases that the folds do not know yet; returns ``{case: fold}`` of those.

    Does nothing (returns ``{}``) when the work folder has no splits yet: the first training
    run makes them from all cases.
    """
    path = splits_path(work)
    if not path.is_file():
        return {}
    before = {c for fold in read_json(path) for c in fold.get("val", [])}
    data = open_dataset(dataset)
    splits = engine_splits.load_or_create_splits(work, data.case_ids,
                                                 groups=engine_splits.groups_from_spec(data.spec.extra))
    return {c: f for f, fold in enumerate(splits) for c in fold["val"] if c not in before}


def fold_of(work, case_id: str) -> int | None:
    """The fold whose validation set holds ``case_id`` (None without splits or if not placed)."""
    path = splits_path(work)
    if not path.is_file():
        return None
    for f, fold in enumerate(read_json(path)):
        if case_id in fold.get("val", []):
            return f
    return None
