"""U-Net++ (Zhou et al., IEEE TMI 2020): nested, dense skip pathways over one encoder.

Node ``X(i, j)`` sits at encoder depth ``i`` (0 = full resolution), ``j`` steps along its skip
pathway; ``X(i, 0)`` is the blueprint's encoder. For ``j > 0`` a node convolves the
concatenation of every earlier node of its row and the transposed-convolution up-sampling of
``X(i+1, j-1)``. With ``L`` = stages - 1 the network holds U-Nets of depths 1..L that share the
encoder; ``X(0, j)`` is the output of the depth-``j`` one.

Deep supervision is over the nested outputs: a 1x1 head on each ``X(0, j)``, all at full
resolution, returned deepest first and weighted equally (``supervision_weights``); the
trainer pairs each output with the target of its shape. Without deep supervision the network
predicts with the head of depth ``inference_depth`` (default ``L``) and computes only the
nodes that depth needs (``i + j <= depth``, encoder stages ``0..depth``): the paper's pruning,
which a plan chooses with ``network.inference_depth``.
"""

from __future__ import annotations

import torch
from torch import nn

from AutoSegLib.network.blocks import CONV, TRANSPOSED_CONV, StackedConvs, init_he
from AutoSegLib.network.unet import PlainConvEncoder, UNet, UNetSpec


class NestedDecoder(nn.Module):
    def __init__(self, spec: UNetSpec):
        super().__init__()
        self.deep_supervision = spec.deep_supervision
        self.depth = spec.n_stages - 1
        self.inference_depth = self.depth
        f, dims = spec.features, spec.dims
        nodes, ups = {}, {}
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                ups[f"{i}_{j}"] = TRANSPOSED_CONV[dims](f[i + 1], f[i], list(spec.strides[i + 1]),
                                                        list(spec.strides[i + 1]), bias=True)
                n_conv = spec.n_conv_decoder[-(i + 1)]
                nodes[f"{i}_{j}"] = StackedConvs(dims, n_conv, (j + 1) * f[i], f[i], list(spec.kernel_sizes[i]), 1)
        self.nodes, self.ups = nn.ModuleDict(nodes), nn.ModuleDict(ups)
        self.seg_layers = nn.ModuleList(CONV[dims](f[0], spec.n_classes, 1, 1, 0, bias=True)
                                        for _ in range(self.depth))

    @property
    def supervision_weights(self) -> list[float] | None:
        return [1.0 / self.depth] * self.depth if self.deep_supervision else None

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        depth = self.depth if self.deep_supervision else self.inference_depth
        rows = [[skip] for skip in skips[:depth + 1]]
        for j in range(1, depth + 1):
            for i in range(depth - j + 1):
                key = f"{i}_{j}"
                up = self.ups[key](rows[i + 1][j - 1])
                rows[i].append(self.nodes[key](torch.cat((*rows[i], up), 1)))
        if not self.deep_supervision:
            return self.seg_layers[depth - 1](rows[0][depth])
        return [self.seg_layers[j - 1](rows[0][j]) for j in range(depth, 0, -1)]


class UNetPlusPlus(UNet):
    """The shared encoder runs only as deep as the pruned inference needs."""

    @property
    def inference_depth(self) -> int:
        return self.decoder.inference_depth

    @inference_depth.setter
    def inference_depth(self, depth: int) -> None:
        if not 1 <= int(depth) <= self.decoder.depth:
            raise ValueError(f"inference_depth {depth} must be from 1 to {self.decoder.depth}")
        self.decoder.inference_depth = int(depth)

    @property
    def supervision_weights(self) -> list[float] | None:
        return self.decoder.supervision_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        depth = self.decoder.depth if self.deep_supervision else self.decoder.inference_depth
        skips = []
        for stage in self.encoder.stages[:depth + 1]:
            x = stage(x)
            skips.append(x)
        return self.decoder(skips)


def unet_plus_plus(spec: UNetSpec) -> UNetPlusPlus:
    net = UNetPlusPlus("UNetPlusPlus", PlainConvEncoder(spec), NestedDecoder(spec))
    net.apply(init_he)
    return net
