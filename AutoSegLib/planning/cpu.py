"""``3d_cpu``: the configuration sized for training on a CPU. AutoSeg's addition to the plans.

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
  class keeps ``MIN_VOXELS_ACROSS`` (4) voxels across; then the patch covers part of the image
  and prediction slides over more windows, the price of seeing a rib or a renal artery;
* **width**: 16 feature maps at full resolution instead of 32, doubling per stage as usual
  (the first stages dominate the cost: 3x faster per iteration, 0.38 vs 1.14 s at 20x48x56);
* **batch**: 2, the method's minimum.

**3D or 2D.** Where the thinnest class holds the spacing so fine that a 3D patch of a CPU's
size sees less than ``MIN_3D_COVERAGE`` of the typical image, ``3d_cpu`` is planned as a 2D
network instead (:func:`configure_cpu_2d`): whole slices at the in-plane spacing (coarsened by
the same rule, in plane only), 16 base features, and a batch of slices worth about
``CPU_2D_STEP_PIXELS`` pixels a step. On the many-class phantoms (31 structures, 29% coverage
in 3D) 10 minutes on 2 cores gave a held-out mean Dice of 0.78 in 2D against 0.69 in 3D
(BENCHMARKS.md, "Whole slices when a 3D patch sees a corner"). The name stays: ``autoseg train
DATASET 3d_cpu FOLD`` is the configuration a CPU user should train, whichever it is.

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
# A class keeps at least this many voxels across its thickness (2 x its radius): at two it is
# found but its boundary is a voxel either way (issue 14: a 3 mm CT coarsened to 5.9 mm lost
# ribs and vessels - 27 of 41 structures never predicted). Four, measured against two at the
# same cost per iteration (BENCHMARKS.md, "Four voxels across"): MR phantoms' test kidneys
# 0.41 -> 0.64 (fold 0) and 0.43 -> 0.54 (fold 1), the CT demo's mean 0.852 -> 0.874.
MIN_VOXELS_ACROSS = 4
# A 3D patch of a CPU's size that sees less of the typical image than this trains worse, in the
# same minutes, than a 2D network on whole slices: the many-class phantoms' 3D patch saw 29% and
# ended 0.09-0.11 below 2D (validation and test cases). The CT and MR phantoms' sees 70% and
# keeps 3D: in 2D the MR kidneys fell to 0.60 on one fold's validation cases (0.72 in 3D).
MIN_3D_COVERAGE = 0.5
# Pixels in a 2D training step on a CPU (batch x patch): batch 12 of 96 x 96 slices takes
# 0.25-0.35 s on 2 cores with 16 base features, about half a 3D step of 2 x 20 x 56 x 64.
CPU_2D_STEP_PIXELS = 110_000


def cpu_features(n_stages: int, spatial_dims: int = 3) -> list[int]:
    """16 maps at full resolution, doubling per stage, capped like the blueprint (320 in 3D, 512 in 2D)."""
    return [min(CPU_BASE_FEATURES * 2 ** i, MAX_FEATURES[spatial_dims]) for i in range(n_stages)]


def coverage(patch: tuple[int, ...], median: tuple[int, ...]) -> float:
    """The share of a typical image of ``median`` voxels one ``patch`` sees (at most 1)."""
    return min(1.0, math.prod(patch) / float(math.prod(median)))


def patch_coverage(stage: StagePlan) -> float:
    """The share of the typical image one patch of ``stage`` sees (at most 1)."""
    return coverage(stage.patch_size, stage.median_shape)


def prefer_2d(three_d: StagePlan) -> bool:
    """Plan 3d_cpu in 2D: its 3D patch would see less than ``MIN_3D_COVERAGE`` of the typical image."""
    return patch_coverage(three_d) < MIN_3D_COVERAGE


def cpu_2d_batch(patch: tuple[int, ...], dataset_pixels: int) -> int:
    """Slices per step: about ``CPU_2D_STEP_PIXELS`` pixels, at most 5% of the dataset, at least 2.

    Example:
        >>> cpu_2d_batch((96, 96), 10**7), cpu_2d_batch((256, 256), 10**7), cpu_2d_batch((96, 96), 10**5)
        (12, 2, 2)
    """
    wanted = max(1, int(round(CPU_2D_STEP_PIXELS / math.prod(patch))))
    return rules.final_batch_size(wanted, rules.batch_cap(dataset_pixels, patch))[0]


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
    topology, shrinks = cpu_patch(spacing, median)
    notes: list[dict] = []
    note(notes, "remark", message=_spacing_text(target, median_full, spacing, shape, median, steps, stopped,
                                                thinnest, radii))
    if thinnest and _thin_between_slices(target, thinnest[1]):
        note(notes, "remark", message=(
            f"The slices are {max(target):.2f} mm apart, {max(target) / min(target):.1f}x the in-plane spacing and "
            f"more than the thinnest class ({thinnest[0]}) is thick: a 3D network sees it on one slice at a time. "
            "The 2d configuration, trained slice by slice at the in-plane spacing, is the other CPU choice for such "
            "data; train both and let `autoseg find-best` compare them."))
    seen = coverage(topology.patch_size, median)  # as patch_coverage, which decides 2D
    note(notes, "remark", message=(
        f"Patch {_vox(topology.patch_size)} voxels ({seen:.0%} of the typical image"
        + (f", shrunk {shrinks} step(s) to stay near {CPU_PATCH_VOXELS:,} voxels" if shrinks else "")
        + f"), batch {CPU_BATCH_SIZE}, {CPU_BASE_FEATURES} feature maps at full resolution (half the blueprint's "
          "32, about 3x less computation per iteration)."
        + (f" The patch sees at least {MIN_3D_COVERAGE:.0%} of the typical image, so 3d_cpu stays 3D (below that "
           "it would be planned as a 2D network on whole slices)." if seen >= MIN_3D_COVERAGE else "")))
    return StagePlan(tuple(float(s) for s in spacing), median, topology, CPU_BATCH_SIZE, 0, 0.0, notes)


def cpu_patch(spacing, median: tuple[int, ...]):
    """(topology, shrinks): the whole typical image, shrunk one step at a time to ``CPU_PATCH_VOXELS``."""
    topology = plan_topology(spacing, median)
    shrinks = 0
    while math.prod(topology.patch_size) > CPU_PATCH_VOXELS:
        topology = shrink_once(topology, spacing, axis_to_shrink(topology.patch_size, median))
        shrinks += 1
    return topology, shrinks


def configure_cpu_2d(spacing, median_shape, num_cases: int, radii: dict[str, float] | None,
                     three_d: StagePlan) -> StagePlan:
    """Plan ``3d_cpu`` as a 2D network on the two trailing axes (where :func:`prefer_2d` says so).

    ``spacing`` and ``median_shape`` are the 2d configuration's 3D inputs (the median spacing
    and the typical image at it, planning axis order): slices are not resampled across. In
    plane the spacing is coarsened as in 3D until a typical slice has at most
    ``CPU_IMAGE_VOXELS`` pixels, never past the thinnest class's limit. ``three_d`` is the 3D
    plan it replaces, for the explanation.
    """
    spacing, median3 = np.asarray(spacing, float), rounded_shape(median_shape)
    thinnest = thinnest_class(radii)
    limit = coarsest_spacing(thinnest[1]) if thinnest else None
    in_plane, shape, steps, _ = cpu_spacing(spacing[1:], np.asarray(median3[1:], float), limit)
    median = rounded_shape(shape)
    topology, shrinks = cpu_patch(in_plane, median)
    batch = cpu_2d_batch(topology.patch_size, math.prod(median) * median3[0] * num_cases)
    notes: list[dict] = []
    note(notes, "remark", message=_why_2d(three_d, thinnest))
    kept = (f"; the thinnest class, {thinnest[0]} (radius {thinnest[1]:.2f} mm), keeps at least "
            f"{MIN_VOXELS_ACROSS} voxels across" if thinnest else "")
    where = (f"coarsened from {_mm(spacing[1:])} to {_mm(in_plane)} mm so that a typical slice fits about "
             f"{CPU_IMAGE_VOXELS:,} pixels" if steps else f"{_mm(in_plane)} mm, the median in-plane spacing")
    note(notes, "remark", message=(
        f"In plane the spacing is {where}{kept}; slices are not resampled across. Patch {_vox(topology.patch_size)} "
        f"pixels ({coverage(topology.patch_size, median):.0%} of the typical slice, {_vox(median)}"
        + (f"; shrunk {shrinks} step(s) to stay near {CPU_PATCH_VOXELS:,} pixels" if shrinks else "")
        + f"), batch {batch} slices (about {CPU_2D_STEP_PIXELS:,} pixels a step), {CPU_BASE_FEATURES} feature maps "
          "at full resolution."))
    return StagePlan(tuple(float(v) for v in in_plane), median, topology, batch, 0, 0.0, notes)


def _why_2d(three_d: StagePlan, thinnest) -> str:
    held = (f"keeping the thinnest class, {thinnest[0]} (radius {thinnest[1]:.2f} mm), {MIN_VOXELS_ACROSS} voxels "
            "across holds" if thinnest else "the typical image holds")
    return (f"For training on a CPU, 3d_cpu is a 2D network here, trained on whole slices like 2d but at a CPU's "
            f"size. In 3D, {held} the spacing at {_mm(three_d.spacing)} mm, where a patch a CPU trains in under a "
            f"second ({_vox(three_d.patch_size)} voxels) sees {patch_coverage(three_d):.0%} of the typical image "
            f"({_vox(three_d.median_shape)}). Under {MIN_3D_COVERAGE:.0%}, whole slices learn more in the same "
            "minutes (many-class phantoms, 10 minutes on 2 cores: held-out mean Dice 0.78 in 2D against 0.69 in "
            "3D). 3d_fullres on a GPU keeps the 3D context.")


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
