"""nnU-Net v2's plans.json and dataset.json as AutoSeg plans: pure functions, dicts in, dicts out.

nnU-Net v2 (2.4 and later; the older ``UNet_class_name`` layout is converted the way nnU-Net
itself converts it) names code in its plans: network classes, operator classes to import,
normalization schemes, resampling functions, the preprocessor, the image reader. Each name is
looked up in the small tables below, which list only what AutoSeg computes the same way;
anything else is refused with one line naming the feature and the file, never imported.

What maps to what (nnU-Net v2 key -> AutoSeg plans key):

- ``spacing``, ``patch_size``, ``batch_size``, ``normalization_schemes``, ``use_mask_for_norm``,
  ``transpose_forward/backward``, ``foreground_intensity_properties_per_channel``: unchanged;
- ``architecture.network_class_name`` + ``arch_kwargs``: ``network.architecture`` and the
  per-stage lists (``n_conv_per_stage`` or a residual encoder's ``n_blocks_per_stage`` ->
  ``n_conv_per_stage_encoder``); operators must be the blueprint's (conv, instance norm with
  eps 1e-5 and affine, leaky ReLU 0.01, no dropout), which our blocks build;
- ``resampling_fn_*_kwargs`` of ``resample_data_or_seg_to_shape``: ``order`` -> image/label
  order, ``order_z`` -> ``out_of_plane_order``, ``force_separate_z`` null -> the anisotropy rule
  with ``separate_z_anisotropy_threshold`` (default 3), false -> never separate;
- ``inherits_from`` is resolved; ``previous_stage`` kept (the cascade).

Example:
    >>> config = convert_configuration(nnunet_plans, "3d_fullres", "plans.json")  # doctest: +SKIP
    >>> config["network"], config["n_conv_per_stage_encoder"]  # doctest: +SKIP
    ({'architecture': 'PlainConvUNet'}, [2, 2, 2])
"""

from __future__ import annotations

import copy
import math

from AutoSegLib.models.choice import ModelFolderError
from AutoSegLib.names import CONFIGURATIONS, listing

# DNA class paths whose state_dict AutoSeg's networks reproduce (network/unet.py).
NETWORK_CLASSES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "ResidualEncoderUNet",
    "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet": "ResidualEncoderUNet",
}
LEGACY_NETWORK_CLASSES = {"PlainConvUNet": "PlainConvUNet", "ResidualEncoderUNet": "ResidualEncoderUNet"}
# Operators by the names nnU-Net writes (``module.Class``) and the short public spelling.
CONV_OPS = {f"torch.nn.{m}Conv{d}d": d for d in (2, 3) for m in ("modules.conv.", "")}
NORM_OPS = {f"torch.nn.{m}InstanceNorm{d}d": d for d in (2, 3) for m in ("modules.instancenorm.", "")}
NONLINS = ("torch.nn.LeakyReLU", "torch.nn.modules.activation.LeakyReLU")
IMPORTED_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin")
ARCH_KWARGS = {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
               "n_blocks_per_stage", "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs",
               "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs", "deep_supervision"}
# Residual-encoder options that only have DNA's default in AutoSeg's network.
RESIDUAL_DEFAULTS = {"block": ("dynamic_network_architectures.building_blocks.residual.BasicBlockD",),
                     "bottleneck_channels": (None,), "stem_channels": (None,), "disable_default_stem": (False,),
                     "return_skips": (False,)}
NORMALIZATION_SCHEMES = ("CTNormalization", "ZScoreNormalization")
RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"
RESAMPLING_KWARGS = {"is_seg", "order", "order_z", "force_separate_z", "separate_z_anisotropy_threshold"}
DEFAULT_ANISOTROPY_THRESHOLD = 3.0
NEVER_SEPARATE = 1e9  # force_separate_z false: no spacing ratio reaches this
PREPROCESSORS = ("DefaultPreprocessor",)
IMAGE_READERS = ("SimpleITKIO",)
LABEL_MANAGERS = ("LabelManager",)
LEAKY_SLOPE = 1e-2


class NnUNetModelError(ModelFolderError):
    """An nnU-Net v2 model folder uses something AutoSeg does not reproduce; the message names it."""


def _refuse(source: str, what: str) -> NnUNetModelError:
    return NnUNetModelError(f"{source}: {what}")


def resolve_configuration(plans: dict, name: str, source: str) -> dict:
    """The configuration ``name`` with ``inherits_from`` applied (the child's keys win), as nnU-Net does."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        found = listing(configurations) if isinstance(configurations, dict) else "none"
        raise _refuse(source, f"configuration {name!r} is not in the plans (it has {found})")
    chain, current = [], name
    while current is not None:
        if current in chain:
            raise _refuse(source, f"configuration {name!r}: inherits_from loops through {chain + [current]}")
        if current not in configurations or not isinstance(configurations[current], dict):
            raise _refuse(source, f"configuration {chain[-1]!r} inherits from {current!r}, which is not planned")
        chain.append(current)
        current = configurations[current].get("inherits_from")
    merged: dict = {}
    for link in reversed(chain):
        merged.update(copy.deepcopy(configurations[link]))
    merged.pop("inherits_from", None)
    return merged


def legacy_architecture(config: dict, source: str) -> dict:
    """The ``architecture`` entry nnU-Net v2 >= 2.4 reconstructs from its older plans keys."""
    unet = config.get("UNet_class_name")
    if unet not in LEGACY_NETWORK_CLASSES:
        raise _refuse(source, f"network UNet_class_name {unet!r} is not supported; supported: "
                              f"{listing(LEGACY_NETWORK_CLASSES)}")
    try:
        n = len(config["n_conv_per_stage_encoder"])
        dims = len(config["patch_size"])
        features = [min(config["UNet_base_num_features"] * 2 ** i, config["unet_max_num_features"]) for i in range(n)]
        blocks = "n_conv_per_stage" if unet == "PlainConvUNet" else "n_blocks_per_stage"
        kwargs = {"n_stages": n, "features_per_stage": features, "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
                  "kernel_sizes": config["conv_kernel_sizes"], "strides": config["pool_op_kernel_sizes"],
                  blocks: config["n_conv_per_stage_encoder"],
                  "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"], "conv_bias": True,
                  "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
                  "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                  "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    except (KeyError, TypeError) as exc:
        raise _refuse(source, f"old-style network keys (UNet_class_name) incomplete: {exc}") from None
    module = "unet" if unet == "PlainConvUNet" else "residual_unet"
    return {"network_class_name": f"dynamic_network_architectures.architectures.{module}.{unet}",
            "arch_kwargs": kwargs, "_kw_requires_import": list(IMPORTED_KWARGS)}


def _check_operators(kwargs: dict, dims: int, where: str, source: str) -> None:
    """Only the blueprint's operators: the ones our blocks compute (network/blocks.py)."""
    if CONV_OPS.get(kwargs.get("conv_op")) != dims:
        raise _refuse(source, f"{where}.conv_op {kwargs.get('conv_op')!r} is not supported for a {dims}D patch "
                              f"(supported: torch.nn.modules.conv.Conv{dims}d)")
    if NORM_OPS.get(kwargs.get("norm_op")) != dims:
        raise _refuse(source, f"{where}.norm_op {kwargs.get('norm_op')!r} is not supported (supported: "
                              f"torch.nn.modules.instancenorm.InstanceNorm{dims}d)")
    norm = kwargs.get("norm_op_kwargs") or {}
    if norm.get("affine") is not True or not math.isclose(float(norm.get("eps", 1e-5)), 1e-5) \
            or set(norm) - {"eps", "affine"}:
        raise _refuse(source, f"{where}.norm_op_kwargs {norm!r} is not supported (supported: eps 1e-05, affine true)")
    if kwargs.get("dropout_op") is not None:
        raise _refuse(source, f"{where}.dropout_op {kwargs['dropout_op']!r} is not supported (supported: null)")
    if kwargs.get("nonlin") not in NONLINS:
        raise _refuse(source, f"{where}.nonlin {kwargs.get('nonlin')!r} is not supported (supported: torch.nn.LeakyReLU)")
    nonlin = kwargs.get("nonlin_kwargs") or {}
    if set(nonlin) - {"inplace", "negative_slope"} or not math.isclose(float(nonlin.get("negative_slope", 1e-2)),
                                                                         LEAKY_SLOPE):
        raise _refuse(source, f"{where}.nonlin_kwargs {nonlin!r} is not supported (supported: negative_slope 0.01)")
    if kwargs.get("conv_bias", True) is not True:
        raise _refuse(source, f"{where}.conv_bias {kwargs['conv_bias']!r} is not supported (supported: true)")


def convert_architecture(architecture: dict, dims: int, where: str, source: str) -> dict:
    """nnU-Net v2's ``architecture`` entry -> AutoSeg's network keys of a configuration."""
    if not isinstance(architecture, dict):
        raise _refuse(source, f"{where} must be an object, found {architecture!r}")
    class_name = architecture.get("network_class_name")
    if class_name not in NETWORK_CLASSES:
        raise _refuse(source, f"{where}.network_class_name {class_name!r} is not supported; supported: "
                              f"{listing(NETWORK_CLASSES)}")
    arch = NETWORK_CLASSES[class_name]
    kwargs = architecture.get("arch_kwargs")
    if not isinstance(kwargs, dict):
        raise _refuse(source, f"{where}.arch_kwargs must be an object, found {kwargs!r}")
    imports = architecture.get("_kw_requires_import", [])
    if not isinstance(imports, list) or set(imports) - set(IMPORTED_KWARGS):
        raise _refuse(source, f"{where}._kw_requires_import {imports!r}: only {listing(IMPORTED_KWARGS, 'and')} "
                              "may name classes, and only those checked here")
    residual = arch == "ResidualEncoderUNet"
    extra = set(RESIDUAL_DEFAULTS) if residual else set()
    unknown = sorted(set(kwargs) - ARCH_KWARGS - extra)
    if unknown:
        raise _refuse(source, f"{where}.arch_kwargs {unknown} not supported for {arch}")
    for key in extra & set(kwargs):
        if kwargs[key] not in RESIDUAL_DEFAULTS[key]:
            raise _refuse(source, f"{where}.arch_kwargs.{key} {kwargs[key]!r} is not supported "
                                  f"(supported: {RESIDUAL_DEFAULTS[key][0]!r})")
    _check_operators(kwargs, dims, f"{where}.arch_kwargs", source)
    blocks_key = "n_blocks_per_stage" if residual else "n_conv_per_stage"
    try:
        n = int(kwargs["n_stages"])
        per_stage = {"features_per_stage": kwargs["features_per_stage"], "kernel_sizes": kwargs["kernel_sizes"],
                     "strides": kwargs["strides"], "n_conv_per_stage_encoder": kwargs[blocks_key]}
        decoder = kwargs["n_conv_per_stage_decoder"]
    except (KeyError, TypeError, ValueError) as exc:
        raise _refuse(source, f"{where}.arch_kwargs lacks or garbles {exc} ({arch} needs n_stages, "
                              f"features_per_stage, kernel_sizes, strides, {blocks_key}, n_conv_per_stage_decoder)")
    # DNA accepts one value for every stage as well as a list per stage.
    out = {key: (value if isinstance(value, list) else [value] * n) for key, value in per_stage.items()}
    out["n_conv_per_stage_decoder"] = decoder if isinstance(decoder, list) else [decoder] * (n - 1)
    for key in ("kernel_sizes", "strides"):
        out[key] = [v if isinstance(v, list) else [v] * dims for v in out[key]]
    wrong = {k: len(v) for k, v in out.items() if len(v) != (n - 1 if k == "n_conv_per_stage_decoder" else n)}
    if wrong:
        raise _refuse(source, f"{where}.arch_kwargs: n_stages {n} but lengths {wrong}")
    out["network"] = {"architecture": arch}
    return out


def _resampling_kwargs(config: dict, kind: str, is_seg: bool, where: str, source: str) -> dict:
    function = config.get(f"resampling_fn_{kind}")
    if function != RESAMPLING_FUNCTION:
        raise _refuse(source, f"{where}.resampling_fn_{kind} {function!r} is not supported "
                              f"(supported: {RESAMPLING_FUNCTION})")
    kwargs = config.get(f"resampling_fn_{kind}_kwargs") or {}
    unknown = sorted(set(kwargs) - RESAMPLING_KWARGS)
    if unknown or bool(kwargs.get("is_seg", is_seg)) != is_seg:
        raise _refuse(source, f"{where}.resampling_fn_{kind}_kwargs {kwargs!r} is not supported "
                              f"(keys {listing(sorted(RESAMPLING_KWARGS), 'and')}, is_seg {str(is_seg).lower()})")
    return kwargs


def convert_resampling(config: dict, where: str, source: str) -> dict:
    """The three ``resample_data_or_seg_to_shape`` kwargs -> AutoSeg's ``resampling`` entry.

    AutoSeg restores probabilities linearly in plane and nearest across separated slices, and
    resamples a cascade's previous segmentation nearest across slices: those orders are required.
    """
    data = _resampling_kwargs(config, "data", False, where, source)
    seg = _resampling_kwargs(config, "seg", True, where, source)
    probabilities = _resampling_kwargs(config, "probabilities", False, where, source)
    if (probabilities.get("order", 1), probabilities.get("order_z", 0)) != (1, 0):
        raise _refuse(source, f"{where}.resampling_fn_probabilities_kwargs order {probabilities.get('order')}, "
                              f"order_z {probabilities.get('order_z')} are not supported (supported: 1 and 0)")
    if seg.get("order_z", 0) != 0:
        raise _refuse(source, f"{where}.resampling_fn_seg_kwargs order_z {seg['order_z']} is not supported "
                              "(supported: 0)")
    forced = {kw.get("force_separate_z") for kw in (data, seg, probabilities)}
    thresholds = {kw.get("separate_z_anisotropy_threshold", DEFAULT_ANISOTROPY_THRESHOLD)
                  for kw in (data, seg, probabilities)}
    if len(forced) > 1 or True in forced or len(thresholds) > 1:
        raise _refuse(source, f"{where}: force_separate_z {sorted(map(str, forced))} / "
                              f"separate_z_anisotropy_threshold {sorted(thresholds)} are not supported (supported: "
                              "null or false, one threshold for data, seg and probabilities)")
    threshold = NEVER_SEPARATE if False in forced else float(thresholds.pop())
    return {"image_order": int(data.get("order", 3)), "label_order": int(seg.get("order", 1)),
            "out_of_plane_order": int(data.get("order_z", 0)), "separate_z_anisotropy_threshold": threshold}


def convert_configuration(plans: dict, name: str, source: str) -> dict:
    """One nnU-Net v2 configuration as an AutoSeg configuration dict (``Configuration.from_dict`` input)."""
    where = f"configurations.{name}"
    if name not in CONFIGURATIONS:
        raise _refuse(source, f"configuration {name!r} is not supported (supported: {listing(CONFIGURATIONS)})")
    config = resolve_configuration(plans, name, source)
    preprocessor = config.get("preprocessor_name", PREPROCESSORS[0])
    if preprocessor not in PREPROCESSORS:
        raise _refuse(source, f"{where}.preprocessor_name {preprocessor!r} is not supported "
                              f"(supported: {listing(PREPROCESSORS)})")
    schemes = config.get("normalization_schemes")
    bad = [s for s in schemes or [] if s not in NORMALIZATION_SCHEMES]
    if not isinstance(schemes, list) or bad:
        raise _refuse(source, f"{where}.normalization_schemes {bad or schemes!r} not supported "
                              f"(supported: {listing(NORMALIZATION_SCHEMES)})")
    patch = config.get("patch_size")
    if not (isinstance(patch, list) and len(patch) in (2, 3)):
        raise _refuse(source, f"{where}.patch_size {patch!r} must list 2 or 3 voxel counts")
    architecture = config.get("architecture")
    if architecture is None and "UNet_class_name" in config:
        architecture = legacy_architecture(config, source)
    out = {"spacing": config.get("spacing"), "patch_size": patch, "batch_size": config.get("batch_size"),
           "median_image_size_in_voxels": config.get("median_image_size_in_voxels", list(patch)),
           **convert_architecture(architecture, len(patch), f"{where}.architecture", source),
           "normalization_schemes": schemes, "use_mask_for_norm": config.get("use_mask_for_norm"),
           "resampling": convert_resampling(config, where, source),
           "batch_dice": bool(config.get("batch_dice", False))}
    if config.get("previous_stage") is not None:
        out["previous_stage"] = config["previous_stage"]
    return out


def convert_dataset(dataset: dict, source: str) -> dict:
    """nnU-Net v2's dataset.json as AutoSeg reads it; label regions and other readers refused."""
    if not isinstance(dataset, dict):
        raise _refuse(source, "must be a JSON object")
    labels = dataset.get("labels")
    if "regions_class_order" in dataset or (isinstance(labels, dict)
                                            and any(isinstance(v, (list, tuple)) for v in labels.values())):
        raise _refuse(source, "label regions (regions_class_order, labels given as lists of values) are not "
                              "supported: AutoSeg predicts one class per voxel with a softmax, region models need "
                              "a sigmoid per region")
    reader = dataset.get("overwrite_image_reader_writer")
    if reader is not None and reader not in IMAGE_READERS:
        raise _refuse(source, f"overwrite_image_reader_writer {reader!r} is not supported "
                              f"(supported: {listing(IMAGE_READERS)})")
    if "modality" in dataset and "channel_names" not in dataset:
        raise _refuse(source, "an nnU-Net v1 dataset.json ('modality') is not supported; nnU-Net v2 models only")
    return dataset


def plans_level(plans: dict, source: str) -> dict:
    """The plans keys shared by every configuration, checked: transposes, intensities, reader."""
    if not isinstance(plans, dict):
        raise _refuse(source, "must be a JSON object")
    if "version" in plans and "plans_name" not in plans:
        raise _refuse(source, "this is an AutoSeg plans file, not nnU-Net v2's")
    for key, allowed in (("image_reader_writer", IMAGE_READERS), ("label_manager", LABEL_MANAGERS)):
        value = plans.get(key, allowed[0])
        if value not in allowed:
            raise _refuse(source, f"{key} {value!r} is not supported (supported: {listing(allowed)})")
    return {"transpose_forward": plans.get("transpose_forward"), "transpose_backward": plans.get("transpose_backward"),
            "foreground_intensity_properties_per_channel":
                plans.get("foreground_intensity_properties_per_channel", {})}


def convert_plans(plans_by_configuration: dict[str, tuple[dict, str]], dataset: dict) -> dict:
    """AutoSeg plans (version 1) for the trained configurations of one nnU-Net v2 model.

    Args:
        plans_by_configuration: configuration name -> (its folder's plans.json dict, that file's
            path for messages). Folders of one dataset may use different plans files; they must
            agree on the transposes and intensity statistics, which are the dataset's.
        dataset: the dataset.json dict (checked by :func:`convert_dataset`).
    """
    shared, configurations, first = None, {}, None
    for name, (plans, source) in plans_by_configuration.items():
        level = plans_level(plans, source)
        if shared is None:
            shared, first = level, source
        elif level != shared:
            differ = [k for k in level if level[k] != shared[k]]
            raise _refuse(source, f"{listing(differ, 'and')} differ from {first}: the folders are not one dataset's")
        configurations[name] = convert_configuration(plans, name, source)
    plans = next(iter(plans_by_configuration.values()))[0]
    labels = dataset["labels"]
    spacing = plans.get("original_median_spacing_after_transp") or next(iter(configurations.values()))["spacing"]
    shape = plans.get("original_median_shape_after_transp") or [1, 1, 1]
    return {"version": 1, "dataset_name": str(plans.get("dataset_name", "")), "gpu_memory_gb": 8.0,
            **shared, "num_training_cases": int(dataset.get("numTraining", 0)),
            "channel_names": dataset["channel_names"], "labels": labels,
            "num_classes": len([n for n in labels if n != "ignore"]),
            "original_median_spacing": [float(s) for s in spacing], "original_median_shape": [float(s) for s in shape],
            "configurations": configurations,
            "planner": f"nnU-Net v2 {plans.get('experiment_planner_used', 'planner')} ({plans.get('plans_name', '?')}), "
                       "converted by AutoSegLib.models.nnunet_plans"}
