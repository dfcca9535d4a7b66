"""Preprocessing of one case, arrays in and out: crop, normalize, resample, sample, and the way back.

Small arrays built here state the exact expectations; phantom cases (``make_case``) draw the
same patient on any grid, which gives ground truth for the resampling round trip.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from AutoSegLib.imageio import Geometry
from AutoSegLib.planning.rules import resampling_settings
from AutoSegLib.preprocessing.case import (OUTSIDE_MASK_LABEL, preprocess_case, restore_label, restore_labels,
                                          restore_probabilities)
from AutoSegLib.preprocessing import cropping
from AutoSegLib.preprocessing.cropping import crop, crop_bbox, cropped_nonzero_mask, nonzero_mask, paste
from AutoSegLib.preprocessing.normalization import normalize, normalize_ct, normalize_zscore
from AutoSegLib.preprocessing.resampling import resample_image, resample_label
from AutoSegLib.preprocessing.sampling import sample_foreground_locations
from AutoSegLib.synthetic import make_case
from AutoSegLib.synthetic.grid import Grid

RESAMPLING = resampling_settings((1.0, 1.0, 1.0))
# CTNormalization with these statistics is the identity: resampling tests see raw values.
IDENTITY = {"mean": 0.0, "std": 1.0, "percentile_00_5": -1e9, "percentile_99_5": 1e9}
CT_STATS = {"mean": 50.0, "std": 20.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0}


def config(spacing, schemes=("CTNormalization",), masks=None):
    return {"spacing": list(spacing), "patch_size": [8] * len(spacing), "normalization_schemes": list(schemes),
            "use_mask_for_norm": list(masks or [False] * len(schemes)), "resampling": RESAMPLING}


def geometry(spacing=(1.0, 1.0, 1.0)) -> Geometry:
    return Geometry.identity(spacing)


def dice(a, b, value) -> float:
    a, b = a == value, b == value
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def mr_like(shape=(10, 14, 16), seed=0):
    """A ball of tissue in a zero surround, a zero hole inside it, and a labelled box."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    body = ((z - 5) / 4.5) ** 2 + ((y - 7) / 5.5) ** 2 + ((x - 8) / 6.5) ** 2 <= 1
    image = np.where(body, rng.uniform(100, 200, shape), 0).astype(np.float32)
    image[5, 7, 8] = 0  # dark spot inside the body: stays inside the mask
    label = np.zeros(shape, np.uint8)
    label[4:7, 6:9, 6:10] = 1
    return image, label, body


# -- cropping ----------------------------------------------------------------------------------
def test_nonzero_mask_fills_holes_and_bbox_is_tight():
    image, _, body = mr_like()
    mask = nonzero_mask([image])
    assert np.array_equal(mask, body)  # the zero voxel inside is filled
    assert crop_bbox(mask) == ((1, 10), (2, 13), (2, 15))
    assert crop_bbox(np.zeros((2, 3, 4), bool)) == ((0, 2), (0, 3), (0, 4))


def test_mask_filled_inside_its_box_equals_the_mask_filled_whole():
    rng = np.random.default_rng(4)
    for seed in range(20):
        shape = tuple(rng.integers(4, 12, 3))
        image = np.zeros(shape, np.int16)
        box = tuple(slice(int(rng.integers(0, n // 2)), int(rng.integers(n // 2 + 1, n + 1))) for n in shape)
        image[box] = rng.random(image[box].shape) < 0.7  # shells, holes and gaps on the box border
        second = np.zeros(shape, np.float32)
        second[tuple(int(rng.integers(0, n)) for n in shape)] = -2.5
        for channels in ([image], [image, second]):
            raw = np.any([c != 0 for c in channels], axis=0)
            filled = ndimage.binary_fill_holes(raw)
            inside, bbox = cropped_nonzero_mask(channels)
            assert bbox == crop_bbox(filled)
            assert np.array_equal(inside, crop(filled, bbox))
            assert np.array_equal(nonzero_mask(channels), filled)


def test_holes_are_not_filled_when_every_voxel_is_nonzero(monkeypatch):
    def fail(mask):
        raise AssertionError("binary_fill_holes called on an all-nonzero image")

    monkeypatch.setattr(cropping.ndimage, "binary_fill_holes", fail)
    inside, bbox = cropped_nonzero_mask([np.full((3, 4, 5), -1000, np.int16)])
    assert inside.all() and bbox == ((0, 3), (0, 4), (0, 5))


def test_paste_inverts_crop_and_refuses_a_wrong_shape():
    a = np.arange(2 * 5 * 6 * 7).reshape(2, 5, 6, 7)
    bbox = ((1, 4), (0, 6), (2, 5))
    back = paste(crop(a, bbox), bbox, (5, 6, 7), fill=-1)
    assert back.shape == a.shape and np.array_equal(crop(back, bbox), crop(a, bbox))
    assert (back[:, 0] == -1).all() and (back[:, :, :, :2] == -1).all()
    with pytest.raises(ValueError, match="does not match bounding box"):
        paste(np.zeros((3, 6, 4)), bbox, (5, 6, 7))


def test_mr_case_with_zero_surround_is_cropped_and_outside_labelled_minus_one():
    image, label, body = mr_like()
    data, seg, props = preprocess_case([image], label, geometry(), config((1, 1, 1), ["ZScoreNormalization"]),
                                       [0, 1, 2], {})
    assert props["crop_bbox"] == [[1, 10], [2, 13], [2, 15]]
    assert data.shape == (1, 9, 11, 13) and seg.shape == (1, 9, 11, 13)
    assert data.dtype == np.float32 and seg.dtype == np.int16
    inside = crop(body, ((1, 10), (2, 13), (2, 15)))
    cropped_label = crop(label, ((1, 10), (2, 13), (2, 15)))
    assert np.array_equal(seg[0] == OUTSIDE_MASK_LABEL, ~inside)  # every outside voxel, nothing else
    assert np.array_equal(seg[0][inside], cropped_label[inside])
    assert props["original_shape"] == [10, 14, 16] and props["shape_after_crop"] == [9, 11, 13]


def test_ct_with_air_at_minus_1000_is_not_cropped():
    image = np.full((6, 8, 9), -1000, np.int16)
    image[2:4, 3:5, 3:6] = 40
    _, _, props = preprocess_case([image], None, geometry(), config((1, 1, 1)), [0, 1, 2], {"0": CT_STATS})
    assert props["crop_bbox"] == [[0, 6], [0, 8], [0, 9]]


# -- normalization -----------------------------------------------------------------------------
def test_ct_normalization_clips_to_dataset_percentiles_then_dataset_zscore():
    image = np.array([[[-1000, -100, 0, 50, 300, 3000]]], np.int16)
    out = normalize(image, "CTNormalization", CT_STATS)
    expected = (np.clip(image.astype(float), -100, 300) - 50) / 20
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() == out[0, 0, 0] == out[0, 0, 1]  # air and the 0.5% percentile clip to one value


def test_zscore_per_image_ignores_dataset_statistics():
    rng = np.random.default_rng(1)
    image = rng.normal(500, 80, (4, 6, 7)).astype(np.float32)
    out = normalize(image, "ZScoreNormalization", {"mean": 0.0, "std": 1.0})
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-5
    np.testing.assert_allclose(out, (image - image.mean(dtype=float)) / image.std(dtype=float), atol=1e-5)


def test_zscore_inside_mask_uses_mask_statistics_and_zero_outside():
    image, _, body = mr_like()
    out = normalize_zscore(image, body)
    values = image[body].astype(float)
    np.testing.assert_allclose(out[body], (values - values.mean()) / values.std(), atol=1e-5)
    assert (out[~body] == 0).all()
    assert normalize_zscore(image, np.zeros_like(body)).max() == 0  # empty mask: all zeros, no NaN


def test_constant_image_normalizes_without_nan():
    out = normalize_zscore(np.full((3, 3, 3), 7.0))
    assert np.isfinite(out).all() and (out == 0).all()
    ct = normalize_ct(np.full((2, 2, 2), 7.0), {**CT_STATS, "std": 0.0})
    assert np.isfinite(ct).all()


def test_normalizing_into_a_given_array_gives_the_same_result():
    image, _, body = mr_like()
    for scheme, stats, mask in (("CTNormalization", CT_STATS, None), ("ZScoreNormalization", None, body),
                                ("ZScoreNormalization", None, None)):
        out = np.full(image.shape, np.nan, np.float32)
        assert normalize(image.astype(np.int16), scheme, stats, mask, out=out) is out
        assert np.array_equal(out, normalize(image.astype(np.int16), scheme, stats, mask))
    with pytest.raises(ValueError, match="out must be float32"):
        normalize(image, "CTNormalization", CT_STATS, out=np.zeros(image.shape))


def test_zscore_statistics_over_many_slabs_match_numpy():
    rng = np.random.default_rng(2)
    image = rng.normal(300, 40, (20, 512, 512)).astype(np.float32)  # two slabs of 16 slices
    mask = np.zeros(image.shape, bool)
    mask[3:18, 100:400, 50:450] = True
    for m in (None, mask):
        values = image[m] if m is not None else image
        mean, std = values.mean(dtype=np.float64), values.std(dtype=np.float64)
        expected = (image - np.float32(mean)) / np.float32(std)
        if m is not None:
            expected[~m] = 0
        np.testing.assert_allclose(normalize_zscore(image, m), expected, rtol=0, atol=1e-6)


def test_unknown_scheme_and_missing_ct_statistics_are_refused():
    with pytest.raises(ValueError, match="allowed: CTNormalization, ZScoreNormalization"):
        normalize(np.zeros((2, 2, 2)), "MinMax")
    with pytest.raises(ValueError, match="foreground intensity properties"):
        normalize(np.zeros((2, 2, 2)), "CTNormalization", None)


def test_preprocess_case_normalizes_inside_the_mask_when_the_plan_says_so():
    image, label, body = mr_like()
    data, _, props = preprocess_case([image], label, geometry(), config((1, 1, 1), ["ZScoreNormalization"], [True]),
                                     [0, 1, 2], {})
    inside = crop(body, tuple(map(tuple, props["crop_bbox"])))
    assert (data[0][~inside] == 0).all()
    assert abs(data[0][inside].mean()) < 1e-5 and abs(data[0][inside].std() - 1) < 1e-5
    unmasked, _, _ = preprocess_case([image], label, geometry(), config((1, 1, 1), ["ZScoreNormalization"]),
                                     [0, 1, 2], {})
    assert abs(unmasked[0].mean()) < 1e-5 and (unmasked[0][~inside] != 0).all()


def test_multi_channel_cases_keep_channel_order_and_each_channel_its_scheme():
    image, label, body = mr_like()
    ct = np.where(body, image * 2 - 100, 0).astype(np.float32)  # both 0 outside: the same crop
    mr = np.where(body, image * 0.01 + 3, 0).astype(np.float32)
    cfg = config((1, 1, 1), ["CTNormalization", "ZScoreNormalization"], [False, True])
    data, _, props = preprocess_case([ct, mr], label, geometry(), cfg, [0, 1, 2], {"0": CT_STATS, "1": IDENTITY})
    bbox = tuple(map(tuple, props["crop_bbox"]))
    inside = crop(body, bbox)
    assert data.shape[0] == 2
    np.testing.assert_allclose(data[0], normalize_ct(crop(ct, bbox), CT_STATS), atol=1e-6)
    np.testing.assert_allclose(data[1], normalize_zscore(crop(mr, bbox), inside), atol=1e-6)
    # The same channels the other way round: the outputs swap, nothing else changes.
    swapped_cfg = config((1, 1, 1), ["ZScoreNormalization", "CTNormalization"], [True, False])
    swapped, _, _ = preprocess_case([mr, ct], label, geometry(), swapped_cfg, [0, 1, 2], {"1": CT_STATS})
    assert np.array_equal(swapped[::-1], data)


# -- axes and resampling -----------------------------------------------------------------------
def test_transpose_forward_is_applied_after_cropping_and_undone_by_restore():
    image, label, _ = mr_like()
    g = geometry((3.0, 1.0, 0.5))
    data, seg, props = preprocess_case([image], label, g, config((0.5, 3.0, 1.0), ["ZScoreNormalization"]),
                                       [2, 0, 1], {})
    bbox = ((1, 10), (2, 13), (2, 15))
    assert props["spacing_after_crop"] == [0.5, 3.0, 1.0]
    assert props["shape_after_crop"] == [13, 9, 11] == props["shape_after_resampling"]
    expected = crop(label, bbox).transpose(2, 0, 1)
    assert np.array_equal(seg[0][seg[0] >= 0], expected[seg[0] >= 0])
    restored, restored_geometry = restore_label(seg[0], props)
    assert np.array_equal(restored, label) and restored_geometry == g

    # Target spacing is read in planning order: (x, z, y) here.
    _, seg2, props2 = preprocess_case([image], label, g, config((0.8, 1.5, 0.5), ["ZScoreNormalization"]),
                                      [2, 0, 1], {})
    assert props2["shape_after_resampling"] == [8, 18, 22] and seg2.shape == (1, 8, 18, 22)
    assert restore_label(seg2[0], props2)[0].shape == label.shape


def test_2d_configuration_resamples_in_plane_only():
    slices = np.stack([np.full((10, 12), v, np.float32) for v in (5, 50, 500, 7)])  # one value per slice
    slices[:, 4:6, 5:8] += 1000
    data, _, props = preprocess_case([slices], None, geometry((1.0, 1.0, 1.0)), config((0.5, 0.75)), [0, 1, 2],
                                     {"0": IDENTITY})
    assert props["target_spacing"] == [1.0, 0.5, 0.75]  # the case keeps its own slice spacing
    assert data.shape == (1, 4, 20, 16)  # slice count unchanged
    assert props["resampling"]["separate_axis"] == 0
    for k in range(4):  # each slice is the 2D resampling of the same input slice, nothing else
        np.testing.assert_array_equal(data[0, k], resample_image(slices[k], (20, 16), order=3))


def test_anisotropic_case_uses_nearest_neighbour_across_slices():
    values = (1, 101, 41, 71, 11)
    slices = np.stack([np.full((12, 12), v, np.float32) for v in values])
    data, _, props = preprocess_case([slices], None, geometry((5.0, 1.0, 1.0)), config((2.0, 0.8, 0.8)),
                                     [0, 1, 2], {"0": IDENTITY})
    assert props["resampling"]["separate_axis"] == 0 and data.shape == (1, 12, 15, 15)
    # Nearest across slices: output slice j (centre at 2j+1 mm) takes the input slice whose
    # 5 mm slab holds that centre; every output slice is one input slice, nothing blended.
    per_slice = np.round(data[0].mean(axis=(1, 2)), 3)
    assert np.array_equal(per_slice, [1, 1, 101, 101, 101, 41, 41, 71, 71, 71, 11, 11])
    assert np.allclose(data[0], per_slice[:, None, None], atol=1e-3)
    # 2:1 is not anisotropic: all axes together, cubic, so values between the slices appear.
    data, _, props = preprocess_case([slices], None, geometry((2.0, 1.0, 1.0)), config((1.0, 1.0, 1.0)),
                                     [0, 1, 2], {"0": IDENTITY})
    assert props["resampling"]["separate_axis"] is None and data.shape == (1, 10, 12, 12)
    assert not set(np.round(np.unique(data), 3)) <= set(values)


def test_isotropic_case_to_anisotropic_target_still_keeps_slices_apart():
    _, _, props = preprocess_case([np.ones((8, 8, 8))], None, geometry(), config((4.0, 1.0, 1.0)), [0, 1, 2],
                                  {"0": IDENTITY})
    assert props["resampling"]["separate_axis"] == 0


# -- foreground sampling -----------------------------------------------------------------------
def test_foreground_locations_follow_the_count_rule_and_lie_in_their_class():
    seg = np.zeros((50, 200, 210), np.int16)
    seg[:40, :190, :200] = 2  # 1,520,000 voxels: 1% = 15,200 > 10,000
    seg[45:48, 10:30, 10:215 - 5] = 1  # 3 * 20 * 200 = 12,000 voxels: capped at 10,000
    seg[49, 0, :7] = 3  # 7 voxels: all of them
    seg[49, 1, 0] = -1  # outside-mask marker is never sampled
    rows = sample_foreground_locations(seg, [1, 2, 3, 4], seed=7)
    assert rows.dtype == np.int32 and rows.shape[1] == 4
    counts = {c: int((rows[:, 0] == c).sum()) for c in (1, 2, 3, 4)}
    assert counts == {1: 10_000, 2: 15_200, 3: 7, 4: 0}
    assert (rows[:, 1:] >= 0).all() and (rows[:, 1:] < np.array(seg.shape)).all()
    assert np.array_equal(seg[tuple(rows[:, 1:].T)], rows[:, 0])
    assert len(np.unique(rows, axis=0)) == len(rows)  # without replacement
    assert np.array_equal(rows, sample_foreground_locations(seg, [1, 2, 3, 4], seed=7))
    assert not np.array_equal(rows, sample_foreground_locations(seg, [1, 2, 3, 4], seed=8))


def test_no_foreground_gives_an_empty_table_of_the_right_width():
    rows = sample_foreground_locations(np.zeros((3, 4, 5), np.int16), [1, 2], seed=0)
    assert rows.shape == (0, 4) and rows.dtype == np.int32
    assert sample_foreground_locations(np.zeros((4, 5), np.int16), [1], seed=0).shape == (0, 3)


# -- the way back, on phantoms -----------------------------------------------------------------
@pytest.fixture(scope="module")
def phantoms():
    """One CT phantom per acquisition protocol (oblique, thick, flipped, axial for seed 0)."""
    return {case.protocol: case for case in (make_case("ct", 0, i) for i in range(4))}


def index_of(case) -> int:
    return int(case.case_id.rsplit("_", 1)[1])


def forward(case, target, transpose=(0, 1, 2)):
    stats = {"0": {"mean": 100.0, "std": 50.0, "percentile_00_5": -200.0, "percentile_99_5": 300.0}}
    return preprocess_case(case.images, case.label, case.geometry, config(target), list(transpose), stats)


def round_trip(case, target, transpose=(0, 1, 2)):
    _, seg, props = forward(case, target, transpose)
    restored, restored_geometry = restore_label(seg[0], props)
    assert restored_geometry == case.geometry  # spacing, origin and direction exactly
    assert restored.shape == case.label.shape and restored.dtype == np.int16
    return restored, props


def label_values(case):
    return [v for v in range(1, 6) if (case.label == v).any()]


@pytest.mark.parametrize("protocol", ["oblique", "thick", "flipped", "axial"])
def test_round_trip_at_the_original_spacing_is_exact(phantoms, protocol):
    case = phantoms[protocol]
    restored, props = round_trip(case, case.geometry.spacing)
    assert props["shape_after_resampling"] == list(case.label.shape)
    assert np.array_equal(restored, case.label)


@pytest.mark.parametrize("protocol", ["oblique", "thick", "flipped", "axial"])
def test_round_trip_through_a_finer_grid_keeps_every_label(phantoms, protocol):
    case = phantoms[protocol]
    target = tuple(s * f for s, f in zip(case.geometry.spacing, (0.7, 0.8, 0.75)))
    restored, props = round_trip(case, target)
    assert props["shape_after_resampling"] != list(case.label.shape)
    for value in label_values(case):
        assert dice(restored, case.label, value) >= 0.98, (protocol, value)


def anisotropic_grid(case, spacing) -> Grid:
    """The case's field of view and orientation, sampled with other voxel sizes."""
    g = case.geometry
    shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(case.label.shape, g.spacing, spacing))
    return Grid(shape, Geometry(tuple(spacing), g.origin, g.direction))


@pytest.mark.parametrize("protocol, spacing, target", [
    ("oblique", (4.5, 1.0, 1.0), (3.0, 1.0, 1.0)),  # slices 4.5x the pixels, oblique direction
    ("flipped", (5.0, 1.1, 1.1), (2.0, 0.8, 0.8)),  # 4.5x, axes flipped
    ("oblique", (4.0, 0.9, 0.9), (1.0, 0.6, 0.6)),  # from thick slices to nearly isotropic
])
def test_anisotropic_round_trip_with_non_identity_directions(phantoms, protocol, spacing, target):
    case = make_case("ct", 0, index_of(phantoms[protocol]), grid=anisotropic_grid(phantoms[protocol], spacing))
    assert not np.allclose(np.reshape(case.geometry.direction, (3, 3)), np.eye(3))
    restored, props = round_trip(case, target)
    assert props["resampling"]["separate_axis"] == 0
    for value in label_values(case):
        assert dice(restored, case.label, value) >= 0.98, (protocol, value)


def test_transposed_and_2d_round_trips(phantoms):
    case = phantoms["flipped"]
    s = case.geometry.spacing
    restored, props = round_trip(case, (s[2] * 0.75, s[0] * 0.7, s[1] * 0.8), transpose=(2, 0, 1))
    assert props["transpose_forward"] == [2, 0, 1]
    for value in label_values(case):
        assert dice(restored, case.label, value) >= 0.98
    restored, props = round_trip(case, (s[1] * 0.75, s[2] * 0.75))  # 2D: in-plane only
    assert props["shape_after_resampling"][0] == case.label.shape[0]
    for value in label_values(case):
        assert dice(restored, case.label, value) >= 0.98


def test_coarser_target_loses_detail_but_large_organs_survive(phantoms):
    # Going to a coarser grid and back cannot restore what the coarse grid does not hold:
    # small and thin structures lose most (spleen 0.91, aorta 0.89 at worst here; the aorta
    # drops to 0.69 at 1.5 mm isotropic), so only the liver is held to a bound.
    for case in phantoms.values():
        restored, _ = round_trip(case, (2.5, 1.4, 1.4))
        assert dice(restored, case.label, 1) >= 0.95


def edge_aligned_grid(case, new_shape) -> Grid:
    """The grid a resampled array lives on: same outer voxel edges, ``new_shape`` voxels."""
    g = case.geometry
    spacing = np.array(g.spacing) * np.array(case.label.shape) / np.array(new_shape)
    shift_xyz = ((spacing - np.array(g.spacing)) / 2)[::-1]
    origin = np.array(g.origin) + np.reshape(g.direction, (3, 3)) @ shift_xyz
    return Grid(tuple(new_shape), Geometry(tuple(spacing), tuple(origin), g.direction))


def world_centroid(label, value, g: Geometry) -> np.ndarray:
    index_zyx = np.array(ndimage.center_of_mass(label == value))
    return np.array(g.origin) + np.reshape(g.direction, (3, 3)) @ (index_zyx[::-1] * np.array(g.spacing[::-1]))


@pytest.mark.parametrize("protocol", ["oblique", "thick"])
def test_resampled_label_sits_where_the_anatomy_is(phantoms, protocol):
    # The round trip cannot see an error made the same way in both directions (a half-voxel
    # shift, swapped axes); drawing the patient on the resampled grid can.
    case = phantoms[protocol]
    _, seg, props = forward(case, (1.5, 1.5, 1.5))
    grid = edge_aligned_grid(case, props["shape_after_resampling"])
    truth = make_case("ct", 0, index_of(case), grid=grid).label
    resampled = seg[0]  # CT: nothing cropped, no -1 voxels
    for value in (1, 2):  # liver, spleen: big enough for a stable centroid
        shift = np.linalg.norm(world_centroid(resampled, value, grid.geometry)
                               - world_centroid(truth, value, grid.geometry))
        assert shift < 0.45, (value, shift)  # half a 1.5 mm voxel would be 0.75
        assert dice(resampled, truth, value) >= 0.9


def test_restore_probabilities_agrees_with_restore_label_and_is_background_outside_the_crop():
    case = make_case("mr", 0, 2, channels=2)
    pad = ((2, 3), (4, 1), (0, 5))  # a zero surround that cropping removes
    images = [np.pad(image, pad) for image in case.images]
    label = np.pad(case.label, pad)
    target = tuple(s * 1.3 for s in case.geometry.spacing)
    _, seg, props = preprocess_case(images, label, case.geometry, config(target, ["ZScoreNormalization"] * 2),
                                    [0, 1, 2], {})
    assert props["crop_bbox"] == [[2, 2 + case.label.shape[0]], [4, 4 + case.label.shape[1]],
                                  [0, case.label.shape[2]]]
    prediction = np.maximum(seg[0], 0)  # what a network would predict: no -1
    one_hot = np.stack([prediction == k for k in range(6)]).astype(np.float32)
    probabilities, restored_geometry = restore_probabilities(one_hot, props)
    assert restored_geometry == case.geometry
    assert probabilities.shape == (6, *label.shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert probabilities.min() >= 0
    outside = np.ones(label.shape, bool)
    outside[tuple(slice(a, b) for a, b in props["crop_bbox"])] = False
    assert (probabilities[0][outside] == 1).all() and (probabilities[1:][:, outside] == 0).all()
    # Both interpolate the one-hot channels linearly; renormalizing does not move the argmax.
    restored, _ = restore_label(prediction, props)
    assert np.array_equal(probabilities.argmax(axis=0), restored)


@pytest.mark.parametrize("transpose, target_scale, anisotropic", [([0, 1, 2], 1.3, False), ([2, 0, 1], 0.7, False),
                                                                  ([0, 1, 2], 1.0, True)])
def test_restore_labels_is_the_argmax_of_restore_probabilities(transpose, target_scale, anisotropic):
    # A class at a time with a running maximum (no (K, ...) array on the input grid) gives the
    # argmax of the full restore: on softmax outputs with near-ties, cropped, transposed, and
    # with nearest neighbour across distant slices.
    case = make_case("mr", 0, 2, channels=1)
    pad = ((2, 3), (4, 1), (0, 5))
    images = [np.pad(image, pad) for image in case.images]
    spacing = tuple(s * target_scale for s in case.geometry.spacing)
    if anisotropic:
        spacing = (spacing[0] * 4, spacing[1], spacing[2])
    _, _, props = preprocess_case(images, None, case.geometry, config(spacing, ["ZScoreNormalization"]), transpose, {})
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7, *props["shape_after_resampling"])).astype(np.float32)
    logits[3] = logits[2]  # exact ties: the lower class wins in both
    probabilities = np.exp(logits) / np.exp(logits).sum(0)
    full, geometry = restore_probabilities(probabilities, props)
    labels, labels_geometry = restore_labels(probabilities, props, np.uint8)
    assert labels.dtype == np.uint8 and labels.shape == full.shape[1:] and labels_geometry == geometry
    np.testing.assert_array_equal(labels, full.argmax(axis=0))
    assert (labels == 3).sum() == 0 and (labels == 2).any()


def reference_forward(image, label, props, masked):
    """Preprocessing as first written: a float32 copy per step, the label resampled as a copy."""
    how, bbox, transpose = props["resampling"], tuple(map(tuple, props["crop_bbox"])), props["transpose_forward"]
    new_shape = props["shape_after_resampling"]
    mask = crop(nonzero_mask([image]), bbox).transpose(transpose)
    normalized = normalize_zscore(crop(image, bbox).transpose(transpose), mask if masked else None)
    data = resample_image(normalized, new_shape, how["image_order"], how["separate_axis"], how["out_of_plane_order"])
    seg = crop(label, bbox).transpose(transpose).astype(np.int16)
    seg[(seg == 0) & ~mask] = OUTSIDE_MASK_LABEL
    return data, resample_label(seg, new_shape, how["label_order"], how["separate_axis"])


def reference_restore(seg, probabilities, props):
    """The restores as first written: resample to the crop, transpose back, paste a copy per class."""
    how, shape = props["resampling"], props["shape_after_crop"]
    bbox = tuple(map(tuple, props["crop_bbox"]))
    backward = tuple(np.argsort(props["transpose_forward"]))
    label = resample_label(seg, shape, how["label_order"], how["separate_axis"])
    label[label == OUTSIDE_MASK_LABEL] = 0
    label = paste(label.transpose(backward), bbox, props["original_shape"], 0)
    out = np.stack([resample_image(p, shape, 1, how["separate_axis"]) for p in probabilities])
    np.clip(out, 0, None, out=out)
    out /= np.maximum(out.sum(axis=0), 1e-8)
    pasted = [paste(o.transpose(backward), bbox, props["original_shape"], 1.0 if k == 0 else 0.0)
              for k, o in enumerate(out)]
    return label, np.stack(pasted)


@pytest.mark.parametrize("spacing, target, transpose", [
    ((1.0, 1.0, 1.0), (1.3, 0.8, 1.1), (0, 1, 2)),
    ((3.0, 1.0, 0.5), (0.5, 2.0, 0.8), (2, 0, 1)),  # anisotropic, transposed
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1, 2, 0)),  # no resampling
])
def test_in_place_preprocessing_and_restores_give_what_the_copies_gave(spacing, target, transpose):
    image, label, _ = mr_like()
    label[2:5, 8:10, 3:6] = 2
    for masked in (True, False):
        cfg = config(target, ["ZScoreNormalization"], [masked])
        data, seg, props = preprocess_case([image], label, geometry(spacing), cfg, list(transpose), {})
        expected_data, expected_seg = reference_forward(image, label, props, masked)
        assert np.array_equal(data[0], expected_data) and np.array_equal(seg[0], expected_seg)
        assert data.flags.c_contiguous and seg.flags.c_contiguous  # written to disk without another copy
    rng = np.random.default_rng(0)
    probabilities = rng.uniform(-0.1, 1.0, (4, *seg.shape[1:])).astype(np.float32)  # negatives get clipped
    expected_label, expected_probabilities = reference_restore(seg[0], probabilities, props)
    assert np.array_equal(restore_label(seg, props)[0], expected_label)
    restored = restore_probabilities(probabilities, props)[0]
    assert restored.dtype == expected_probabilities.dtype and np.array_equal(restored, expected_probabilities)
