"""Stage and skip blocks of the U-Net family designs (AutoSegLib/network/family.py).

Each stage builder has one signature, ``(dims, n_convs, in_channels, out_channels, kernel,
stride) -> nn.Module``, so the family's encoder and decoder take the block as an argument
and only the block changes between designs (the comparison holds everything else fixed).
None of these layouts exist in nnU-Net v2, so their state_dict keys are ours.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from AutoSegLib.network.blocks import AVG_POOL, CONV, ConvNormAct, InstanceNorm, StackedConvs, leaky_relu

# ConvNeXt's inverted bottleneck widens 4x (Liu et al. 2022, "A ConvNet for the 2020s").
CONVNEXT_EXPANSION = 4
# Attention heads get at least this many channels each; narrower skips use one head.
ATTENTION_HEAD_CHANNELS = 32
# Keys and values are average-pooled to at most this many positions, so the attention matrix
# is (stage voxels x 512) per head: linear in the stage's size. Unpooled, a 16x32x32 skip
# needed 15 GB for one training step of batch 2 (16,384^2 scores per head and sample, kept
# for the backward pass).
ATTENTION_MAX_KEYS = 512


def plain_stage(dims, n, in_channels, out_channels, kernel, stride) -> nn.Module:
    """The blueprint: ``n`` conv-norm-act, the first one strided."""
    return StackedConvs(dims, n, in_channels, out_channels, kernel, stride)


class ResidualStage(nn.Module):
    """One residual connection around the stage's ``n`` convolutions ("ResBlock 1").

    Unlike ``BasicBlockD`` (two convolutions per block, blocks stacked) the shortcut spans the
    whole stage. The shortcut average-pools when strided and projects with a 1x1 convolution
    when the width changes, as ResNet-D does, so no input voxel is skipped.
    """

    def __init__(self, dims, n, in_channels, out_channels, kernel, stride):
        super().__init__()
        stride = [stride] * dims if isinstance(stride, int) else list(stride)
        layers = [ConvNormAct(dims, in_channels, out_channels, kernel, stride, activation=n > 1)]
        layers += [ConvNormAct(dims, out_channels, out_channels, kernel, activation=i < n - 2) for i in range(n - 1)]
        self.convs = nn.Sequential(*layers)
        shortcut = []
        if any(s != 1 for s in stride):
            shortcut.append(AVG_POOL[dims](stride, stride, ceil_mode=True))
        if in_channels != out_channels:
            shortcut.append(ConvNormAct(dims, in_channels, out_channels, [1] * dims, bias=False, activation=False))
        self.skip = nn.Sequential(*shortcut) if shortcut else None
        self.nonlin = leaky_relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.skip is None else self.skip(x)
        out = self.convs(x)
        out = out + residual
        return self.nonlin(out)


def residual_stage(dims, n, in_channels, out_channels, kernel, stride) -> nn.Module:
    return ResidualStage(dims, n, in_channels, out_channels, kernel, stride)


def residual3_stage(dims, n, in_channels, out_channels, kernel, stride) -> nn.Module:
    """"ResBlock 2": one more conv-norm-act (strided, changing the width) before a ResBlock 1.

    With the plan's two convolutions per stage this is three convolutions per stage, the
    residual connection around the last two.
    """
    return nn.Sequential(ConvNormAct(dims, in_channels, out_channels, kernel, stride),
                         ResidualStage(dims, n, out_channels, out_channels, kernel, 1))


class ConvNeXtBlock(nn.Module):
    """Depth-wise large kernel - norm - 1x1 widening 4x - GELU - 1x1 back, plus the input.

    The depth-wise kernel is ``2k + 1`` along each axis where the plan's kernel is ``k > 1``
    (3 -> 7, ConvNeXt's size) and stays 1 along axes the plan does not convolve (thick slices).
    """

    def __init__(self, dims: int, channels: int, kernel):
        super().__init__()
        large = [2 * k + 1 if k > 1 else 1 for k in kernel]
        self.depthwise = CONV[dims](channels, channels, large, 1, padding=[(k - 1) // 2 for k in large],
                                    groups=channels, bias=True)
        self.norm = InstanceNorm(channels)
        self.expand = CONV[dims](channels, CONVNEXT_EXPANSION * channels, 1, bias=True)
        self.act = nn.GELU()
        self.reduce = CONV[dims](CONVNEXT_EXPANSION * channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.reduce(self.act(self.expand(self.norm(self.depthwise(x)))))


def convnext_stage(dims, n, in_channels, out_channels, kernel, stride) -> nn.Module:
    """A strided conv-norm-act that changes resolution and width, then ``n - 1`` ConvNeXt blocks."""
    return nn.Sequential(ConvNormAct(dims, in_channels, out_channels, kernel, stride),
                         *[ConvNeXtBlock(dims, out_channels, kernel) for _ in range(max(1, n - 1))])


POOL = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def pooled_size(size, max_positions: int) -> list[int]:
    """Halve the longest axis (rounding up) until at most ``max_positions`` positions remain.

    Example:
        >>> pooled_size([12, 24, 28], 512)
        [6, 12, 7]
    """
    size = [int(s) for s in size]
    while math.prod(size) > max_positions:
        longest = max(range(len(size)), key=lambda a: size[a])
        size[longest] = (size[longest] + 1) // 2
    return size


class CrossAttentionSkip(nn.Module):
    """Cross-attention on a skip connection: the decoder's features ask, the skip answers.

    Queries come from the up-sampled decoder features, keys and values from the encoder's skip
    features at the same resolution; the attended features are added to the skip (so the
    block starts close to a plain skip) before the usual concatenation. Every query sees the
    whole skip, average-pooled to at most ``ATTENTION_MAX_KEYS`` positions, so memory grows
    linearly with the stage's voxels; the family decoder also puts it only on the coarse
    skips (``ATTENTION_SKIPS`` in family.py).
    """

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.heads = max(1, channels // ATTENTION_HEAD_CHANNELS)
        while channels % self.heads:
            self.heads -= 1
        self.norm_query, self.norm_skip = InstanceNorm(channels), InstanceNorm(channels)
        self.query = CONV[dims](channels, channels, 1)
        self.key_value = CONV[dims](channels, 2 * channels, 1)
        self.out = CONV[dims](channels, channels, 1)

    def forward(self, decoder: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        b, c, *size = skip.shape
        n, h = math.prod(size), self.heads

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (b, c, *size) -> (b, heads, voxels, c / heads)
            return t.reshape(b, h, c // h, n).transpose(-1, -2)

        q = tokens(self.query(self.norm_query(decoder)))
        keys = self.norm_skip(skip)
        pooled = pooled_size(size, ATTENTION_MAX_KEYS)
        if pooled != list(size):
            keys = POOL[len(size)](keys, pooled)
        k, v = self.key_value(keys).chunk(2, dim=1)
        m = math.prod(pooled)
        k, v = (t.reshape(b, h, c // h, m).transpose(-1, -2) for t in (k, v))
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(-1, -2).reshape(b, c, *size)
        return skip + self.out(attended)
