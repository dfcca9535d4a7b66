"""From a plans configuration to a network: a fixed registry of architectures, checked input.

A received plans file must never choose which code runs, so the architecture is looked up by
name in ``ARCHITECTURES`` and the other network options may only name the blueprint's choice.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import nn

from AutoSegLib.network import family
from AutoSegLib.network.swin import SWIN_DIVISOR, SwinUNETRNet
from AutoSegLib.network.unet import UNetSpec, conv_skip_unet, plain_conv_unet, residual_encoder_unet
from AutoSegLib.network.unetpp import unet_plus_plus
from AutoSegLib import names
from AutoSegLib.names import DEFAULT_ARCHITECTURE  # noqa: F401 (re-exported)


def swin_unetr(spec: UNetSpec) -> SwinUNETRNet:
    """MONAI's Swin-UNETR at the plan's dimensionality; its width follows the first stage's."""
    return SwinUNETRNet(spec.dims, spec.n_input_channels, spec.n_classes, spec.features[0], spec.deep_supervision)


ARCHITECTURES: dict[str, Callable[[UNetSpec], nn.Module]] = {
    "PlainConvUNet": plain_conv_unet,
    "ResidualEncoderUNet": residual_encoder_unet,
    "ConvSkipUNet": conv_skip_unet,
    "ResBlockUNet": family.resblock_unet,
    "ResBlock3UNet": family.resblock3_unet,
    "ConvNeXtUNet": family.convnext_unet,
    "ConvSkipResBlockUNet": family.conv_skip_resblock_unet,
    "AttentionSkipUNet": family.attention_skip_unet,
    "HalfUNet": family.half_unet,
    "UNetPlusPlus": unet_plus_plus,
    "SwinUNETR": swin_unetr,
}
assert tuple(ARCHITECTURES) == names.ARCHITECTURES, "names.ARCHITECTURES and the registry must list the same designs"
# Options the planner writes into ``network`` that have exactly one supported value: a plan
# naming anything else is refused rather than silently trained with the blueprint.
FIXED_OPTIONS = {"norm": "InstanceNorm", "nonlinearity": "LeakyReLU",
                 "downsampling": "strided_conv", "upsampling": "transposed_conv"}
STAGE_KEYS = ("strides", "kernel_sizes", "features_per_stage", "n_conv_per_stage_encoder")


class NetworkConfigError(ValueError):
    """A configuration cannot be turned into a network; the message names the value."""


def build_network(config: dict, n_input_channels: int, n_classes: int,
                  deep_supervision: bool = True) -> nn.Module:
    """The U-Net a plans configuration describes, initialised like nnU-Net.

    Args:
        config: one entry of ``plans.json``'s ``configurations`` (``patch_size``, ``strides``,
            ``kernel_sizes``, ``features_per_stage``, ``n_conv_per_stage_encoder``,
            ``n_conv_per_stage_decoder``, ``network``).
        n_input_channels: image channels (plus one per previous-stage class for a cascade).
        n_classes: output channels, background included.
        deep_supervision: return the heads of all decoder stages, highest resolution first;
            switch later with ``net.deep_supervision = False``.

    Example:
        >>> net = build_network(plans["configurations"]["3d_fullres"], 1, 3)  # doctest: +SKIP
        >>> [o.shape[2:] for o in net(torch.zeros(2, 1, *patch))]  # doctest: +SKIP
    """
    network = config.get("network", {})
    name = architecture_name(network)
    spec = spec_from_config(config, n_input_channels, n_classes, deep_supervision)
    if name == "SwinUNETR":
        check_swin_patch(config["patch_size"])
    net = ARCHITECTURES[name](spec)
    if "inference_depth" in network:
        set_inference_depth(net, name, network["inference_depth"])
    return net


def check_swin_patch(patch_size) -> None:
    odd = [int(p) for p in patch_size if int(p) % SWIN_DIVISOR]
    if odd:
        raise NetworkConfigError(f"SwinUNETR needs every patch axis divisible by {SWIN_DIVISOR}, got patch_size "
                                 f"{list(patch_size)}; plan with `autoseg plan --architecture SwinUNETR`, which "
                                 "rounds the patch")


def set_inference_depth(net: nn.Module, name: str, depth) -> None:
    """U-Net++'s pruned inference (``network.inference_depth``); other designs have no such choice."""
    if name != "UNetPlusPlus":
        raise NetworkConfigError(f"network inference_depth is a UNetPlusPlus option, not one of {name}")
    if type(depth) is not int or not 1 <= depth <= net.decoder.depth:
        raise NetworkConfigError(f"network inference_depth {depth!r} must be an integer from 1 to {net.decoder.depth}")
    net.inference_depth = depth


def architecture_name(network: dict) -> str:
    """The registered architecture a ``network`` entry names; refuses unknown names and options."""
    name = network.get("architecture", DEFAULT_ARCHITECTURE)
    if name not in ARCHITECTURES:
        raise NetworkConfigError(f"unknown network architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}")
    for key, allowed in FIXED_OPTIONS.items():
        if key in network and network[key] != allowed:
            raise NetworkConfigError(f"network {key} {network[key]!r} is not supported; allowed: {allowed!r}")
    return name


def spec_from_config(config: dict, n_input_channels: int, n_classes: int, deep_supervision: bool) -> UNetSpec:
    """Check the per-stage lists against each other and the patch, and collect them."""
    missing = [k for k in ("patch_size", *STAGE_KEYS, "n_conv_per_stage_decoder") if k not in config]
    if missing:
        raise NetworkConfigError(f"configuration lacks {missing}")
    dims, n = len(config["patch_size"]), len(config["strides"])
    if dims not in (2, 3):
        raise NetworkConfigError(f"patch_size {config['patch_size']} must have 2 or 3 entries")
    if n < 2:
        raise NetworkConfigError(f"a U-Net needs at least 2 stages, got strides {config['strides']}")
    wrong = {k: len(config[k]) for k in STAGE_KEYS if len(config[k]) != n}
    if len(config["n_conv_per_stage_decoder"]) != n - 1:
        wrong["n_conv_per_stage_decoder"] = len(config["n_conv_per_stage_decoder"])
    if wrong:
        raise NetworkConfigError(f"{n} strides but lengths {wrong} (the decoder has one entry fewer)")
    check_stage_shapes(config, dims)
    if n_input_channels < 1 or n_classes < 1:
        raise NetworkConfigError(f"need at least one input channel and one class, "
                                 f"got {n_input_channels} and {n_classes}")
    return UNetSpec(dims=dims, n_input_channels=int(n_input_channels), n_classes=int(n_classes),
                    features=tuple(int(f) for f in config["features_per_stage"]),
                    kernel_sizes=tuple(tuple(int(k) for k in ks) for ks in config["kernel_sizes"]),
                    strides=tuple(tuple(int(s) for s in ss) for ss in config["strides"]),
                    n_conv_encoder=tuple(int(c) for c in config["n_conv_per_stage_encoder"]),
                    n_conv_decoder=tuple(int(c) for c in config["n_conv_per_stage_decoder"]),
                    deep_supervision=bool(deep_supervision))


def check_stage_shapes(config: dict, dims: int) -> None:
    """Odd kernels, positive strides and widths, and a patch the strides divide."""
    for key in ("strides", "kernel_sizes"):
        bad = [v for v in config[key] if len(v) != dims or any(int(x) < 1 for x in v)]
        if bad:
            raise NetworkConfigError(f"{key} {bad} must be {dims} positive integers each")
    # 'Same' padding keeps the size only for odd kernels; an even one would shift every stage.
    even = [k for k in config["kernel_sizes"] if any(int(x) % 2 == 0 for x in k)]
    if even:
        raise NetworkConfigError(f"kernel_sizes {even} must be odd")
    counts = [c for key in ("features_per_stage", "n_conv_per_stage_encoder", "n_conv_per_stage_decoder")
              for c in config[key]]
    if any(int(c) < 1 for c in counts):
        raise NetworkConfigError("features_per_stage and n_conv_per_stage_* must be positive")
    # Otherwise an upsampled map and its skip differ in size and the concatenation fails.
    total = [math.prod(int(s[a]) for s in config["strides"]) for a in range(dims)]
    if any(int(p) % t for p, t in zip(config["patch_size"], total)):
        raise NetworkConfigError(f"patch_size {config['patch_size']} is not divisible by the total stride {total}")


def count_parameters(net: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters, each shared tensor counted once (``decoder.encoder`` is shared)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)
