"""From class probabilities to what a user sees: labels, uncertainty, cascade inputs. Pure numpy.

Example:
    >>> p = np.array([[[[0.9, 0.5]]], [[[0.1, 0.5]]]], dtype=np.float32)  # (K=2, 1, 1, 2)
    >>> labels_from_probabilities(p).tolist(), [round(float(h), 2) for h in normalized_entropy(p).ravel()]
    ([[[0, 0]]], [0.47, 1.0])
"""

from __future__ import annotations

import math

import numpy as np

from AutoSegLib.preprocessing.slabs import slabs


def label_dtype(n_classes: int) -> type:
    """The smallest unsigned type that holds label values ``0 .. n_classes - 1``."""
    return np.uint8 if n_classes <= 256 else np.uint16


def labels_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Most probable class per voxel (class k is label value k; the lowest on ties), as the
    smallest unsigned type.

    A slab of slices at a time: ``np.argmax`` over the class axis of a whole (K, z, y, x) array
    makes a contiguous copy with the class axis last (K float32 values per voxel, 5.2 GB for 6
    classes at 600^3) and an int64 result; per slab both are a few MiB, and the labels identical.
    """
    out = np.empty(probabilities.shape[1:], dtype=label_dtype(probabilities.shape[0]))
    if out.ndim == 0:
        out[...] = np.argmax(probabilities)
        return out
    for s in slabs(out.shape):
        out[s] = np.argmax(probabilities[:, s], axis=0)
    return out


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of each voxel's class distribution divided by its maximum, log K: 0 certain, 1 uniform.

    One class at a time, so the only temporaries are the size of one class map.
    """
    n_classes = probabilities.shape[0]
    entropy = np.zeros(probabilities.shape[1:], dtype=np.float32)
    if n_classes < 2:
        return entropy
    for p in probabilities:
        p = p.astype(np.float32, copy=False)
        entropy -= p * np.log(np.maximum(p, np.float32(1e-12)))
    entropy /= np.float32(math.log(n_classes))
    return np.clip(entropy, 0.0, 1.0, out=entropy)


def one_hot_foreground(seg: np.ndarray, values: list[int], dtype=np.float32) -> np.ndarray:
    """One channel per foreground value (background and -1, outside the body, give none).

    A cascade's second stage gets the first stage's segmentation this way (nnU-Net v2's
    ``convert_labelmap_to_one_hot`` over the foreground labels).
    """
    out = np.zeros((len(values), *seg.shape), dtype=dtype)
    for c, value in enumerate(values):
        out[c][seg == value] = 1
    return out
