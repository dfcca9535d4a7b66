"""Which memory layout a network's activations use at inference.

oneDNN, torch's CPU convolution library, computes 3D convolutions in a channels-last layout
(channels innermost). Fed ``contiguous`` (N, C, D, H, W) tensors it reorders every input and
output of every convolution; in ``channels_last_3d`` those reorders go away. Measured on the
phantoms' 3d_fullres network (1 thread, BENCHMARKS.md "Network layout"): a phantom case
predicts 18-19% faster (4.92-5.00 -> 4.05 s), logits equal to 7e-4. Training is not converted: there
the backward convolutions in channels-last were slower (one step 21.2-21.7 s contiguous,
22.0-23.4 s channels-last). The layout changes no state_dict key: it is a storage order, and
checkpoints load into either layout.

CUDA keeps the contiguous layout: cuDNN's choice between layouts depends on the GPU and on
mixed precision, and nothing here can measure it.
"""

from __future__ import annotations

import torch


def inference_memory_format(dims: int, device: torch.device | str) -> torch.memory_format:
    """``channels_last_3d`` for 3D networks on the CPU, ``contiguous_format`` otherwise.

    2D networks stay contiguous: their convolutions are cheap next to the 3D ones and the
    layout was not measured to help them.
    """
    if dims == 3 and torch.device(device).type == "cpu":
        return torch.channels_last_3d
    return torch.contiguous_format

