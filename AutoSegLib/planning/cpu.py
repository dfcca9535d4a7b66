"""``3d_cpu``: a 3D configuration sized for training on a CPU. AutoSeg's addition to the plans.

The method sizes its configurations for a GPU's memory. On a CPU the limit is time: the CT
phantoms' 3d_fullres plan (patch 40x96x112, 32 base features) costs about 14 s per training
iteration on 2 cores, so the paper's schedule would take years and even a quick one learns
only the liver. ``3d_cpu`` keeps every rule of the method (topology, kernels, normalization,
resampling, augmentation) and changes three sizes, each measured on that machine
(``benchmarks/bench_training.py``, docs/decisions.md):

* **spacing**: coarsened from the full-resolution spacing by the low-resolution stage's own
  procedure (1% steps, finer axes first while anisotropic) until the typical image has at most
  ``CPU_IMAGE_VOXELS`` voxels, so one patch still sees the whole typical image;
* **width**: 16 feature maps at full resolution instead of 32, doubling per stage as usual
  (the first stages dominate the cost: 3x faster per iteration, 0.38 vs 1.14 s at 20x48x56);
* **batch**: 2, the method's minimum.

The price is resolution: structures a few voxels thin at full resolution (small vessels,
small lesions) come out coarser. Train 3d_fullres on a GPU when they matter.
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


def cpu_features(n_stages: int) -> list[int]:
    """16 maps at full resolution, doubling per stage, capped like the 3D blueprint (320)."""
    return [min(CPU_BASE_FEATURES * 2 ** i, MAX_FEATURES[3]) for i in range(n_stages)]


def cpu_spacing(target: np.ndarray, median_full: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Coarsen ``target`` until the typical image fits ``CPU_IMAGE_VOXELS``; (spacing, shape, steps).

    Never finer than the full-resolution spacing: a small dataset keeps its resolution.
    """
    spacing = np.asarray(target, dtype=float)
    shape = np.asarray(median_full, dtype=float)
    steps = 0
    while float(np.prod(shape)) > CPU_IMAGE_VOXELS:
        spacing = rules.lowres_spacing_step(spacing)
        shape = np.asarray(target) / spacing * np.asarray(median_full, dtype=float)
        steps += 1
        if steps > MAX_STEPS:
            raise PlanningError(f"3d_cpu spacing search did not converge (spacing {spacing.tolist()})")
    return spacing, shape, steps


def configure_cpu(target, median_full, axes: list[str]) -> StagePlan:
    """Plan ``3d_cpu`` from the full-resolution spacing and typical image (planning axis order)."""
    spacing, shape, steps = cpu_spacing(np.asarray(target, float), np.asarray(median_full, float))
    median = rounded_shape(shape)
    topology = plan_topology(spacing, median)
    shrinks = 0
    while math.prod(topology.patch_size) > CPU_PATCH_VOXELS:
        topology = shrink_once(topology, spacing, axis_to_shrink(topology.patch_size, median))
        shrinks += 1
    notes: list[dict] = []
    full_voxels = float(np.prod(median_full))
    if steps:
        text = (f"For training on a CPU: the spacing is coarsened from {_mm(target)} to {_mm(spacing)} mm so that "
                f"the typical image ({_vox(median)} voxels, {full_voxels / np.prod(shape):.1f}x fewer than at full "
                f"resolution) fits about {CPU_IMAGE_VOXELS:,} voxels, what a CPU trains on in well under a second "
                "per iteration. Thin structures lose detail; train 3d_fullres on a GPU when they matter.")
    else:
        text = (f"For training on a CPU: the typical image already fits about {CPU_IMAGE_VOXELS:,} voxels at the "
                f"full-resolution spacing ({_mm(spacing)} mm), so the spacing is kept.")
    note(notes, "remark", message=text)
    coverage = math.prod(topology.patch_size) / float(np.prod(shape))
    note(notes, "remark", message=(
        f"Patch {_vox(topology.patch_size)} voxels ({min(coverage, 1.0):.0%} of the typical image"
        + (f", shrunk {shrinks} step(s) to stay near {CPU_PATCH_VOXELS:,} voxels" if shrinks else "")
        + f"), batch {CPU_BATCH_SIZE}, {CPU_BASE_FEATURES} feature maps at full resolution (half the blueprint's "
          "32, about 3x less computation per iteration)."))
    return StagePlan(tuple(float(s) for s in spacing), median, topology, CPU_BATCH_SIZE, 0, 0.0, notes)


def _mm(values) -> str:
    return " x ".join(f"{float(v):.2f}" for v in values)


def _vox(values) -> str:
    return " x ".join(str(int(v)) for v in values)
