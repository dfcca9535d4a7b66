"""Preprocess one case for one configuration, and the exact way back: pure array functions.

Forward (:func:`preprocess_case`)::

    channels (z,y,x) + label  ->  crop to the nonzero region  ->  canonical axes (when planned)
    ->  transpose to planning order
    ->  normalize each channel (scheme per plan)  ->  resample to the target spacing
    ->  data (C, ...) float32, label (1, ...) int16, properties (JSON-able dict)

Backward (:func:`restore_label`, :func:`restore_probabilities`, :func:`restore_labels`): resample to the cropped
shape, transpose back, undo the canonical axes, paste into the original grid (all through one
view of the crop region); the original geometry travels in the properties, so the result lines
up with the input scan exactly. Canonical axes (:mod:`.orientation`) only permute and reverse.

Everything here is arrays in, arrays out; files are :mod:`.storage`'s job.

Memory (issue 4): the nonzero mask is computed once; each channel is normalized straight into
its place in ``data`` (or into one float32 scratch that the resampling prefilters in place and
zooms from straight into ``data``); labels are resampled with one reused boolean mask; restores
write into their crop region of one preallocated result. No float64 volume and no one-hot of
all classes is made. Measured on a 400x512x512 int16 CT (200 MiB) with a 5-class label
(``python benchmarks/bench_preprocess_memory.py --cases A B``), peak above the inputs:

* ``preprocess_case``, no resampling: 708 MiB, 3.5x the int16 image (was 1300 MiB, 6.5x);
  600 MiB of it is the result (float32 data, int16 label), the rest the nonzero mask.
* ``preprocess_case`` to 1.5x1x1 mm (267x399x399): 916 MiB, 4.6x (was 1809 MiB, 9.0x).
* ``restore_label`` from there: 1149 MiB, 5.7x (was 1663 MiB); see :mod:`.resampling`.
* ``restore_probabilities``, 5 classes: 2032 MiB, 10.2x (was 6400 MiB, 32x); that is the
  float32 result itself.
"""

from __future__ import annotations

import numpy as np

from AutoSegLib.imageio import Geometry
from AutoSegLib.preprocessing.cropping import BBox, crop, cropped_nonzero_mask
from AutoSegLib.preprocessing.normalization import normalize
from AutoSegLib.preprocessing.orientation import CANONICAL, STORED, Orientation, canonical_orientation, canonical_view
from AutoSegLib.preprocessing.resampling import (resample_image, resample_label, separate_axis_for, take_better,
                                                 target_shape)
from AutoSegLib.preprocessing.slabs import slabs

PROPERTIES_VERSION = 1
# Label value for background voxels outside the nonzero (body) region. Training maps it back
# to background; it lets augmentation keep the empty surround empty when the plan normalizes
# inside the mask only.
OUTSIDE_MASK_LABEL = -1


def full_target_spacing(config_spacing, case_spacing) -> tuple[float, ...]:
    """3D target spacing for a case: a 2D configuration keeps the case's own slice spacing."""
    config_spacing = tuple(float(s) for s in config_spacing)
    if len(config_spacing) == len(case_spacing):
        return config_spacing
    return (float(case_spacing[0]), *config_spacing)


def resampling_plan(case_spacing, target_spacing, resampling: dict, spatial_dims: int) -> dict:
    """Orders and the separately handled axis for one case (planning axis order)."""
    if spatial_dims == 2:
        axis = 0  # slices are resampled in-plane only; the slice axis keeps its spacing
    else:
        axis = separate_axis_for(case_spacing, target_spacing, resampling["separate_z_anisotropy_threshold"])
    return {"separate_axis": axis, "image_order": resampling["image_order"],
            "label_order": resampling["label_order"], "out_of_plane_order": resampling["out_of_plane_order"]}


def preprocess_case(channels: list[np.ndarray], label: np.ndarray | None, geometry: Geometry, config: dict,
                    transpose_forward, intensity_properties: dict,
                    orientation: str | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, orient, transpose, normalize and resample one case for one configuration.

    Args:
        channels: the case's images, (z, y, x) each, in channel order.
        label: its label map or None (inference).
        geometry: geometry of the images (all channels share it; ``verify`` checks that).
        config: one configuration of plans.json (``Configuration.to_dict()``).
        transpose_forward: the plans' axis permutation into planning order.
        intensity_properties: plans' ``foreground_intensity_properties_per_channel``.
        orientation: the plans' ``orientation``: ``"canonical"`` views the case along LPS axes
            first (from ``geometry.direction``); None keeps the stored axes (nnU-Net's way).

    Returns:
        data (C, ...) float32, label (1, ...) int16 or None, and the case's properties.
    """
    inside, bbox = cropped_nonzero_mask(channels)
    oriented = case_orientation(geometry, orientation)
    transpose = tuple(int(a) for a in transpose_forward)
    oriented_spacing = oriented.spacing(geometry.spacing)
    spacing = tuple(oriented_spacing[a] for a in transpose)
    mask = canonical_view(inside, oriented).transpose(transpose)
    shape_after_crop = mask.shape
    target_spacing = full_target_spacing(config["spacing"], spacing)
    new_shape = target_shape(shape_after_crop, spacing, target_spacing)
    how = resampling_plan(spacing, target_spacing, config["resampling"], len(config["patch_size"]))

    resample = tuple(new_shape) != tuple(shape_after_crop)
    data = np.empty((len(channels), *new_shape), dtype=np.float32)
    # One channel at a time, normalized into data[c] or, when resampling, into one float32
    # scratch that the spline prefilter may overwrite: no other full-size float32 copy.
    scratch = np.empty(shape_after_crop, dtype=np.float32) if resample else None
    for c, channel in enumerate(channels):
        image = canonical_view(crop(channel, bbox), oriented).transpose(transpose)
        use_mask = config["use_mask_for_norm"][c]
        normalize(image, config["normalization_schemes"][c], intensity_properties.get(str(c)),
                  mask if use_mask else None, out=scratch if resample else data[c])
        if resample:
            resample_image(scratch, new_shape, how["image_order"], how["separate_axis"], how["out_of_plane_order"],
                           out=data[c], overwrite_input=True)
    del scratch
    seg = None
    if label is not None:
        seg = _label_in_planning_order(label, bbox, oriented, transpose, mask)
        del mask, inside  # not needed to resample the label
        if resample:
            seg = resample_label(seg, new_shape, how["label_order"], how["separate_axis"], 0)
        seg = seg[None]
    properties = {
        "version": PROPERTIES_VERSION,
        "original_shape": [int(s) for s in channels[0].shape],
        "original_geometry": geometry.to_dict(),
        "crop_bbox": [list(b) for b in bbox],
        "orientation": oriented.to_dict(),
        "transpose_forward": list(transpose),
        "shape_after_crop": [int(s) for s in shape_after_crop],
        "spacing_after_crop": [float(s) for s in spacing],
        "target_spacing": [float(s) for s in target_spacing],
        "shape_after_resampling": [int(s) for s in new_shape],
        "resampling": how,
    }
    return data, seg, properties


def case_orientation(geometry: Geometry, orientation: str | None) -> Orientation:
    """The case's axis permutation and reversals: canonical from its direction, or none."""
    if orientation is None:
        return STORED
    if orientation != CANONICAL:
        raise ValueError(f"orientation {orientation!r}; allowed: {CANONICAL!r} or none")
    return canonical_orientation(geometry.direction)


def _label_in_planning_order(label: np.ndarray, bbox: BBox, oriented: Orientation, transpose,
                             mask: np.ndarray) -> np.ndarray:
    """The label cropped, oriented and transposed as int16, background outside ``mask`` marked."""
    seg = np.empty(mask.shape, dtype=np.int16)
    seg[...] = canonical_view(crop(label, bbox), oriented).transpose(transpose)
    for s in slabs(seg.shape):  # a slab at a time: no full-size boolean temporaries
        part = seg[s]
        part[(part == 0) & ~mask[s]] = OUTSIDE_MASK_LABEL
    return seg


def _crop_region(full: np.ndarray, properties: dict) -> np.ndarray:
    """View of ``full`` (leading axes kept) on the crop box, oriented, in planning axis order."""
    region = tuple(slice(a, b) for a, b in properties["crop_bbox"])
    lead = full.ndim - len(region)
    forward = tuple(range(lead)) + tuple(lead + int(a) for a in properties["transpose_forward"])
    oriented = Orientation.from_dict(properties.get("orientation"))  # absent: written before orientation
    return canonical_view(full[(slice(None),) * lead + region], oriented).transpose(forward)


def restore_label(seg: np.ndarray, properties: dict) -> tuple[np.ndarray, Geometry]:
    """A label map at the preprocessed resolution back to the original grid and geometry."""
    how = properties["resampling"]
    seg = np.asarray(seg)
    if seg.ndim == len(properties["shape_after_crop"]) + 1 and seg.shape[0] == 1:
        seg = seg[0]  # the stored (1, ...) layout
    full = np.zeros(properties["original_shape"], dtype=seg.dtype)
    region = _crop_region(full, properties)  # resampled straight into place: no pasted copy
    resample_label(seg, properties["shape_after_crop"], how["label_order"], how["separate_axis"], 0, out=region)
    for s in slabs(region.shape):
        part = region[s]
        part[part == OUTSIDE_MASK_LABEL] = 0
    return full, Geometry.from_dict(properties["original_geometry"])


def restore_probabilities(probabilities: np.ndarray, properties: dict) -> tuple[np.ndarray, Geometry]:
    """Class probabilities (K, ...) back to the original grid; outside the crop it is background.

    Each class is resampled linearly on its own, straight into its crop region of the one
    (K, ...) float32 result, which is then renormalized a slab at a time so the classes sum
    to one again: the result is the only full-size array.
    """
    how = properties["resampling"]
    full = np.empty((probabilities.shape[0], *properties["original_shape"]), dtype=np.float32)
    full[0] = 1.0
    full[1:] = 0.0
    region = _crop_region(full, properties)
    for k in range(probabilities.shape[0]):
        resample_image(probabilities[k], region.shape[1:], 1, how["separate_axis"], 0, out=region[k])
    for s in slabs(region.shape[1:]):
        block = region[:, s]
        np.clip(block, 0, None, out=block)
        total = block.sum(axis=0)
        np.maximum(total, 1e-8, out=total)
        block /= total
    return full, Geometry.from_dict(properties["original_geometry"])


def restore_labels(probabilities: np.ndarray, properties: dict, dtype=np.uint8) -> tuple[np.ndarray, Geometry]:
    """The argmax of :func:`restore_probabilities`, without its (K, ...) array on the original grid.

    One class at a time is resampled (linearly, as there) into one float32 volume of the crop
    and kept where it beats the running maximum, so memory is two float32 volumes and a boolean
    one at the original size, for any number of classes (the full restore holds K float32 values
    per voxel: 6.3 GB for 20 classes at 512x512x300). Outside the crop it is background.

    Equal to ``argmax(restore_probabilities(...))`` but for one case: there each voxel's classes
    are divided by their sum (about 1: the restored classes of a softmax), which can round two
    different values to the same float32 and so hand an exact tie to the lower class. Here the
    higher value wins. No such voxel was found in the tests and benchmarks (see BENCHMARKS.md).
    """
    how = properties["resampling"]
    full = np.zeros(properties["original_shape"], dtype=dtype)
    region = _crop_region(full[None], properties)[0]
    best = np.empty(region.shape, dtype=np.float32)
    resample_image(probabilities[0], region.shape, 1, how["separate_axis"], 0, out=best)
    score = np.empty_like(best)
    better = np.empty(region.shape, dtype=bool)
    for k in range(1, probabilities.shape[0]):
        resample_image(probabilities[k], region.shape, 1, how["separate_axis"], 0, out=score)
        take_better(region, k, score, best, better)
    return full, Geometry.from_dict(properties["original_geometry"])
