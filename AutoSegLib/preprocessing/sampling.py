"""Foreground voxel locations per class, sampled once at preprocessing time.

Training forces a third of each batch to contain foreground; finding a foreground voxel by
scanning the label at every draw would cost a full read of the case. A bounded sample of
locations per class, stored with the case, makes each draw O(1). Enough locations are kept
to cover the object (10,000, or 1% of the class's voxels if more) so oversampled patches
still see all of it.
"""

from __future__ import annotations

import math

import numpy as np

MAX_LOCATIONS_PER_CLASS = 10_000
MIN_FRACTION = 0.01


def sample_foreground_locations(seg: np.ndarray, classes: list[int], seed: int,
                                max_per_class: int = MAX_LOCATIONS_PER_CLASS,
                                min_fraction: float = MIN_FRACTION) -> np.ndarray:
    """Rows ``[class, *index]`` (int32) for up to the sample size of each class's voxels.

    Args:
        seg: label map (spatial axes only).
        classes: the class values to sample (foreground classes; not background or ignore).
        seed: makes the sample reproducible per case.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for value in classes:
        flat = np.flatnonzero(seg == value)
        if flat.size == 0:
            continue
        count = min(flat.size, max(max_per_class, math.ceil(flat.size * min_fraction)))
        chosen = np.sort(rng.choice(flat, size=count, replace=False)) if count < flat.size else flat
        coords = np.stack(np.unravel_index(chosen, seg.shape), axis=1)
        rows.append(np.concatenate([np.full((count, 1), value), coords], axis=1))
    if not rows:
        return np.zeros((0, seg.ndim + 1), dtype=np.int32)
    return np.concatenate(rows).astype(np.int32)
