"""Comparing a network with dynamic-network-architectures (DNA) without needing DNA installed.

``benchmarks/check_dna_compat.py`` runs DNA and records, per plan, the state_dict layout and
the outputs for weights and input computed by formula (no random generator, so any torch
version reproduces them). Tests then rebuild our network, fill it the same way and compare.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

# Output values recorded per head: evenly spaced over the flattened tensor.
N_SAMPLES = 16
# Parameter values repeat with this period (a prime, so never in step with a tensor's shape);
# computing a few thousand sines instead of one per weight keeps the fill instant.
PERIOD = 9973


def state_dict_layout(net: nn.Module) -> list[list]:
    """``[key, shape]`` for every state_dict entry, in state_dict order."""
    return [[key, list(value.shape)] for key, value in net.state_dict().items()]


def fill_deterministic(net: nn.Module) -> None:
    """Set every parameter from a formula of its name, at a scale that keeps activations O(1).

    The phase comes from a checksum of the name, so the values do not depend on the order of
    parameters; norm scales sit near 1, biases near 0, weights about 1/sqrt(fan-in).
    """
    with torch.no_grad():
        for name, param in net.named_parameters():
            phase = zlib.crc32(name.encode()) % 997
            n = param.numel()
            period = torch.sin(torch.arange(min(n, PERIOD), dtype=torch.float64) * 0.731 + phase)
            if param.dim() > 1:
                period *= math.sqrt(3.0 / (n // param.shape[0]))
            elif name.endswith("norm.weight"):
                period = 1.0 + 0.1 * period
            else:
                period *= 0.1
            tile_into(param.view(-1), period.to(param.dtype))


def tile_into(flat: torch.Tensor, period: torch.Tensor) -> None:
    """Write ``period`` repeatedly into ``flat`` without materialising the repeated tensor."""
    whole = flat.numel() // period.numel() * period.numel()
    flat[:whole].view(-1, period.numel()).copy_(period.expand(whole // period.numel(), -1))
    flat[whole:].copy_(period[:flat.numel() - whole])


def reference_input(shape: list[int], dtype=torch.float32) -> torch.Tensor:
    """A smooth, non-symmetric input of ``shape`` (batch, channels, *spatial)."""
    i = torch.arange(math.prod(shape), dtype=torch.float64)
    return (torch.sin(i * 0.0137) + torch.cos(i * 0.291)).reshape(shape).to(dtype)


def output_summary(outputs: torch.Tensor | list[torch.Tensor]) -> list[dict]:
    """Shape, sum, absolute sum and sampled values of each output head."""
    heads = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    summary = []
    for head in heads:
        flat = head.detach().to(torch.float64).flatten()
        index = torch.linspace(0, flat.numel() - 1, N_SAMPLES).round().long()
        summary.append({"shape": list(head.shape), "sum": flat.sum().item(), "abs_sum": flat.abs().sum().item(),
                        "samples": flat[index].tolist()})
    return summary
