"""The U-Net of a plans configuration, with nnU-Net v2's parameter layout.

Architectures come from a fixed registry (``ARCHITECTURES``): ``PlainConvUNet`` (the
blueprint, default), ``ResidualEncoderUNet``, ``ConvSkipUNet`` and the U-Net family of the
architecture study (docs/architectures.md: residual, ConvNeXt, attention-skip, Half-U-Net,
U-Net++ and MONAI's Swin-UNETR). ``PlainConvUNet`` and ``ResidualEncoderUNet`` have exactly
the state_dict of dynamic-network-architectures (DNA) 0.4.4, so nnU-Net v2 weights load into
them. We do not depend on DNA: its requirements (timm -> torchvision) make pip replace the
user's torch with another version and about 3 GB of CUDA libraries.

Example:
    >>> import torch
    >>> from AutoSegLib.network import build_network
    >>> config = {"patch_size": [32, 32], "strides": [[1, 1], [2, 2], [2, 2]],
    ...           "kernel_sizes": [[3, 3]] * 3, "features_per_stage": [8, 16, 32],
    ...           "n_conv_per_stage_encoder": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2],
    ...           "network": {"architecture": "PlainConvUNet"}}
    >>> net = build_network(config, n_input_channels=1, n_classes=3)
    >>> [tuple(o.shape) for o in net(torch.zeros(2, 1, 32, 32))]
    [(2, 3, 32, 32), (2, 3, 16, 16)]
    >>> net.deep_supervision = False
    >>> tuple(net(torch.zeros(2, 1, 32, 32)).shape)
    (2, 3, 32, 32)
"""

from AutoSegLib.network.registry import (ARCHITECTURES, DEFAULT_ARCHITECTURE, NetworkConfigError,
                                         build_network, count_parameters)
from AutoSegLib.network.unet import UNet, UNetSpec

__all__ = ["build_network", "count_parameters", "ARCHITECTURES", "DEFAULT_ARCHITECTURE",
           "NetworkConfigError", "UNet", "UNetSpec"]
