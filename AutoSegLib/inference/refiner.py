"""Refine a prediction with clicks: the torch side of :meth:`Predictor.refine`.

The case is preprocessed once (:func:`prepare_case`, cached by the engine process); each
refine then costs one network window per group of nearby clicks (per fold, times the mirrorings
when test-time augmentation is on), whatever the image size::

    clicks (physical) -> preprocessed grid -> windows centred on them
      -> image + guidance maps of *all* clicks -> Gaussian-weighted logits -> softmax, fold mean
      -> the windows' inner parts back to the original grid -> merged into the previous labels

A model trained without guidance simply re-predicts the windows (its automatic result there).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from AutoSegLib.imageio import Geometry
from AutoSegLib.inference.clicks import Click, ClickError, encode_guidance
from AutoSegLib.inference.refine import (RefineCase, RefineResult, check_scope, click_points, inner_mask,
                                         merge_labels, region_box, region_labels, window_starts_for)
from AutoSegLib.inference.memory import min_samples_per_pass
from AutoSegLib.inference.sliding import predict_window_batch
from AutoSegLib.inference.windows import gaussian_importance, padding_for
from AutoSegLib.planning.guidance import guidance_of
from AutoSegLib.preprocessing.case import preprocess_case


def refine_stage(predictor):
    """The one stage a refine runs; a clear error for ensembles and cascades."""
    if len(predictor.stages) != 1 or predictor.stages[0].previous is not None:
        raise ClickError(f"refining with clicks needs one configuration without a cascade; this predictor runs "
                         f"{' + '.join(predictor.configurations)} (choose one with --configuration)")
    return predictor.stages[0]


def prepare_case(predictor, channels: list[np.ndarray], geometry: Geometry) -> RefineCase:
    """Preprocess one case for the refine stage (crop, normalize, resample), once per image."""
    stage = refine_stage(predictor)
    channels = predictor.check_input(channels, geometry)
    plans = predictor.model.plans
    data, _, properties = preprocess_case(channels, None, geometry, stage.config, plans.transpose_forward,
                                          plans.foreground_intensity_properties_per_channel, plans.orientation)
    return RefineCase(data, properties, geometry, stage.name)


def refine_case(predictor, case: RefineCase, previous_labels: np.ndarray, clicks: Sequence[Click],
                scope: str = "clicked") -> RefineResult:
    """Re-predict the windows around ``clicks`` and merge them into ``previous_labels`` (see module doc)."""
    started = time.monotonic()
    stage = refine_stage(predictor)
    check_scope(scope)
    clicks = list(clicks)
    if not clicks:
        raise ClickError("refine needs at least one click")
    previous_labels = np.asarray(previous_labels)
    if previous_labels.shape != case.original_shape:
        raise ClickError(f"previous labels have shape {previous_labels.shape}, the image {case.original_shape}")
    foreground = predictor.model.foreground_values
    points = click_points(clicks, case, foreground)
    patch = [int(p) for p in stage.config["patch_size"]]
    if len(patch) != case.data.ndim - 1:
        raise ClickError(f"refining needs a 3D configuration; {stage.name} predicts {len(patch)}D patches")
    data_shape = case.data.shape[1:]
    pads = padding_for(data_shape, patch)
    before = np.array([b for b, _ in pads])
    padded_shape = [n + b + a for n, (b, a) in zip(data_shape, pads)]
    starts = window_starts_for([p + before for _, _, p in points], padded_shape, patch)
    box_lo = np.min(starts, axis=0)
    box_hi = np.max(starts, axis=0) + patch
    box_shape = tuple(int(v) for v in box_hi - box_lo)
    x = _box_input(case.data, before, box_lo, box_shape)
    spec = guidance_of(stage.config)
    if spec is not None:
        guidance = encode_guidance([(c, s, p + before - box_lo) for c, s, p in points], box_shape,
                                   len(foreground), spec.radius)
        x = np.concatenate([x, guidance])
    local = [tuple(int(v) for v in np.asarray(s) - box_lo) for s in starts]
    network_started = time.monotonic()
    probabilities = _windows_probabilities(predictor, stage, torch.from_numpy(x), local, patch)
    network_seconds = time.monotonic() - network_started
    # back to the data's own (unpadded) grid
    lo = np.maximum(box_lo, before)
    hi = np.minimum(box_hi, before + np.asarray(data_shape))
    inside = tuple(slice(int(a - box_lo[k]), int(b - box_lo[k])) for k, (a, b) in enumerate(zip(lo, hi)))
    covered = inner_mask(local, [0] * len(patch), box_shape, patch, before - box_lo,
                         before - box_lo + np.asarray(data_shape))[inside]
    region, labels, take = region_labels(probabilities[(slice(None), *inside)], covered, lo - before,
                                         case.properties)
    merged = merge_labels(previous_labels, region, labels, take, sorted({c.label for c in clicks}), scope)
    return RefineResult(merged, region_box(region), len(starts) * len(stage.weights), time.monotonic() - started,
                        network_seconds)


def _box_input(data: np.ndarray, before: np.ndarray, box_lo: np.ndarray, box_shape) -> np.ndarray:
    """The image channels on the box (padded-grid coordinates), zero where it leaves the image."""
    out = np.zeros((data.shape[0], *box_shape), dtype=np.float32)
    src, dst = [], []
    for k, n in enumerate(data.shape[1:]):
        a = int(box_lo[k] - before[k])  # box start in data coordinates
        lo, hi = max(a, 0), min(a + box_shape[k], n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - a, hi - a))
    out[(slice(None), *dst)] = data[(slice(None), *src)]
    return out


def _windows_probabilities(predictor, stage, x: torch.Tensor, starts: list[tuple], patch: list[int]) -> np.ndarray:
    """Fold-mean softmax of the Gaussian-weighted window logits over the box (K, *box) float32."""
    from AutoSegLib.inference.predictor import mirror_axes_for

    mirror = mirror_axes_for(stage.config) if predictor.tta else ()
    gaussian = torch.from_numpy(gaussian_importance(patch, dtype=np.float32))
    windows = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in starts]
    network = predictor._forward(stage.network)
    min_samples = min_samples_per_pass(patch, predictor.device.type)
    total = None
    with torch.inference_mode():
        batch = torch.stack([x[(slice(None), *w)] for w in windows]).to(predictor.device)
        for weights in stage.weights:
            if len(stage.weights) > 1:
                stage.network.load_state_dict(weights)
            out = predict_window_batch(network, batch, mirror, min_samples).float().cpu() * gaussian
            logits = torch.zeros((out.shape[1], *x.shape[1:]))
            weight = torch.zeros(x.shape[1:])
            for w, o in zip(windows, out):
                logits[(slice(None), *w)] += o
                weight[w] += gaussian
            logits /= weight.clamp_min(1e-12)
            probabilities = torch.softmax(logits, 0)
            total = probabilities if total is None else total + probabilities
        total /= len(stage.weights)
    return total.numpy()
