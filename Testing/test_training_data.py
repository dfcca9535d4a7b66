"""Patch sampling and batch assembly (AutoSegLib/training/data.py) on small cases made in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from AutoSegLib.preprocessing import storage
from AutoSegLib.preprocessing.sampling import sample_foreground_locations
from AutoSegLib.training.augmentation import training_pipeline, validation_pipeline
from AutoSegLib.training.data import (PatchSampler, batch_rng, crop_and_pad, group_foreground,
                                      is_forced_foreground, make_batch, pick_foreground_voxel, sample_box)


def make_config(patch=(8, 16, 16), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)), batch_size=2, dummy_2d=False,
                mask=False, deep_supervision=True) -> dict:
    """The fields of a plans.json configuration that data loading reads."""
    return {"patch_size": list(patch), "batch_size": batch_size, "strides": [list(s) for s in strides],
            "dummy_2d_augmentation": dummy_2d, "use_mask_for_norm": [mask],
            "normalization_schemes": ["ZScoreNormalization"], "network": {"deep_supervision": deep_supervision}}


def write_case(folder: Path, case_id: str, shape=(12, 40, 48), boxes=None, outside_columns=0,
               seed=0, classes=(1, 2)) -> None:
    """A preprocessed case: noise image, labelled boxes, optional -1 band (outside the body)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    seg = np.zeros((1, *shape), np.int16)
    if outside_columns:
        seg[0, :, :, :outside_columns] = -1
    for value, box in (boxes or {}).items():
        seg[(0, *[slice(a, b) for a, b in box])] = value
    foreground = sample_foreground_locations(seg[0], list(classes), seed)
    storage.write_case(folder, case_id, image, seg, foreground, {"case_id": case_id})


@pytest.fixture
def blob_folder(tmp_path) -> Path:
    """Two cases whose foreground is tiny: random patches rarely see it."""
    folder = tmp_path / "3d"
    write_case(folder, "a", shape=(24, 64, 64), boxes={1: ((20, 22), (30, 33), (58, 61)), 2: ((10, 12), (50, 53), (20, 23))})
    write_case(folder, "b", shape=(24, 64, 64), boxes={2: ((10, 12), (30, 32), (30, 32))}, seed=1)
    return folder


def test_forced_foreground_is_v2_rule_and_at_least_one_per_batch():
    assert [is_forced_foreground(j, 2) for j in range(2)] == [False, True]
    assert [is_forced_foreground(j, 3) for j in range(3)] == [False, False, True]
    assert sum(is_forced_foreground(j, 12) for j in range(12)) == 4
    assert not is_forced_foreground(0, 1)  # v2: round(0.67) = 1, so a batch of one is never forced
    for batch in range(2, 65):
        forced = [is_forced_foreground(j, batch) for j in range(batch)]
        assert sum(forced) >= 1
        assert forced == [not j < round(batch * (1 - 0.33)) for j in range(batch)]  # nnU-Net v2
        assert forced == sorted(forced)  # the last samples of the batch


def test_sample_box_range_is_v2s():
    rng = np.random.default_rng(0)
    starts = {sample_box((50,), (70,), (40,), rng)[0][0] for _ in range(400)}
    assert min(starts) == -15 and max(starts) == -5  # lbs = -30 // 2, ubs = 50 + 15 - 70
    starts = {sample_box((50,), (41,), (40,), rng)[0][0] for _ in range(400)}
    assert min(starts) == -1 and max(starts) == 10  # odd margin: -(1 // 2) rounds down, as v2
    box = sample_box((50, 60), (20, 30), (20, 30), rng, center=np.array([3, 40]))
    assert box == [(0, 20), (25, 55)]  # centred on the voxel, clamped at the lower end only


def test_crop_and_pad_equals_numpy_pad():
    rng = np.random.default_rng(1)
    array = rng.normal(size=(2, 7, 9, 5)).astype(np.float32)
    padded = np.pad(array, ((0, 0), (20, 20), (20, 20), (20, 20)), constant_values=-3)
    for _ in range(50):
        starts = rng.integers(-12, 10, size=3)
        sizes = rng.integers(1, 15, size=3)
        box = [(int(a), int(a + s)) for a, s in zip(starts, sizes)]
        expected = padded[(slice(None), *[slice(a + 20, b + 20) for a, b in box])]
        np.testing.assert_array_equal(crop_and_pad(array, box, -3), expected)


def test_crop_reads_only_the_slab():
    class Spy:
        shape = (1, 100, 100, 100)
        dtype = np.float32

        def __init__(self):
            self.keys = []

        def __getitem__(self, key):
            self.keys.append(key)
            return np.zeros((1, *[k.stop - k.start for k in key[1:]]))

    spy = Spy()
    crop_and_pad(spy, [(-5, 10), (40, 60), (95, 120)], 0)
    assert spy.keys == [(slice(None), slice(0, 10), slice(40, 60), slice(95, 100))]


def test_ignore_label_is_never_a_forced_class():
    rows = np.array([[1, 0, 0, 0], [3, 1, 1, 1], [3, 2, 2, 2], [2, 4, 4, 4]], np.int32)
    groups = group_foreground(rows, ignore_label=3)
    assert sorted(groups) == [1, 2]
    rng = np.random.default_rng(0)
    picked = {tuple(pick_foreground_voxel(groups, rng)) for _ in range(100)}
    assert picked == {(0, 0, 0), (4, 4, 4)}
    assert pick_foreground_voxel(group_foreground(rows[1:3], ignore_label=3), rng) is None


def test_forced_samples_contain_a_random_present_class(blob_folder):
    sampler = PatchSampler(blob_folder, ["a"], (8, 16, 16), (8, 16, 16))
    rng = np.random.default_rng(0)
    centres, unforced_with_fg = [], 0
    for _ in range(200):
        image, seg = sampler.sample("a", True, rng)
        assert image.shape == (1, 8, 16, 16) and image.dtype == np.float32 and seg.dtype == np.int16
        centres.append(int(seg[0, 4, 8, 8]))  # the chosen voxel sits at the patch centre
        unforced_with_fg += int((sampler.sample("a", False, rng)[1] > 0).any())
    assert set(centres) == {1, 2}
    assert 0.35 < centres.count(1) / 200 < 0.65  # classes uniformly, not by voxel count
    assert unforced_with_fg < 40


def test_every_batch_has_its_forced_foreground_sample(blob_folder):
    config = make_config(batch_size=3)
    sampler = PatchSampler(blob_folder, ["a", "b"], config["patch_size"], config["patch_size"])
    augmentation = validation_pipeline(config)
    for index in range(30):
        batch = make_batch(sampler, augmentation, 3, batch_rng(0, index))
        assert (batch["target"][0][2] > 0).any()  # the last third of the batch


def test_batch_has_the_final_patch_shape_and_targets_per_output(blob_folder):
    config = make_config()
    augmentation = training_pipeline(config)
    assert augmentation.input_patch_size != tuple(config["patch_size"])  # sampled larger, cropped back
    sampler = PatchSampler(blob_folder, ["a", "b"], config["patch_size"], augmentation.input_patch_size)
    batch = make_batch(sampler, augmentation, 2, batch_rng(0, 0))
    assert batch["data"].shape == (2, 1, 8, 16, 16) and batch["data"].dtype == torch.float32
    assert [tuple(t.shape) for t in batch["target"]] == [(2, 1, 8, 16, 16), (2, 1, 8, 8, 8)]
    assert all(t.dtype == torch.int16 for t in batch["target"])
    assert set(batch["keys"]) <= {"a", "b"}


def test_2d_configuration_samples_single_slices(tmp_path):
    folder = tmp_path / "2d"
    write_case(folder, "a", shape=(30, 40, 48), boxes={1: ((17, 18), (10, 20), (10, 20))})
    config = make_config(patch=(24, 32), strides=((1, 1), (2, 2), (2, 2)), batch_size=4)
    augmentation = training_pipeline(config)
    assert len(augmentation.input_patch_size) == 2
    sampler = PatchSampler(folder, ["a"], config["patch_size"], augmentation.input_patch_size)
    image, seg = sampler.sample("a", True, np.random.default_rng(0))
    assert image.shape == (1, *augmentation.input_patch_size)
    assert (seg == 1).any()  # the forced sample took slice 17, the only labelled one
    batch = make_batch(sampler, augmentation, 4, batch_rng(0, 0))
    assert batch["data"].shape == (4, 1, 24, 32)
    assert [tuple(t.shape) for t in batch["target"]] == [(4, 1, 24, 32), (4, 1, 12, 16)]


def test_image_smaller_than_patch_is_padded_whole(tmp_path):
    folder = tmp_path / "small"
    write_case(folder, "s", shape=(4, 10, 12), boxes={1: ((1, 3), (2, 8), (3, 9))})
    sampler = PatchSampler(folder, ["s"], (8, 16, 16), (8, 16, 16))
    rng = np.random.default_rng(0)
    for force in (False, True) * 10:
        image, seg = sampler.sample("s", force, rng)
        assert image.shape == (1, 8, 16, 16)
        assert (seg != -1).sum() == 4 * 10 * 12  # the whole image is inside the patch
        assert (image[seg == -1] == 0).all()  # image padding is 0, label padding -1
        assert (seg == 1).sum() == 2 * 6 * 6


def test_same_seed_and_index_same_batch(blob_folder):
    config = make_config()
    augmentation = training_pipeline(config)
    sampler = PatchSampler(blob_folder, ["a", "b"], config["patch_size"], augmentation.input_patch_size)
    first = make_batch(sampler, augmentation, 2, batch_rng(7, 3))
    again = make_batch(sampler, augmentation, 2, batch_rng(7, 3))
    other = make_batch(sampler, augmentation, 2, batch_rng(7, 4))
    assert torch.equal(first["data"], again["data"])
    assert all(torch.equal(a, b) for a, b in zip(first["target"], again["target"]))
    assert not torch.equal(first["data"], other["data"])


def test_a_broken_case_is_named(blob_folder):
    (blob_folder / "b.npy").write_bytes(b"not an array")
    sampler = PatchSampler(blob_folder, ["b"], (8, 16, 16), (8, 16, 16))
    with pytest.raises(RuntimeError, match="case 'b'"):
        make_batch(sampler, validation_pipeline(make_config()), 2, batch_rng(0, 0))
