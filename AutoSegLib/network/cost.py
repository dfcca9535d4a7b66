"""What a planned network costs: parameters and GFLOP per forward pass of one patch.

FLOPs are counted by torch's ``FlopCounterMode`` on a network built on the ``meta`` device:
no weights are allocated and nothing is computed, so even a GPU-sized 3D plan is counted in
about a second. The counter counts the matrix products and convolutions (2 FLOPs per
multiply-add), which are nearly all of a U-Net's work; norms, activations and up-sampling by
interpolation are left out, as they are in the papers' FLOP figures.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from AutoSegLib.network.registry import build_network, count_parameters


def network_cost(config: dict, n_input_channels: int, n_classes: int) -> dict:
    """``{"architecture", "parameters", "gflop"}`` of one configuration at batch 1, inference mode.

    Example:
        >>> network_cost(plans["configurations"]["3d_cpu"], 1, 7)  # doctest: +SKIP
        {'architecture': 'PlainConvUNet', 'parameters': 1234567, 'gflop': 12.3}
    """
    try:
        with torch.device("meta"):
            net = build_network(config, n_input_channels, n_classes, deep_supervision=False)
    except RuntimeError:  # MONAI's constructor reads tensor values, which meta tensors lack
        net = build_network(config, n_input_channels, n_classes, deep_supervision=False).to("meta")
    net.eval()
    with torch.device("meta"):
        x = torch.empty(1, n_input_channels, *config["patch_size"])
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(x)
    return {"architecture": config.get("network", {}).get("architecture", "PlainConvUNet"),
            "parameters": count_parameters(net), "gflop": counter.get_total_flops() / 1e9}


def describe_costs(plans: dict) -> str:
    """Lines for ``autoseg plan --explain``: each configuration's network, parameters and GFLOP."""
    n_in = len(plans["channel_names"])
    n_classes = int(plans["num_classes"])  # background included
    lines = ["Network cost (one forward pass of one patch, batch 1):"]
    for name, config in plans["configurations"].items():
        try:
            cost = network_cost(config, n_in, n_classes)
        except (ImportError, ValueError) as exc:
            lines.append(f"  {name}: not counted ({exc})")
            continue
        lines.append(f"  {name}: {cost['architecture']}, {cost['parameters'] / 1e6:.2f} M parameters, "
                     f"{cost['gflop']:.1f} GFLOP for a {'x'.join(map(str, config['patch_size']))} patch")
    return "\n".join(lines)
