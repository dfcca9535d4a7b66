"""Explanations: every planning decision is recorded as it is made, with its numbers.

An entry is a plain dict: ``topic``, the numbers behind the decision, and ``text``, a
sentence a clinician can follow (mm, voxels, percentages). Entries travel inside plans.json,
so a plan can be explained long after it was made. ``render`` joins them into the
``autoseg plan --explain`` report.
"""

from __future__ import annotations

import math

import numpy as np


def plain(value):
    """JSON-ready copy: numpy scalars and arrays, tuples -> Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


def note(log: list, topic: str, **data) -> dict:
    """Record one decision: its topic, its numbers, and the sentence explaining it."""
    entry = {"topic": topic, **plain(data)}
    entry["text"] = TEXT[topic](entry)
    log.append(entry)
    return entry


# -- number formatting -----------------------------------------------------------------------
def mm(values) -> str:
    return " x ".join(f"{v:.2f}" for v in values) + " mm"


def vox(values) -> str:
    return " x ".join(str(int(v)) for v in values)


def axes_of(names) -> str:
    return "(" + ", ".join(names) + ")"


def pct(fraction: float) -> str:
    value = 100 * fraction
    if value >= 10:
        return f"{value:.0f}%"
    return f"{value:.1f}%" if value >= 0.1 else f"{value:.2f}%"


def millions(n: float) -> str:
    return f"{n / 1e6:,.0f} M"


def physical(shape, spacing) -> str:
    """Extent in mm, to the millimetre (to 0.1 mm below 10 mm)."""
    sizes = [s * p for s, p in zip(shape, spacing)]
    return " x ".join(f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in sizes) + " mm"


# -- one sentence per topic ------------------------------------------------------------------
def _dataset(e) -> str:
    channels = ", ".join(f"{k}: {v}" for k, v in e["channels"].items())
    n = len(e["channels"])
    text = (f"The dataset has {e['num_cases']} training cases, {n} image channel{'s' if n > 1 else ''} "
            f"({channels}) and {e['num_classes']} classes to predict, background included "
            f"({', '.join(e['classes'])}).")
    if e["has_ignore"]:
        text += " The label 'ignore' marks unannotated voxels; it is not predicted."
    return text


def _anisotropy(e) -> str:
    axis = e["axis_name"]
    head = (f"Median voxel spacing of the training images: {mm(e['median_spacing'])} {axes_of(e['axis_names'])}. "
            f"The coarsest axis, {axis}, has {e['spacing_ratio']:.1f}x the spacing of the others, and in a "
            f"typical image the others have {e['voxel_ratio']:.1f}x as many voxels as {axis}.")
    if e["anisotropic"]:
        return head + (f" Both exceed {e['threshold']:g}x: the images are stacks of thick slices "
                       f"(anisotropic), with {axis} as the out-of-plane axis.")
    return head + (f" Anisotropy needs both to exceed {e['threshold']:g}x, so the images are not treated "
                   f"as anisotropic.")


def _target_spacing(e) -> str:
    if e["percentile_axis"] is None:
        return (f"Full-resolution target spacing: {mm(e['spacing'])}, the median per axis, which changes "
                f"most images least when they are resampled.")
    return (f"Full-resolution target spacing: {mm(e['spacing'])}. Along {e['percentile_axis']} it is "
            f"{e['percentile_value']:.2f} mm, the 10th percentile of the training spacings, instead of the "
            f"median {e['median_value']:.2f} mm: more images are upsampled for training than downsampled, "
            f"which avoids blurring contours that change between distant slices.")


def _axis_order(e) -> str:
    if e["forward"] == sorted(e["forward"]):
        return (f"Axis order kept as {axes_of(e['planning_axes'])}; {e['planning_axes'][0]} is the "
                f"out-of-plane axis and the 2D U-Net works on {axes_of(e['planning_axes'][1:])} slices.")
    return (f"Axes reordered from {axes_of(e['original_axes'])} to {axes_of(e['planning_axes'])} so the "
            f"out-of-plane axis, {e['planning_axes'][0]}, comes first; all sizes below are in that order, "
            f"and the 2D U-Net works on {axes_of(e['planning_axes'][1:])} slices.")


def _normalization(e) -> str:
    head = f"Channel {e['channel']} ({e['name']}): "
    if e["scheme"] == "CTNormalization":
        return head + (f"CT normalization. Intensities are clipped to the foreground's 0.5-99.5 percentile "
                       f"range [{e['clip'][0]:.1f}, {e['clip'][1]:.1f}], then the foreground mean "
                       f"({e['mean']:.1f}) is subtracted and the result divided by the foreground standard "
                       f"deviation ({e['std']:.1f}), the same for every image, because CT values are physical "
                       f"units (Hounsfield).")
    text = head + ("z-score per image (subtract the image's mean, divide by its standard deviation), "
                   "because these intensities have no fixed scale from one scan to the next.")
    if e["use_mask"]:
        return text + (f" Only voxels inside the nonzero region count: cropping to it kept a median of "
                       f"{pct(e['relative_size'])} of each image (below {pct(e['threshold'])}), so the empty "
                       f"surround would distort the statistics.")
    return text + (f" The whole image counts: cropping kept a median of {pct(e['relative_size'])} of each image "
                   f"(masking starts below {pct(e['threshold'])}).")


def _resampling(e) -> str:
    text = ("Resampling: images with cubic splines; label maps by linear interpolation of each label's "
            "mask, then the most likely label per voxel. ")
    if e["separate_z"]:
        return text + (f"A typical case ({mm(e['spacing'])}) has a coarsest-to-finest spacing ratio of "
                       f"{e['anisotropy']:.1f}, above {e['threshold']:g}, so its coarse axis is resampled "
                       f"separately with nearest neighbour, avoiding interpolation across distant slices.")
    return text + (f"A typical case ({mm(e['spacing'])}) has a coarsest-to-finest spacing ratio of "
                   f"{e['anisotropy']:.1f}, within {e['threshold']:g}, so all axes are resampled together; "
                   f"any case above {e['threshold']:g} gets nearest neighbour along its coarse axis.")


def _config_spacing(e) -> str:
    return f"Spacing {mm(e['spacing'])} {axes_of(e['axes'])}: {e['source']}."


def _median_image(e) -> str:
    text = (f"A typical image at this spacing is {vox(e['shape'])} voxels "
            f"({physical(e['shape'], e['spacing'])})")
    if e.get("slices") is not None:
        text += f", in {e['slices']} slices"
    return text + "."


def _patch_start(e) -> str:
    padded = "" if e["patch"] == e["start"] else (
        f", padded to {vox(e['patch'])} so that each axis halves evenly at every downsampling")
    return (f"The patch starts as the whole typical image, {vox(e['start'])} voxels{padded}. "
            f"Estimated memory: {pct(e['estimate'] / e['budget'])} of the budget "
            f"({millions(e['estimate'])} vs {millions(e['budget'])} feature-map voxels at batch size 2).")


def _shrink(e) -> str:
    axis = e["axes"][e["axis"]]
    return (f"Shrink step {e['step']}: {axis} is the longest relative to the typical image "
            f"({pct(e['relative'])}), so it loses {e['before'] - e['after']} voxels ({e['before']} -> {e['after']}); "
            f"patch {vox(e['patch'])}, memory {pct(e['estimate'] / e['budget'])} of the budget.")


def _patch_final(e) -> str:
    coverage = math.prod(e["patch"]) / math.prod(e["median"])
    return (f"Patch {vox(e['patch'])} voxels ({physical(e['patch'], e['spacing'])}), using "
            f"{pct(e['estimate'] / e['budget'])} of the memory budget; it covers {pct(min(coverage, 1.0))} of a "
            f"typical image.")


def _topology(e) -> str:
    pools = ", ".join(f"{a} {p} time{'s' if p != 1 else ''} (by {2 ** p})" for a, p in zip(e["axes"], e["pools"]))
    strides = " ".join("[" + ",".join(map(str, s)) + "]" for s in e["strides"])
    text = (f"Network: {len(e['strides'])} resolution stages, halving {pools} to a "
            f"{vox(e['bottleneck'])} voxel bottleneck (feature maps no smaller than 4 voxels, spacings kept "
            f"within 2x). Strides per stage: {strides}. Feature maps per stage: "
            f"{', '.join(map(str, e['features']))} (doubling, capped at {e['cap']}).")
    if e["flat_stages"]:
        stages = "stage uses" if e["flat_stages"] == 1 else f"{e['flat_stages']} stages use"
        text += (f" The first {stages} kernel {'x'.join(map(str, e['kernels'][0]))}: "
                 f"their voxels are more than 2x longer along some axis, so the network convolves within "
                 f"slices until downsampling has evened the resolution.")
    else:
        text += f" All kernels are {'x'.join(['3'] * len(e['axes']))}."
    return text


def _batch(e) -> str:
    why = {"memory": "limited by GPU memory",
           "dataset_cap": "capped so one batch covers at most 5% of all training voxels, against over-fitting",
           "minimum": "raised to the minimum of 2 for stable training"}[e["reason"]]
    return (f"Batch size {e['batch_size']}, {why}: memory allows {e['from_memory']} "
            f"(budget is {e['ratio']:.2f}x the estimate for 2 samples) and 5% of the "
            f"{millions(e['dataset_voxels'])} training voxels allow {e['cap']}.")


def _augmentation(e) -> str:
    if e["in_plane_only"]:
        return ("The patch is more than 3x longer in-plane than deep: rotation and scaling augmentation "
                "are done in-plane only.")
    return "The patch proportions allow full 3D rotation and scaling augmentation."


def _cascade(e) -> str:
    covered = f"The full-resolution patch covers {pct(min(e['coverage'], 1.0))} of a typical image"
    if not e["tried"]:
        return covered + " (more than 25%): enough context, so no low-resolution cascade."
    if e["kept"]:
        return covered + (f" (25% or less): a low-resolution U-Net (3d_lowres) is planned at "
                          f"{mm(e['lowres_spacing'])}, with {e['reduction']:.1f}x fewer voxels, and its "
                          f"segmentation guides a second full-resolution U-Net (3d_cascade_fullres).")
    return covered + (f" (25% or less), so a low-resolution stage was tried; at {mm(e['lowres_spacing'])} its "
                      f"patch already covers 25%, but that shrinks a typical image only {e['reduction']:.1f}x "
                      f"(more than 2x needed to be worth a second network): no cascade.")


def _lowres_search(e) -> str:
    return (f"Starting from {mm(e['start'])}, the spacing was coarsened by 1% per step (only the finer "
            f"axes while spacings differed by more than 2x) for {e['steps']} steps, to {mm(e['spacing'])}, "
            f"where the patch of {vox(e['patch'])} covers {pct(e['coverage'])} of the typical "
            f"{vox(e['median'])} image (at least 25% needed).")


def _remark(e) -> str:
    return e["message"]


TEXT = {"dataset": _dataset, "anisotropy": _anisotropy, "target_spacing": _target_spacing,
        "axis_order": _axis_order, "normalization": _normalization, "resampling": _resampling,
        "config_spacing": _config_spacing, "median_image": _median_image, "patch_start": _patch_start,
        "shrink": _shrink, "patch_final": _patch_final, "topology": _topology, "batch": _batch,
        "augmentation": _augmentation, "cascade": _cascade, "lowres_search": _lowres_search,
        "remark": _remark}


def render(dataset_notes: list[dict], configurations: dict[str, list[dict]], header: str = "") -> str:
    """The report: dataset-wide decisions, then each configuration's, as numbered lines."""
    lines = [header] if header else []
    lines += ["Dataset-wide decisions:"] + [f"  - {e['text']}" for e in dataset_notes]
    for name, notes in configurations.items():
        lines += ["", f"Configuration {name}:"] + [f"  {i}. {e['text']}" for i, e in enumerate(notes, 1)]
    return "\n".join(lines)
