"""The U-Net family for the architecture study: one encoder and one decoder, the block varies.

Every design is built from the same plan keys as the blueprint (stages, strides, kernels,
widths, convolutions per stage), so a comparison changes only the network
(docs/architectures.md). Outputs follow the blueprint's contract: with deep supervision, one
head per decoder stage, highest resolution first, at the resolutions the plan's strides give.

- ``ResBlockUNet``: a residual connection around each stage's convolutions (encoder and decoder).
- ``ResBlock3UNet``: one extra convolution before that residual block (three per stage).
- ``ConvNeXtUNet``: a strided convolution, then ConvNeXt blocks.
- ``ConvSkipResBlockUNet``: ResBlock3 stages and a residual block on each skip connection.
- ``AttentionSkipUNet``: cross-attention on the coarse skips, the decoder's features as the query.
- ``HalfUNet``: every encoder stage projected to the first stage's width, up-sampled to full
  resolution and summed; one convolution stage and the head (Lu et al. 2022's simplified decoder).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from AutoSegLib.network.blocks import CONV, TRANSPOSED_CONV, ConvNormAct, StackedConvs, init_he
from AutoSegLib.network.family_blocks import (CrossAttentionSkip, ResidualStage, convnext_stage, plain_stage,
                                              residual3_stage, residual_stage)
from AutoSegLib.network.unet import StagedEncoder, UNet, UNetSpec

StageBuilder = Callable[..., nn.Module]
# Cross-attention costs memory in the square of a stage's voxels, so only the coarsest skips
# get it: with the planner's patches these hold at most a few thousand voxels (16^3 for a
# 128^3 patch); the finer skips stay plain concatenations.
ATTENTION_SKIPS = 2


class FamilyDecoder(nn.Module):
    """Transposed convolution up, an optional block on the skip, concatenate, ``stage``, a head.

    ``skip``: ``None`` (plain concatenation), ``"resblock"`` (a ResBlock 1 on each skip,
    Conv-Skip's block) or ``"attention"`` (cross-attention on the ``ATTENTION_SKIPS`` coarsest).
    """

    def __init__(self, spec: UNetSpec, stage: StageBuilder, skip: str | None = None):
        super().__init__()
        self.deep_supervision = spec.deep_supervision
        ups, stages, heads, skip_ops = [], [], [], []
        self.attention = []
        for s in range(1, spec.n_stages):
            below, width = spec.features[-s], spec.features[-(s + 1)]
            stride, kernel = list(spec.strides[-s]), list(spec.kernel_sizes[-(s + 1)])
            ups.append(TRANSPOSED_CONV[spec.dims](below, width, stride, stride, bias=True))
            stages.append(stage(spec.dims, spec.n_conv_decoder[s - 1], 2 * width, width, kernel, 1))
            heads.append(CONV[spec.dims](width, spec.n_classes, 1, 1, 0, bias=True))
            attend = skip == "attention" and s <= ATTENTION_SKIPS
            self.attention.append(attend)
            if attend:
                skip_ops.append(CrossAttentionSkip(spec.dims, width))
            elif skip == "resblock":
                skip_ops.append(ResidualStage(spec.dims, 2, width, width, kernel, 1))
            else:
                skip_ops.append(nn.Identity())
        self.transpconvs, self.stages = nn.ModuleList(ups), nn.ModuleList(stages)
        self.seg_layers, self.skip_ops = nn.ModuleList(heads), nn.ModuleList(skip_ops)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x, outputs, last = skips[-1], [], len(self.stages) - 1
        for s, stage in enumerate(self.stages):
            up, skip = self.transpconvs[s](x), skips[-(s + 2)]
            skip = self.skip_ops[s](up, skip) if self.attention[s] else self.skip_ops[s](skip)
            x = stage(torch.cat((up, skip), 1))
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        outputs.reverse()
        return outputs if self.deep_supervision else outputs[0]


class HalfUNetDecoder(nn.Module):
    """Full-scale fusion instead of a decoder path: project, up-sample, sum, convolve once.

    Deep supervision heads read the projected encoder features at their own resolution, so
    the outputs have the blueprint's shapes and the trainer's targets fit unchanged.
    """

    def __init__(self, spec: UNetSpec):
        super().__init__()
        self.deep_supervision = spec.deep_supervision
        width, ones = spec.features[0], [1] * spec.dims
        self.projections = nn.ModuleList(ConvNormAct(spec.dims, f, width, ones) for f in spec.features)
        self.fuse = StackedConvs(spec.dims, spec.n_conv_decoder[-1], width, width, list(spec.kernel_sizes[0]), 1)
        self.seg_layers = nn.ModuleList(CONV[spec.dims](width, spec.n_classes, 1, 1, 0, bias=True)
                                        for _ in range(spec.n_stages - 1))
        self.mode = "trilinear" if spec.dims == 3 else "bilinear"

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        projected = [p(x) for p, x in zip(self.projections, skips)]
        size = projected[0].shape[2:]
        fused = projected[0]
        for p in projected[1:]:
            fused = fused + F.interpolate(p, size=size, mode=self.mode, align_corners=False)
        full = self.seg_layers[0](self.fuse(fused))
        if not self.deep_supervision:
            return full
        return [full, *[head(p) for head, p in zip(self.seg_layers[1:], projected[1:])]]


def _family_unet(name: str, spec: UNetSpec, stage: StageBuilder, skip: str | None = None) -> UNet:
    net = UNet(name, StagedEncoder(spec, stage), FamilyDecoder(spec, stage, skip))
    net.apply(init_he)
    return net


def resblock_unet(spec: UNetSpec) -> UNet:
    return _family_unet("ResBlockUNet", spec, residual_stage)


def resblock3_unet(spec: UNetSpec) -> UNet:
    return _family_unet("ResBlock3UNet", spec, residual3_stage)


def convnext_unet(spec: UNetSpec) -> UNet:
    return _family_unet("ConvNeXtUNet", spec, convnext_stage)


def conv_skip_resblock_unet(spec: UNetSpec) -> UNet:
    return _family_unet("ConvSkipResBlockUNet", spec, residual3_stage, skip="resblock")


def attention_skip_unet(spec: UNetSpec) -> UNet:
    return _family_unet("AttentionSkipUNet", spec, plain_stage, skip="attention")


def half_unet(spec: UNetSpec) -> UNet:
    net = UNet("HalfUNet", StagedEncoder(spec, plain_stage), HalfUNetDecoder(spec))
    net.apply(init_he)
    return net
