import numpy as np
import pytest

from AutoSegLib.preprocessing.resampling import (out_of_plane_axis, resample_image, resample_label,
                                                 separate_axis_for, target_shape)


def ball_label(shape, centers_radii):
    grid = np.indices(shape).astype(float)
    label = np.zeros(shape, np.uint8)
    for value, (center, radius) in enumerate(centers_radii, start=1):
        d = sum((g - c) ** 2 for g, c in zip(grid, center))
        label[d <= radius**2] = value
    return label


def dice(a, b, v):
    a, b = a == v, b == v
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_target_shape_keeps_physical_extent():
    assert target_shape((10, 100, 100), (5.0, 0.8, 0.8), (2.5, 1.6, 1.6)) == (20, 50, 50)
    assert target_shape((1, 3, 3), (1.0, 1.0, 1.0), (10.0, 10.0, 10.0)) == (1, 1, 1)


def test_out_of_plane_axis_needs_more_than_threefold_anisotropy():
    assert out_of_plane_axis((3.0, 1.0, 1.0)) is None
    assert out_of_plane_axis((3.1, 1.0, 1.0)) == 0
    assert out_of_plane_axis((1.0, 1.0, 5.0)) == 2
    assert separate_axis_for((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == 0


def test_same_shape_is_a_float32_copy():
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    out = resample_image(a, a.shape)
    assert out.dtype == np.float32 and np.array_equal(out, a) and not np.shares_memory(out, a)


def test_images_are_float32_and_smooth_functions_survive_a_round_trip():
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in (20, 30, 40)], indexing="ij")
    image = (np.sin(3 * z) + np.cos(2 * y) * x).astype(np.float32)
    up = resample_image(image, (40, 60, 80))
    back = resample_image(up, image.shape)
    assert up.dtype == np.float32
    assert np.abs(back - image)[2:-2, 2:-2, 2:-2].max() < 0.01


def test_separate_axis_uses_nearest_neighbour_across_slices():
    image = np.stack([np.full((8, 8), v, np.float32) for v in (0, 100, 0, 100)])  # alternating slices
    out = resample_image(image, (8, 8, 8), order=3, separate_axis=0, order_separate=0)
    # Nearest across slices: every output slice equals one input slice, nothing in between.
    assert set(np.unique(out)) <= {0.0, 100.0}
    blended = resample_image(image, (8, 8, 8), order=1)
    assert len(np.unique(blended)) > 2


def test_label_resampling_invents_no_values_and_keeps_shapes():
    label = ball_label((24, 40, 40), [((12, 14, 14), 8), ((12, 27, 27), 7)])
    up = resample_label(label, (48, 80, 80))
    assert set(np.unique(up)) == {0, 1, 2} and up.dtype == label.dtype
    back = resample_label(up, label.shape)
    for v in (1, 2):
        assert dice(back, label, v) >= 0.98


def test_anisotropic_label_round_trip_dice():
    label = ball_label((12, 64, 64), [((6, 30, 30), 5), ((6, 40, 45), 3)])
    out = resample_label(label, (12, 40, 40), separate_axis=0)
    back = resample_label(out, label.shape, separate_axis=0)
    for v in (1, 2):
        assert dice(back, label, v) >= 0.9  # in-plane downsampling by 1.6 loses some edge voxels
    assert set(np.unique(out)) == {0, 1, 2}


def test_constant_label_stays_constant():
    label = np.full((3, 4, 5), 2, np.uint8)
    assert np.all(resample_label(label, (6, 8, 10)) == 2)
