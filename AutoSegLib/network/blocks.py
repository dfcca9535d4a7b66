"""Convolution blocks named and ordered exactly like dynamic-network-architectures (DNA).

The attribute names are the contract: nnU-Net v2 checkpoints address weights by paths such
as ``encoder.stages.1.0.convs.0.conv.weight``, so every submodule here is registered under
DNA's name and in DNA's order (that order is the state_dict order). We do not import DNA:
its requirements make pip replace the user's torch (see ``AutoSegLib.network``).

Only the blueprint's choices exist (instance norm, leaky ReLU, no dropout), so the blocks
take no operator classes as arguments; a plan cannot swap in other code.
"""

from __future__ import annotations

import torch
from torch import nn

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
AVG_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}
NORM_EPS = 1e-5
LEAKY_SLOPE = 1e-2


class InstanceNorm(nn.GroupNorm):
    """Instance norm computed as a group norm with one channel per group.

    The same operation as ``nn.InstanceNorm2d/3d(affine=True)`` without running statistics
    (nnU-Net's norm): per sample and channel, normalise over the spatial axes, then scale and
    shift per channel. Its parameters are also named ``weight`` and ``bias``, so checkpoints
    of either module load into the other. Why not ``nn.InstanceNorm3d``: on the CPU it
    reshapes to a batch norm over ``B*C`` channels, copying the activations, and it cannot
    keep the ``channels_last_3d`` layout; group norm works on either layout directly
    (benchmarks/bench_inference.py: BENCHMARKS.md, "Network layout").
    """

    def __init__(self, channels: int):
        super().__init__(num_groups=channels, num_channels=channels, eps=NORM_EPS, affine=True)


def leaky_relu() -> nn.LeakyReLU:
    # In place: saves one activation-sized buffer per block, which is most of the memory.
    return nn.LeakyReLU(negative_slope=LEAKY_SLOPE, inplace=True)


class ConvNormAct(nn.Module):
    """Convolution - instance norm - leaky ReLU (DNA's ``ConvDropoutNormReLU``, no dropout).

    ``activation=False`` ends after the norm, as the last convolution of a residual block does.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: list[int],
                 stride: list[int] | int = 1, bias: bool = True, activation: bool = True):
        super().__init__()
        # DNA registers each op under its own name *and* again inside ``all_modules``, so its
        # state_dict lists every weight twice (``conv.weight`` and ``all_modules.0.weight``).
        # Same tensors, same keys here, so its checkpoints load with strict=True.
        self.conv = CONV[dims](in_channels, out_channels, kernel_size, stride,
                               padding=[(k - 1) // 2 for k in kernel_size], dilation=1, bias=bias)
        self.norm = InstanceNorm(out_channels)
        ops = [self.conv, self.norm]
        if activation:
            self.nonlin = leaky_relu()
            ops.append(self.nonlin)
        self.all_modules = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class StackedConvs(nn.Module):
    """``n`` ConvNormAct blocks; only the first one strides (DNA's ``StackedConvBlocks``)."""

    def __init__(self, dims: int, n: int, in_channels: int, out_channels: int,
                 kernel_size: list[int], stride: list[int] | int):
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormAct(dims, in_channels, out_channels, kernel_size, stride),
            *[ConvNormAct(dims, out_channels, out_channels, kernel_size) for _ in range(n - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class BasicBlockD(nn.Module):
    """Residual block of ResNet-D (He et al. 2019, "Bag of tricks"), as in DNA.

    Two convolutions, the first one strided; the shortcut average-pools (when strided) and
    projects with a 1x1 convolution (when the width changes) instead of a strided 1x1
    convolution, so no input voxel is skipped.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: list[int],
                 stride: list[int]):
        super().__init__()
        self.conv1 = ConvNormAct(dims, in_channels, out_channels, kernel_size, stride)
        self.conv2 = ConvNormAct(dims, out_channels, out_channels, kernel_size, activation=False)
        self.nonlin2 = leaky_relu()
        strided = any(s != 1 for s in stride)
        shortcut = []
        if strided:
            shortcut.append(AVG_POOL[dims](stride, stride))
        if in_channels != out_channels:
            shortcut.append(ConvNormAct(dims, in_channels, out_channels, [1] * dims, bias=False,
                                        activation=False))
        # The identity shortcut is not a module in DNA (no entry in its module list): None here.
        self.skip = nn.Sequential(*shortcut) if shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.skip is None else self.skip(x)
        out = self.conv2(self.conv1(x))
        out += residual
        return self.nonlin2(out)


class StackedResidualBlocks(nn.Module):
    """``n`` BasicBlockD; only the first one strides (DNA's ``StackedResidualBlocks``)."""

    def __init__(self, dims: int, n: int, in_channels: int, out_channels: int,
                 kernel_size: list[int], stride: list[int]):
        super().__init__()
        self.blocks = nn.Sequential(
            BasicBlockD(dims, in_channels, out_channels, kernel_size, stride),
            *[BasicBlockD(dims, out_channels, out_channels, kernel_size, [1] * dims) for _ in range(n - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def init_he(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)``: Kaiming normal for the leaky ReLU slope, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_residual_as_identity(module: nn.Module) -> None:
    """Zero the last norm of each residual block (DNA's ``init_last_bn_before_add_to_0``).

    Every block then starts as its shortcut, which lets deep residual encoders train from
    the first iteration (Goyal et al. 2017).
    """
    if isinstance(module, BasicBlockD):
        nn.init.zeros_(module.conv2.norm.weight)
        nn.init.zeros_(module.conv2.norm.bias)
