"""Cross-entropy weights for rare classes in the ``3d_cpu`` plan (issue 14). Pure: no torch.

The method weighs every voxel alike in its cross-entropy and relies on the Dice term and
foreground oversampling to bring small classes in, over 250,000 iterations. A CPU run has a
few hundred to a few thousand, and there a class of a few dozen voxels per case (a renal
artery, a lymph node, an adrenal gland) is seldom learned at all. ``3d_cpu`` therefore weighs a
class at least 3x rarer than the typical (median) foreground class by how much rarer it is,
capped so that no class can dominate the loss; background and the other classes keep 1.

Why the cross-entropy: a class the network has learned to suppress everywhere has a tiny
softmax probability in its own voxels, where the Dice term's gradient (through the softmax)
vanishes; the cross-entropy's does not. Measured (BENCHMARKS.md, "Rare-class weights in the CPU
plan") on the 31-structure detailed phantoms, 825 iterations, every class rarer than the median
weighed: mean foreground Dice 0.609 unweighted, 0.639 with ``(median / share) ** 0.5`` capped at
10, 0.732 with ``** 1`` capped at 30, 0.731 with ``** 1.5`` capped at 100; classes never
predicted 9, 5, 0, 0. This rule after 10 minutes on 2 cores: 0.606 unweighted, 0.730 weighted,
never predicted 9 and 1. The five-class CT and MR phantoms have no class 3x rarer than the
median, so their plans have no weights.
"""

from __future__ import annotations

from typing import Sequence

from AutoSegLib.planning import rules

# A class ``r`` times rarer than the median foreground class weighs ``r ** POWER``, at most CAP,
# once ``r`` reaches MIN_RARITY: a class within 3x of the median is learned unweighted (the CT and
# MR phantoms' kidneys and lesion, 1.6x and 2.5x rarer; weighing them cost the MR spleen of fold 0
# 0.08 Dice and gained nothing that held on both folds).
POWER = 1.0
CAP = 30.0
MIN_RARITY = 3.0
SHOWN = 6  # classes named in the --explain sentence
# During training a class whose smoothed validation pseudo-Dice lags the others' weighs up to
# LAG_LIFT times its plan weight (training/class_lift.py). Planned together with the rare-class
# weights: on the five-class CT and MR phantoms (no class 3x rarer than the median) the lift
# changed nothing that held (MR kidneys +0.00-0.03, CT demo mean 0.862 against 0.874), on the
# 31-structure detailed phantoms it found the stomach and gallbladder the weights left out.
LAG_LIFT = 4.0


def rare_class_weights(voxel_ratios: Sequence[float], power: float = POWER, cap: float = CAP,
                       min_rarity: float = MIN_RARITY) -> list[float]:
    """One weight per network output (background first) from each class's share of all voxels.

    A foreground class at least ``min_rarity`` times rarer than the median foreground class
    gets ``(median / ratio) ** power``, at most ``cap``; every other class, background included,
    keeps 1. A class with no voxels at all keeps 1 too (nothing to learn, nothing to weigh).

    Example:
        >>> rare_class_weights([0.9, 0.08, 0.02, 0.01, 0.0025, 0.0005])  # median foreground share 0.01
        [1.0, 1.0, 1.0, 1.0, 4.0, 20.0]
    """
    ratios = [float(r) for r in voxel_ratios]
    present = sorted(r for r in ratios[1:] if r > 0)
    if not present:
        return [1.0] * len(ratios)
    half = len(present) // 2
    median = present[half] if len(present) % 2 else 0.5 * (present[half - 1] + present[half])
    return [1.0] + [min(cap, (median / r) ** power) if 0 < r and median / r >= min_rarity else 1.0
                    for r in ratios[1:]]


def plan_class_weights(labels: dict, class_ratios: dict | None) -> tuple[list[float] | None, str | None]:
    """``(weights, explanation)`` for the CPU plan, or ``(None, None)`` when every weight is 1.

    ``class_ratios``: the fingerprint's ``class_voxel_ratios`` (name -> share of all voxels, as
    the planner's ``read_fingerprint`` checked them); an nnU-Net v2 fingerprint has none, and
    then nothing is weighted.
    """
    names = rules.output_classes(labels)
    if not class_ratios or any(name not in class_ratios for name in names):
        return None, None
    weights = rare_class_weights([class_ratios[name] for name in names])
    lifted = sorted(((w, n) for w, n in zip(weights, names) if w > 1.0), key=lambda item: (-item[0], item[1]))
    if not lifted:
        return None, None
    shown = ", ".join(f"{n} x{w:.1f}" for w, n in lifted[:SHOWN])
    more = f" and {len(lifted) - SHOWN} more" if len(lifted) > SHOWN else ""
    rule = "as many times more as they are rarer" if POWER == 1 else f"(median share / own share) ** {POWER:g}"
    text = (f"Cross-entropy weights for rare classes: {len(lifted)} of {len(names) - 1} class(es) are at least "
            f"{MIN_RARITY:g}x rarer than the median foreground class and weigh {rule}, at most {CAP:g}x: "
            f"{shown}{more}. A CPU run is too short for the method's unweighted loss to learn a class of a few "
            f"dozen voxels per case; background and the other classes weigh 1.")
    return weights, text


def lagging_lift_text(max_lift: float = LAG_LIFT) -> str:
    """The ``--explain`` sentence for the plan's ``lagging_class_lift``."""
    return (f"Lagging classes weigh more while training: after every epoch, a class whose validation pseudo-Dice "
            f"(smoothed over epochs) is behind the others' has its cross-entropy weight multiplied by how far "
            f"behind it is, at most {max_lift:g}x, until it catches up. A short CPU run otherwise leaves a class "
            f"it has not found by chance unfound to the end.")
