"""From class probabilities to what a user sees: labels, uncertainty, cascade inputs. Pure numpy.

Example:
    >>> p = np.array([[[[0.9, 0.5]]], [[[0.1, 0.5]]]], dtype=np.float32)  # (K=2, 1, 1, 2)
    >>> labels_from_probabilities(p).tolist(), [round(float(h), 2) for h in normalized_entropy(p).ravel()]
    ([[[0, 0]]], [0.47, 1.0])
"""

from __future__ import annotations

import math

import numpy as np


def labels_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Most probable class per voxel (class k is label value k), as the smallest unsigned type."""
    dtype = np.uint8 if probabilities.shape[0] <= 256 else np.uint16
    return np.argmax(probabilities, axis=0).astype(dtype)


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
