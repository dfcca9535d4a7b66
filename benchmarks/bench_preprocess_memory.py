"""Peak memory and time of preprocessing one large case, and of the way back (issue 4, item 7).

Builds CT-like (and one MR-like) cases in code, then measures ``preprocess_case``,
``restore_label`` and ``restore_probabilities`` (K=5) each in a fresh subprocess, so the
process's high-water mark belongs to that one call:

    peak above inputs = ru_maxrss after the call - RSS after imports and after building inputs

(the high-water mark is reset with ``/proc/self/clear_refs`` once the inputs are built, so the
temporaries used to *build* them do not count; without that file the baseline is the
high-water mark so far). The same figures are measured for ``proposed`` copies of the
functions (defined below, not library code) that write into preallocated outputs instead of
holding extra full-size copies; their outputs are checked against the library's.

    python benchmarks/bench_preprocess_memory.py                  # library code, cases A B C (~4 min)
    python benchmarks/bench_preprocess_memory.py --variant both --cases A B C C-1mm A-mr   # (~8 min)
    python benchmarks/bench_preprocess_memory.py --cases A --ops preprocess               # a subset
    python benchmarks/bench_preprocess_memory.py --lines B:preprocess[:proposed]  # peak per line

Cases (see CASES): A 400x512x512 CT at 1.0x0.78x0.78 mm, target = original (no resampling);
B the same to 1.5x1.0x1.0 mm; C 80x512x512 at 5 mm slices with the planner's 3d_lowres;
C-1mm the same to 1 mm slices; A-mr an MR-like A (zero outside the body, z-score in mask).

``--lines CASE:OP`` traces the lines of the functions that matter and prints, per line, the
highest RSS reached while it ran (above the inputs), nested calls included. Results and the
conclusions drawn from them: BENCHMARKS.md, section Preprocessing.
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1024 * 1024
K_PROBABILITIES = 5
SLAB = 16  # slices per block where the proposed copies work slab by slab

# name: (shape z,y,x, spacing mm, modality, target spacing: a configuration name or explicit, description)
CASES = {
    "A": ((400, 512, 512), (1.0, 0.78, 0.78), "CT", "3d_fullres", "CT, target = original spacing"),
    "B": ((400, 512, 512), (1.0, 0.78, 0.78), "CT", (1.5, 1.0, 1.0), "CT, resampled to 1.5 x 1.0 x 1.0"),
    "C": ((80, 512, 512), (5.0, 0.78, 0.78), "CT", "3d_lowres", "CT 5 mm slices, planner's 3d_lowres"),
    "A-mr": ((400, 512, 512), (1.0, 0.78, 0.78), "MR", "3d_fullres", "MR-like, zero outside body, z-score in mask"),
    "C-1mm": ((80, 512, 512), (5.0, 0.78, 0.78), "CT", (1.0, 0.78, 0.78), "CT 5 mm slices to 1 mm slices"),
}
DEFAULT_CASES = ("A", "B", "C")  # A-mr and C-1mm on request (--cases)
OPS = ("preprocess", "restore_label", "restore_probabilities")
CT_INTENSITY = {"0": {"mean": 60.0, "median": 55.0, "std": 45.0, "min": -300.0, "max": 1500.0,
                      "percentile_00_5": -60.0, "percentile_99_5": 300.0}}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def build_case(shape, spacing, modality: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CT-like int16 image and uint8 label with 5 classes (0..4), built one slice at a time.

    CT: air -1000 around an elliptic body (40 HU), liver/spleen/kidneys (60/45/30 HU, labels
    1-4), a bright spine (700 HU), Gaussian noise (sd 15). MR: same anatomy, positive
    intensities, exactly 0 outside the body (so cropping and the in-mask z-score have work).
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    image = np.empty(shape, np.int16)
    label = np.zeros(shape, np.uint8)
    zz, yy, xx = ((np.arange(n) + 0.5) * s for n, s in zip(shape, spacing))
    ext_z, ext_y, ext_x = (n * s for n, s in zip(shape, spacing))
    outside, tissue, spine = (-1000.0, 40.0, 700.0) if modality == "CT" else (0.0, 300.0, 150.0)
    organs = [((0.45, 0.45, 0.35), (90, 60, 70), 60 if modality == "CT" else 500, 1),
              ((0.50, 0.45, 0.70), (50, 35, 35), 45 if modality == "CT" else 400, 2),
              ((0.55, 0.60, 0.30), (40, 25, 25), 30 if modality == "CT" else 700, 3),
              ((0.55, 0.60, 0.70), (40, 25, 25), 30 if modality == "CT" else 700, 4)]
    ry = ((yy[:, None] - ext_y / 2) / (0.36 * ext_y)) ** 2
    rx = ((xx[None, :] - ext_x / 2) / (0.45 * ext_x)) ** 2
    spine_mask = ((yy[:, None] - 0.75 * ext_y) / 15) ** 2 + ((xx[None, :] - ext_x / 2) / 15) ** 2 <= 1
    for k, z in enumerate(zz):
        scale = 1.0 + 0.05 * np.sin(2 * np.pi * z / ext_z)
        body = ry + rx <= scale * scale
        plane = np.full((ny, nx), outside, np.float32)
        plane[body] = tissue
        labels = np.zeros((ny, nx), np.uint8)
        for (fz, fy, fx), (dz, dy, dx), value, cls in organs:
            rz = ((z - fz * ext_z) / dz) ** 2
            if rz >= 1:
                continue
            inside = ((yy[:, None] - fy * ext_y) / dy) ** 2 + ((xx[None, :] - fx * ext_x) / dx) ** 2 + rz <= 1
            plane[inside] = value
            labels[inside] = cls
        plane[spine_mask] = spine
        noise = rng.normal(0, 15, (ny, nx)).astype(np.float32)
        if modality == "CT":
            plane += noise
        else:
            plane[body] = np.maximum(plane[body] + noise[body], 1)  # keep the body nonzero
        image[k] = np.round(plane).astype(np.int16)
        label[k] = labels
    return image, label


def configuration(case: str) -> tuple[dict, list[int], dict]:
    """A plans.json configuration for the case from the real planner (50 such cases)."""
    from AutoSegLib.planning import plan

    shape, spacing, modality, target, _ = CASES[case]
    fingerprint = {"spacings": [list(spacing)] * 50, "shapes_after_crop": [list(shape)] * 50,
                   "foreground_intensity_properties_per_channel": CT_INTENSITY if modality == "CT" else {},
                   "median_relative_size_after_cropping": 1.0 if modality == "CT" else 0.5}
    labels = {"background": 0, "liver": 1, "spleen": 2, "kidney_l": 3, "kidney_r": 4}
    plans = plan(fingerprint, {0: modality if modality == "CT" else "T1"}, labels).to_dict()
    name = target if isinstance(target, str) else "3d_fullres"
    config = plans["configurations"][name]
    if not isinstance(target, str):
        config = {**config, "spacing": list(target)}
    return config, plans["transpose_forward"], plans["foreground_intensity_properties_per_channel"]


# --------------------------------------------------------------------------------------------
# Proposed copies (benchmark only; the library keeps its own code until the lead changes it)
# --------------------------------------------------------------------------------------------

def _proposed_zoom_into(array, out, order):
    """``_zoom`` writing into ``out``; ``array`` is a private float32 scratch the filter may overwrite."""
    from scipy import ndimage

    factors = [n / o for n, o in zip(out.shape, array.shape)]
    if all(f == 1 for f in factors):
        out[...] = array
        return out
    if order > 1:
        ndimage.spline_filter(array, order=order, output=array, mode="mirror")  # in place: no copy
        ndimage.zoom(array, factors, order=order, output=out, mode="mirror", grid_mode=True, prefilter=False)
    else:
        ndimage.zoom(array, factors, order=order, output=out, mode="nearest", grid_mode=True)
    return out


def proposed_resample_into(array, out, order=3, separate_axis=None, order_separate=0, scratch_ok=False):
    """``resample_image`` into a preallocated float32 ``out`` (any strides).

    ``scratch_ok``: ``array`` is float32 and may be destroyed (in-place spline prefilter).
    Integer/bool input with order <= 1 is zoomed as is (scipy converts line by line), so a
    0/1 mask never becomes a float32 copy.
    """
    from scipy import ndimage

    if tuple(array.shape) == tuple(out.shape):
        out[...] = array
        return out
    if separate_axis is None:
        if order > 1 and not (scratch_ok and array.dtype == np.float32):
            array = array.astype(np.float32)  # the prefilter needs a float32 copy it may overwrite
        return _proposed_zoom_into(array, out, order)
    moved = np.moveaxis(array, separate_axis, 0)
    moved_out = np.moveaxis(out, separate_axis, 0)
    if order_separate == 0:
        # Nearest neighbour across slices: every output slice is the in-plane resampling of one
        # source slice, so resample each source slice once, straight into its first target.
        for k, targets in _slice_targets(moved.shape[0], moved_out.shape[0]):
            plane = moved[k].astype(np.float32) if order > 1 else moved[k]  # one slice: small
            _proposed_zoom_into(plane, moved_out[targets[0]], order)
            for t in targets[1:]:
                moved_out[t] = moved_out[targets[0]]
        return out
    plane_shape = moved_out.shape[1:]
    same_slices = moved.shape[0] == moved_out.shape[0]
    inplane = moved_out if same_slices else np.empty((moved.shape[0], *plane_shape), np.float32)
    for k in range(moved.shape[0]):
        plane = moved[k]
        if order > 1:
            plane = plane.astype(np.float32)  # one slice: small
        _proposed_zoom_into(plane, inplane[k], order)
    if not same_slices:
        factors = [moved_out.shape[0] / moved.shape[0], 1, 1]
        if order_separate > 1:
            ndimage.spline_filter(inplane, order=order_separate, output=inplane, mode="mirror")
            ndimage.zoom(inplane, factors, order=order_separate, output=moved_out, mode="mirror",
                         grid_mode=True, prefilter=False)
        else:
            ndimage.zoom(inplane, factors, order=order_separate, output=moved_out, mode="nearest",
                         grid_mode=True)
    return out


def _slice_targets(n_old: int, n_new: int):
    """(source slice, output slices taking it) for nearest-neighbour resampling along an axis,
    with scipy's own index mapping (zoom of an index ramp, same order/mode/grid as ``_zoom``)."""
    from scipy import ndimage

    if n_old == n_new:
        return [(k, [k]) for k in range(n_old)]
    ramp = np.arange(n_old, dtype=np.float32)
    source = ndimage.zoom(ramp, n_new / n_old, order=0, mode="nearest", grid_mode=True).astype(np.intp)
    assert source.shape == (n_new,)
    return [(int(k), np.flatnonzero(source == k).tolist()) for k in np.unique(source)]


def _label_values(label):
    """Sorted label values present, found slab by slab (no full-size sort as in np.unique)."""
    present = set()
    for z in range(0, label.shape[0], SLAB):
        present.update(int(v) for v in np.unique(label[z:z + SLAB]))
    return sorted(present)


def proposed_resample_label(label, new_shape, order=1, separate_axis=None, order_separate=0, out=None):
    """``resample_label`` with the same result and smaller temporaries:

    * one reused bool mask per label (zoomed as uint8 by scipy), not a new float32 copy per
      label (the library's ``mask = (label == v).astype(float32)`` holds two of them at once);
    * score/better buffers reused across labels;
    * with nearest neighbour across slices (anisotropic plans), slice by slice: every output
      slice is the argmax of one source slice's in-plane resampling, so 2D buffers suffice.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if out is None:
        out = np.empty(new_shape, dtype=label.dtype)
    if tuple(label.shape) == new_shape:
        out[...] = label
        return out
    values = _label_values(label)
    if len(values) == 1:
        out[...] = values[0]
        return out
    if separate_axis is not None and order_separate == 0:
        moved, moved_out = np.moveaxis(label, separate_axis, 0), np.moveaxis(out, separate_axis, 0)
        plane_shape = moved_out.shape[1:]
        best, score = np.empty(plane_shape, np.float32), np.empty(plane_shape, np.float32)
        better, mask = np.empty(plane_shape, bool), np.empty(moved.shape[1:], bool)
        for k, targets in _slice_targets(moved.shape[0], moved_out.shape[0]):
            first = moved_out[targets[0]]
            first[...] = values[0]
            best.fill(-np.inf)
            for value in values:
                np.equal(moved[k], value, out=mask)
                if mask.any():
                    _proposed_zoom_into(mask.view(np.uint8), score, order)
                else:
                    score.fill(0)  # zoom of an all-zero plane is exactly 0
                np.greater(score, best, out=better)
                first[better] = value
                np.maximum(best, score, out=best)
            for t in targets[1:]:
                moved_out[t] = first
        return out
    out[...] = values[0]
    best = np.full(new_shape, -np.inf, dtype=np.float32)
    score = np.empty(new_shape, dtype=np.float32)
    better = np.empty(new_shape, dtype=bool)
    mask = np.empty(label.shape, dtype=bool)
    for value in values:
        np.equal(label, value, out=mask)
        proposed_resample_into(mask.view(np.uint8), score, order, separate_axis, order_separate)
        np.greater(score, best, out=better)
        out[better] = value
        np.maximum(best, score, out=best)
    return out


def _proposed_normalize_into(image, scheme, props, mask, out):
    """``normalize`` into ``out`` (float32, same shape): no float32 temporaries beyond ``out``."""
    out[...] = image
    if scheme == "CTNormalization":
        np.clip(out, props["percentile_00_5"], props["percentile_99_5"], out=out)
        out -= np.float32(props["mean"])
        out /= np.float32(max(props["std"], 1e-8))
        return out
    # z-score: two passes of float64 sums slab by slab, instead of a full masked copy plus
    # the float64 temporary inside ndarray.std
    def slabs():
        for z in range(0, out.shape[0], SLAB):
            block = out[z:z + SLAB]
            yield (block[mask[z:z + SLAB]] if mask is not None else block.ravel()).astype(np.float64)

    n = sum(v.size for v in slabs())
    if n == 0:
        out[...] = 0
        return out
    mean = sum(float(v.sum()) for v in slabs()) / n
    std = float(np.sqrt(sum(float(np.dot(v - mean, v - mean)) for v in slabs()) / n))
    out -= np.float32(mean)
    out /= np.float32(max(std, 1e-8))
    if mask is not None:
        for z in range(0, out.shape[0], SLAB):
            np.putmask(out[z:z + SLAB], ~mask[z:z + SLAB], 0)
    return out


def proposed_nonzero_mask(channels):
    """``nonzero_mask`` + ``crop_bbox`` in one, same result: the box of the raw nonzero voxels
    is the box of the hole-filled mask (filling never reaches the box's border), so holes are
    filled inside the box only, and not at all when everything is nonzero (CT: air is -1000)."""
    from scipy import ndimage

    from AutoSegLib.preprocessing.cropping import crop, crop_bbox

    raw = np.zeros(channels[0].shape, dtype=bool)
    for channel in channels:
        raw |= channel != 0
    bbox = crop_bbox(raw)
    inside = crop(raw, bbox)
    if inside.all():
        return inside, bbox
    return ndimage.binary_fill_holes(inside), bbox


def proposed_preprocess_case(channels, label, geometry, config, transpose_forward, intensity_properties):
    """``preprocess_case`` with the same outputs and fewer full-size temporaries:

    * the nonzero mask is computed once, not twice, holes filled inside the box only
      (:func:`proposed_nonzero_mask`);
    * each channel is normalized straight into ``data[c]`` (no resampling) or into one
      float32 scratch that the spline prefilter then overwrites in place, and the zoom
      writes straight into ``data[c]``;
    * the label is resampled with :func:`proposed_resample_label`.
    """
    from AutoSegLib.preprocessing import case as lib
    from AutoSegLib.preprocessing.cropping import crop

    cropped_mask, bbox = proposed_nonzero_mask(channels)
    transpose = tuple(int(a) for a in transpose_forward)
    spacing = tuple(geometry.spacing[a] for a in transpose)
    mask = np.ascontiguousarray(cropped_mask.transpose(transpose))
    del cropped_mask
    shape_after_crop = mask.shape
    target_spacing = lib.full_target_spacing(config["spacing"], spacing)
    new_shape = lib.target_shape(shape_after_crop, spacing, target_spacing)
    how = lib.resampling_plan(spacing, target_spacing, config["resampling"], len(config["patch_size"]))
    resample = tuple(new_shape) != tuple(shape_after_crop)
    data = np.empty((len(channels), *new_shape), dtype=np.float32)
    scratch = np.empty(shape_after_crop, np.float32) if resample else None
    for c, channel in enumerate(channels):
        image = crop(channel, bbox).transpose(transpose)
        use_mask = config["use_mask_for_norm"][c]
        target = scratch if resample else data[c]
        _proposed_normalize_into(image, config["normalization_schemes"][c], intensity_properties.get(str(c)),
                                 mask if use_mask else None, target)
        if resample:
            proposed_resample_into(scratch, data[c], how["image_order"], how["separate_axis"],
                                   how["out_of_plane_order"], scratch_ok=True)
    del scratch, target  # the scratch (a full float32 channel) must not outlive the images
    seg = None
    if label is not None:
        seg = np.empty((1, *shape_after_crop) if not resample else shape_after_crop, np.int16)
        cropped = seg[0] if not resample else seg
        cropped[...] = crop(label, bbox).transpose(transpose)
        for z in range(0, len(cropped), SLAB):  # background outside the body, a slab at a time
            part = cropped[z:z + SLAB]
            part[(part == 0) & ~mask[z:z + SLAB]] = lib.OUTSIDE_MASK_LABEL
        del mask  # not needed for the label's resampling
        if resample:
            seg = proposed_resample_label(cropped, new_shape, how["label_order"], how["separate_axis"], 0)[None]
    properties = {
        "version": lib.PROPERTIES_VERSION,
        "original_shape": [int(s) for s in channels[0].shape],
        "original_geometry": geometry.to_dict(),
        "crop_bbox": [list(b) for b in bbox],
        "transpose_forward": list(transpose),
        "shape_after_crop": [int(s) for s in shape_after_crop],
        "spacing_after_crop": [float(s) for s in spacing],
        "target_spacing": [float(s) for s in target_spacing],
        "shape_after_resampling": [int(s) for s in new_shape],
        "resampling": how,
    }
    return data, seg, properties


def _crop_views(full, properties):
    """Views of ``full`` (leading axes kept) on the crop region, in planning axis order."""
    region = tuple(slice(a, b) for a, b in properties["crop_bbox"])
    lead = full.ndim - len(region)
    view = full[(slice(None),) * lead + region]
    forward = tuple(range(lead)) + tuple(lead + int(a) for a in properties["transpose_forward"])
    return view.transpose(forward)


def proposed_restore_label(seg, properties):
    """``restore_label`` resampling straight into the crop region of the full output."""
    from AutoSegLib.imageio import Geometry
    from AutoSegLib.preprocessing.case import OUTSIDE_MASK_LABEL

    how = properties["resampling"]
    seg = np.asarray(seg)
    full = np.zeros(properties["original_shape"], dtype=seg.dtype)
    target = _crop_views(full, properties)
    proposed_resample_label(seg, properties["shape_after_crop"], how["label_order"], how["separate_axis"], 0,
                            out=target)
    target[target == OUTSIDE_MASK_LABEL] = 0
    return full, Geometry.from_dict(properties["original_geometry"])


def proposed_restore_probabilities(probabilities, properties):
    """``restore_probabilities`` with one full-size output: each class is resampled straight
    into its crop region of the result, then clipped and renormalized a slab at a time (no
    per-class pasted copies, no ``np.stack``, no full-size sum)."""
    from AutoSegLib.imageio import Geometry

    how = properties["resampling"]
    n = probabilities.shape[0]
    full = np.empty((n, *properties["original_shape"]), dtype=np.float32)
    full[0] = 1.0
    full[1:] = 0.0
    region = _crop_views(full, properties)
    for k in range(n):
        proposed_resample_into(probabilities[k], region[k], 1, how["separate_axis"], 0)
    for z in range(0, region.shape[1], SLAB):  # renormalize a slab at a time: no full-size sum
        block = region[:, z:z + SLAB]
        np.clip(block, 0, None, out=block)
        total = block.sum(axis=0)
        np.maximum(total, 1e-8, out=total)
        block /= total
    return full, Geometry.from_dict(properties["original_geometry"])


# --------------------------------------------------------------------------------------------
# Child process: one measurement
# --------------------------------------------------------------------------------------------

def _status() -> dict:
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM and with it ru_maxrss (RUSAGE_SELF)
        return True
    except OSError:
        return False


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class LinePeaks:
    """Highest RSS reached while each traced line ran (nested calls count for the caller's line)."""

    def __init__(self, functions):
        self.codes = {f.__code__ for f in functions}
        self.stack: list = []  # [frame, current line]
        self.peaks: dict = {}

    def _account(self):
        hwm = _status()["VmHWM"]
        for entry in self.stack:
            key = (entry[0].f_code, entry[1])
            self.peaks[key] = max(self.peaks.get(key, 0), hwm)
        _reset_peak()

    def _local(self, frame, event, arg):
        if event == "line":
            self._account()
            self.stack[-1][1] = frame.f_lineno
        elif event == "return":
            self._account()
            self.stack.pop()
        return self._local

    def _global(self, frame, event, arg):
        if event == "call" and frame.f_code in self.codes:
            self._account()
            self.stack.append([frame, frame.f_lineno])
            return self._local
        return None

    def __enter__(self):
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


def _functions(variant: str):
    from AutoSegLib.preprocessing import case as lib

    if variant == "current":
        return {"preprocess": lib.preprocess_case, "restore_label": lib.restore_label,
                "restore_probabilities": lib.restore_probabilities}
    return {"preprocess": proposed_preprocess_case, "restore_label": proposed_restore_label,
            "restore_probabilities": proposed_restore_probabilities}


def _probabilities_from(seg: np.ndarray) -> np.ndarray:
    """K=5 float32 class probabilities at the preprocessed resolution, peaked on the label."""
    seg = seg[0]
    probs = np.full((K_PROBABILITIES, *seg.shape), 0.1 / (K_PROBABILITIES - 1), dtype=np.float32)
    for k in range(K_PROBABILITIES):
        hit = (seg == k) | ((seg < 0) & (k == 0))
        probs[k][hit] = 0.9
    return probs


def child(spec: dict) -> dict:
    from AutoSegLib.imageio import Geometry

    case, op, variant, scratch = spec["case"], spec["op"], spec["variant"], Path(spec["scratch"])
    shape, spacing, modality, _, _ = CASES[case]
    function = _functions(variant)[op]
    if op == "preprocess":
        config, transpose, intensity = configuration(case)
        image, label = build_case(shape, spacing, modality)
        args = ([image], label, Geometry.identity(spacing), config, transpose, intensity)
        input_bytes = image.nbytes + label.nbytes
    else:
        properties = json.loads((scratch / f"{case}_properties.json").read_text())
        seg = np.load(scratch / f"{case}_seg.npy")
        if op == "restore_label":
            args = (seg[0], properties)
            input_bytes = seg.nbytes
        else:
            probs = _probabilities_from(seg)
            del seg
            args = (probs, properties)
            input_bytes = probs.nbytes
    reset = _reset_peak()
    baseline = _status()["VmRSS"] if reset else _maxrss()
    lines = None
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if spec.get("lines"):
        from AutoSegLib.preprocessing import case as lib_case
        from AutoSegLib.preprocessing import cropping, normalization, resampling

        traced = [lib_case.preprocess_case, lib_case.restore_label, lib_case.restore_probabilities,
                  lib_case._to_original_grid, resampling.resample_label, resampling.resample_image,
                  resampling._zoom, resampling._zoom_separate, normalization.normalize_ct,
                  normalization.normalize_zscore, cropping.nonzero_mask, cropping.paste,
                  proposed_preprocess_case, proposed_restore_label, proposed_restore_probabilities,
                  proposed_resample_label, proposed_resample_into, _proposed_normalize_into,
                  proposed_nonzero_mask]
        with LinePeaks(traced) as tracer:
            result = function(*args)
        lines = tracer
    else:
        result = function(*args)
    seconds = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    peak = _maxrss() - baseline
    out = {"case": case, "op": op, "variant": variant, "seconds": seconds, "cpu": cpu, "peak": peak,
           "input": input_bytes, "image_int16": int(np.prod(shape)) * 2, "voxels": int(np.prod(shape)),
           "rss": _maxrss(), "reset_ok": reset}
    if lines is not None:
        rows = []
        for (code, line), hwm in lines.peaks.items():
            rows.append({"function": code.co_name, "line": line, "peak": hwm - baseline,
                         "source": linecache.getline(code.co_filename, line).strip()})
        out["lines"] = rows
        out["peak"] = max([r["peak"] for r in rows] + [peak])  # the tracer's resets hide ru_maxrss
        return out
    # Save the library's outputs; check the proposed copies against them (after measuring).
    if op == "preprocess":
        data, seg_out, properties = result
        out["shape_out"] = list(data.shape[1:])
        names = {"data": data, "seg": seg_out}
    else:
        names = {op: result[0]}
    if variant == "current":
        for name, array in names.items():
            np.save(scratch / f"{case}_{name}.npy", array)
        if op == "preprocess":
            (scratch / f"{case}_properties.json").write_text(json.dumps(properties))
    else:
        diffs = {}
        for name, array in names.items():
            reference = np.load(scratch / f"{case}_{name}.npy", mmap_mode="r")
            same_shape = reference.shape == array.shape and reference.dtype == array.dtype
            if not same_shape:
                diffs[name] = "shape/dtype differ"
            elif array.dtype.kind == "f":
                diffs[name] = max(float(np.max(np.abs(reference[k] - array[k]))) for k in range(len(array)))
            else:
                diffs[name] = int(sum(int(np.count_nonzero(reference[k] != array[k])) for k in range(len(array))))
        out["diff_vs_current"] = diffs
    return out


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------

def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], header: bool = True) -> None:
    head = (f"{'case':7s} {'operation':22s} {'variant':8s} {'voxels':>11s} {'input MiB':>9s} "
            f"{'peak MiB':>8s} {'x int16':>7s} {'RSS MiB':>7s} {'wall s':>6s} {'cpu s':>6s}  output check")
    if header:
        print(head)
        print("-" * len(head))
    for r in rows:
        check = ""
        if "diff_vs_current" in r:
            check = ", ".join(f"{k}: {v if isinstance(v, str) else (f'{v:.1e}' if isinstance(v, float) else v)}"
                              for k, v in r["diff_vs_current"].items())
            check = "identical" if all(v == 0 for v in r["diff_vs_current"].values()) else check
        elif "shape_out" in r:
            check = "-> " + "x".join(map(str, r["shape_out"]))
        print(f"{r['case']:7s} {r['op']:22s} {r['variant']:8s} {r['voxels']:11,d} {r['input'] / MB:9.0f} "
              f"{r['peak'] / MB:8.0f} {r['peak'] / r['image_int16']:7.1f} {r['rss'] / MB:7.0f} "
              f"{r['seconds']:6.1f} {r['cpu']:6.1f}  {check}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=list(CASES))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--variant", choices=("current", "both"), default="current",
                        help="both: also the proposed copies, checked against the library's outputs")
    parser.add_argument("--repeats", type=int, default=1, help="median time over repeats (peak is the max)")
    parser.add_argument("--lines", metavar="CASE:OP[:proposed]", help="per-line peak profile of one measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import scipy

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          "peak = ru_maxrss above RSS after building the inputs")
    for case in args.cases:
        shape, spacing, modality, target, what = CASES[case]
        print(f"  {case}: {'x'.join(map(str, shape))} at {spacing} mm, {modality}, {what}")
    # Outputs kept for the restores and the checks go to RAM-backed /dev/shm when there is room
    # (disk writeback of GBs of reference arrays otherwise doubles the wall time).
    shm = Path("/dev/shm")
    use_shm = shm.is_dir() and shutil.disk_usage(shm).free > 6 * 1024 * MB
    scratch = Path(tempfile.mkdtemp(prefix="bench_preprocess_", dir=shm if use_shm else None))
    try:
        if args.lines:
            case, op, variant = (args.lines.split(":") + ["current"])[:3]
            if op != "preprocess":
                run_child({"case": case, "op": "preprocess", "variant": "current", "scratch": str(scratch)})
            r = run_child({"case": case, "op": op, "variant": variant, "scratch": str(scratch), "lines": True})
            print(f"{case} {op} ({variant}): peak {r['peak'] / MB:.0f} MiB above inputs in {r['seconds']:.1f} s "
                  "(traced); the lines where RSS got highest:")
            print(f"{'peak MiB':>8s}  {'function':28s} {'line':>5s}  source")
            for row in sorted(r["lines"], key=lambda x: -x["peak"])[:25]:
                print(f"{row['peak'] / MB:8.0f}  {row['function']:28s} {row['line']:5d}  {row['source'][:90]}")
            return
        variants = ["current", "proposed"] if args.variant == "both" else ["current"]
        rows = []
        for case in args.cases:
            for op in OPS:  # the library's preprocess always runs: it makes the restores' inputs
                if op not in args.ops and op != "preprocess":
                    continue
                for variant in variants:
                    results = [run_child({"case": case, "op": op, "variant": variant, "scratch": str(scratch)})
                               for _ in range(args.repeats)]
                    row = dict(results[-1])
                    row["seconds"] = statistics.median(r["seconds"] for r in results)
                    row["cpu"] = statistics.median(r["cpu"] for r in results)
                    row["peak"] = max(r["peak"] for r in results)
                    if op in args.ops:
                        rows.append(row)
                        print_table([row], header=len(rows) == 1)
            for leftover in scratch.glob(f"{case}_*"):
                leftover.unlink()
        print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes slow the wall times, "
              "not the memory figures); x int16 = peak / size of the case's int16 image")
        if not all(r["reset_ok"] for r in rows):
            print("note: /proc/self/clear_refs unavailable; baseline was the high-water mark after building inputs")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
