"""Schema checks for a plans file: types, ranges, lengths that match the dimensions, sane sizes.

A plans file that arrives with a model folder is input like any image: it may be damaged,
hand-edited or hostile. Everything built from it (resampling, the network, the sliding
window, test-time mirroring) indexes and allocates by its numbers, so they are checked here,
before anything is built, and a bad one is reported as ``key: value: what is wrong`` instead
of surfacing as a ZeroDivisionError, an IndexError or a terabyte allocation deep inside.

The functions are pure and return a list of problems (empty: usable); callers decide how to
report them (:meth:`Plans.from_dict` raises one ``PlanningError`` line naming them all).

The limits accept every plan the planner makes and nnU-Net v2-sized networks (up to ~8
stages, 320 features in 3D and 512 in 2D, patches up to 512x512 or 320^3, 2D batches of a
few hundred), with an order of magnitude to spare; they refuse networks no machine could
hold. Network size is bounded by estimates of its weights and activations rather than by a
feature limit alone, because a wide bottleneck costs weights and a wide first stage costs
activations.

Example:
    >>> plans_problems([1, 2])
    ['(top level): [1, 2]: must be a JSON object, not a list']
    >>> configuration_problems("2d", {**config, "spacing": [0.0, 1.0]})  # doctest: +SKIP
    ['configurations.2d.spacing: [0.0, 1.0]: entries must be finite numbers from 1e-06 to 1e+06']
"""

from __future__ import annotations

import math
from numbers import Real

from AutoSegLib.names import ARCHITECTURES, CONFIGURATIONS, listing

NORMALIZATION_SCHEMES = ("CTNormalization", "ZScoreNormalization")
# Network options with exactly one supported value (network/registry.py, FIXED_OPTIONS); the
# registry refuses others too, but only when the network is built.
FIXED_NETWORK_OPTIONS = {"norm": "InstanceNorm", "nonlinearity": "LeakyReLU",
                         "downsampling": "strided_conv", "upsampling": "transposed_conv"}
NETWORK_KEYS = ("architecture", *FIXED_NETWORK_OPTIONS, "deep_supervision", "inference_depth")
LABEL_ENCODINGS = ("one_hot",)
CT_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")

# Spacing in mm: from electron microscopy (nanometres) to anything a scanner makes.
MIN_SPACING, MAX_SPACING = 1e-6, 1e6
MAX_STAGES = 12  # a 2048-voxel 2D patch pooled to 4 has 10; nnU-Net v2 plans have up to 8
MAX_KERNEL = 15  # odd; the planner uses 1 and 3
MAX_STRIDE = 16  # the planner uses 1 and 2
MAX_CONVS_PER_STAGE = 32  # nnU-Net v2's largest residual encoders have 6 blocks per stage
MAX_FEATURES = 8192  # per stage; the planner caps at 320 (3D) and 512 (2D)
MAX_BATCH_SIZE = 4096
MAX_CHANNELS = 256  # image channels and network classes
MAX_CLASSES = 1000
MAX_CLASS_WEIGHT = 1000.0  # a cross-entropy weight; the planner's are at most class_weights.CAP
# Weights: nnU-Net v2's largest residual encoder U-Net (XL) has ~1e8; 1e9 float32 weights are
# 4 GB before the optimizer's copies.
MAX_PARAMETERS = 1_000_000_000
# Activation elements of one training batch (feature-map voxels x features, kept for the
# backward pass). The planner's plans for an 8 GB GPU reach ~1e9; an 80 GB plan ~1e10.
MAX_ACTIVATIONS = 100_000_000_000


def show(value, limit: int = 60) -> str:
    """A value as in the file, shortened: a plans file may hold huge lists."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _problem(key: str, value, wrong: str) -> str:
    return f"{key}: {show(value)}: {wrong}"


def int_list_problems(key: str, value, length: int | None, low: int, high: int) -> list[str]:
    """A list of ``length`` integers in [low, high]."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        need = f"{length} integers" if length is not None else "a list of integers"
        return [_problem(key, value, f"must be {need}")]
    if not all(is_int(v) and low <= v <= high for v in value):
        return [_problem(key, value, f"entries must be integers from {low} to {high}")]
    return []


def number_list_problems(key: str, value, length: int, low: float, high: float) -> list[str]:
    """A list of ``length`` finite numbers in [low, high]."""
    if not isinstance(value, list) or len(value) != length:
        return [_problem(key, value, f"must be a list of {length} numbers")]
    if not all(is_number(v) and low <= v <= high for v in value):
        return [_problem(key, value, f"entries must be finite numbers from {low:g} to {high:g}")]
    return []


def permutation_problems(key: str, value, length: int = 3) -> list[str]:
    if not (isinstance(value, list) and len(value) == length and all(is_int(v) for v in value)
            and sorted(value) == list(range(length))):
        return [_problem(key, value, f"must be a permutation of {list(range(length))}")]
    return []


# -- one configuration -------------------------------------------------------------------------
def configuration_problems(name: str, config, n_channels: int | None = None, planned=None,
                           n_classes: int | None = None) -> list[str]:
    """Problems of one configuration dict (as in plans.json, optional ``mirror_axes`` included).

    ``n_channels``: image channels the plans declare (checks the per-channel lists);
    ``planned``: names of the plans' configurations: a ``previous_stage`` must be one of them
    (a model folder predicts it first; a work folder's plans may name a stage planned later);
    ``n_classes``: network outputs (sharpens the activation estimate).
    """
    key = f"configurations.{name}"
    if not isinstance(config, dict):
        return [_problem(key, config, "must be an object")]
    problems = [_problem(f"{key}.{k}", None, "missing") for k in
                ("spacing", "patch_size", "batch_size", "strides", "kernel_sizes", "features_per_stage",
                 "n_conv_per_stage_encoder", "n_conv_per_stage_decoder", "normalization_schemes",
                 "use_mask_for_norm", "resampling", "network") if k not in config]
    if problems:
        return problems
    patch = config["patch_size"]
    dims = len(patch) if isinstance(patch, list) and len(patch) in (2, 3) else None
    if dims is None:
        return [_problem(f"{key}.patch_size", patch, "must list 2 or 3 voxel counts")]
    problems += int_list_problems(f"{key}.patch_size", patch, dims, 1, 1 << 20)
    problems += number_list_problems(f"{key}.spacing", config["spacing"], dims, MIN_SPACING, MAX_SPACING)
    if "median_image_size_in_voxels" in config:
        problems += number_list_problems(f"{key}.median_image_size_in_voxels",
                                         config["median_image_size_in_voxels"], dims, 0, 1 << 31)
    batch = config["batch_size"]
    if not (is_int(batch) and 1 <= batch <= MAX_BATCH_SIZE):
        problems.append(_problem(f"{key}.batch_size", batch, f"must be an integer from 1 to {MAX_BATCH_SIZE}"))
    problems += topology_problems(key, config, dims)
    problems += channel_list_problems(key, config, n_channels)
    problems += resampling_problems(f"{key}.resampling", config["resampling"])
    problems += network_problems(f"{key}.network", config["network"])
    problems += optional_problems(key, config, dims, planned, n_classes)
    if not problems:
        problems += size_problems(key, config, n_channels or 1, n_classes or 2)
    return problems


def topology_problems(key: str, config: dict, dims: int) -> list[str]:
    """Strides, kernels, widths and convolution counts: one entry per stage, in range."""
    strides = config["strides"]
    if not (isinstance(strides, list) and 1 <= len(strides) <= MAX_STAGES):
        return [_problem(f"{key}.strides", strides, f"must list 1 to {MAX_STAGES} stages")]
    n = len(strides)
    problems = []
    for i, stride in enumerate(strides):
        problems += int_list_problems(f"{key}.strides[{i}]", stride, dims, 1, MAX_STRIDE)
    if not problems and any(s != 1 for s in strides[0]):
        problems.append(_problem(f"{key}.strides", strides[:1], "the first stride must be all ones"))
    kernels = config["kernel_sizes"]
    if not isinstance(kernels, list) or len(kernels) != n:
        problems.append(_problem(f"{key}.kernel_sizes", kernels, f"{n} strides but {_length(kernels)} kernel sizes"))
    else:
        for i, kernel in enumerate(kernels):
            found = int_list_problems(f"{key}.kernel_sizes[{i}]", kernel, dims, 1, MAX_KERNEL)
            if not found and any(k % 2 == 0 for k in kernel):
                found = [_problem(f"{key}.kernel_sizes[{i}]", kernel, "kernel sizes must be odd")]
            problems += found
    for name, length, high in (("features_per_stage", n, MAX_FEATURES),
                               ("n_conv_per_stage_encoder", n, MAX_CONVS_PER_STAGE),
                               ("n_conv_per_stage_decoder", n - 1, MAX_CONVS_PER_STAGE)):
        value = config[name]
        if not isinstance(value, list) or len(value) != length:
            problems.append(_problem(f"{key}.{name}", value, f"{n} strides but {_length(value)} entries "
                                                             f"(needs {length})"))
        else:
            problems += int_list_problems(f"{key}.{name}", value, length, 1, high)
    if not problems and all(is_int(p) for p in config["patch_size"]):
        total = [math.prod(s[a] for s in strides) for a in range(dims)]
        if any(p % t for p, t in zip(config["patch_size"], total)):
            problems.append(_problem(f"{key}.patch_size", config["patch_size"],
                                     f"not divisible by the total stride {total}"))
    return problems


def _length(value) -> str:
    return str(len(value)) if isinstance(value, list) else "no list of"


def channel_list_problems(key: str, config: dict, n_channels: int | None) -> list[str]:
    problems = []
    schemes, masks = config["normalization_schemes"], config["use_mask_for_norm"]
    if not (isinstance(schemes, list) and schemes and all(isinstance(s, str) for s in schemes)):
        problems.append(_problem(f"{key}.normalization_schemes", schemes, "must list one scheme name per channel"))
    elif any(s not in NORMALIZATION_SCHEMES for s in schemes):
        problems.append(_problem(f"{key}.normalization_schemes", schemes,
                                 f"unknown normalization scheme; allowed: {listing(NORMALIZATION_SCHEMES)}"))
    elif n_channels is not None and len(schemes) != n_channels:
        problems.append(_problem(f"{key}.normalization_schemes", schemes,
                                 f"{len(schemes)} entries but {n_channels} channel(s) in channel_names"))
    if not (isinstance(masks, list) and all(isinstance(m, bool) for m in masks)):
        problems.append(_problem(f"{key}.use_mask_for_norm", masks, "must list true/false per channel"))
    elif isinstance(schemes, list) and len(masks) != len(schemes):
        problems.append(_problem(f"{key}.use_mask_for_norm", masks,
                                 f"{len(masks)} entries but {len(schemes)} normalization schemes"))
    return problems


def resampling_problems(key: str, resampling) -> list[str]:
    if not isinstance(resampling, dict):
        return [_problem(key, resampling, "must be an object")]
    problems = []
    for order in ("image_order", "label_order", "out_of_plane_order"):
        value = resampling.get(order)
        if not (is_int(value) and 0 <= value <= 5):  # scipy's spline orders
            problems.append(_problem(f"{key}.{order}", value, "must be an interpolation order from 0 to 5"))
    threshold = resampling.get("separate_z_anisotropy_threshold")
    if not (is_number(threshold) and threshold > 0):
        problems.append(_problem(f"{key}.separate_z_anisotropy_threshold", threshold, "must be a positive number"))
    if resampling.get("label_encoding", "one_hot") not in LABEL_ENCODINGS:
        problems.append(_problem(f"{key}.label_encoding", resampling["label_encoding"],
                                 f"allowed: {listing(LABEL_ENCODINGS)}"))
    return problems


def network_problems(key: str, network) -> list[str]:
    """Only registered architectures and the blueprint's options: a plan never picks code."""
    if not isinstance(network, dict):
        return [_problem(key, network, "must be an object")]
    problems = []
    if network.get("architecture") not in ARCHITECTURES:
        problems.append(_problem(f"{key}.architecture", network.get("architecture"),
                                 f"unknown network architecture; allowed: {listing(ARCHITECTURES)}"))
    for option, allowed in FIXED_NETWORK_OPTIONS.items():
        if option in network and network[option] != allowed:
            problems.append(_problem(f"{key}.{option}", network[option], f"not supported; allowed: {allowed!r}"))
    if not isinstance(network.get("deep_supervision", True), bool):
        problems.append(_problem(f"{key}.deep_supervision", network["deep_supervision"], "must be true or false"))
    depth = network.get("inference_depth")
    if depth is not None and (network.get("architecture") != "UNetPlusPlus" or not is_int(depth) or depth < 1):
        problems.append(_problem(f"{key}.inference_depth", depth, "a positive integer, for UNetPlusPlus only"))
    unknown = [k for k in network if k not in NETWORK_KEYS]
    if unknown:
        problems.append(_problem(key, unknown, f"unknown network option(s); known: {listing(NETWORK_KEYS, 'and')}"))
    return problems


def optional_problems(key: str, config: dict, dims: int, planned, n_classes: int | None = None) -> list[str]:
    """``mirror_axes``, the class weights, the cascade links and the boolean flags, when present."""
    problems = class_weight_problems(f"{key}.ce_class_weights", config.get("ce_class_weights"), n_classes)
    lift = config.get("lagging_class_lift")
    if lift is not None and not (is_number(lift) and 1 <= lift <= MAX_CLASS_WEIGHT):
        problems.append(_problem(f"{key}.lagging_class_lift", lift, f"must be a number from 1 to {MAX_CLASS_WEIGHT:g}"))
    if "mirror_axes" in config:
        axes = config["mirror_axes"]
        if not (isinstance(axes, list) and all(is_int(a) and 0 <= a < dims for a in axes)
                and len(set(axes)) == len(axes)):
            problems.append(_problem(f"{key}.mirror_axes", axes, f"must list distinct patch axes from 0 to {dims - 1}"))
    for link in ("previous_stage", "next_stage"):
        value = config.get(link)
        if value is None:
            continue
        if not isinstance(value, str) or value not in CONFIGURATIONS:
            problems.append(_problem(f"{key}.{link}", value, f"must name a configuration ({listing(CONFIGURATIONS)})"))
        elif link == "previous_stage" and planned is not None and value not in planned:
            problems.append(_problem(f"{key}.{link}", value, f"not planned; planned: {listing(planned, 'and')}"))
        elif value == key.rsplit(".", 1)[-1]:
            problems.append(_problem(f"{key}.{link}", value, "a configuration cannot follow itself"))
    for flag in ("dummy_2d_augmentation", "batch_dice"):
        if flag in config and not isinstance(config[flag], bool):
            problems.append(_problem(f"{key}.{flag}", config[flag], "must be true or false"))
    if config.get("guidance") is not None:
        from AutoSegLib.planning.guidance import guidance_problems

        problems += guidance_problems(f"{key}.guidance", config["guidance"])
        if config.get("previous_stage"):
            problems.append(_problem(f"{key}.guidance", "...", "a cascade's second stage cannot take clicks"))
    return problems


def class_weight_problems(key: str, weights, n_classes: int | None) -> list[str]:
    """``ce_class_weights``: absent, or one positive weight (at most MAX_CLASS_WEIGHT) per network output."""
    if weights is None:
        return []
    if not (isinstance(weights, list) and weights and all(is_number(w) and 0 < w <= MAX_CLASS_WEIGHT for w in weights)):
        return [_problem(key, weights, f"must list positive numbers up to {MAX_CLASS_WEIGHT:g}, one per class")]
    if n_classes is not None and len(weights) != n_classes:
        return [_problem(key, weights, f"has {len(weights)} weights for {n_classes} classes (background included)")]
    return []


# -- network size ------------------------------------------------------------------------------
def network_size(config: dict, n_channels: int, n_classes: int) -> tuple[int, int]:
    """(weights, activation elements of one training batch) of the U-Net a checked configuration builds.

    Weights: every convolution ``kernel x in x out`` (residual blocks counted as two
    convolutions, the decoder's first convolution taking the skip as well), the transposed
    convolutions and the heads. Activations: each stage's feature maps, one per convolution
    of encoder and decoder plus the upsampled map, times the batch size.
    """
    residual = config["network"].get("architecture") == "ResidualEncoderUNet"
    strides, kernels = config["strides"], config["kernel_sizes"]
    features = config["features_per_stage"]
    encoder = [c * (2 if residual else 1) for c in config["n_conv_per_stage_encoder"]]
    # The decoder's list starts below the bottleneck: its last entry is the full-resolution stage.
    decoder = [*config["n_conv_per_stage_decoder"][::-1], 0]
    voxels, size = [], list(config["patch_size"])
    for stride in strides:
        size = [s // k for s, k in zip(size, stride)]
        voxels.append(math.prod(size))
    weights, activations, previous = 0, 0, n_channels
    for s, (kernel, width) in enumerate(zip(kernels, features)):
        volume = math.prod(kernel)
        weights += volume * width * (previous + (encoder[s] - 1) * width)
        maps = encoder[s]
        if s + 1 < len(features):  # decoder stage s: upsampled map, then convolutions on [up, skip]
            weights += math.prod(strides[s + 1]) * features[s + 1] * width
            weights += volume * width * (2 * width + (decoder[s] - 1) * width) + width * n_classes
            maps += decoder[s] + 1
        activations += voxels[s] * width * maps
        previous = width
    activations += voxels[0] * (n_channels + n_classes)
    return weights, activations * config["batch_size"]


def size_problems(key: str, config: dict, n_channels: int, n_classes: int) -> list[str]:
    weights, activations = network_size(config, n_channels, n_classes)
    what = f"patch {config['patch_size']}, batch {config['batch_size']}, features {config['features_per_stage']}"
    if weights > MAX_PARAMETERS:
        return [_problem(f"{key}.features_per_stage", config["features_per_stage"],
                         f"the network would have {weights:.3g} weights (limit {MAX_PARAMETERS:.0e})")]
    if activations > MAX_ACTIVATIONS:
        return [(f"{key}: {what}: a training batch would hold {activations:.3g} activations "
                 f"({activations * 4 / 1e9:,.0f} GB in float32; limit {MAX_ACTIVATIONS:.0e})")]
    return []


# -- the whole plans file ----------------------------------------------------------------------
def plans_problems(data) -> list[str]:
    """Problems of a plans.json dict (version aside: :meth:`Plans.from_dict` checks it first)."""
    if not isinstance(data, dict):
        return [_problem("(top level)", data, f"must be a JSON object, not a {type(data).__name__}")]
    problems = permutation_problems("transpose_forward", data.get("transpose_forward"))
    problems += permutation_problems("transpose_backward", data.get("transpose_backward"))
    if not problems:
        forward, backward = data["transpose_forward"], data["transpose_backward"]
        if [forward[b] for b in backward] != list(range(len(forward))):
            problems.append(_problem("transpose_backward", backward,
                                     f"is not the inverse of transpose_forward {forward}"))
    if data.get("orientation") not in (None, "canonical"):
        problems.append(_problem("orientation", data.get("orientation"), "must be \"canonical\" or absent"))
    channels = data.get("channel_names")
    n_channels = None
    if not (isinstance(channels, dict) and 1 <= len(channels) <= MAX_CHANNELS
            and all(isinstance(v, str) for v in channels.values())):
        problems.append(_problem("channel_names", channels, f"must map 1 to {MAX_CHANNELS} channels to names"))
    else:
        n_channels = len(channels)
    n_classes = data.get("num_classes")
    if not (is_int(n_classes) and 1 <= n_classes <= MAX_CLASSES):
        problems.append(_problem("num_classes", n_classes, f"must be an integer from 1 to {MAX_CLASSES}"))
        n_classes = None
    for name in ("labels", "foreground_intensity_properties_per_channel"):
        if not isinstance(data.get(name), dict):
            problems.append(_problem(name, data.get(name), "must be an object"))
    problems += scalar_problems(data)
    configurations = data.get("configurations")
    if not isinstance(configurations, dict) or not configurations:
        return problems + [_problem("configurations", configurations, "must be an object {name: configuration}")]
    unknown = [k for k in configurations if k not in CONFIGURATIONS]
    if unknown:
        return problems + [_problem("configurations", unknown, f"unknown configuration(s); allowed: "
                                                              f"{listing(CONFIGURATIONS)}")]
    for name, config in configurations.items():
        problems += configuration_problems(name, config, n_channels, None, n_classes)
    problems += intensity_problems(data.get("foreground_intensity_properties_per_channel"), configurations)
    return problems


def scalar_problems(data: dict) -> list[str]:
    problems = []
    if "gpu_memory_gb" in data and not (is_number(data["gpu_memory_gb"]) and data["gpu_memory_gb"] > 0):
        problems.append(_problem("gpu_memory_gb", data["gpu_memory_gb"], "must be a positive number"))
    if "num_training_cases" in data and not (is_int(data["num_training_cases"]) and data["num_training_cases"] >= 0):
        problems.append(_problem("num_training_cases", data["num_training_cases"], "must be a non-negative integer"))
    for name in ("original_median_spacing", "original_median_shape"):
        if name in data:
            low = MIN_SPACING if name.endswith("spacing") else 0
            problems += number_list_problems(name, data[name], len(data[name]) if isinstance(data[name], list)
                                             and len(data[name]) in (2, 3) else 3, low, 1 << 31)
    if not isinstance(data.get("explanation", []), list):
        problems.append(_problem("explanation", data["explanation"], "must be a list"))
    return problems


def intensity_problems(properties, configurations: dict) -> list[str]:
    """CT normalization divides by the dataset's std and clips to its percentiles: they must be there."""
    if not isinstance(properties, dict):
        return []
    problems = []
    ct_channels = sorted({c for config in configurations.values() if isinstance(config, dict)
                          and isinstance(config.get("normalization_schemes"), list)
                          for c, s in enumerate(config["normalization_schemes"]) if s == "CTNormalization"})
    for c in ct_channels:
        stats = properties.get(str(c))
        key = f"foreground_intensity_properties_per_channel.{c}"
        if not isinstance(stats, dict) or not all(is_number(stats.get(k)) for k in CT_KEYS):
            problems.append(_problem(key, stats, f"CT normalization needs finite numbers {listing(CT_KEYS, 'and')}"))
        elif stats["std"] < 0 or stats["percentile_00_5"] > stats["percentile_99_5"]:
            problems.append(_problem(key, stats, "std must be >= 0 and percentile_00_5 <= percentile_99_5"))
    return problems


def summarize(problems: list[str], most: int = 6) -> str:
    """Problems on one line, the first ``most`` of them."""
    more = f"; and {len(problems) - most} more" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


def model_folder_problems(plans, channel_names: dict, labels: dict) -> list[str]:
    """dataset.json against plans.json in one model folder: the same channels and classes.

    Preprocessing indexes the plans' per-channel lists by the dataset's channels, and the
    network's outputs are the dataset's labels: a mismatch would fail deep inside or mislabel.
    """
    if not isinstance(plans, dict):
        return []
    problems = []
    planned = plans.get("channel_names", {})
    if isinstance(planned, dict) and len(planned) != len(channel_names):
        problems.append(_problem("channel_names", {str(k): v for k, v in channel_names.items()},
                                 f"{len(channel_names)} channel(s) but plans.json has {len(planned)}"))
    classes = len([name for name in labels if name != "ignore"])
    if is_int(plans.get("num_classes")) and plans["num_classes"] != classes:
        problems.append(_problem("labels", labels, f"{classes} classes but plans.json has num_classes "
                                                   f"{plans['num_classes']}"))
    return problems
