"""Preprocess one case for one configuration, and the exact way back: pure array functions.

Forward (:func:`preprocess_case`)::

    channels (z,y,x) + label  ->  crop to the nonzero region  ->  transpose to planning order
    ->  normalize each channel (scheme per plan)  ->  resample to the target spacing
    ->  data (C, ...) float32, label (1, ...) int16, properties (JSON-able dict)

Backward (:func:`restore_label`, :func:`restore_probabilities`): resample to the cropped
shape, transpose back, paste into the original grid; the original geometry travels in the
properties, so the result lines up with the input scan exactly.

Everything here is arrays in, arrays out; files are :mod:`.storage`'s job.
"""

from __future__ import annotations

import numpy as np

from AutoSegLib.imageio import Geometry
from AutoSegLib.preprocessing.cropping import crop, crop_bbox, nonzero_mask, paste
from AutoSegLib.preprocessing.normalization import normalize
from AutoSegLib.preprocessing.resampling import resample_image, resample_label, separate_axis_for, target_shape

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
                    transpose_forward, intensity_properties: dict) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, transpose, normalize and resample one case for one configuration.

    Args:
        channels: the case's images, (z, y, x) each, in channel order.
        label: its label map or None (inference).
        geometry: geometry of the images (all channels share it; ``verify`` checks that).
        config: one configuration of plans.json (``Configuration.to_dict()``).
        transpose_forward: the plans' axis permutation into planning order.
        intensity_properties: plans' ``foreground_intensity_properties_per_channel``.

    Returns:
        data (C, ...) float32, label (1, ...) int16 or None, and the case's properties.
    """
    bbox = crop_bbox(nonzero_mask(channels))
    transpose = tuple(int(a) for a in transpose_forward)
    spacing = tuple(geometry.spacing[a] for a in transpose)
    mask = nonzero_mask([crop(c, bbox) for c in channels]).transpose(transpose)
    shape_after_crop = mask.shape
    target_spacing = full_target_spacing(config["spacing"], spacing)
    new_shape = target_shape(shape_after_crop, spacing, target_spacing)
    how = resampling_plan(spacing, target_spacing, config["resampling"], len(config["patch_size"]))

    data = np.empty((len(channels), *new_shape), dtype=np.float32)
    for c, channel in enumerate(channels):
        # One channel at a time: peak memory is a few float32 copies of one channel.
        image = crop(channel, bbox).transpose(transpose)
        use_mask = config["use_mask_for_norm"][c]
        normalized = normalize(image, config["normalization_schemes"][c], intensity_properties.get(str(c)),
                               mask if use_mask else None)
        data[c] = resample_image(normalized, new_shape, how["image_order"], how["separate_axis"],
                                 how["out_of_plane_order"])
        del normalized
    seg = None
    if label is not None:
        seg = crop(label, bbox).transpose(transpose).astype(np.int16)
        seg[(seg == 0) & ~mask] = OUTSIDE_MASK_LABEL
        seg = resample_label(seg, new_shape, how["label_order"], how["separate_axis"], 0)[None]
    properties = {
        "version": PROPERTIES_VERSION,
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


def _to_original_grid(array: np.ndarray, properties: dict, fill) -> np.ndarray:
    backward = tuple(int(np.argsort(properties["transpose_forward"])[a]) for a in range(array.ndim))
    return paste(array.transpose(backward), tuple(map(tuple, properties["crop_bbox"])),
                 properties["original_shape"], fill)


def restore_label(seg: np.ndarray, properties: dict) -> tuple[np.ndarray, Geometry]:
    """A label map at the preprocessed resolution back to the original grid and geometry."""
    how = properties["resampling"]
    seg = np.asarray(seg)
    if seg.ndim == len(properties["shape_after_crop"]) + 1 and seg.shape[0] == 1:
        seg = seg[0]  # the stored (1, ...) layout
    resampled = resample_label(seg, properties["shape_after_crop"], how["label_order"], how["separate_axis"], 0)
    resampled[resampled == OUTSIDE_MASK_LABEL] = 0
    return _to_original_grid(resampled, properties, 0), Geometry.from_dict(properties["original_geometry"])


def restore_probabilities(probabilities: np.ndarray, properties: dict) -> tuple[np.ndarray, Geometry]:
    """Class probabilities (K, ...) back to the original grid; outside the crop it is background.

    Each class is resampled linearly on its own (one float32 volume at a time) and the
    result renormalized so the classes sum to one again.
    """
    how = properties["resampling"]
    shape = tuple(properties["shape_after_crop"])
    out = np.empty((probabilities.shape[0], *shape), dtype=np.float32)
    for k in range(probabilities.shape[0]):
        out[k] = resample_image(probabilities[k], shape, 1, how["separate_axis"], 0)
    np.clip(out, 0, None, out=out)
    total = out.sum(axis=0)
    out /= np.maximum(total, 1e-8)
    full = np.stack([_to_original_grid(out[k], properties, 1.0 if k == 0 else 0.0) for k in range(len(out))])
    return full, Geometry.from_dict(properties["original_geometry"])
