"""Cross-validation folds: ``splits_final.json``, written once per work folder and reused.

The file is nnU-Net v2's: a JSON list with one ``{"train": [...], "val": [...]}`` per fold.
Without patient groups the folds are exactly nnU-Net v2's (scikit-learn ``KFold`` with
shuffle and seed 12345 over the sorted case ids), so results compare fold by fold.

- **Written once.** Later runs reuse the file. When cases are added to the dataset, the
  existing assignments are kept and only the new cases are placed (each in the fold with the
  fewest validation cases). Existing folds are never reshuffled: reshuffling after a retrain
  moves cases the old model trained on into validation and inflates the scores (a known
  complaint about MONAI Label's retraining). Cases removed from the dataset are dropped.
- **Patient groups.** Two scans of one patient in different folds leak the patient into
  validation. A dataset declares groups with an optional ``case_groups`` object in
  ``dataset.json`` mapping case id -> group id (e.g. a patient id); cases not listed are
  their own group. All cases of a group land in one fold. The same mapping can come from a
  JSON file given on the command line (:func:`load_groups`).
- **Fold "all"** trains on every case and validates on every case (so the validation
  numbers only show that training worked, not how well it generalizes); it needs no
  splits file. It is what a dataset with fewer cases than folds can train.
- **Fewer cases (or groups) than folds is an error** naming the counts, rather than quietly
  making fewer folds: fold numbers would stop meaning the same thing across datasets.
- **A user-supplied splits file** (:func:`load_splits`) must mention every case in every
  fold, in train or val but not both; every problem is reported at once, naming the ids.

Example:
    >>> splits = make_splits([f"case_{i}" for i in range(10)], n_folds=5)
    >>> [len(f["val"]) for f in splits]
    [2, 2, 2, 2, 2]
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

from AutoSegLib.fileutil import read_json, write_json
from AutoSegLib.names import SPLITS_FILE  # noqa: F401 (re-exported)

GROUPS_KEY = "case_groups"
ALL_FOLDS = "all"
DEFAULT_SEED = 12345


class SplitsError(ValueError):
    """The folds cannot be made or used; the message names the ids involved."""


def _repeated(ids: Iterable[str]) -> set[str]:
    return {i for i, n in Counter(ids).items() if n > 1}


def _show(ids: Iterable[str], limit: int = 10) -> str:
    ids = sorted(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"[{shown}]" + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def kfold_val_indices(n: int, n_folds: int, seed: int) -> list[list[int]]:
    """Validation indices per fold, identical to ``sklearn.model_selection.KFold(n_folds,
    shuffle=True, random_state=seed)``: a seeded shuffle cut into consecutive chunks, the
    first ``n % n_folds`` chunks one longer, each returned sorted."""
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = [n // n_folds + (1 if f < n % n_folds else 0) for f in range(n_folds)]
    bounds = np.cumsum([0, *sizes])
    return [sorted(int(i) for i in order[bounds[f]:bounds[f + 1]]) for f in range(n_folds)]


def _check_ids(case_ids: Sequence[str], n_folds: int) -> list[str]:
    ids = sorted(case_ids)
    duplicates = _repeated(ids)
    if duplicates:
        raise SplitsError(f"duplicate case ids {_show(duplicates)}")
    if n_folds < 2:
        raise SplitsError(f"need at least 2 folds for cross-validation, got {n_folds} (use fold 'all' instead)")
    return ids


def _group_members(ids: Sequence[str], groups: Mapping[str, Hashable] | None) -> dict[tuple, list[str]]:
    # Ungrouped cases are keyed apart from named groups, so a case id never collides with a group id.
    groups = groups or {}
    unknown = set(groups) - set(ids)
    if unknown:
        raise SplitsError(f"case groups name cases that are not in the dataset: {_show(unknown)}")
    members: dict[tuple, list[str]] = {}
    for case_id in ids:
        key = ("group", str(groups[case_id])) if case_id in groups else ("case", case_id)
        members.setdefault(key, []).append(case_id)
    return members


def _assign_groups(members: Mapping[tuple, list[str]], fold_vals: list[list[str]], seed: int) -> None:
    """Place whole groups, largest first, each in the fold with the fewest validation cases.

    A seeded shuffle before the (stable) size sort decides among groups of equal size, so
    the folds are deterministic but not alphabetical.
    """
    keys = sorted(members)
    order = [keys[i] for i in np.random.RandomState(seed).permutation(len(keys))]
    order.sort(key=lambda k: -len(members[k]))
    for key in order:
        fold = min(range(len(fold_vals)), key=lambda f: (len(fold_vals[f]), f))
        fold_vals[fold].extend(members[key])


def _folds_from_vals(ids: Sequence[str], fold_vals: list[list[str]]) -> list[dict[str, list[str]]]:
    splits = []
    for val in fold_vals:
        val_set = set(val)
        splits.append({"train": [i for i in sorted(ids) if i not in val_set], "val": sorted(val)})
    return splits


def make_splits(case_ids: Sequence[str], n_folds: int = 5, seed: int = DEFAULT_SEED,
                groups: Mapping[str, Hashable] | None = None) -> list[dict[str, list[str]]]:
    """``n_folds`` folds whose validation sets are disjoint and cover every case.

    Without groups (or when no group has more than one case) the folds equal nnU-Net v2's.
    With groups, whole groups are dealt out so the folds hold similar numbers of cases.
    """
    ids = _check_ids(case_ids, n_folds)
    members = _group_members(ids, groups)
    if len(members) < n_folds:
        what = "cases" if len(members) == len(ids) else "patient groups"
        raise SplitsError(f"only {len(members)} {what} for {n_folds} folds; train fold 'all' or use fewer folds")
    if all(len(m) == 1 for m in members.values()):
        fold_vals = [[ids[i] for i in fold] for fold in kfold_val_indices(len(ids), n_folds, seed)]
    else:
        fold_vals = [[] for _ in range(n_folds)]
        _assign_groups(members, fold_vals, seed)
    return _folds_from_vals(ids, fold_vals)


def _parse_splits(data, source: str) -> list[dict[str, list[str]]]:
    def is_id_list(value):
        return isinstance(value, list) and all(isinstance(i, str) for i in value)

    if not isinstance(data, list) or not data:
        raise SplitsError(f"{source}: must be a non-empty JSON list of {{\"train\": [...], \"val\": [...]}} folds")
    for f, fold in enumerate(data):
        if not isinstance(fold, dict) or not is_id_list(fold.get("train")) or not is_id_list(fold.get("val")):
            raise SplitsError(f"{source}: fold {f} must be an object with 'train' and 'val' lists of case ids")
    return [{"train": list(fold["train"]), "val": list(fold["val"])} for fold in data]


def splits_problems(splits: Sequence[Mapping[str, list[str]]], case_ids: Iterable[str]) -> list[str]:
    """Every problem of a splits list against the dataset's cases, one message per fold and kind."""
    ids = set(case_ids)
    problems = []
    for f, fold in enumerate(splits):
        train, val = fold["train"], fold["val"]
        checks = [
            ("unknown case ids (not in the dataset)", (set(train) | set(val)) - ids),
            ("cases in neither train nor val", ids - set(train) - set(val)),
            ("cases in both train and val", set(train) & set(val)),
            ("cases listed twice", _repeated(train) | _repeated(val)),
        ]
        problems += [f"fold {f}: {what} {_show(bad)}" for what, bad in checks if bad]
        if not train or not val:
            problems.append(f"fold {f}: empty {'train' if not train else 'val'} list")
    return problems


def load_splits(path: str | Path, case_ids: Iterable[str]) -> list[dict[str, list[str]]]:
    """Read and check a splits file (nnU-Net's format); raises SplitsError naming every problem."""
    path = Path(path)
    if not path.is_file():
        raise SplitsError(f"{path}: splits file not found")
    splits = _parse_splits(read_json(path), str(path))
    problems = splits_problems(splits, case_ids)
    if problems:
        raise SplitsError(f"{path}: " + "; ".join(problems))
    return splits


def _check_groups(fold_vals: list[list[str]], groups: Mapping[str, Hashable] | None, source: str) -> None:
    folds_of: dict[str, set[int]] = {}
    for f, val in enumerate(fold_vals):
        for case_id in val:
            if groups and case_id in groups:
                folds_of.setdefault(str(groups[case_id]), set()).add(f)
    problems = [f"group {g!r} is split over folds {sorted(fs)}" for g, fs in sorted(folds_of.items()) if len(fs) > 1]
    if problems:
        raise SplitsError(f"{source}: " + "; ".join(problems) + " (patient groups changed after the folds were "
                          "made; delete the file to make new folds, which changes every fold's result)")


def _extend_splits(splits, case_ids, groups, seed, source: str, log: Callable[[str], None]):
    """Keep every existing assignment; drop removed cases; deal out the new ones."""
    ids = sorted(case_ids)
    known = set(splits[0]["train"]) | set(splits[0]["val"])
    fold_vals = [list(fold["val"]) for fold in splits]
    covered = [c for val in fold_vals for c in val]
    if len(covered) != len(set(covered)) or set(covered) != known or splits_problems(splits, known):
        raise SplitsError(f"{source}: the folds do not partition the cases (edited by hand?), so the dataset's "
                          f"changes (added {_show(set(ids) - known)}, removed {_show(known - set(ids))}) cannot be "
                          "applied automatically; update the file yourself or delete it")
    removed = known - set(ids)
    if removed:
        fold_vals = [[c for c in val if c not in removed] for val in fold_vals]
        log(f"{source}: dropped cases no longer in the dataset: {_show(removed)}")
    _check_groups(fold_vals, groups, source)
    added = sorted(set(ids) - known)
    if added:
        fold_of = {c: f for f, val in enumerate(fold_vals) for c in val}
        members = _group_members(ids, groups)
        new = {}
        for key, cases in members.items():
            homes = {fold_of[c] for c in cases if c in fold_of}
            fresh = [c for c in cases if c not in fold_of]
            if homes and fresh:
                fold_vals[homes.pop()].extend(fresh)  # join the patient's other scans
            elif fresh:
                new[key] = fresh
        _assign_groups(new, fold_vals, seed)
        fold_of = {c: f for f, val in enumerate(fold_vals) for c in val}
        log(f"{source}: added new cases to folds: " + ", ".join(f"{c} -> {fold_of[c]}" for c in added))
    empty = [f for f, val in enumerate(fold_vals) if not val]
    if empty:
        raise SplitsError(f"{source}: fold(s) {empty} would have no validation case left; delete the file to make new folds")
    return _folds_from_vals(ids, fold_vals)


def load_or_create_splits(work_dir: str | Path, case_ids: Sequence[str], groups: Mapping[str, Hashable] | None = None,
                          n_folds: int = 5, seed: int = DEFAULT_SEED,
                          log: Callable[[str], None] | None = None) -> list[dict[str, list[str]]]:
    """The folds from ``work_dir/splits_final.json``, creating or extending the file as needed.

    The file is rewritten (atomically) only when it is created or the dataset's cases
    changed; ``log`` receives one message per change. An existing file wins over
    ``n_folds`` and ``seed``, which only apply when the file is made.
    """
    log = log or (lambda message: None)
    path = Path(work_dir) / SPLITS_FILE
    if not path.is_file():
        splits = make_splits(case_ids, n_folds, seed, groups)
        write_json(path, splits)
        log(f"{path}: created {n_folds} folds for {len(case_ids)} cases")
        return splits
    _check_ids(case_ids, 2)
    splits = _parse_splits(read_json(path), str(path))
    known = set(splits[0]["train"]) | set(splits[0]["val"])
    if known == set(case_ids):
        problems = splits_problems(splits, case_ids)
        if problems:
            raise SplitsError(f"{path}: " + "; ".join(problems) + " (fix the file, or delete it to make new folds)")
        _check_groups([fold["val"] for fold in splits], groups, str(path))
        return splits
    extended = _extend_splits(splits, case_ids, groups, seed, str(path), log)
    write_json(path, extended)
    return extended


def parse_fold(text: str | int) -> int | str:
    """``"all"`` or a fold number from the command line."""
    if text == ALL_FOLDS:
        return ALL_FOLDS
    try:
        fold = int(text)
    except (TypeError, ValueError):
        raise SplitsError(f"fold must be a number (0, 1, ...) or 'all', got {text!r}") from None
    if fold < 0:
        raise SplitsError(f"fold must be a number (0, 1, ...) or 'all', got {text!r}")
    return fold


def fold_cases(splits: Sequence[Mapping[str, list[str]]] | None, fold: int | str,
               case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(train, val)`` case ids of ``fold``; fold ``"all"`` is every case for both (no splits needed)."""
    if fold == ALL_FOLDS:
        return sorted(case_ids), sorted(case_ids)
    if not splits or not isinstance(fold, int) or not 0 <= fold < len(splits):
        n = len(splits or [])
        raise SplitsError(f"fold {fold!r} does not exist; the splits have folds 0..{n - 1} and 'all'")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def parse_groups(data, source: str) -> dict[str, str]:
    """A case id -> group id mapping; group ids may be strings or integers (stored as strings)."""
    if not isinstance(data, dict):
        raise SplitsError(f"{source}: case groups must be a JSON object mapping case id -> group id")
    bad = {k: v for k, v in data.items() if isinstance(v, bool) or not isinstance(v, (str, int))}
    if bad:
        raise SplitsError(f"{source}: group ids must be strings or integers, found {bad}")
    return {str(k): str(v) for k, v in data.items()}


def groups_from_spec(spec_extra: Mapping) -> dict[str, str] | None:
    """The ``case_groups`` of dataset.json (``DatasetSpec.extra``), or None when not declared."""
    if GROUPS_KEY not in spec_extra:
        return None
    return parse_groups(spec_extra[GROUPS_KEY], f"dataset.json '{GROUPS_KEY}'")


def load_groups(path: str | Path) -> dict[str, str]:
    """Case groups from a JSON file: ``{"case_id": "patient_id", ...}`` (or dataset.json's key)."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get(GROUPS_KEY), dict):
        data = data[GROUPS_KEY]
    return parse_groups(data, str(path))
