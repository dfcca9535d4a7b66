"""Plan one configuration: patch size, network topology and batch size under the memory budget.

The patch starts as the whole typical (median) image after resampling, as the paper says,
and shrinks one divisibility step at a time on the axis largest relative to that image until
the network's memory estimate fits the budget; the batch then grows into what is left.
(nnU-Net v1's code started from a box of 512 voxels along the coarsest axis with the aspect
ratio of 1/spacing, clipped to the median image; for any image under 512 voxels along its
coarsest axis, i.e. the paper's datasets, that is the median image. v2 starts from a
256^3-voxel cube of the same aspect, which gives different plans.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from AutoSegLib.planning import memory, rules
from AutoSegLib.planning.explain import note
from AutoSegLib.planning.plans import PlanningError
from AutoSegLib.planning.topology import (BASE_FEATURES, MAX_FEATURES, MIN_FEATURE_MAP_EDGE, Topology,
                                          features_per_stage, plan_topology)


@dataclass
class StagePlan:
    """What ``configure_3d`` / ``configure_2d`` decide, in planning (transposed) axis order."""

    spacing: tuple[float, ...]
    median_shape: tuple[int, ...]
    topology: Topology
    batch_size: int
    estimate: int
    budget: float
    notes: list[dict] = field(default_factory=list)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.topology.patch_size


def rounded_shape(shape) -> tuple[int, ...]:
    """Median image size in whole voxels (at least 1 per axis)."""
    return tuple(max(1, int(round(float(s)))) for s in shape)


def axis_to_shrink(patch: tuple[int, ...], median: tuple[int, ...]) -> int:
    """The axis largest relative to the typical image, so the patch keeps its aspect ratio.

    Ties go to the last axis, as in v1 (x before y for square images).
    """
    ratios = [p / m for p, m in zip(patch, median)]
    best = max(ratios)
    return max(a for a, r in enumerate(ratios) if r == best)


def shrink_once(topology: Topology, spacing, axis: int) -> Topology:
    """Cut one axis by one divisibility step and re-plan the network for the smaller patch.

    The step is that of the reduced patch (it may pool one time fewer on that axis), so the
    cut is never larger than needed (v1).
    """
    trial = list(topology.patch_size)
    trial[axis] -= topology.divisor[axis]
    step = plan_topology(spacing, trial).divisor[axis] if trial[axis] > 0 else 1
    reduced = list(topology.patch_size)
    reduced[axis] -= step
    if reduced[axis] < MIN_FEATURE_MAP_EDGE:
        raise PlanningError(f"the GPU memory budget is too small: the patch would shrink to "
                            f"{'x'.join(map(str, reduced))} voxels and still not fit")
    return plan_topology(spacing, reduced)


def fit_patch(spacing, median: tuple[int, ...], estimate_of: Callable[[Topology, bool], int],
              budget: float, notes: list, axes: list[str]) -> tuple[Topology, int]:
    """Start from the median image and shrink until the memory estimate is within budget."""
    topology = plan_topology(spacing, median)
    estimate = estimate_of(topology, False)
    note(notes, "patch_start", axes=axes, start=median, patch=topology.patch_size,
         pools=topology.pools_per_axis, estimate=estimate, budget=budget)
    step = 0
    while estimate > budget:
        axis = axis_to_shrink(topology.patch_size, median)
        before = topology.patch_size[axis]
        topology = shrink_once(topology, spacing, axis)
        estimate = estimate_of(topology, True)
        step += 1
        note(notes, "shrink", axes=axes, step=step, axis=axis, before=before, after=topology.patch_size[axis],
             relative=before / median[axis], patch=topology.patch_size, estimate=estimate, budget=budget)
    return topology, estimate


def note_network(notes: list, topology: Topology, spacing, median, estimate: int, budget: float,
                 axes: list[str]) -> None:
    """Record the final patch and the network built for it."""
    note(notes, "patch_final", axes=axes, patch=topology.patch_size, spacing=spacing, median=median,
         estimate=estimate, budget=budget)
    dims = len(axes)
    flat = 0
    while flat < len(topology.kernel_sizes) and 1 in topology.kernel_sizes[flat]:
        flat += 1
    bottleneck = [p // d for p, d in zip(topology.patch_size, topology.divisor)]
    note(notes, "topology", axes=axes, pools=topology.pools_per_axis, strides=topology.strides,
         kernels=topology.kernel_sizes, features=features_per_stage(topology.n_stages, dims),
         cap=MAX_FEATURES[dims], bottleneck=bottleneck, flat_stages=flat)


def choose_batch(budget: float, estimate: int, dataset_voxels: int, patch: tuple[int, ...],
                 spatial_dims: int, notes: list) -> int:
    """Grow the batch into leftover memory, capped at 5% of the dataset, at least 2."""
    from_memory = memory.batch_from_memory(budget, estimate, spatial_dims)
    cap = rules.batch_cap(dataset_voxels, patch)
    size, reason = rules.final_batch_size(from_memory, cap)
    note(notes, "batch", batch_size=size, from_memory=from_memory, cap=cap, reason=reason,
         dataset_voxels=dataset_voxels, patch_voxels=math.prod(patch), ratio=budget / estimate)
    return size


def configure_3d(spacing, median_shape, num_cases: int, n_channels: int, n_classes: int,
                 gpu_memory_gb: float, axes: list[str], source: str = "") -> StagePlan:
    """A 3D U-Net configuration at ``spacing`` for images of typical size ``median_shape``."""
    spacing = tuple(float(s) for s in spacing)
    median = rounded_shape(median_shape)
    notes: list[dict] = []
    budget = memory.budget(3, BASE_FEATURES, gpu_memory_gb)

    def estimate_of(topology: Topology, _shrunk: bool) -> int:
        return memory.estimate(topology, BASE_FEATURES, n_channels, n_classes)

    note(notes, "config_spacing", axes=axes, spacing=spacing, source=source)
    note(notes, "median_image", axes=axes, shape=median, spacing=spacing)
    topology, estimate = fit_patch(spacing, median, estimate_of, budget, notes, axes)
    note_network(notes, topology, spacing, median, estimate, budget, axes)
    batch = choose_batch(budget, estimate, math.prod(median) * num_cases, topology.patch_size, 3, notes)
    return StagePlan(spacing, median, topology, batch, estimate, budget, notes)


def configure_2d(spacing, median_shape, num_cases: int, n_channels: int, n_classes: int,
                 gpu_memory_gb: float, axes: list[str], source: str = "") -> StagePlan:
    """The 2D U-Net on the two trailing (highest-resolution) axes of the transposed data.

    ``spacing`` and ``median_shape`` are 3D; the slice axis only counts towards the
    dataset's voxels for the 5% batch cap, since slices are not resampled across.
    """
    median3 = rounded_shape(median_shape)
    spacing2 = tuple(float(s) for s in spacing[1:])
    median = median3[1:]
    notes: list[dict] = []
    budget = memory.budget(2, BASE_FEATURES, gpu_memory_gb)

    def estimate_of(topology: Topology, shrunk: bool) -> int:
        features = memory.features_for_2d_estimate(shrunk, BASE_FEATURES)
        return memory.estimate(topology, features, n_channels, n_classes)

    note(notes, "config_spacing", axes=axes[1:], spacing=spacing2, source=source)
    note(notes, "median_image", axes=axes[1:], shape=median, spacing=spacing2, slices=median3[0])
    topology, estimate = fit_patch(spacing2, median, estimate_of, budget, notes, axes[1:])
    note_network(notes, topology, spacing2, median, estimate, budget, axes[1:])
    batch = choose_batch(budget, estimate, math.prod(median3) * num_cases, topology.patch_size, 2, notes)
    return StagePlan(spacing2, median, topology, batch, estimate, budget, notes)
