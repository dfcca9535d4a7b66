"""Sliding-window prediction of one network over one preprocessed case: tensors in, logits out.

nnU-Net v2's scheme: each window's logits (averaged over the mirrored copies when test-time
augmentation is on) are multiplied by the Gaussian importance map and added into an
accumulator the size of the image; a second accumulator sums the weights; their ratio is the
prediction, and the softmax is taken of these averaged logits (:func:`softmax`), not of each
window. Memory is the two accumulators plus one batch of windows, whatever the image size.

The network is any callable ``(B, C, *patch) -> (B, K, *patch)``, so tests can put a known
function in its place.

Example:
    >>> net = lambda x: torch.cat([x, -x], 1)  # doctest: +SKIP
    >>> logits = sliding_window_logits(net, torch.zeros(1, 40, 50, 30), (16, 32, 32))  # doctest: +SKIP
    >>> logits.shape  # doctest: +SKIP
    torch.Size([2, 40, 50, 30])
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from AutoSegLib.inference.memory import min_samples_per_pass
from AutoSegLib.preprocessing.slabs import slabs
from AutoSegLib.inference.windows import (VALUE_SCALE, gaussian_importance, mirror_combinations, padding_for,
                                          sliding_windows, unpad_slices)

Network = Callable[[torch.Tensor], torch.Tensor]
FLOAT16_MIN_WEIGHT = VALUE_SCALE * 1e-3


def accumulate_dtype_for(device: torch.device) -> torch.dtype:
    """float16 on CUDA (halves the accumulators in scarce GPU memory, as nnU-Net), float32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def predict_window_batch(network: Network, x: torch.Tensor, mirror_axes: Sequence[int] = (),
                         min_samples: int = 1) -> torch.Tensor:
    """Logits of a batch of windows, averaged over every flip of ``mirror_axes`` (patch axes).

    Each flipped input's output is flipped back before averaging, so a network that is not
    mirror-equivariant still gets its predictions aligned with the image. ``min_samples``: a
    batch of fewer windows goes through the network together with flipped copies, so that each
    call holds at least that many samples while flips remain (the CPU's convolutions want two,
    :func:`AutoSegLib.inference.memory.min_samples_per_pass`). The sum runs in the same order either way.
    """
    flips = [(), *mirror_combinations(a + 2 for a in mirror_axes)]  # + batch and channel axes
    n = x.shape[0]
    per_call = max(1, -(-int(min_samples) // n))  # flipped copies per network call
    out = None
    for first in range(0, len(flips), per_call):
        group = flips[first:first + per_call]
        inputs = [torch.flip(x, axes) if axes else x for axes in group]
        logits = network(inputs[0] if len(inputs) == 1 else torch.cat(inputs)).float()
        for i, axes in enumerate(group):
            part = logits[i * n:(i + 1) * n]
            part = torch.flip(part, axes) if axes else part
            out = part.clone() if out is None else out.add_(part)
    if len(flips) > 1:
        out /= len(flips)
    return out


def _pad(data: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    if not any(before or after for before, after in pads):
        return data
    flat = [n for before_after in reversed(pads) for n in before_after]  # F.pad wants the last axis first
    return F.pad(data, flat, mode="constant", value=0.0)


def sliding_window_logits(network: Network, data: torch.Tensor, patch_size: Sequence[int], step: float = 0.5,
                          mirror_axes: Sequence[int] = (), batch_size: int = 1,
                          accumulate_dtype: torch.dtype | None = None,
                          progress: Callable[[int, int], None] | None = None,
                          network_device: torch.device | None = None) -> torch.Tensor:
    """Gaussian-weighted mean logits of all windows over ``data`` (C, *spatial).

    Args:
        network: ``(B, C, *patch) -> (B, K, *patch)``; run on ``network_device``.
        data: one preprocessed case; with a 2D patch and 3D data, windows are slices.
        patch_size: the training patch (2 or 3 axes).
        step: window spacing as a fraction of the patch (0.5 in nnU-Net; 1 = no overlap).
        mirror_axes: patch axes flipped for test-time augmentation (all combinations).
        batch_size: windows per forward pass.
        accumulate_dtype: of the accumulators; default float16 on CUDA, else float32.
        progress: called as ``progress(windows_done, windows_total)`` after each forward pass.
        network_device: where the network runs; default ``data``'s device. With ``data`` in host
            memory and the network on a GPU, each batch of windows goes to the GPU and its logits
            come back, so the accumulators (K values per voxel) take no GPU memory.

    Returns:
        logits (K, *spatial) on ``data``'s device, in ``accumulate_dtype``.
    """
    device = data.device
    dtype = accumulate_dtype or accumulate_dtype_for(device)
    min_samples = min_samples_per_pass(patch_size, torch.device(network_device or device).type)
    pads = padding_for(tuple(data.shape[1:]), patch_size)
    padded = _pad(data, pads)
    spatial = tuple(padded.shape[1:])
    windows = sliding_windows(spatial, patch_size, step)
    gaussian = torch.from_numpy(gaussian_importance(patch_size, dtype=np.float32)).to(device)
    if dtype == torch.float16:
        # Window corners weigh ~1e-10 of the peak: in float16 both weight and weighted logits would
        # underflow to 0 and voxels seen only by corners would come out 0. A floor of 0.1% of the
        # peak keeps them representable and changes no other voxel's weighting measurably.
        gaussian = gaussian.clamp_min(FLOAT16_MIN_WEIGHT)
    weight = gaussian.to(dtype)  # numerator and denominator use exactly the same weights
    weights = torch.zeros(spatial, dtype=dtype, device=device)
    logits = None
    with torch.inference_mode():
        for first in range(0, len(windows), max(1, int(batch_size))):
            chunk = windows[first:first + max(1, int(batch_size))]
            x = torch.stack([padded[(slice(None), *w)] for w in chunk])
            if network_device is not None:
                x = x.to(network_device)
            out = predict_window_batch(network, x, mirror_axes, min_samples).to(device) * gaussian
            if logits is None:
                logits = torch.zeros((out.shape[1], *spatial), dtype=dtype, device=device)
            for w, o in zip(chunk, out):
                logits[(slice(None), *w)] += o.to(dtype)
                weights[w] += weight
            if progress is not None:
                progress(first + len(chunk), len(windows))
        logits /= weights
    return logits[(slice(None), *unpad_slices(pads, spatial))]


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (K, ...) float32 from averaged logits, computed in float32.

    float32 logits in host memory are overwritten a slab of slices at a time (the same values as
    one ``torch.softmax`` over the whole array, tested bit for bit): no second K-class volume
    beside the logits, 0.8 GB less for 6 classes on a 207x399x399 grid.
    """
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() < 2:
        return torch.softmax(logits.float(), dim=0)
    with torch.inference_mode():  # the accumulators are inference tensors
        for s in slabs(tuple(logits.shape[1:])):
            logits[:, s] = torch.softmax(logits[:, s], dim=0)
    return logits
