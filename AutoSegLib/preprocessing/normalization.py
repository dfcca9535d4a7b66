"""Intensity normalization schemes: pure array functions, no I/O.

Schemes are picked by name from :data:`SCHEMES` (a plans file can only choose among these,
never name arbitrary code). All return float32.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-8


def normalize_ct(array: np.ndarray, properties: dict) -> np.ndarray:
    """CT: clip to the dataset's foreground 0.5/99.5 percentiles, then the dataset-wide z-score.

    Hounsfield units mean the same tissue in every scan, so one transform for the whole
    dataset keeps that information; clipping removes metal and air extremes first.
    """
    lower, upper = properties["percentile_00_5"], properties["percentile_99_5"]
    out = np.clip(array.astype(np.float32, copy=True), lower, upper)
    out -= np.float32(properties["mean"])
    out /= np.float32(max(properties["std"], _EPS))
    return out


def normalize_zscore(array: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-image z-score; with ``mask``, statistics from inside it and zero outside.

    MR intensities have no absolute meaning, so each image is standardised on its own. When
    cropping removed a large empty surround, the mask keeps that surround from dominating.
    """
    out = array.astype(np.float32, copy=True)
    values = out[mask] if mask is not None else out
    if values.size == 0:
        return np.zeros_like(out)
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    out -= np.float32(mean)
    out /= np.float32(max(std, _EPS))
    if mask is not None:
        out[~mask] = 0
    return out


SCHEMES = ("CTNormalization", "ZScoreNormalization")


def normalize(array: np.ndarray, scheme: str, properties: dict | None = None,
              mask: np.ndarray | None = None) -> np.ndarray:
    """Apply a scheme by name; unknown names are refused with the allowed list."""
    if scheme == "CTNormalization":
        if properties is None:
            raise ValueError("CTNormalization needs the dataset's foreground intensity properties")
        return normalize_ct(array, properties)
    if scheme == "ZScoreNormalization":
        return normalize_zscore(array, mask)
    raise ValueError(f"unknown normalization scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
