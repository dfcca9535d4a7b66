"""The planner's rules on the fingerprint, one small pure function each, with its reason.

Numbers come from the nnU-Net paper and from nnU-Net v1's planner, the procedure that
produced the paper's tables; where nnU-Net v2 decides differently the docstring says so.
"""

from __future__ import annotations

import math

import numpy as np

# Spacing ratio (coarsest / finest) above which an axis counts as out-of-plane: the data are
# then effectively a stack of slices and are treated separately along that axis.
ANISOTROPY_THRESHOLD = 3.0
# Percentile of the out-of-plane spacings used as target for anisotropic data.
OUT_OF_PLANE_PERCENTILE = 10
# One batch may cover at most this fraction of all training voxels, against over-fitting.
MAX_BATCH_FRACTION_OF_DATASET = 0.05
MIN_BATCH_SIZE = 2
# The low-resolution U-Net must see at least 1/4 of a typical (downsampled) image per patch.
LOWRES_MIN_COVERAGE = 0.25
# Low-resolution spacing grows by 1% per step (paper and v1; v2 uses 3%).
LOWRES_SPACING_STEP = 1.01
# A low-resolution stage is kept only if it shrinks the typical image by more than this factor.
LOWRES_MIN_VOXEL_REDUCTION = 2.0
# Resampling orders (paper): cubic spline for images, linear on one-hot labels, nearest
# neighbour across slices of anisotropic data.
IMAGE_ORDER = 3
LABEL_ORDER = 1
OUT_OF_PLANE_ORDER = 0
# Cropping that shrank the median image below this fraction means a nonzero mask (e.g. a
# skull-stripped brain) is meaningful; z-scoring inside it ignores the empty surround.
MASK_FOR_NORM_BELOW_RELATIVE_SIZE = 0.75
CT_SCHEME = "CTNormalization"
ZSCORE_SCHEME = "ZScoreNormalization"
IGNORE_LABEL = "ignore"


def median_spacing(spacings: np.ndarray) -> np.ndarray:
    """Default target spacing: the median per axis, so most images change least when resampled."""
    return np.percentile(spacings, 50, axis=0)


def anisotropy(spacing: np.ndarray, sizes: np.ndarray) -> dict:
    """Is one axis much coarser than the others, both in mm and in number of voxels?

    Both must exceed 3x (paper; v1 and v2 alike). ``sizes`` is the median image size in
    voxels at the original spacing (v1 and v2 use the unresampled sizes here).
    """
    worst = int(np.argmax(spacing))
    others = [a for a in range(len(spacing)) if a != worst]
    spacing_ratio = float(spacing[worst] / max(spacing[a] for a in others))
    voxel_ratio = float(min(sizes[a] for a in others) / sizes[worst])
    return {"axis": worst, "spacing_ratio": spacing_ratio, "voxel_ratio": voxel_ratio,
            "anisotropic": spacing_ratio > ANISOTROPY_THRESHOLD and voxel_ratio > ANISOTROPY_THRESHOLD}


def out_of_plane_target(spacings: np.ndarray, axis: int, coarsest_other: float) -> float:
    """Target spacing of the out-of-plane axis of anisotropic data: the 10th percentile.

    The median would downsample many images across slices and upsample them back for the
    final segmentation, which blurs contours that change a lot between distant slices. A
    finer target upsamples more images during training instead. Never finer than the other
    axes, so that axis stays the out-of-plane one.
    """
    return max(float(np.percentile(spacings[:, axis], OUT_OF_PLANE_PERCENTILE)), coarsest_other)


def median_shape_at(spacings: np.ndarray, shapes: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Median image size in voxels after resampling every case to ``target`` (per axis)."""
    return np.median(spacings / target * shapes, axis=0)


def transpose_forward(spacing: np.ndarray, median_shape_raw: np.ndarray) -> list[int]:
    """Put the out-of-plane (coarsest median spacing) axis first; the other two keep their order.

    The 2D U-Net then works on the two highest-resolution axes (the two trailing ones after
    transposition), and anisotropic 3D data always have their coarse axis first. For
    isotropic data the first coarsest axis is taken, so (z, y, x) stays as is. An axis one
    voxel thick (2D data) is the slice axis whatever its spacing. (The median, not the
    target: a 10th-percentile target clamped to the in-plane spacing must not move the
    out-of-plane axis; v1 kept it by adding 1e-5 to the target.)
    """
    thin = [a for a in range(len(spacing)) if median_shape_raw[a] <= 1]
    first = thin[0] if thin else int(np.argmax(spacing))
    return [first] + [a for a in range(len(spacing)) if a != first]


def is_2d_data(median_shape: np.ndarray) -> bool:
    """Images one slice thick: only the 2D configuration makes sense."""
    return bool(median_shape[0] <= 1)


def batch_cap(dataset_voxels: int, patch_size: tuple[int, ...]) -> int:
    """Largest batch covering at most 5% of all training voxels (rounded, as v1).

    On small datasets a large batch would see most of the data at every step, which
    encourages over-fitting rather than faster learning.
    """
    return int(round(MAX_BATCH_FRACTION_OF_DATASET * dataset_voxels / math.prod(patch_size)))


def final_batch_size(from_memory: int, cap: int) -> tuple[int, str]:
    """Memory allowance, capped at 5% of the dataset, never below 2; returns the limiting reason.

    At least 2 samples keep batch statistics and gradients from being too noisy (the paper's
    minimum; v1's 2D planner allowed 1 when the 5% cap was below 2, we keep 2 everywhere).
    """
    if cap < from_memory:
        size, reason = cap, "dataset_cap"
    else:
        size, reason = from_memory, "memory"
    if size < MIN_BATCH_SIZE:
        return MIN_BATCH_SIZE, "minimum"
    return size, reason


def needs_lowres(median_voxels: float, patch_voxels: int) -> bool:
    """Try a low-resolution stage when the full-resolution patch sees <= 1/4 of a typical image.

    Combined with ``keep_lowres`` (the stage must halve the image), this is the paper's
    "cascade only when the patch covers less than 12.5% of the median image": a lowres patch
    of the same size covering 1/4 of a halved image covers 1/8 of the full one.
    """
    return median_voxels / patch_voxels >= 1 / LOWRES_MIN_COVERAGE


def lowres_spacing_step(spacing: np.ndarray) -> np.ndarray:
    """Coarsen the spacing by 1%: only the finer axes while the spacing is anisotropic (>2x).

    Coarsening the fine axes first makes the low-resolution data more isotropic, which is
    where a 3D network uses its patch best.
    """
    coarsest = spacing.max()
    fine = coarsest / spacing > 2
    factor = np.where(fine, LOWRES_SPACING_STEP, 1.0) if fine.any() else LOWRES_SPACING_STEP
    return spacing * factor


def lowres_covers_enough(median_voxels: float, patch_voxels: int) -> bool:
    """Stop coarsening once the lowres patch covers at least 1/4 of the lowres median image."""
    return median_voxels <= patch_voxels / LOWRES_MIN_COVERAGE


def keep_lowres(lowres_median_voxels: int, fullres_median_voxels: int) -> bool:
    """A cascade is worth its second training only if the low-res data are < half the voxels."""
    return LOWRES_MIN_VOXEL_REDUCTION * lowres_median_voxels < fullres_median_voxels


def anisotropic_patch(patch_size: tuple[int, ...]) -> bool:
    """Patch much longer in-plane than deep: augment with in-plane (2D) rotation and scaling.

    3D rotations of such a patch would move mostly-padding into view (v1's test: the longest
    edge is more than 3x the out-of-plane edge).
    """
    return max(patch_size) / patch_size[0] > ANISOTROPY_THRESHOLD


def use_batch_dice(spatial_dims: int, part_of_cascade_fullres: bool) -> bool:
    """Whether the Dice loss pools the whole batch (True) or averages per sample.

    2D batches hold many slices, most without a given structure; a per-sample Dice on a slice
    without it is undefined noise, so 2D pools the batch. A full-resolution 3D stage whose
    patch covers a small part of large images (the cascade case) pools too for the same
    reason; 3D patches that cover most of an image score each sample on its own (nnU-Net v2).
    """
    return spatial_dims == 2 or part_of_cascade_fullres


def normalization_scheme(channel_name: str) -> str:
    """CT intensities are physical (Hounsfield units): normalize with dataset-wide foreground
    statistics. Other modalities (MRI, ...) have arbitrary scales per scan: z-score per image."""
    return CT_SCHEME if channel_name.strip().lower() == "ct" else ZSCORE_SCHEME


def use_mask_for_norm(scheme: str, median_relative_size: float) -> bool:
    """Z-score inside the nonzero region when cropping removed 25% or more of a typical image.

    Such data have a meaningful empty background (skull-stripped brains): including it would
    shift the statistics. CT normalization uses fixed dataset statistics, so it never masks.
    """
    return scheme == ZSCORE_SCHEME and median_relative_size < MASK_FOR_NORM_BELOW_RELATIVE_SIZE


def spacing_anisotropy(spacing) -> float:
    """Coarsest over finest spacing."""
    return float(max(spacing) / min(spacing))


def resampling_settings(typical_spacing) -> dict:
    """How preprocessing resamples images and labels.

    Images: cubic spline. Labels: linear interpolation of the one-hot encoding, then argmax
    (smooth borders without inventing labels). When a case's spacing (or the target) is more
    anisotropic than 3, the out-of-plane axis is resampled separately with nearest neighbour:
    interpolating across distant slices creates artefacts where contours change between them.
    ``separate_z_for_typical_case`` tells whether a case with the median spacing is affected;
    preprocessing decides per case with the threshold.
    """
    return {"image_order": IMAGE_ORDER, "label_order": LABEL_ORDER, "label_encoding": "one_hot",
            "separate_z_anisotropy_threshold": ANISOTROPY_THRESHOLD, "out_of_plane_order": OUT_OF_PLANE_ORDER,
            "separate_z_for_typical_case": spacing_anisotropy(typical_spacing) > ANISOTROPY_THRESHOLD}


def num_classes(labels: dict) -> int:
    """Output channels of the network: every label but ``ignore`` (which marks unannotated
    voxels, not a class to predict), background included."""
    return len([name for name in labels if name != IGNORE_LABEL])


def output_classes(labels: dict) -> list[str]:
    """The label names in network-output order (by label value), background first, ``ignore`` left out."""
    return [name for name, _ in sorted(((n, v) for n, v in labels.items() if n != IGNORE_LABEL),
                                       key=lambda item: int(item[1]))]
