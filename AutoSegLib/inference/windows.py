"""Where the sliding windows go and how much each voxel of a window counts: pure numpy.

Follows nnU-Net v2 (``sliding_window_prediction.py``):

* windows of the training patch size, spaced by ``step`` x patch (0.5: every voxel is seen
  by up to 2 windows per axis), the spacing stretched evenly so the last window ends at the
  image border;
* a Gaussian importance map per window (sigma = patch / 8 per axis), peak ``value_scale``,
  because a network predicts worst near the window border, where it saw the least context;
* images smaller than a patch are zero-padded, centred, and cropped back afterwards.

A 2D configuration on a 3D image (patch of 2 axes, image of 3) gives windows that are single
slices: the leading axis is indexed by an integer, so the window has the patch's 2 axes.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from scipy import ndimage

SIGMA_SCALE = 1 / 8
# nnU-Net scales the peak to 10 so that sums of many small weights stay representable in
# float16 accumulators (on CUDA); the scale cancels in the weighted mean.
VALUE_SCALE = 10.0

Window = tuple  # per spatial axis of the image: an int (one slice) or a slice


def window_starts(image_size: int, patch_size: int, step: float) -> list[int]:
    """Start offsets along one axis: ``ceil((image - patch) / (step * patch)) + 1`` windows, even spacing.

    Example:
        >>> window_starts(10, 4, 0.5)
        [0, 2, 4, 6]
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1] (a fraction of the patch size), got {step}")
    if image_size < patch_size:
        raise ValueError(f"image size {image_size} is smaller than the patch {patch_size}; pad it first")
    n = math.ceil((image_size - patch_size) / (patch_size * step)) + 1
    if n == 1:
        return [0]
    spacing = (image_size - patch_size) / (n - 1)
    return [int(round(spacing * i)) for i in range(n)]


def sliding_windows(image_shape, patch_size, step: float = 0.5) -> list[Window]:
    """Every window over ``image_shape`` (spatial axes only; already at least one patch large).

    With fewer patch axes than image axes (2D on 3D) every leading index is a window of its own.
    """
    image_shape, patch_size = tuple(image_shape), tuple(patch_size)
    lead = len(image_shape) - len(patch_size)
    if lead < 0:
        raise ValueError(f"patch {patch_size} has more axes than the image {image_shape}")
    per_axis = [range(s) for s in image_shape[:lead]]
    per_axis += [[slice(a, a + p) for a in window_starts(s, p, step)]
                 for s, p in zip(image_shape[lead:], patch_size)]
    return [tuple(w) for w in itertools.product(*per_axis)]


@functools.lru_cache(maxsize=8)
def _gaussian_cached(patch_size: tuple[int, ...], sigma_scale: float, value_scale: float) -> np.ndarray:
    # A filtered delta, as nnU-Net does (scipy truncates at 4 sigma, which is the patch border at
    # sigma = patch / 8); separable, so the outer product of the 1D profiles is the same map.
    profiles = []
    for size in patch_size:
        delta = np.zeros(size)
        delta[size // 2] = 1
        profiles.append(ndimage.gaussian_filter1d(delta, size * sigma_scale, mode="constant", cval=0))
    gaussian = functools.reduce(np.multiply.outer, profiles)
    return gaussian / gaussian.max() * value_scale


def gaussian_importance(patch_size, sigma_scale: float = SIGMA_SCALE, value_scale: float = VALUE_SCALE,
                        dtype=np.float32) -> np.ndarray:
    """The weight of each voxel of a window: a Gaussian peaking at ``value_scale`` in the centre.

    Zeros (beyond scipy's 4-sigma truncation, or underflow in ``dtype``) are raised to the
    smallest nonzero weight: a voxel covered only by window corners must not divide by zero.

    Example:
        >>> g = gaussian_importance((8, 8))
        >>> float(g.max()), bool(g.min() > 0)
        (10.0, True)
    """
    gaussian = _gaussian_cached(tuple(int(p) for p in patch_size), float(sigma_scale), float(value_scale))
    gaussian = gaussian.astype(dtype)
    zero = gaussian == 0
    if zero.any():
        gaussian[zero] = gaussian[~zero].min()
    return gaussian


def padding_for(image_shape, patch_size) -> list[tuple[int, int]]:
    """(before, after) zero padding per axis that makes each patch axis at least a patch long, centred."""
    lead = len(image_shape) - len(patch_size)
    pads = [(0, 0)] * lead
    for size, patch in zip(image_shape[lead:], patch_size):
        missing = max(0, int(patch) - int(size))
        pads.append((missing // 2, missing - missing // 2))
    return pads


def unpad_slices(pads: list[tuple[int, int]], padded_shape) -> tuple[slice, ...]:
    """The region of a padded array that holds the original image."""
    return tuple(slice(before, size - after) for (before, after), size in zip(pads, padded_shape))


def mirror_combinations(axes) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``axes``: the flips of test-time augmentation (7 for 3 axes)."""
    axes = tuple(axes)
    return [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
