"""Connected-component postprocessing: keep only the largest component of the foreground or a class.

Whether to apply it is decided empirically on the cross-validation predictions
(:mod:`AutoSegLib.evaluation.selection`); this module only applies a decision.

Components are connected through faces, edges and corners (26 neighbours in 3D, 8 in 2D), as
in nnU-Net v2 (nnU-Net v1 used faces only). Full connectivity keeps a thin, obliquely running
structure such as a vessel in one piece instead of cutting it into "small components" that
would then be deleted. When several components share the largest size, all of them are kept
(also nnU-Net v2's rule): nothing but size decides, so the result does not depend on voxel order.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SPEC_KEYS = ("largest_component_foreground", "largest_component_classes")


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """``mask`` reduced to its largest connected component (full connectivity); empty stays empty.

    Example:
        >>> keep_largest_component(np.array([1, 1, 0, 1], bool)).astype(int).tolist()
        [1, 1, 0, 0]
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background
    return np.isin(components, np.flatnonzero(sizes == sizes.max()))


def _check_spec(spec: dict) -> None:
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ValueError(f"postprocessing: unknown key(s) {sorted(unknown)}; known: {', '.join(SPEC_KEYS)}")
    classes = spec.get("largest_component_classes", [])
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, int) and c > 0 for c in classes):
        raise ValueError(f"postprocessing: 'largest_component_classes' must be a list of label values > 0, "
                         f"found {classes!r}")


def apply_postprocessing(labels: np.ndarray, spec: dict) -> np.ndarray:
    """Apply a postprocessing decision to a label map; returns a new array, same dtype.

    ``spec`` is ``inference_plan.json``'s ``postprocessing``:
    ``{"largest_component_foreground": bool, "largest_component_classes": [int, ...]}``
    (missing keys mean no postprocessing). The foreground step comes first: every foreground
    voxel outside the largest component of all foreground classes together becomes
    background. Then, for each listed class, its voxels outside its own largest component
    become background.
    """
    _check_spec(spec)
    result = np.array(labels, copy=True)
    if spec.get("largest_component_foreground", False):
        foreground = result > 0
        result[foreground & ~keep_largest_component(foreground)] = 0
    for value in spec.get("largest_component_classes", []):
        mask = result == value
        result[mask & ~keep_largest_component(mask)] = 0
    return result
