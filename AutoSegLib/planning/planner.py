"""``plan()``: from a dataset fingerprint to the plans, by the paper's rules. Pure: no files,
no environment, no GPU; the same fingerprint and budget always give the same plans.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from AutoSegLib.planning import class_weights, cpu, mirroring, rules
from AutoSegLib.planning.cascade import plan_cascade
from AutoSegLib.planning.configure import StagePlan, configure_2d, configure_3d
from AutoSegLib.planning.explain import note
from AutoSegLib.planning.architectures import configure_for_architecture
from AutoSegLib.planning.plans import ARCHITECTURES, Configuration, Plans, PlanningError
from AutoSegLib.planning.topology import CONVS_PER_STAGE, features_per_stage
from AutoSegLib.preprocessing.orientation import CANONICAL

AXIS_NAMES = ("z", "y", "x")
REQUIRED_KEYS = ("spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
                 "median_relative_size_after_cropping")
CT_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")
# The blueprint network every configuration uses (docs/architecture.md); only its size is planned.
NETWORK = {"architecture": "PlainConvUNet", "norm": "InstanceNorm", "nonlinearity": "LeakyReLU",
           "downsampling": "strided_conv", "upsampling": "transposed_conv", "deep_supervision": True}
MEMORY_MODEL = "nnU-Net v1 feature-map estimate vs reference budget (per batch of 2)"


@dataclass
class _Fingerprint:
    spacings: np.ndarray
    shapes: np.ndarray
    intensity: dict
    relative_size: float
    radii: dict  # class name -> median radius in mm (ours only; empty for an nnU-Net v2 fingerprint)
    sides: dict  # class name -> median offset across the patient, -0.5 right .. 0.5 left (ours only)
    class_ratios: dict | None = None  # class name -> share of all voxels (ours only)


def read_fingerprint(fingerprint: dict) -> _Fingerprint:
    """Check the fingerprint keys planning needs (nnU-Net v2's names) and convert them."""
    missing = [k for k in REQUIRED_KEYS if k not in fingerprint]
    if missing:
        raise PlanningError(f"fingerprint lacks {', '.join(missing)}")
    try:
        spacings = np.asarray(fingerprint["spacings"], dtype=float)
        shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=float)
    except ValueError:
        raise PlanningError("fingerprint 'spacings' and 'shapes_after_crop' must be lists of 3 numbers "
                            "per case") from None
    if spacings.ndim != 2 or spacings.shape[1:] != (3,) or shapes.shape != spacings.shape or len(spacings) == 0:
        raise PlanningError(f"fingerprint 'spacings' {spacings.shape} and 'shapes_after_crop' {shapes.shape} "
                            f"must both list (z, y, x) for the same, non-zero number of cases")
    for key, values in (("spacings", spacings), ("shapes_after_crop", shapes)):
        bad = np.flatnonzero(~np.all(np.isfinite(values) & (values > 0), axis=1))
        if bad.size:
            raise PlanningError(f"fingerprint '{key}' of case index {int(bad[0])} is {values[bad[0]].tolist()}; "
                                f"values must be positive")
    radii = fingerprint.get("class_radius_mm", {})
    if not isinstance(radii, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                                              for v in radii.values()):
        raise PlanningError(f"fingerprint 'class_radius_mm' must map class names to positive millimetres, got {radii!r}")
    return _Fingerprint(spacings, shapes, fingerprint["foreground_intensity_properties_per_channel"],
                        float(fingerprint["median_relative_size_after_cropping"]), dict(radii),
                        _sides(fingerprint.get("class_sides", {})), _ratios(fingerprint.get("class_voxel_ratios")))


def _sides(sides) -> dict[str, float]:
    if not isinstance(sides, dict) or not all(isinstance(v, (int, float)) and -0.5 <= v <= 0.5 for v in sides.values()):
        raise PlanningError(f"fingerprint 'class_sides' must map class names to offsets from -0.5 to 0.5, got {sides!r}")
    return {str(k): float(v) for k, v in sides.items()}


def _ratios(ratios) -> dict[str, float] | None:
    if ratios is None:
        return None
    if not isinstance(ratios, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1
                                               for v in ratios.values()):
        raise PlanningError(f"fingerprint 'class_voxel_ratios' must map class names to shares from 0 to 1, got {ratios!r}")
    return {str(k): float(v) for k, v in ratios.items()}


def _channels(channel_names: dict) -> dict[str, str]:
    try:
        ordered = sorted((int(k), str(v)) for k, v in channel_names.items())
    except (TypeError, ValueError, AttributeError):
        raise PlanningError(f"channel_names must map channel numbers to names, got {channel_names!r}") from None
    if not ordered or [k for k, _ in ordered] != list(range(len(ordered))):
        raise PlanningError(f"channel_names must number the channels 0, 1, ..., got {channel_names!r}")
    return {str(k): v for k, v in ordered}


def _check_inputs(labels: dict, gpu_memory_gb: float) -> int:
    if not (isinstance(gpu_memory_gb, (int, float)) and math.isfinite(gpu_memory_gb) and gpu_memory_gb > 0):
        raise PlanningError(f"gpu_memory_gb must be a positive number, got {gpu_memory_gb!r}")
    n_classes = rules.num_classes(labels)
    if n_classes < 2:
        raise PlanningError(f"labels must name background and at least one class, got {labels!r}")
    return n_classes


def full_resolution_spacing(fp: _Fingerprint, notes: list) -> tuple[np.ndarray, list[int]]:
    """Target spacing (median, 10th percentile out of plane if anisotropic) and axis order."""
    median = rules.median_spacing(fp.spacings)
    raw_size = np.median(fp.shapes, axis=0)
    found = rules.anisotropy(median, raw_size)
    note(notes, "anisotropy", median_spacing=median, axis_names=AXIS_NAMES, axis_name=AXIS_NAMES[found["axis"]],
         threshold=rules.ANISOTROPY_THRESHOLD, **found)
    target = median.copy()
    axis = found["axis"]
    if found["anisotropic"]:
        coarsest_other = max(median[a] for a in range(3) if a != axis)
        target[axis] = rules.out_of_plane_target(fp.spacings, axis, coarsest_other)
    note(notes, "target_spacing", spacing=target,
         percentile_axis=AXIS_NAMES[axis] if found["anisotropic"] else None,
         percentile_value=target[axis], median_value=median[axis])
    forward = rules.transpose_forward(median, raw_size)
    note(notes, "axis_order", forward=forward, original_axes=AXIS_NAMES,
         planning_axes=[AXIS_NAMES[a] for a in forward])
    return target, forward


def normalization(channels: dict[str, str], fp: _Fingerprint, notes: list) -> tuple[list[str], list[bool]]:
    """Scheme and mask use per channel, with the CT statistics each CT channel relies on."""
    schemes, masks = [], []
    for index, name in channels.items():
        scheme = rules.normalization_scheme(name)
        mask = rules.use_mask_for_norm(scheme, fp.relative_size)
        stats = {}
        if scheme == rules.CT_SCHEME:
            props = fp.intensity.get(index) or fp.intensity.get(int(index)) or {}
            if not all(isinstance(props.get(k), (int, float)) and math.isfinite(props[k]) for k in CT_KEYS):
                raise PlanningError(f"channel {index} ({name}) is CT but the fingerprint has no finite foreground "
                                    f"intensity statistics {CT_KEYS} for it (no labelled voxels?)")
            stats = {"clip": [props["percentile_00_5"], props["percentile_99_5"]], "mean": props["mean"],
                     "std": props["std"]}
        note(notes, "normalization", channel=index, name=name, scheme=scheme, use_mask=mask,
             relative_size=fp.relative_size, threshold=rules.MASK_FOR_NORM_BELOW_RELATIVE_SIZE, **stats)
        schemes.append(scheme)
        masks.append(mask)
    return schemes, masks


def network_settings(architecture: str, notes: list[dict]) -> dict:
    """The blueprint network, with the architecture variant the user chose.

    The default stays the plain U-Net: the seed study found residual encoders and
    convolutions on the skip path ("Conv-Skip") ahead only on average, not on every dataset.
    """
    if architecture not in ARCHITECTURES:
        raise PlanningError(f"unknown network architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    if architecture != NETWORK["architecture"]:
        note(notes, "remark", message=f"Network variant {architecture} instead of the plain U-Net, as requested; "
                                      "stages, patch and batch follow the same rules.")
    return {**NETWORK, "architecture": architecture}


def to_configuration(stage: StagePlan, shared: dict, extra_notes: list[dict] = (), **links) -> Configuration:
    """Turn a planned stage into the plans' configuration entry."""
    topology = stage.topology
    dims = len(stage.patch_size)
    notes = list(stage.notes)
    dummy_2d = dims == 3 and rules.anisotropic_patch(stage.patch_size)
    if dims == 3:
        note(notes, "augmentation", in_plane_only=dummy_2d)
    return Configuration(
        spacing=list(stage.spacing), patch_size=list(stage.patch_size), batch_size=stage.batch_size,
        median_image_size_in_voxels=list(stage.median_shape),
        strides=[list(s) for s in topology.strides], kernel_sizes=[list(k) for k in topology.kernel_sizes],
        features_per_stage=list(features_per_stage(topology.n_stages, dims)),
        n_conv_per_stage_encoder=[CONVS_PER_STAGE] * topology.n_stages,
        n_conv_per_stage_decoder=[CONVS_PER_STAGE] * (topology.n_stages - 1),
        dummy_2d_augmentation=dummy_2d,
        memory={"estimate": stage.estimate, "budget": stage.budget, "model": MEMORY_MODEL},
        explanation=notes + list(extra_notes), **copy.deepcopy(shared), **links)


def three_d_configurations(target, median_full, args: tuple, shared: dict, radii: dict | None = None,
                           slices: tuple | None = None) -> dict[str, Configuration]:
    """3d_fullres, plus 3d_lowres and 3d_cascade_fullres when the cascade rule asks for them, and 3d_cpu
    (``slices``: the 2d configuration's spacing and typical image, for a 3d_cpu planned in 2D)."""
    full = configure_3d(target, median_full, *args, source="the full-resolution target spacing")
    decision = plan_cascade(full, target, median_full, *args)
    configurations = {"3d_fullres": to_configuration(full, shared, [decision.note])}
    configurations["3d_fullres"].batch_dice = rules.use_batch_dice(3, decision.lowres is not None)
    if decision.lowres is not None:
        link = note([], "remark", message="Its segmentation, upsampled, is an extra input of 3d_cascade_fullres.")
        configurations["3d_lowres"] = to_configuration(decision.lowres, shared, [link],
                                                       next_stage="3d_cascade_fullres")
        cascade = to_configuration(full, shared, previous_stage="3d_lowres")
        cascade.batch_dice = rules.use_batch_dice(3, True)
        cascade.explanation = [note([], "remark", message=(
            "Same network, spacing, patch and batch as 3d_fullres; it also receives the upsampled 3d_lowres "
            "segmentation (one channel per class) as input."))]
        configurations["3d_cascade_fullres"] = cascade
    configurations[cpu.NAME] = cpu_configuration(target, median_full, args, shared, radii, slices)
    return configurations


def cpu_configuration(target, median_full, args: tuple, shared: dict, radii: dict | None = None,
                      slices: tuple | None = None) -> Configuration:
    """``3d_cpu`` (see :mod:`.cpu`): the 3D rules at a CPU's size, no coarser than its thinnest class allows;
    in 2D on ``slices`` (spacing, typical image) where a 3D patch of that size would see too little."""
    stage = cpu.configure_cpu(target, median_full, args[-1], radii)
    if slices is not None and cpu.prefer_2d(stage):
        stage = cpu.configure_cpu_2d(*slices, args[0], radii, three_d=stage)
    config = to_configuration(stage, shared)
    dims = len(stage.patch_size)
    config.features_per_stage = cpu.cpu_features(len(config.strides), dims)
    config.memory = {"model": f"sized for a CPU: typical {'image' if dims == 3 else 'slice'} <= "
                              f"{cpu.CPU_IMAGE_VOXELS} voxels, {cpu.CPU_BASE_FEATURES} base features "
                              "(not by GPU memory)"}
    config.batch_dice = rules.use_batch_dice(dims, False)
    return config


def weigh_rare_classes(config: Configuration, labels: dict, class_ratios: dict | None) -> None:
    """The CPU plan's cross-entropy weights (:mod:`.class_weights`): for rare classes, when any is above
    1, and then also the lift of the classes that lag while training."""
    weights, text = class_weights.plan_class_weights(labels, class_ratios)
    if weights is None:
        return
    config.ce_class_weights = [round(w, 4) for w in weights]
    config.lagging_class_lift = class_weights.LAG_LIFT
    note(config.explanation, "remark", message=text)
    note(config.explanation, "remark", message=class_weights.lagging_lift_text())


def keep_sides(configurations: dict[str, Configuration], labels: dict, sides: dict[str, float],
               forward: list[int], notes: list[dict]) -> None:
    """In a canonical plan: no mirroring across left-right when labels name a side or classes keep
    to one side of every patient (:mod:`.mirroring`); else nothing changes."""
    named = mirroring.side_labels(labels)
    lateral = mirroring.lateral_classes(sides)
    if not named and not lateral:
        return
    left_right = [int(a) for a in forward].index(mirroring.CANONICAL_LEFT_RIGHT)
    for config in configurations.values():
        config.mirror_axes = mirroring.mirror_axes_without(left_right, config.spatial_dims)
    note(notes, "remark", message=mirroring.mirroring_text(named, lateral, AXIS_NAMES[forward[left_right]]))


def plan(fingerprint: dict, channel_names: dict, labels: dict, gpu_memory_gb: float = 8.0,
         dataset_name: str = "", architecture: str = "PlainConvUNet") -> Plans:
    """Plan every configuration for a dataset from its fingerprint.

    Args:
        fingerprint: nnU-Net v2 ``dataset_fingerprint.json`` content (ours is a superset).
        channel_names: channel number -> name (``{0: "CT"}``); a channel named CT gets CT normalization.
        labels: label name -> value, background included; ``ignore`` is not a predicted class.
        gpu_memory_gb: GPU memory to plan for; 8 reproduces the paper's plans.
        dataset_name: recorded in the plans.
        architecture: ``PlainConvUNet`` (the blueprint, default) or another design of
            ``names.ARCHITECTURES`` (docs/architectures.md); the topology, patch and batch rules
            are the same for all (Swin-UNETR's patch is then rounded to multiples of 32).

    Example:
        >>> fp = {"spacings": [[1.0, 1.0, 1.0]] * 260, "shapes_after_crop": [[36, 50, 35]] * 260,
        ...       "foreground_intensity_properties_per_channel": {}, "median_relative_size_after_cropping": 1.0}
        >>> plans = plan(fp, {0: "MRI"}, {"background": 0, "anterior": 1, "posterior": 2})
        >>> plans.configurations["3d_fullres"].patch_size, plans.configurations["3d_fullres"].batch_size
        ([40, 56, 40], 9)
    """
    fp = read_fingerprint(fingerprint)
    channels = _channels(channel_names)
    n_classes = _check_inputs(labels, gpu_memory_gb)
    n_cases, n_channels = len(fp.spacings), len(channels)
    notes: list[dict] = []
    note(notes, "dataset", num_cases=n_cases, channels=channels, num_classes=n_classes,
         classes=[k for k in labels if k != rules.IGNORE_LABEL], has_ignore=rules.IGNORE_LABEL in labels)
    target, forward = full_resolution_spacing(fp, notes)
    axes = [AXIS_NAMES[a] for a in forward]
    schemes, masks = normalization(channels, fp, notes)
    median_spacing = rules.median_spacing(fp.spacings)
    resampling = rules.resampling_settings(median_spacing)
    note(notes, "resampling", spacing=median_spacing, anisotropy=rules.spacing_anisotropy(median_spacing),
         threshold=rules.ANISOTROPY_THRESHOLD, separate_z=resampling["separate_z_for_typical_case"])
    shared = {"normalization_schemes": schemes, "use_mask_for_norm": masks, "resampling": resampling,
              "network": network_settings(architecture, notes)}
    args = (n_cases, n_channels, n_classes, gpu_memory_gb, axes)

    # 2D: the in-plane median spacing; slices are not resampled across, so v1 takes the plain
    # median (no 10th percentile) for the slice axis, which only sizes the dataset for the batch cap.
    median_2d = rules.median_shape_at(fp.spacings, fp.shapes, median_spacing)[forward]
    stage_2d = configure_2d(median_spacing[forward], median_2d, *args,
                            source="the median in-plane spacing of the training cases; no resampling across slices")
    configurations = {"2d": to_configuration(stage_2d, shared)}
    configurations["2d"].batch_dice = rules.use_batch_dice(2, False)

    median_full = rules.median_shape_at(fp.spacings, fp.shapes, target)[forward]
    if rules.is_2d_data(median_full):
        note(notes, "remark", message="The images are single slices, so only the 2D configuration is planned.")
    else:
        radii = {name: r for name, r in fp.radii.items() if name in labels and name != rules.IGNORE_LABEL}
        configurations.update(three_d_configurations(target[forward], median_full, args, shared, radii,
                                                      slices=(median_spacing[forward], median_2d)))
        weigh_rare_classes(configurations[cpu.NAME], labels, fp.class_ratios)
    configurations = {name: Configuration.from_dict(name, configure_for_architecture(c.to_dict(), architecture))
                      for name, c in configurations.items()}
    canonical = fingerprint.get("orientation") == CANONICAL
    if canonical:
        note(notes, "remark", message=(
            "Every case is first viewed along the same anatomical axes (z towards the head, y towards the back, "
            "x towards the patient's left), whatever orientation its file was stored in: the axes are only permuted "
            "and reversed, never resampled, and predictions go back to each file's own grid exactly. A network then "
            "sees every patient the same way round; spacings and shapes above are along these axes."))
        keep_sides(configurations, labels, fp.sides, forward, notes)
    return Plans(dataset_name=dataset_name, gpu_memory_gb=float(gpu_memory_gb), transpose_forward=forward,
                 transpose_backward=[int(i) for i in np.argsort(forward)], num_training_cases=n_cases,
                 channel_names=channels, labels=dict(labels), num_classes=n_classes,
                 original_median_spacing=median_spacing.tolist(),
                 original_median_shape=np.median(fp.shapes, axis=0).tolist(),
                 foreground_intensity_properties_per_channel=copy.deepcopy(fp.intensity),
                 configurations=configurations, explanation=notes,
                 orientation=CANONICAL if canonical else None)
