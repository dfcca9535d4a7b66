"""Network topology from patch size and spacing: where to downsample, which kernels, how wide.

This follows nnU-Net v1's ``get_pool_and_conv_props`` (the procedure behind the paper's
tables). nnU-Net v2 changed three details, listed here so a reader comparing plans knows
where they part:

- v1 stops downsampling every axis once the next step would leave the finest current
  spacing behind by 2x, even when that finest axis itself can no longer be pooled (it is too
  small); v2 compares only the axes that can still be pooled, so it keeps pooling in-plane.
- v1 halves feature-map sizes exactly (an odd size gives x.5); v2 rounds up.
- v2 needs 12 voxels, not 8, to pool when a single axis is left.
The paper's text ("until further downsampling would reduce the feature map size to smaller
than 4 voxels or the feature map spacings become anisotropic") is v1's rule; we follow v1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The smallest feature-map edge in the bottleneck, in voxels. Coarser maps add no useful
# context (the receptive field already spans the patch) and lose position information.
MIN_FEATURE_MAP_EDGE = 4
# Two spacings within this factor count as "the same resolution" (isotropic enough to pool
# together and to convolve across with a 3-wide kernel).
SPACING_RATIO_ISOTROPIC = 2.0
# Feature maps at full resolution, doubled at every downsampling (paper: 32).
BASE_FEATURES = 32
# Width cap of the deepest stages, keeping the model size bounded (paper: 320 in 3D, 512 in 2D).
MAX_FEATURES = {3: 320, 2: 512}
# Two (conv - instance norm - leaky ReLU) blocks per stage, encoder and decoder (blueprint).
CONVS_PER_STAGE = 2


@dataclass(frozen=True)
class Topology:
    """Downsampling plan of a U-Net for one patch size and spacing.

    ``strides`` and ``kernel_sizes`` have one entry per resolution stage; the first stride is
    all ones (the full-resolution stage), each later one is the downsampling into that stage.
    ``patch_size`` is the requested patch padded up to a multiple of ``divisor`` per axis.
    """

    pools_per_axis: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]

    @property
    def divisor(self) -> tuple[int, ...]:
        """A patch edge must be a multiple of 2^(poolings on that axis) to pool cleanly."""
        return tuple(2 ** p for p in self.pools_per_axis)

    @property
    def n_stages(self) -> int:
        return len(self.strides)


def axes_to_pool(spacing: list[float], size: list[float]) -> list[int]:
    """Axes downsampled at this stage.

    An axis is pooled when its spacing is within 2x of the finest current spacing (so the
    high-resolution axes of anisotropic data are pooled alone until they catch up) and its
    map is still at least 2 x 4 voxels (so no map falls below the 4-voxel minimum).
    """
    finest = min(spacing)
    return [a for a in range(len(spacing))
            if spacing[a] / finest < SPACING_RATIO_ISOTROPIC and size[a] >= 2 * MIN_FEATURE_MAP_EDGE]


def stage_kernel(spacing: list[float]) -> tuple[int, ...]:
    """Kernel size 3 on the largest group of axes of similar resolution, 1 on the others.

    Convolving across slices far apart (e.g. 5 mm slices with 1.5 mm pixels) mixes tissue that
    is not neighbouring, so the out-of-plane kernel stays 1 until the in-plane pooling has
    brought the spacings within 2x of each other. After that all axes stay pooled together,
    so the kernel stays 3. (v1's grouping: for each axis, the axes within 2x of it; the first
    largest group wins.)
    """
    group: list[int] = []
    for a, own in enumerate(spacing):
        partners = [i for i, other in enumerate(spacing)
                    if other / own < SPACING_RATIO_ISOTROPIC and own / other < SPACING_RATIO_ISOTROPIC]
        if len(partners) > len(group):
            group = partners
    return tuple(3 if a in group else 1 for a in range(len(spacing)))


def pad_to_divisor(patch: list[int] | tuple[int, ...], divisor: tuple[int, ...]) -> tuple[int, ...]:
    """Round every edge up to a multiple of its divisor (the paper pads the initial patch)."""
    return tuple(int(math.ceil(p / d) * d) for p, d in zip(patch, divisor))


def plan_topology(spacing: list[float] | tuple[float, ...], patch: list[int] | tuple[int, ...]) -> Topology:
    """Downsample stage by stage until no axis may be pooled any more (v1 procedure).

    Example:
        >>> plan_topology((5.0, 1.56, 1.56), (18, 237, 208)).strides[:3]
        ((1, 1, 1), (1, 2, 2), (2, 2, 2))
    """
    current_spacing = [float(s) for s in spacing]
    current_size = [float(p) for p in patch]
    pools = [0] * len(spacing)
    strides = [tuple(1 for _ in spacing)]
    kernels = []
    while True:
        kernel = stage_kernel(current_spacing)
        axes = axes_to_pool(current_spacing, current_size)
        if not axes:
            break
        kernels.append(kernel)
        strides.append(tuple(2 if a in axes else 1 for a in range(len(spacing))))
        for a in axes:
            pools[a] += 1
            current_spacing[a] *= 2
            current_size[a] /= 2
    # The bottleneck is small and isotropic enough by construction: always a full 3-kernel.
    kernels.append(tuple(3 for _ in spacing))
    divisor = tuple(2 ** p for p in pools)
    return Topology(tuple(pools), tuple(strides), tuple(kernels), pad_to_divisor(patch, divisor))


def features_per_stage(n_stages: int, spatial_dims: int) -> tuple[int, ...]:
    """32 maps at full resolution, doubled per stage, capped at 320 (3D) or 512 (2D).

    Doubling keeps the computation per stage roughly constant as maps shrink; the cap keeps
    the deepest layers (and the model file) from growing without bound.
    """
    cap = MAX_FEATURES[spatial_dims]
    return tuple(min(BASE_FEATURES * 2 ** i, cap) for i in range(n_stages))
