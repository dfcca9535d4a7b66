"""What a network design changes in a planned configuration: pure rules, like the planner's.

Every design takes the configuration as planned for the blueprint (stages, patch, batch), so
a comparison changes only the network. One exception: Swin-UNETR halves the resolution five
times, so each patch axis must be a multiple of 32, and its deepest stage must keep more than
one voxel for instance norm to train. The patch is rounded to the nearest such size; the
change is noted in the configuration's explanation (``autoseg plan --explain``).
"""

from __future__ import annotations

import math

from AutoSegLib.planning.explain import note

SWIN_ARCHITECTURE = "SwinUNETR"
SWIN_DIVISOR = 32  # MONAI's patch embedding (2) and four patch-merging steps (2 each)


def swin_patch(patch_size: list[int], strides: list[list[int]]) -> list[int]:
    """Each axis to the nearest multiple of 32 (and of the plan's total stride), at least one;
    when every axis ends at one multiple, the longest doubles (the bottleneck needs 2 voxels).

    Example:
        >>> swin_patch([20, 48, 56], [[1, 1, 1], [2, 2, 2]])
        [32, 64, 64]
        >>> swin_patch([24, 30], [[1, 1], [2, 2]])
        [32, 64]
    """
    patch = []
    for axis, size in enumerate(patch_size):
        total = math.prod(int(s[axis]) for s in strides)
        step = math.lcm(SWIN_DIVISOR, total)
        patch.append(max(step, step * math.floor(size / step + 0.5)))
    if all(p == SWIN_DIVISOR for p in patch):
        longest = max(range(len(patch)), key=lambda a: patch_size[a])
        patch[longest] *= 2
    return patch


def configure_for_architecture(config: dict, architecture: str) -> dict:
    """A plans configuration (dict) for ``architecture``: the same plan, the network named, and
    Swin-UNETR's patch rounded with a note saying so."""
    out = {**config, "network": {**config.get("network", {}), "architecture": architecture}}
    if architecture != "UNetPlusPlus":
        out["network"].pop("inference_depth", None)  # U-Net++'s pruning only
    if architecture == SWIN_ARCHITECTURE:
        patch = swin_patch(list(config["patch_size"]), config["strides"])
        if patch != list(config["patch_size"]):
            out["patch_size"] = patch
            out["explanation"] = list(config.get("explanation", []))
            note(out["explanation"], "remark",
                 message=f"Patch {config['patch_size']} rounded to {patch} for Swin-UNETR, whose five halvings "
                         f"need every axis divisible by {SWIN_DIVISOR} and a bottleneck of 2 voxels or more "
                         "(batch size, spacing and stages unchanged, so it trains on larger patches).")
    return out


def plans_for_architecture(plans: dict, architecture: str) -> dict:
    """A whole plans dict with every configuration set up for ``architecture``."""
    return {**plans, "configurations": {name: configure_for_architecture(config, architecture)
                                        for name, config in plans["configurations"].items()}}
