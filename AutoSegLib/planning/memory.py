"""GPU memory: an estimate from feature-map sizes, compared against a reference budget.

Training memory is dominated by the activations kept for back-propagation, which scale with
the number of feature-map voxels in the network. So no GPU is needed to plan: the estimate
for a candidate network is compared against the estimate of a network known to fit.

We use nnU-Net v1's estimate (``Generic_UNet.compute_approx_vram_consumption``) and its
reference values, because those produced the paper's published plans; nnU-Net v2 instead
sums the feature maps of an instantiated network and compares with its own constants
(560,000,000 for 3D at batch 2, 85,000,000 for 2D at batch 12), which gives different plans.
Everything here is pure integer arithmetic: planning every configuration takes milliseconds.
"""

from __future__ import annotations

import math

from AutoSegLib.planning.topology import CONVS_PER_STAGE, MAX_FEATURES, Topology

# The GPU memory the reference values stand for; budgets scale linearly from it. 8 GB is the
# paper-era default (nnU-Net v2 keeps 8 GB as its default target too), so plans made with the
# default are comparable with the published ones.
REFERENCE_GPU_MEMORY_GB = 8.0
# v1's 3D reference: the estimate of a 30-feature network known to train at batch size 2.
REFERENCE_3D = 520_000_000
REFERENCE_3D_BASE_FEATURES = 30
# v1's 2D reference: 19,739,648 per sample for a reference network trained at batch 50,
# i.e. this much for a batch of 2.
REFERENCE_2D = 19_739_648 * 50 // 2
# The batch size the references were taken at: the estimate is per batch of 2.
REFERENCE_BATCH = 2


def budget(spatial_dims: int, base_features: int, gpu_memory_gb: float) -> float:
    """The estimate a network may reach at batch size 2 on a GPU of ``gpu_memory_gb``.

    The 3D reference was measured for 30 base features; the 32 we train with need about
    32/30 as much (v1 chose 32 because mixed precision is much faster with multiples of 8,
    and scaled the reference accordingly). The 2D reference is used as is (see
    ``features_for_2d_estimate``).
    """
    scale = gpu_memory_gb / REFERENCE_GPU_MEMORY_GB
    if spatial_dims == 3:
        return REFERENCE_3D * base_features / REFERENCE_3D_BASE_FEATURES * scale
    return REFERENCE_2D * scale


def features_for_2d_estimate(patch_was_shrunk: bool, base_features: int) -> int:
    """Base features the 2D estimate assumes.

    v1's 2D planner estimates the unshrunk patch as the 30-feature network its reference was
    measured on (fp16 training makes up the difference to 32), but every shrunk candidate as
    the 32-feature network actually trained. We keep this so the paper's 2D plans reproduce;
    it only matters for images larger than about 1,300 x 1,300 pixels.
    """
    return base_features if patch_was_shrunk else REFERENCE_3D_BASE_FEATURES


def estimate(topology: Topology, base_features: int, n_input_channels: int, n_classes: int,
             convs_per_stage: int = CONVS_PER_STAGE) -> int:
    """Feature-map voxels of one sample through the U-Net (v1's approximate VRAM count).

    Full resolution: the input, the output logits, and 2 encoder + 2 decoder convolutions plus
    the transposed convolution's output, each ``base_features`` wide. Each lower stage: the
    same 5 maps at doubled width (capped), except the bottleneck with only its 2 convolutions.
    """
    size = list(topology.patch_size)
    max_features = MAX_FEATURES[len(size)]
    voxels = math.prod(size)
    total = (2 * convs_per_stage + 1) * voxels * base_features + (n_input_channels + n_classes) * voxels
    features = base_features
    lower_stages = topology.strides[1:]
    for i, stride in enumerate(lower_stages):
        size = [s // k for s, k in zip(size, stride)]
        features = min(features * 2, max_features)
        maps = 2 * convs_per_stage + 1 if i < len(lower_stages) - 1 else convs_per_stage
        total += maps * math.prod(size) * features
    return total


def batch_from_memory(budget_value: float, estimate_value: int, spatial_dims: int) -> int:
    """The batch size the memory allows: the budget is for 2 samples, so 2 x budget / estimate.

    v1 rounds this down to whole samples in 3D (never below 2 samples' worth) and to whole
    pairs in 2D; we keep both so published batch sizes reproduce.
    """
    ratio = budget_value / estimate_value
    if spatial_dims == 3:
        return int(math.floor(max(ratio, 1.0) * REFERENCE_BATCH))
    return int(math.floor(ratio)) * REFERENCE_BATCH
