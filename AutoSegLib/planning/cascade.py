"""The 3D U-Net cascade: a low-resolution stage when the full-resolution patch sees too little.

Follows the paper and nnU-Net v1: starting from the full-resolution spacing, coarsen by 1%
per step (the finer axes first while the spacing is anisotropic), re-planning the network at
every step, until the low-resolution patch covers a quarter of the (shrinking) typical
image; keep the stage only if it at least halves the typical image. nnU-Net v2 steps by 3%
and compares patch and image by an approximation, so its low-resolution spacing differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from AutoSegLib.planning import rules
from AutoSegLib.planning.configure import StagePlan, configure_3d
from AutoSegLib.planning.explain import note
from AutoSegLib.planning.plans import PlanningError

# 1.01^1000 is 20,000x coarser per axis: far beyond any real search, so only a bug stops here.
MAX_LOWRES_STEPS = 1000


@dataclass
class CascadeDecision:
    lowres: StagePlan | None
    note: dict


def plan_cascade(full: StagePlan, target: np.ndarray, median_full: np.ndarray, num_cases: int,
                 n_channels: int, n_classes: int, gpu_memory_gb: float, axes: list[str]) -> CascadeDecision:
    """Decide whether to add 3d_lowres + 3d_cascade_fullres; plan 3d_lowres if so.

    ``target`` and ``median_full`` are the full-resolution spacing and the unrounded median
    image size, in planning axis order.
    """
    median_voxels = float(np.prod(median_full))
    patch_voxels = math.prod(full.patch_size)
    coverage = patch_voxels / median_voxels
    if not rules.needs_lowres(median_voxels, patch_voxels):
        return CascadeDecision(None, _decision(coverage, tried=False))
    spacing = np.asarray(target, dtype=float)
    lowres, steps, voxels = None, 0, median_voxels
    while not rules.lowres_covers_enough(voxels, patch_voxels):
        spacing = rules.lowres_spacing_step(spacing)
        steps += 1
        if steps > MAX_LOWRES_STEPS:
            raise PlanningError(f"low-resolution search did not converge after {steps} steps "
                                f"(spacing {spacing.tolist()})")
        shape = target / spacing * median_full
        voxels = float(np.prod(shape))
        lowres = configure_3d(spacing, shape, num_cases, n_channels, n_classes, gpu_memory_gb, axes,
                              source="coarsened from the full-resolution spacing for the low-resolution stage")
        patch_voxels = math.prod(lowres.patch_size)
    if lowres is None:  # the full-resolution patch covered exactly 1/4: nothing to coarsen
        return CascadeDecision(None, _decision(coverage, tried=True, kept=False, reduction=1.0, spacing=target))
    reduction = math.prod(full.median_shape) / math.prod(lowres.median_shape)
    kept = rules.keep_lowres(math.prod(lowres.median_shape), math.prod(full.median_shape))
    search = note([], "lowres_search", start=target, spacing=spacing, steps=steps, patch=lowres.patch_size,
                  median=lowres.median_shape, coverage=patch_voxels / voxels)
    lowres.notes.insert(1, search)
    decision = _decision(coverage, tried=True, kept=kept, reduction=reduction, spacing=spacing)
    return CascadeDecision(lowres if kept else None, decision)


def _decision(coverage: float, tried: bool, kept: bool = False, reduction: float = 1.0, spacing=None) -> dict:
    return note([], "cascade", coverage=coverage, tried=tried, kept=kept, reduction=reduction,
                lowres_spacing=spacing)
