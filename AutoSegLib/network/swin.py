"""Swin-UNETR from MONAI (Hatamizadeh et al. 2022), used as a dependency, not re-written.

MONAI is an optional extra (``pip install 'autoseg[monai]'``) imported only when this network
is built, so the engine and ``autoseg --help`` never load it otherwise. MONAI needs only torch
and numpy: installing it leaves the user's torch alone (checked with ``pip install --dry-run``).

Swin-UNETR halves the resolution five times (patch embedding, then four merging stages), so
every patch axis must be divisible by 32; the planner rounds the patch
(``AutoSegLib.planning.architectures``). Its decoder has one output: with deep supervision
on, the network returns that one output in a list and ``supervision_weights`` is ``[1.0]``.
"""

from __future__ import annotations

import torch
from torch import nn

SWIN_DIVISOR = 32
INSTALL_HINT = "pip install 'autoseg[monai]'"
# MONAI's Swin stages have 3, 6, 12 and 24 heads, so the feature size is a multiple of 12.
FEATURE_MULTIPLE = 12


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message is the one line to fix it."""


def swin_feature_size(base_features: int) -> int:
    """The multiple of 12 nearest to the plan's first-stage width (at least 12): 16 -> 12, 32 -> 36."""
    return max(FEATURE_MULTIPLE, FEATURE_MULTIPLE * round(base_features / FEATURE_MULTIPLE))


class SwinUNETRNet(nn.Module):
    def __init__(self, dims: int, n_input_channels: int, n_classes: int, base_features: int,
                 deep_supervision: bool = True):
        super().__init__()
        try:
            from monai.networks.nets import SwinUNETR
        except ImportError:
            raise MissingExtra(f"Swin-UNETR needs MONAI: {INSTALL_HINT}") from None
        self.architecture = "SwinUNETR"
        self.deep_supervision = bool(deep_supervision)
        self.net = SwinUNETR(in_channels=n_input_channels, out_channels=n_classes,
                             feature_size=swin_feature_size(base_features), spatial_dims=dims)

    @property
    def supervision_weights(self) -> list[float] | None:
        return [1.0] if self.deep_supervision else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net(x)
        return [out] if self.deep_supervision else out
