"""Intensity normalization schemes: pure array functions, no I/O.

Schemes are picked by name from :data:`SCHEMES` (a plans file can only choose among these,
never name arbitrary code). All return float32. Each can write into a caller's float32 array
(``out``), so a case is normalized straight into its place in the preprocessed data: the only
full-size array is the result itself.
"""

from __future__ import annotations

import numpy as np

from AutoSegLib.preprocessing.slabs import slabs

_EPS = 1e-8


def _float32_copy(array: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return array.astype(np.float32, copy=True)
    if out.shape != array.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {array.shape}, got {out.dtype} {out.shape}")
    out[...] = array
    return out


def normalize_ct(array: np.ndarray, properties: dict, out: np.ndarray | None = None) -> np.ndarray:
    """CT: clip to the dataset's foreground 0.5/99.5 percentiles, then the dataset-wide z-score.

    Hounsfield units mean the same tissue in every scan, so one transform for the whole
    dataset keeps that information; clipping removes metal and air extremes first.
    Everything happens in place in the float32 result (``out`` when given).
    """
    out = _float32_copy(array, out)
    np.clip(out, properties["percentile_00_5"], properties["percentile_99_5"], out=out)
    out -= np.float32(properties["mean"])
    out /= np.float32(max(properties["std"], _EPS))
    return out


def _mean_std(out: np.ndarray, mask: np.ndarray | None) -> tuple[float, float] | None:
    # Two float64 passes a slab at a time: the same statistics as ndarray.mean/std(float64)
    # without their full masked copy (up to 400 MiB) and float64 temporary (up to 800 MiB).
    def values():
        for s in slabs(out.shape):
            yield (out[s][mask[s]] if mask is not None else out[s].ravel()).astype(np.float64)

    n = sum(v.size for v in values())
    if n == 0:
        return None
    mean = sum(float(v.sum()) for v in values()) / n
    variance = sum(float(np.dot(v - mean, v - mean)) for v in values()) / n
    return mean, float(np.sqrt(variance))


def normalize_zscore(array: np.ndarray, mask: np.ndarray | None = None,
                     out: np.ndarray | None = None) -> np.ndarray:
    """Per-image z-score; with ``mask``, statistics from inside it and zero outside.

    MR intensities have no absolute meaning, so each image is standardised on its own. When
    cropping removed a large empty surround, the mask keeps that surround from dominating.
    """
    out = _float32_copy(array, out)
    stats = _mean_std(out, mask)
    if stats is None:
        out[...] = 0
        return out
    mean, std = stats
    out -= np.float32(mean)
    out /= np.float32(max(std, _EPS))
    if mask is not None:
        for s in slabs(out.shape):
            out[s][~mask[s]] = 0
    return out


SCHEMES = ("CTNormalization", "ZScoreNormalization")


def normalize(array: np.ndarray, scheme: str, properties: dict | None = None,
              mask: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Apply a scheme by name; unknown names are refused with the allowed list.

    Example:
        >>> normalize(np.array([-2000, 0, 40]), "CTNormalization",
        ...           {"percentile_00_5": -100, "percentile_99_5": 100, "mean": 0, "std": 100})
        array([-1. ,  0. ,  0.4], dtype=float32)
    """
    if scheme == "CTNormalization":
        if properties is None:
            raise ValueError("CTNormalization needs the dataset's foreground intensity properties")
        return normalize_ct(array, properties, out)
    if scheme == "ZScoreNormalization":
        return normalize_zscore(array, mask, out)
    raise ValueError(f"unknown normalization scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
