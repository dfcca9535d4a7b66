"""``3d_cpu``: a 3D configuration sized for training on a CPU. AutoSeg's addition to the plans.

The method sizes its configurations for a GPU's memory. On a CPU the limit is time: the CT
phantoms' 3d_fullres plan (patch 40x96x112, 32 base features) costs about 14 s per training
iteration on 2 cores, so the paper's schedule would take years and even a quick one learns
only the liver. ``3d_cpu`` keeps every rule of the method (topology, kernels, normalization,
resampling, augmentation) and changes three sizes, each measured on that machine
(``benchmarks/bench_training.py``, docs/decisions.md):

* **spacing**: coarsened from the full-resolution spacing by the low-resolution stage's own
  procedure (1% steps, finer axes first while anisotropic) until the typical image has at most
  ``CPU_IMAGE_VOXELS`` voxels, so one patch still sees the whole typical image - but never
  past the radius of the thinnest class (the fingerprint's ``class_radius_mm``), so every
  class keeps ``MIN_VOXELS_ACROSS`` voxels across; then the patch covers part of the image
  and prediction slides over more windows, the price of seeing a rib or a renal artery;
* **width**: 16 feature maps at full resolution instead of 32, doubling per stage as usual
  (the first stages dominate the cost: 3x faster per iteration, 0.38 vs 1.14 s at 20x48x56);
* **batch**: 2, the method's minimum.

Where no class is thin, the price is resolution at the boundaries only; where one is, the
spacing stops at it and the trade-off is stated in ``--explain``.
"""

from __future__ import annotations

import math

import numpy as np

from AutoSegLib.planning import rules
from AutoSegLib.planning.configure import StagePlan, axis_to_shrink, rounded_shape, shrink_once
from AutoSegLib.planning.explain import note
from AutoSegLib.planning.plans import PlanningError
from AutoSegLib.planning.topology import MAX_FEATURES, plan_topology

NAME = "3d_cpu"
# About 37 x 37 x 37 voxels: one training iteration of batch 2 in ~0.4 s on 2 cores (16 base features).
CPU_IMAGE_VOXELS = 50_000
# The padded patch may exceed the typical image by a divisibility step per axis; beyond this it shrinks.
CPU_PATCH_VOXELS = 80_000
CPU_BASE_FEATURES = 16
CPU_BATCH_SIZE = 2
MAX_STEPS = 1000  # 1.01^1000: 20,000x coarser per axis; only a bug gets here
# A class keeps at least this many voxels across its thickness (2 x its radius): at fewer it
# is one voxel wide or breaks up, and a network trained on it misses it (issue 14: a 3 mm CT
# coarsened to 5.9 mm lost ribs and vessels - 27 of 41 structures never predicted).
MIN_VOXELS_ACROSS = 4


def cpu_features(n_stages: int) -> list[int]:
    """16 maps at full resolution, doubling per stage, capped like the 3D blueprint (320)."""
    return [min(CPU_BASE_FEATURES * 2 ** i, MAX_FEATURES[3]) for i in range(n_stages)]


def thinnest_class(radii: dict[str, float] | None) -> tuple[str, float] | None:
    """(name, radius mm) of the class with the smallest median radius; None when unmeasured."""
    if not radii:
        return None
    name = min(sorted(radii), key=lambda n: radii[n])
    return name, float(radii[name])


def coarsest_spacing(radius_mm: float) -> float:
    """The coarsest spacing at which a class of ``radius_mm`` keeps ``MIN_VOXELS_ACROSS`` voxels across."""
    return 2.0 * radius_mm / MIN_VOXELS_ACROSS


def cpu_spacing(target: np.ndarray, median_full: np.ndarray,
                limit_mm: float | None = None) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Coarsen ``target`` until the typical image fits ``CPU_IMAGE_VOXELS``.

    Returns (spacing, shape, steps, stopped): ``stopped`` when ``limit_mm`` (the coarsest
    spacing the thinnest class allows) ended the search before the image fitted. Never finer
    than the full-resolution spacing, and an axis already coarser than the limit keeps its
    spacing: a small dataset keeps its resolution.
    """
    spacing = np.asarray(target, dtype=float)
    ceiling = np.maximum(spacing, limit_mm) if limit_mm is not None else np.full_like(spacing, np.inf)
    shape = np.asarray(median_full, dtype=float)
    steps = 0
    while float(np.prod(shape)) > CPU_IMAGE_VOXELS:
        coarser = np.minimum(rules.lowres_spacing_step(spacing), ceiling)
        if np.all(coarser <= spacing):
            return spacing, shape, steps, True
        spacing = coarser
        shape = np.asarray(target) / spacing * np.asarray(median_full, dtype=float)
        steps += 1
        if steps > MAX_STEPS:
            raise PlanningError(f"3d_cpu spacing search did not converge (spacing {spacing.tolist()})")
    return spacing, shape, steps, False


def configure_cpu(target, median_full, axes: list[str], radii: dict[str, float] | None = None) -> StagePlan:
    """Plan ``3d_cpu`` from the full-resolution spacing and typical image (planning axis order).

    ``radii``: class name -> median radius in mm (the fingerprint's ``class_radius_mm``);
    without it (an nnU-Net v2 fingerprint) the spacing is sized by the image alone, as before.
    """
    target, median_full = np.asarray(target, float), np.asarray(median_full, float)
    thinnest = thinnest_class(radii)
    limit = coarsest_spacing(thinnest[1]) if thinnest else None
    spacing, shape, steps, stopped = cpu_spacing(target, median_full, limit)
    median = rounded_shape(shape)
    topology = plan_topology(spacing, median)
    shrinks = 0
    while math.prod(topology.patch_size) > CPU_PATCH_VOXELS:
        topology = shrink_once(topology, spacing, axis_to_shrink(topology.patch_size, median))
        shrinks += 1
    notes: list[dict] = []
    note(notes, "remark", message=_spacing_text(target, median_full, spacing, shape, median, steps, stopped,
                                                thinnest, radii))
    if thinnest and _thin_between_slices(target, thinnest[1]):
        note(notes, "remark", message=(
            f"The slices are {max(target):.2f} mm apart, {max(target) / min(target):.1f}x the in-plane spacing and "
            f"more than the thinnest class ({thinnest[0]}) is thick: a 3D network sees it on one slice at a time. "
            "The 2d configuration, trained slice by slice at the in-plane spacing, is the other CPU choice for such "
            "data; train both and let `autoseg find-best` compare them."))
    coverage = math.prod(topology.patch_size) / float(np.prod(shape))
    note(notes, "remark", message=(
        f"Patch {_vox(topology.patch_size)} voxels ({min(coverage, 1.0):.0%} of the typical image"
        + (f", shrunk {shrinks} step(s) to stay near {CPU_PATCH_VOXELS:,} voxels" if shrinks else "")
        + f"), batch {CPU_BATCH_SIZE}, {CPU_BASE_FEATURES} feature maps at full resolution (half the blueprint's "
          "32, about 3x less computation per iteration)."))
    return StagePlan(tuple(float(s) for s in spacing), median, topology, CPU_BATCH_SIZE, 0, 0.0, notes)


def _spacing_text(target, median_full, spacing, shape, median, steps: int, stopped: bool, thinnest,
                  radii) -> str:
    """Why 3d_cpu has its spacing, in the user's words: what was coarsened, what was kept and why."""
    full_voxels = float(np.prod(median_full))
    if stopped:
        name, radius = thinnest
        fitted = cpu_spacing(target, median_full)[0]  # where the image alone would have taken it
        erased = sorted(n for n, r in radii.items() if 2 * r / float(fitted.min()) < MIN_VOXELS_ACROSS)
        head = ("coarsened from " + _mm(target) + " to " + _mm(spacing) + " mm and no further") if steps else \
            "kept at the full-resolution spacing (" + _mm(spacing) + " mm)"
        return (f"For training on a CPU: the spacing is {head}: the thinnest class, {name} (radius {radius:.2f} mm "
                f"over the training cases' median), keeps {MIN_VOXELS_ACROSS} voxels across. Sized by the image "
                f"alone it would be {_mm(fitted)} mm, where {len(erased)} class(es) would be under "
                f"{MIN_VOXELS_ACROSS} voxels across ({_names(erased)}). The price: the typical image has "
                f"{_vox(median)} voxels ({np.prod(shape) / CPU_IMAGE_VOXELS:.1f}x the {CPU_IMAGE_VOXELS:,} a patch "
                "covers whole), so each patch sees part of it and prediction slides over more windows.")
    note_thin = (f" The thinnest class, {thinnest[0]} (radius {thinnest[1]:.2f} mm), keeps at least "
                 f"{MIN_VOXELS_ACROSS} voxels across." if thinnest else
                 " (The fingerprint has no class radii - an nnU-Net v2 fingerprint? - so thin classes were not "
                 "checked.)")
    if steps:
        return (f"For training on a CPU: the spacing is coarsened from {_mm(target)} to {_mm(spacing)} mm so that "
                f"the typical image ({_vox(median)} voxels, {full_voxels / np.prod(shape):.1f}x fewer than at full "
                f"resolution) fits about {CPU_IMAGE_VOXELS:,} voxels, what a CPU trains on in well under a second "
                f"per iteration.{note_thin}")
    return (f"For training on a CPU: the typical image already fits about {CPU_IMAGE_VOXELS:,} voxels at the "
            f"full-resolution spacing ({_mm(spacing)} mm), so the spacing is kept.")


def _thin_between_slices(target, radius_mm: float) -> bool:
    """Thick slices (anisotropic beyond the method's threshold) and a class thinner than one of them."""
    target = np.asarray(target, float)
    return bool(target.max() / target.min() > rules.ANISOTROPY_THRESHOLD and 2 * radius_mm < target.max())


def _names(names: list[str], shown: int = 6) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _mm(values) -> str:
    return " x ".join(f"{float(v):.2f}" for v in values)


def _vox(values) -> str:
    return " x ".join(str(int(v)) for v in values)
