"""What training says about the model's classes: validation Dice per class, weakest first.

``autoseg train`` ends by validating the fold on its held-out cases and puts each class's
Dice in its ``done`` event (``validation_dice_per_class``). A mean over thirty classes can
look fine while a third of them are barely found, so the module shows the ranking when
training finishes and names the classes under the engine's own warning threshold
(``WEAK_DICE``, AutoSegLib/evaluation/summary.py): those are the segments to review first.
"""

from __future__ import annotations

import math

from AutoSegLib.evaluation.summary import WEAK_DICE  # the engine's warning threshold, one number for both
SHOWN = 8  # classes listed in the status line; the weak ones are all counted


def class_dice(done_events: list[dict]) -> dict[str, float]:
    """Class -> validation Dice, averaged over the folds whose ``done`` events carry it."""
    scores: dict[str, list[float]] = {}
    for event in done_events:
        for name, dice in (event.get("validation_dice_per_class") or {}).items():
            if isinstance(dice, (int, float)) and math.isfinite(dice):
                scores.setdefault(name, []).append(float(dice))
    return {name: sum(values) / len(values) for name, values in scores.items()}


def validation_report(done_events: list[dict], shown: int = SHOWN) -> str:
    """One status line: the weakest classes first, and how many are weak; "" without validation."""
    dice = class_dice(done_events)
    if not dice:
        return ""
    ranking = sorted(dice.items(), key=lambda item: (item[1], item[0]))
    weak = [name for name, value in ranking if value < WEAK_DICE]
    listed = ", ".join(f"{name} {value:.2f}" for name, value in ranking[:shown])
    more = f" (+{len(ranking) - shown} more)" if len(ranking) > shown else ""
    verdict = (f"{len(weak)} of {len(ranking)} below {WEAK_DICE:.2f}: review them first" if weak
               else f"every class at {WEAK_DICE:.2f} or above")
    return f"Validation Dice, weakest first: {listed}{more}; {verdict}"
