"""The training augmentation built from a plan (AutoSegLib/training/augmentation.py)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from AutoSegLib.training.augmentation import (AugmentationParams, deep_supervision_scales, initial_patch_size,
                                              max_rotation, training_pipeline, validation_pipeline)
from AutoSegLib.network.registry import build_network
from test_training_data import make_config

PHANTOM_STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
SPATIAL_ONLY = AugmentationParams(p_rotation=1, p_scaling=1, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0,
                                  p_low_resolution=0, p_gamma_inverted=0, p_gamma=0, mirror=False)
NOTHING = dataclasses.replace(SPATIAL_ONLY, p_rotation=0, p_scaling=0)


@pytest.fixture(autouse=True)
def one_thread():
    """As in a data worker: small tensor operations only lose time to thread hand-over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def labelled_volume(shape, values=(0, 1, 2, 4), seed=0) -> torch.Tensor:
    """Blocky labels (like organs) using ``values``, and a band of -1 (outside the body)."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice(values, size=[max(1, s // 4) for s in shape])
    seg = np.kron(coarse, np.ones([4] * len(shape), dtype=int))
    seg = np.pad(seg, [(0, s - t) for s, t in zip(shape, seg.shape)], mode="edge")
    seg[..., :3] = -1
    return torch.from_numpy(seg[None].astype(np.int16))


@pytest.mark.parametrize("patch, degrees, dummy_2d, min_scale, expected", [
    ((40, 96, 112), 30, False, 0.85, (97, 163, 137)),  # values of nnU-Net v2's get_patch_size
    ((40, 96, 112), 30, False, 0.7, (118, 198, 167)),
    ((32, 96, 112), 180, True, 0.7, (32, 160, 160)),
    ((96, 112), 180, False, 0.7, (160, 160)),
    ((96, 112), 180, False, 0.85, (131, 131)),
    ((64, 160), 15, False, 0.7, (147, 228)),
    ((20, 50, 70), 30, False, 0.7, (60, 111, 100)),
])
def test_initial_patch_size_matches_nnunet(patch, degrees, dummy_2d, min_scale, expected):
    assert initial_patch_size(patch, math.radians(degrees), dummy_2d, min_scale) == expected


def test_rotation_ranges():
    assert max_rotation((40, 96, 112), False) == pytest.approx(math.radians(30))
    assert max_rotation((32, 96, 112), True) == pytest.approx(math.pi)
    assert max_rotation((96, 112), False) == pytest.approx(math.pi)
    assert max_rotation((64, 160), False) == pytest.approx(math.radians(15))  # elongated 2D patch


def test_deep_supervision_targets_match_network_outputs():
    assert deep_supervision_scales(PHANTOM_STRIDES) == [
        [1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25], [0.25, 0.125, 0.125]]
    patch = (40, 96, 112)
    config = make_config(patch=patch, strides=PHANTOM_STRIDES)
    aug = training_pipeline(config)
    image, targets = aug(torch.randn(1, *aug.input_patch_size), labelled_volume(aug.input_patch_size))
    assert image.shape == (1, *patch)
    assert [tuple(t.shape) for t in targets] == [
        (1, 40, 96, 112), (1, 40, 48, 56), (1, 20, 24, 28), (1, 10, 12, 14)]
    assert all(t.dtype == torch.int16 for t in targets)
    # the network this plan builds (narrow, to be quick) has exactly these outputs
    config.update(kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 4, features_per_stage=[2] * 5,
                  n_conv_per_stage_encoder=[1] * 5, n_conv_per_stage_decoder=[1] * 4,
                  network={"architecture": "PlainConvUNet", "deep_supervision": True})
    with torch.no_grad():
        outputs = build_network(config, 1, 3)(image[None])
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(t.shape[1:]) for t in targets]


def test_unknown_label_interpolation_lists_the_choices():
    with pytest.raises(ValueError, match="allowed: bilinear, nearest"):
        AugmentationParams(label_interpolation="cubic")


def test_without_deep_supervision_one_target():
    aug = validation_pipeline(make_config(deep_supervision=False))
    _, targets = aug(torch.randn(1, 8, 16, 16), labelled_volume((8, 16, 16)))
    assert [tuple(t.shape) for t in targets] == [(1, 8, 16, 16)]


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_labels_stay_input_labels_under_rotation_and_scaling(interpolation):
    params = dataclasses.replace(SPATIAL_ONLY, label_interpolation=interpolation)
    aug = training_pipeline(make_config(patch=(16, 24, 24)), params)
    changed = 0
    for seed in range(8):
        seg = labelled_volume(aug.input_patch_size, seed=seed)
        image = seg.float().clone()
        aug.seed(seed)
        _, targets = aug(image, seg.clone())
        for target in targets:
            assert set(target.unique().tolist()) <= {0, 1, 2, 4}  # no blends, -1 became 0, ignore (4) kept
        assert 4 in targets[0].unique().tolist()
        changed += not torch.equal(targets[0], validation_crop(seg, (16, 24, 24)))
    assert changed == 8  # the spatial transform really resampled


def validation_crop(seg: torch.Tensor, patch) -> torch.Tensor:
    _, targets = validation_pipeline(make_config(patch=patch))(torch.zeros(seg.shape), center_crop(seg, patch))
    return targets[0]


def center_crop(tensor: torch.Tensor, patch) -> torch.Tensor:
    starts = [(s - p) // 2 for s, p in zip(tensor.shape[1:], patch)]
    return tensor[(slice(None), *[slice(a, a + p) for a, p in zip(starts, patch)])].clone()


def test_mask_for_norm_zeroes_outside_and_outside_becomes_background():
    seg = labelled_volume((8, 16, 16))
    for mask in (True, False):
        image = torch.ones(1, 8, 16, 16)
        out, targets = validation_pipeline(make_config(mask=mask))(image, seg.clone())
        outside = seg[0] == -1
        assert (out[0][outside] == (0 if mask else 1)).all()
        assert (out[0][~outside] == 1).all()
        assert (targets[0][0][outside] == 0).all()
        assert torch.equal(targets[0][0][~outside], seg[0][~outside])  # ignore (4) untouched


def test_training_pipeline_masks_too():
    aug = training_pipeline(make_config(mask=True), NOTHING)
    seg = labelled_volume(aug.input_patch_size)
    out, targets = aug(torch.ones(1, *aug.input_patch_size), seg)
    assert ((out[0] == 0) == (center_crop(seg, (8, 16, 16))[0] == -1)).all()
    assert targets[0].min() >= 0


def test_same_seed_same_result_other_seed_other_result():
    aug = training_pipeline(make_config(patch=(16, 24, 24)), dataclasses.replace(
        AugmentationParams(), p_noise=1, p_rotation=1))
    seg = labelled_volume(aug.input_patch_size)
    image = torch.randn(1, *aug.input_patch_size)
    results = []
    for seed in (3, 3, 4):
        aug.seed(seed)
        results.append(aug(image.clone(), seg.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert not torch.equal(results[0][0], results[2][0])


def test_dummy_2d_moves_nothing_between_slices():
    aug = training_pipeline(make_config(patch=(6, 32, 40), dummy_2d=True), SPATIAL_ONLY)
    assert aug.input_patch_size[0] == 6  # no room needed out of plane
    depth = aug.input_patch_size[0]
    image = torch.arange(1, depth + 1, dtype=torch.float32)[None, :, None, None].expand(
        1, depth, *aug.input_patch_size[1:]).contiguous()
    seg = torch.zeros(1, *aug.input_patch_size, dtype=torch.int16)
    for seed in range(5):
        aug.seed(seed)
        out, _ = aug(image.clone(), seg.clone())
        for z in range(depth):
            # in-plane resampling of a constant slice gives that constant (or less, at the padding)
            assert out[0, z].max().item() == pytest.approx(z + 1, abs=1e-4)


def test_2d_pipeline_shapes():
    aug = training_pipeline(make_config(patch=(24, 32), strides=((1, 1), (2, 2), (2, 2))))
    image, targets = aug(torch.randn(1, *aug.input_patch_size), labelled_volume(aug.input_patch_size))
    assert image.shape == (1, 24, 32)
    assert [tuple(t.shape) for t in targets] == [(1, 24, 32), (1, 12, 16)]


def test_validation_pipeline_leaves_the_image_alone():
    aug = validation_pipeline(make_config())
    assert aug.input_patch_size == aug.patch_size == (8, 16, 16)
    image = torch.randn(1, 8, 16, 16)
    out, _ = aug(image.clone(), labelled_volume((8, 16, 16)))
    assert torch.equal(out, image)
