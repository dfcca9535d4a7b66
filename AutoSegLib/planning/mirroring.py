"""Which patch axes to mirror: every axis (the method's default), but not left-right for patients seen
the same way round whose anatomy has sides.

nnU-Net mirrors each patch axis with probability 0.5 in training and averages the mirrored
predictions at test time. Across the patient's left-right axis that shows a patient whose
spleen is on the right, and a left kidney labelled ``kidney_left`` on the right. Where every
case is viewed along the same anatomical axes (a canonical plan: preprocessing/orientation.py)
the side of a structure is the most direct cue a network has, and mirroring takes it away:
the planner leaves the left-right axis out of ``mirror_axes`` when a label names a side
(``kidney_left``) or a class keeps to one side of every patient (the fingerprint's
``class_sides``: the spleen left, the liver right). Where arrays are used as stored, the same
structure lies on either side of the array in differently stored files, and mirroring stays:
there it was measured to help (BENCHMARKS.md, "Many classes on the CPU path").

Example:
    >>> side_labels({"background": 0, "kidney_left": 1, "kidney_right": 2, "liver": 3})
    ['kidney_left', 'kidney_right']
    >>> mirror_axes_without(2, 3), mirror_axes_without(2, 2)
    ([0, 1], [0])
"""

from __future__ import annotations

import re

# A side as a word of the name: kidney_left, Left-Hippocampus, lung_upper_lobe_right, iliac_artery_l,
# femur_R, LeftKidney; not "leftover", "bright" or "vertebrae_L1".
_SIDE = re.compile(r"(?:^|[^a-z])(?:left|right|lt|rt|l|r)(?:$|[^a-z0-9])")
_CAMEL = re.compile(r"(?:Left|Right)(?=[A-Z]|$)")
CANONICAL_LEFT_RIGHT = 2  # the canonical view's x axis runs towards the patient's left
# A class keeps to one side when its typical centre lies this share of the body's width off the
# middle (the fingerprint's class_sides; MR phantoms: spleen +0.25, liver -0.12, aorta +0.02).
LATERAL_OFFSET = 0.1


def names_a_side(name: str) -> bool:
    """True when the label name says left or right (as a word, a suffix or a CamelCase part)."""
    return bool(_SIDE.search(name.lower()) or _CAMEL.search(name))


def side_labels(labels: dict) -> list[str]:
    """The label names that say a side, in the labels' order (background and ignore never do)."""
    return [name for name in labels if name not in ("background", "ignore") and names_a_side(name)]


def mirror_axes_without(left_right: int, dims: int) -> list[int]:
    """Patch axes to mirror in a ``dims``-D configuration, leaving out the left-right planning axis.

    A 2D configuration's patch axes are planning axes 1 and 2 (slices are cut along axis 0).
    """
    first = 3 - dims
    return [axis - first for axis in range(first, 3) if axis != left_right]


def lateral_classes(sides: dict[str, float], threshold: float = LATERAL_OFFSET) -> dict[str, float]:
    """Classes whose typical centre lies ``threshold`` or more of the body's width off its middle."""
    return {name: offset for name, offset in sides.items() if abs(offset) >= threshold}


def mirroring_text(named: list[str], lateral: dict[str, float], axis_name: str) -> str:
    """The explain note: why the left-right axis is no longer mirrored, and which axis that is."""
    reasons = []
    if named:
        reasons.append(f"{len(named)} label(s) name a side ({_shown(named)}), and mirrored each would be taught on "
                       "both sides")
    if lateral:
        where = [f"{name} {'left' if offset > 0 else 'right'}" for name, offset in lateral.items()]
        reasons.append(f"{len(lateral)} class(es) keep to one side of every patient ({_shown(where)}), and a "
                       "mirrored patient, with them on the other side, never occurs")
    return (f"Training and test-time augmentation do not mirror across the patient's left-right axis ({axis_name}): "
            + "; ".join(reasons) + ". The other axes are mirrored as the method does.")


def _shown(items: list[str], shown: int = 6) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")
