"""nnU-Net v2's training augmentation, built from one configuration of the plan.

The transforms are batchgeneratorsv2's, the DKFZ library nnU-Net v2 itself trains with; this
module only chooses them, their order and their parameters. Every transform works on one
sample: ``image`` float32 (C, *spatial) and ``segmentation`` int16 (1, *spatial) torch tensors.

Order and probabilities are those of nnU-Net v2's ``get_training_transforms`` (v2.8), which
changed a few of the paper's values (Supplementary D); v2's are used here:

    =====================  ===============================  =================================
    transform              v2 (used here)                   paper
    =====================  ===============================  =================================
    rotation / scaling     p 0.2 each, scale U(0.7, 1.4)    same
    Gaussian noise         p 0.1, variance U(0, 0.1)        p 0.15
    Gaussian blur          p 0.2, 0.5/channel, s U(0.5, 1)  sigma U(0.5, 1.5)
    brightness (mult.)     p 0.15, x in (0.75, 1.25)        x U(0.7, 1.3)
    contrast               p 0.15, x in (0.75, 1.25)        x U(0.65, 1.5)
    low resolution         p 0.25, 0.5/channel, 1/U(.5, 1)  same (zoom U(1, 2))
    gamma, inverted        p 0.1, gamma in (0.7, 1.5)       p 0.15
    gamma                  p 0.3, gamma in (0.7, 1.5)       p 0.15
    mirroring              each axis p 0.5                  same
    =====================  ===============================  =================================

The ``(a, b)`` ranges marked "in" are drawn as nnU-Net does (``BGContrast``): with p 0.5 below
1, otherwise above, so shrinking and growing are equally likely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform

from AutoSegLib.planning.plans import mirror_axes

OUTSIDE_LABEL = -1  # preprocessing's mark for "outside the body region"; padding uses it too
LABEL_INTERPOLATIONS = ("bilinear", "nearest")


@dataclass(frozen=True)
class AugmentationParams:
    """Probabilities and ranges of the training augmentation (nnU-Net v2's defaults).

    Tests and experiments change single values with ``dataclasses.replace``.
    """

    p_rotation: float = 0.2
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)  # > 1 samples a larger region: objects shrink
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_low_resolution: float = 0.25
    low_resolution_scale: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    mirror: bool = True
    p_per_channel: float = 0.5  # blur and low resolution pick channels independently
    # "bilinear" (nnU-Net): each label's indicator is interpolated and the largest wins - smooth
    # borders, one resampling per label. "nearest": one resampling in all, ~12x faster on the
    # labels of a 7-label 3D patch (benchmarks/bench_dataloading.py), staircase borders.
    label_interpolation: str = "bilinear"

    def __post_init__(self):
        if self.label_interpolation not in LABEL_INTERPOLATIONS:
            raise ValueError(f"label_interpolation {self.label_interpolation!r}; "
                             f"allowed: {', '.join(LABEL_INTERPOLATIONS)}")


@dataclass
class Augmentation:
    """A per-sample pipeline and the size of the patch it must be given.

    ``input_patch_size`` is what the sampler cuts from the case (larger than the network's
    patch for the training pipeline, so rotation and zoom-out find real image instead of
    padding); the pipeline returns the network's patch.

    Example:
        >>> aug = training_pipeline(config)
        >>> image, targets = aug(torch.zeros(1, *aug.input_patch_size),
        ...                      torch.zeros(1, *aug.input_patch_size, dtype=torch.int16))
        >>> [t.shape for t in targets]  # one target per network output, full resolution first
    """

    input_patch_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    transform: BasicTransform

    def __call__(self, image: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.transform(image=image, segmentation=seg)
        targets = out["segmentation"]
        return out["image"], list(targets) if isinstance(targets, (list, tuple)) else [targets]

    def seed(self, seed: int) -> None:
        """Seed the global generators batchgeneratorsv2 draws from (numpy's and torch's)."""
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def _config(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else config


def deep_supervision_scales(strides: list[list[int]]) -> list[list[float]]:
    """Scale of each network output relative to the patch, full resolution first.

    One per decoder stage (all stages but the bottleneck), as nnU-Net's
    ``_get_deep_supervision_scales``: the output after stage k sees the patch divided by the
    product of the first k strides.
    """
    cumulative = np.cumprod(np.asarray(strides, dtype=float), axis=0)
    return [[float(v) for v in 1.0 / row] for row in cumulative[:-1]]


def max_rotation(patch_size: tuple[int, ...], dummy_2d: bool) -> float:
    """Largest rotation angle in radians (nnU-Net v2's rule).

    Full turns where rotating keeps the patch's shape meaningful (in-plane for near-square 2D
    patches and for anisotropic 3D patches rotated in plane); 30 degrees around each axis for
    3D patches, where larger angles would move the coarse axis into the plane; 15 degrees for
    elongated 2D patches, whose long side would otherwise turn into the short one.
    """
    if len(patch_size) == 2:
        degrees = 15 if max(patch_size) / min(patch_size) > 1.5 else 180
    else:
        degrees = 180 if dummy_2d else 30
    return math.radians(degrees)


def _rotate(vector: np.ndarray, angle: float, axis: int | None) -> np.ndarray:
    """``vector`` times a rotation matrix (row-vector convention of batchgenerators)."""
    c, s = math.cos(angle), math.sin(angle)
    if axis is None:
        matrix = np.array([[c, -s], [s, c]])
    else:
        matrix = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        sign = -1 if axis == 1 else 1  # rotation about y has the opposite orientation
        matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s * sign, s * sign, c
    return vector @ matrix


def initial_patch_size(patch_size: tuple[int, ...], angle: float, dummy_2d: bool,
                       min_scale: float = AugmentationParams.scaling[0]) -> tuple[int, ...]:
    """Patch to sample so the rotated and scaled final patch finds image rather than padding.

    nnU-Net's ``get_patch_size``: rotate the patch's extent vector by the largest angle
    (at most 90 degrees) about each axis, keep the largest extent per axis, and divide by the
    smallest scale. nnU-Net v2 divides by 0.85 (a leftover it calls wrong in its comments);
    here the scaling range's own minimum is used, which is what zooming out by up to 1.4
    actually needs. In-plane augmentation keeps the out-of-plane size.
    """
    spatial = np.asarray(patch_size[1:] if dummy_2d else patch_size, dtype=float)
    angle = min(abs(angle), math.pi / 2)
    extent = spatial.copy()
    axes = [None] if len(spatial) == 2 else [0, 1, 2]
    for axis in axes:
        extent = np.maximum(extent, np.abs(_rotate(spatial, angle, axis)))
    size = [int(v) for v in extent / min_scale]
    return tuple([int(patch_size[0]), *size]) if dummy_2d else tuple(size)


def _spatial(patch_size, angle, params: AugmentationParams) -> SpatialTransform:
    return SpatialTransform(
        tuple(patch_size), patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
        p_rotation=params.p_rotation, rotation=(-angle, angle), p_scaling=params.p_scaling,
        scaling=params.scaling, p_synchronize_scaling_across_axes=1,
        # either way only labels of the input come out, never blends of two
        bg_style_seg_sampling=False, mode_seg=params.label_interpolation, border_mode_seg="constant",
        padding_value_seg=OUTSIDE_LABEL)


def _intensity(params: AugmentationParams, ignore_axes) -> list[BasicTransform]:
    def maybe(transform, p):
        return RandomTransform(transform, apply_probability=p)

    return [
        maybe(GaussianNoiseTransform(noise_variance=params.noise_variance, p_per_channel=1,
                                     synchronize_channels=True), params.p_noise),
        # benchmark=False: plain convolution always. The benchmark picks FFT or not per process by
        # timing, which would make results differ between workers; with sigma <= 1 the kernels are
        # tiny and direct convolution wins anyway.
        maybe(GaussianBlurTransform(blur_sigma=params.blur_sigma, synchronize_channels=False,
                                    synchronize_axes=False, p_per_channel=params.p_per_channel,
                                    benchmark=False), params.p_blur),
        maybe(MultiplicativeBrightnessTransform(multiplier_range=BGContrast(params.brightness),
                                                synchronize_channels=False, p_per_channel=1),
              params.p_brightness),
        maybe(ContrastTransform(contrast_range=BGContrast(params.contrast), preserve_range=True,
                                synchronize_channels=False, p_per_channel=1), params.p_contrast),
        maybe(SimulateLowResolutionTransform(scale=params.low_resolution_scale, synchronize_channels=False,
                                             synchronize_axes=True, ignore_axes=ignore_axes,
                                             allowed_channels=None, p_per_channel=params.p_per_channel),
              params.p_low_resolution),
        maybe(GammaTransform(gamma=BGContrast(params.gamma), p_invert_image=1, synchronize_channels=False,
                             p_per_channel=1, p_retain_stats=1), params.p_gamma_inverted),
        maybe(GammaTransform(gamma=BGContrast(params.gamma), p_invert_image=0, synchronize_channels=False,
                             p_per_channel=1, p_retain_stats=1), params.p_gamma),
    ]


def _fix_ups(config: dict) -> list[BasicTransform]:
    """Mask the image outside the body, label the outside as background, and make DS targets."""
    steps: list[BasicTransform] = []
    masked = [i for i, use in enumerate(config.get("use_mask_for_norm", [])) if use]
    if masked:
        # normalization used only the body region; keep everything outside it at exactly 0
        steps.append(MaskImageTransform(apply_to_channels=masked, channel_idx_in_seg=0, set_outside_to=0))
    steps.append(RemoveLabelTransform(OUTSIDE_LABEL, 0))
    if config.get("network", {}).get("deep_supervision", True):
        steps.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales(config["strides"])))
    return steps


def training_pipeline(config, params: AugmentationParams = AugmentationParams()) -> Augmentation:
    """nnU-Net v2's training augmentation for one configuration (dict from plans.json).

    Uses ``patch_size``, ``strides``, ``dummy_2d_augmentation``, ``use_mask_for_norm`` and
    ``network.deep_supervision``. With ``dummy_2d_augmentation`` (anisotropic 3D patches),
    rotation, scaling and low-resolution simulation act in plane only.
    """
    config = _config(config)
    patch = tuple(int(v) for v in config["patch_size"])
    dummy_2d = len(patch) == 3 and bool(config.get("dummy_2d_augmentation", False))
    angle = max_rotation(patch, dummy_2d)
    steps: list[BasicTransform] = []
    if dummy_2d:
        # fold the out-of-plane axis into channels: a 2D transform then moves every slice alike
        steps += [Convert3DTo2DTransform(), _spatial(patch[1:], angle, params), Convert2DTo3DTransform()]
    else:
        steps.append(_spatial(patch, angle, params))
    steps += _intensity(params, ignore_axes=(0,) if dummy_2d else None)
    axes = mirror_axes(config)  # the plan's: left-right is not mirrored when labels name a side
    if params.mirror and axes:
        steps.append(MirrorTransform(allowed_axes=axes))
    steps += _fix_ups(config)
    sample_size = initial_patch_size(patch, angle, dummy_2d, params.scaling[0])
    return Augmentation(sample_size, patch, ComposeTransforms(steps))


def validation_pipeline(config) -> Augmentation:
    """No augmentation: the patch as sampled, with the same mask, label and DS fix-ups."""
    config = _config(config)
    patch = tuple(int(v) for v in config["patch_size"])
    return Augmentation(patch, patch, ComposeTransforms(_fix_ups(config)))
