"""Statistics of an architecture study: pure functions on numbers, no files, no torch.

The protocol follows the controlled U-Net comparison the study reproduces
(docs/architectures.md): per fold, a design's Dice minus the baseline's on the same fold
(the *fold-wise difference*); a two-tailed p-value for "the mean difference is zero" by
bootstrapping the fold-wise differences; and the average rank of each design over classes
(1 = best, ties share the mean of their ranks).

Example:
    >>> fold_wise_differences({"0": 0.8, "1": 0.7}, {"0": 0.75, "1": 0.72})
    [0.05, -0.02]
    >>> average_ranks({"a": [0.9, 0.5], "b": [0.8, 0.5]})
    {'a': 1.25, 'b': 1.75}
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def fold_wise_differences(scores: Mapping[str, float | None], baseline: Mapping[str, float | None]) -> list[float]:
    """``scores[f] - baseline[f]`` for every fold both have a finite score for, in fold order.

    Rounded to 12 digits so hand-checked numbers compare exactly (0.8 - 0.75 is 0.05).
    """
    out = []
    for fold in sorted(scores, key=str):
        a, b = scores[fold], baseline.get(fold)
        if _finite(a) and _finite(b):
            out.append(round(float(a) - float(b), 12))
    return out


def bootstrap_p_value(differences: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> float | None:
    """Two-tailed bootstrap p-value of "the mean fold-wise difference is zero".

    The folds' differences are resampled with replacement ``resamples`` times; p is twice the
    smaller share of resampled means on either side of zero (means exactly at zero count on
    both sides), capped at 1. With all differences of one sign p is 0 (no resample crosses
    zero); with few folds it is coarse - 3 folds allow only 10 distinct resamples. None for
    no differences.
    """
    d = np.asarray([float(x) for x in differences], dtype=float)
    if d.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    means = np.round(means, 12)  # sums of equal magnitudes must cancel to exactly 0
    below, above = float(np.mean(means <= 0)), float(np.mean(means >= 0))
    return min(1.0, 2.0 * min(below, above))


def ranks_descending(values: Sequence[float | None]) -> list[float]:
    """Rank 1 for the highest value; ties share the mean of their ranks; missing values rank last.

    Example:
        >>> ranks_descending([0.5, 0.9, 0.5, None])
        [2.5, 1.0, 2.5, 4.0]
    """
    keyed = [(float(v) if _finite(v) else -math.inf) for v in values]
    order = sorted(range(len(keyed)), key=lambda i: -keyed[i])
    ranks = [0.0] * len(keyed)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and keyed[order[end + 1]] == keyed[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def average_ranks(scores: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """Design -> mean over items (classes, or classes of several datasets) of its rank per item.

    ``scores[design][k]`` is the design's score on item ``k``; every design lists the same items.
    """
    designs = list(scores)
    lengths = {len(scores[d]) for d in designs}
    if len(lengths) > 1:
        raise ValueError(f"every design needs a score per item; got {({d: len(scores[d]) for d in designs})}")
    n_items = lengths.pop() if lengths else 0
    totals = dict.fromkeys(designs, 0.0)
    for k in range(n_items):
        for design, rank in zip(designs, ranks_descending([scores[d][k] for d in designs])):
            totals[design] += rank
    return {d: (totals[d] / n_items if n_items else math.nan) for d in designs}


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the finite values; std None for one value."""
    kept = [float(v) for v in values if _finite(v)]
    if not kept:
        return None, None
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)
