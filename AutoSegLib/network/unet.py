"""The U-Nets: encoders, the decoder, and the three architectures of the registry.

Module names and registration order follow dynamic-network-architectures (DNA) 0.4.4, so the
state_dict of ``plain_conv_unet`` equals that of DNA's ``PlainConvUNet`` key for key and
shape for shape (likewise ``residual_encoder_unet`` and ``ResidualEncoderUNet``), and
nnU-Net v2 checkpoints load with ``load_state_dict(strict=True)``.
Fixtures generated from DNA itself (Testing/data/dna_reference_*.json) keep this checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from AutoSegLib.network.blocks import (CONV, TRANSPOSED_CONV, ConvNormAct, StackedConvs,
                                       StackedResidualBlocks, init_he, init_residual_as_identity)


@dataclass(frozen=True)
class UNetSpec:
    """Everything that shapes a U-Net; one entry per resolution stage, full resolution first.

    ``n_conv_encoder`` counts convolutions per stage for the plain encoder and residual blocks
    (two convolutions each) for the residual one, as nnU-Net's ``n_blocks_per_stage`` does.
    ``n_conv_decoder`` has one entry fewer, lowest decoder stage first (DNA's order).
    """

    dims: int
    n_input_channels: int
    n_classes: int
    features: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_encoder: tuple[int, ...]
    n_conv_decoder: tuple[int, ...]
    deep_supervision: bool = True

    @property
    def n_stages(self) -> int:
        return len(self.features)


class StagedEncoder(nn.Module):
    """One ``stage(dims, n_convs, in, out, kernel, stride)`` per resolution, the first block of
    each strided; returns every stage's output (the skips, full resolution first)."""

    def __init__(self, spec: UNetSpec, stage):
        super().__init__()
        stages, channels = [], spec.n_input_channels
        for s in range(spec.n_stages):
            stages.append(stage(spec.dims, spec.n_conv_encoder[s], channels, spec.features[s],
                                list(spec.kernel_sizes[s]), list(spec.strides[s])))
            channels = spec.features[s]
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


def _plain_stage(dims, n_convs, in_channels, out_channels, kernel, stride) -> nn.Module:
    # The extra Sequential is DNA's slot for an optional pooling layer; it is in the keys.
    return nn.Sequential(StackedConvs(dims, n_convs, in_channels, out_channels, kernel, stride))


class PlainConvEncoder(StagedEncoder):
    """Stacked convolutions per stage, the first one strided; returns every stage's output."""

    def __init__(self, spec: UNetSpec):
        super().__init__(spec, _plain_stage)


class ResidualEncoder(nn.Module):
    """A one-convolution stem at full resolution, then residual blocks (DNA's ``ResidualEncoder``)."""

    def __init__(self, spec: UNetSpec):
        super().__init__()
        self.stem = StackedConvs(spec.dims, 1, spec.n_input_channels, spec.features[0], spec.kernel_sizes[0], 1)
        stages, channels = [], spec.features[0]
        for s in range(spec.n_stages):
            stages.append(StackedResidualBlocks(spec.dims, spec.n_conv_encoder[s], channels, spec.features[s],
                                                spec.kernel_sizes[s], spec.strides[s]))
            channels = spec.features[s]
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, skips = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Transposed convolution up, concatenate the skip, convolve; a 1x1 head per stage.

    Stages run from the bottleneck up. ``deep_supervision`` (an attribute, switchable at any
    time) returns the heads of all stages, highest resolution first; otherwise only the
    full-resolution head runs. All heads are always built so a model trained with deep
    supervision loads for inference without it.

    ``conv_skip`` adds one ConvNormAct on each skip before the concatenation (the Conv-Skip
    variant); its weights sit under ``skip_convs``, after DNA's keys.
    """

    def __init__(self, encoder: nn.Module, spec: UNetSpec, conv_skip: bool = False):
        super().__init__()
        self.deep_supervision = spec.deep_supervision
        # DNA's decoder keeps its encoder as a submodule, so nnU-Net v2 checkpoints hold every
        # encoder weight a second time under ``decoder.encoder.``; we keep it for strict loading.
        # The tensors are shared: no extra memory, and torch.save stores them once.
        self.encoder = encoder
        stages, transpconvs, seg_layers = [], [], []
        for s in range(1, spec.n_stages):
            below, skip = spec.features[-s], spec.features[-(s + 1)]
            stride, kernel = spec.strides[-s], spec.kernel_sizes[-(s + 1)]
            transpconvs.append(TRANSPOSED_CONV[spec.dims](below, skip, stride, stride, bias=True))
            stages.append(StackedConvs(spec.dims, spec.n_conv_decoder[s - 1], 2 * skip, skip, kernel, 1))
            seg_layers.append(CONV[spec.dims](skip, spec.n_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.seg_layers = nn.ModuleList(seg_layers)
        self.skip_convs = None
        if conv_skip:
            self.skip_convs = nn.ModuleList(ConvNormAct(spec.dims, width, width, kernel) for width, kernel
                                            in zip(spec.features[-2::-1], spec.kernel_sizes[-2::-1]))

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x, outputs, last = skips[-1], [], len(self.stages) - 1
        for s, stage in enumerate(self.stages):
            skip = skips[-(s + 2)]
            if self.skip_convs is not None:
                skip = self.skip_convs[s](skip)
            x = stage(torch.cat((self.transpconvs[s](x), skip), 1))
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        outputs.reverse()
        return outputs if self.deep_supervision else outputs[0]


class UNet(nn.Module):
    """Encoder and decoder; ``forward`` returns a list (deep supervision) or one tensor."""

    def __init__(self, architecture: str, encoder: nn.Module, decoder: UNetDecoder):
        super().__init__()
        self.architecture = architecture
        self.encoder = encoder
        self.decoder = decoder

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = bool(enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder(x))


def plain_conv_unet(spec: UNetSpec) -> UNet:
    """The nnU-Net blueprint U-Net (DNA's ``PlainConvUNet``)."""
    encoder = PlainConvEncoder(spec)
    net = UNet("PlainConvUNet", encoder, UNetDecoder(encoder, spec))
    net.apply(init_he)
    return net


def residual_encoder_unet(spec: UNetSpec) -> UNet:
    """Residual encoder, plain decoder (DNA's ``ResidualEncoderUNet`` with ``BasicBlockD``)."""
    encoder = ResidualEncoder(spec)
    net = UNet("ResidualEncoderUNet", encoder, UNetDecoder(encoder, spec))
    net.apply(init_he)
    net.apply(init_residual_as_identity)
    return net


def conv_skip_unet(spec: UNetSpec) -> UNet:
    """The plain U-Net with one ConvNormAct on every skip connection (not in DNA).

    Every key of the plain U-Net is kept, so plain nnU-Net weights load with strict=False and
    only ``decoder.skip_convs`` left to train.
    """
    encoder = PlainConvEncoder(spec)
    net = UNet("ConvSkipUNet", encoder, UNetDecoder(encoder, spec, conv_skip=True))
    net.apply(init_he)
    return net
