"""Segment names -> dataset label values, and the colour every label is shown in.

A dataset's ``labels`` table (``dataset.json``) is the single source of label values. Rules:

- A segment is matched to a label by name, ignoring letter case and repeated spaces, so
  "Liver" and "liver " are the same structure; the table keeps the first spelling seen.
- A new name gets the next free value; existing values never change, so cases already in
  the dataset (and a model trained on them) keep meaning what they meant.
- ``background`` is 0. ``ignore`` (unannotated voxels) must be the highest value (nnU-Net's
  rule), so once a dataset has it, a new structure cannot be added without renumbering it:
  that is refused, naming the new structures, instead of rewriting existing label files.

Colours are fixed: a structure with a standard terminology (:mod:`.terminology`) has its
recommended colour (Slicer's GenericAnatomyColors), a few other names a colour of their own,
anything else a colour from a fixed palette by its label value, so a label looks the same in
every case and result.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from AutoSegLib.dataset import IGNORE_LABEL_NAME

BACKGROUND = "background"

# Colours (RGB 0-1) of common structures, close to Slicer's GenericAnatomyColors.
_NAMED_COLOURS = {
    "liver": (0.87, 0.51, 0.40), "spleen": (0.62, 0.37, 0.54), "kidney": (0.73, 0.41, 0.26),
    "kidneys": (0.73, 0.41, 0.26), "left kidney": (0.73, 0.41, 0.26), "right kidney": (0.80, 0.48, 0.30),
    "aorta": (0.88, 0.26, 0.24), "liver_lesion": (0.56, 0.94, 0.36), "lesion": (0.56, 0.94, 0.36),
    "tumor": (0.56, 0.94, 0.36), "tumour": (0.56, 0.94, 0.36), "pancreas": (0.98, 0.83, 0.54),
    "lung": (0.77, 0.89, 1.00), "lungs": (0.77, 0.89, 1.00), "heart": (0.81, 0.37, 0.34),
    "bone": (0.95, 0.84, 0.57), "brain": (0.98, 0.91, 0.85), "prostate": (0.85, 0.74, 0.62),
    "bladder": (0.85, 0.73, 0.38), "stomach": (0.85, 0.73, 0.60), "gallbladder": (0.54, 0.67, 0.34),
}
# A fixed palette for every other label, by value (value 1 takes the first entry).
_PALETTE = [
    (0.50, 0.68, 0.50), (0.94, 0.71, 0.50), (0.69, 0.48, 0.40), (0.44, 0.74, 0.82), (0.85, 0.40, 0.80),
    (0.98, 0.80, 0.30), (0.30, 0.55, 0.90), (0.90, 0.35, 0.35), (0.55, 0.85, 0.45), (0.65, 0.50, 0.95),
    (0.35, 0.80, 0.70), (0.95, 0.55, 0.65), (0.70, 0.70, 0.30), (0.40, 0.40, 0.75), (0.85, 0.60, 0.25),
]
IGNORE_COLOUR = (0.5, 0.5, 0.5)


class LabelError(ValueError):
    """Segment names cannot be given label values; the message names the case and the names."""


def normalise(name: str) -> str:
    return " ".join(name.split()).lower()


def value_of(labels: Mapping[str, int], name: str) -> int | None:
    """The value of ``name`` in ``labels`` (case-insensitive), or None if it has none yet."""
    wanted = normalise(name)
    for known, value in labels.items():
        if normalise(known) == wanted:
            return value
    return None


def extend_labels(labels: Mapping[str, int], names: Iterable[str], need_ignore: bool = False,
                  case: str = "") -> tuple[dict[str, int], list[str]]:
    """``labels`` with values for every name (and ``ignore`` if needed); also the names added.

    Raises:
        LabelError: a new structure would have to be numbered above an existing ``ignore``.
    """
    table = dict(labels) if labels else {BACKGROUND: 0}
    fresh = []
    for name in names:
        if not name.strip():
            raise LabelError(f"case '{case}': a segment has an empty name; name every segment")
        if value_of(table, name) is None and normalise(name) not in map(normalise, fresh):
            fresh.append(" ".join(name.split()))
    new_structures = [n for n in fresh if normalise(n) != IGNORE_LABEL_NAME]
    has_ignore = IGNORE_LABEL_NAME in table
    if has_ignore and new_structures:
        raise LabelError(f"case '{case}': new structure(s) {new_structures} cannot be added because the dataset "
                         f"already has an '{IGNORE_LABEL_NAME}' label (value {table[IGNORE_LABEL_NAME]}), which must "
                         "stay the highest value; add every structure name before marking cases as partially "
                         "annotated, or start a new dataset")
    for name in new_structures:
        table[name] = max(v for k, v in table.items() if k != IGNORE_LABEL_NAME) + 1
    wants_ignore = need_ignore or any(normalise(n) == IGNORE_LABEL_NAME for n in fresh)
    if wants_ignore and not has_ignore:
        table[IGNORE_LABEL_NAME] = max(table.values()) + 1
        new_structures.append(IGNORE_LABEL_NAME)
    return table, new_structures


def colour_of(name: str, value: int) -> tuple[float, float, float]:
    """The fixed display colour of a label (RGB, 0-1)."""
    from AutoSegLogic.terminology import standard_entry

    key = normalise(name)
    if key == IGNORE_LABEL_NAME:
        return IGNORE_COLOUR
    entry = standard_entry(name)
    if entry and entry.get("color"):
        return tuple(c / 255.0 for c in entry["color"])
    if key in _NAMED_COLOURS:
        return _NAMED_COLOURS[key]
    return _PALETTE[(max(value, 1) - 1) % len(_PALETTE)]


def foreground(labels: Mapping[str, int]) -> list[tuple[str, int]]:
    """``(name, value)`` of the structures a model predicts, by value (no background, no ignore)."""
    return sorted(((n, v) for n, v in labels.items() if v != 0 and n != IGNORE_LABEL_NAME), key=lambda nv: nv[1])
