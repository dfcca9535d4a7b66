import numpy as np
import pytest
from scipy import ndimage

from AutoSegLib.preprocessing.resampling import (out_of_plane_axis, resample_image, resample_label,
                                                 separate_axis_for, slice_sources, target_shape)


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


# -- the in-place implementation against the straightforward one -------------------------------
def reference_zoom(image, new_shape, order, separate_axis=None):
    """Resampling as first written: float32 copies of everything, whole-volume zooms."""
    def zoom(a, shape, o):
        factors = [n / s for n, s in zip(shape, a.shape)]
        if all(f == 1 for f in factors):
            return a.astype(np.float32)
        if o > 1:
            a = ndimage.spline_filter(a.astype(np.float32), order=o, output=np.float32, mode="mirror")
            return ndimage.zoom(a, factors, order=o, output=np.float32, mode="mirror", grid_mode=True,
                                prefilter=False)
        return ndimage.zoom(a.astype(np.float32), factors, order=o, output=np.float32, mode="nearest",
                            grid_mode=True)

    if separate_axis is None:
        return zoom(image, new_shape, order)
    moved = np.moveaxis(image, separate_axis, 0)
    plane = tuple(s for i, s in enumerate(new_shape) if i != separate_axis)
    inplane = np.stack([zoom(m, plane, order) for m in moved])
    return np.moveaxis(zoom(inplane, (new_shape[separate_axis], *plane), 0), 0, separate_axis)


def reference_label(label, new_shape, order, separate_axis=None):
    """One-hot of every label at once in float32, then argmax (the lowest label wins ties)."""
    values = np.unique(label)
    scores = np.stack([reference_zoom((label == v).astype(np.float32), new_shape, order, separate_axis)
                       for v in values])
    return values[scores.argmax(axis=0)].astype(label.dtype)


def random_label(shape, classes, seed):
    """Blobs of ``classes`` labels (-1 among them) with ragged, noisy borders."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=(classes, *shape)), (0, 1.5, 1.5, 1.5))
    return (smooth.argmax(axis=0) - 1).astype(np.int16)


SHAPE_CASES = [((9, 14, 11), (13, 10, 17)), ((12, 8, 8), (5, 15, 8)), ((7, 10, 9), (21, 10, 4))]


@pytest.mark.parametrize("old_shape, new_shape", SHAPE_CASES)
@pytest.mark.parametrize("order, separate_axis", [(1, None), (0, None), (3, None), (1, 0), (1, 2), (3, 1)])
def test_label_resampling_equals_the_one_hot_argmax(old_shape, new_shape, order, separate_axis):
    for seed, classes in ((0, 2), (1, 5), (2, 7)):
        label = random_label(old_shape, classes, seed)
        expected = reference_label(label, new_shape, order, separate_axis)
        assert np.array_equal(resample_label(label, new_shape, order, separate_axis), expected)
        as_uint8 = (label + 1).astype(np.uint8)
        assert np.array_equal(resample_label(as_uint8, new_shape, order, separate_axis), expected + 1)


@pytest.mark.parametrize("old_shape, new_shape", SHAPE_CASES)
@pytest.mark.parametrize("order, separate_axis", [(3, None), (1, None), (3, 0), (3, 2), (0, 1)])
def test_image_resampling_equals_the_straightforward_zoom(old_shape, new_shape, order, separate_axis):
    rng = np.random.default_rng(3)
    for image in (rng.integers(-1000, 2000, old_shape).astype(np.int16), rng.normal(size=old_shape).astype(np.float32)):
        expected = reference_zoom(image, new_shape, order, separate_axis)
        assert_same_zoom(resample_image(image, new_shape, order, separate_axis), expected, order)
        exact = resample_image(image, new_shape, order, separate_axis, separable=False)
        assert np.array_equal(exact, expected)


def assert_same_zoom(got, expected, order):
    """Cubic splines one axis at a time equal scipy's 3D zoom within float32 rounding: 1e-6 of the
    largest value (a few float32 steps; the sum of 64 taps is ordered differently). Lower orders
    are scipy's own zoom: identical."""
    assert got.dtype == np.float32 and got.shape == expected.shape
    if order == 3:
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * float(np.abs(expected).max()))
    else:
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("old_shape, new_shape", [((1, 6, 7), (2, 12, 7)), ((9, 1, 4), (9, 3, 2)),
                                                  ((3, 2, 40), (3, 2, 9)), ((40, 30, 20), (25, 31, 20))])
def test_separable_cubic_zoom_at_edge_sizes_and_mirrored_borders(old_shape, new_shape):
    # single voxels, two voxels (the mirror's period is 2), strong shrinking (taps fold back twice)
    image = ndimage.gaussian_filter(np.random.default_rng(4).normal(size=old_shape), 1).astype(np.float32)
    assert_same_zoom(resample_image(image, new_shape, 3), reference_zoom(image, new_shape, 3), 3)


def test_results_can_be_written_into_a_strided_view():
    label = random_label((9, 14, 11), 4, 5)
    full = np.full((3, 17, 10, 13), 99, np.int16)
    view = full[1].transpose(2, 1, 0)  # (13, 10, 17), not contiguous
    for axis in (None, 0):
        assert resample_label(label, view.shape, separate_axis=axis, out=view) is view
        assert np.array_equal(view, reference_label(label, view.shape, 1, axis))
    assert (full[[0, 2]] == 99).all()
    image = np.random.default_rng(6).normal(size=(9, 14, 11)).astype(np.float32)
    out = np.zeros((17, 10, 13), np.float32).transpose(2, 1, 0)
    assert resample_image(image, out.shape, 3, out=out) is out
    assert_same_zoom(out, reference_zoom(image, out.shape, 3), 3)


def test_overwrite_input_saves_the_copy_and_gives_the_same_result():
    image = np.random.default_rng(7).normal(size=(9, 14, 11)).astype(np.float32)
    expected = reference_zoom(image, (13, 10, 17), 3)
    kept = image.copy()
    assert_same_zoom(resample_image(image, (13, 10, 17), 3), expected, 3)
    assert np.array_equal(image, kept)  # the input is left alone by default
    assert_same_zoom(resample_image(image, (13, 10, 17), 3, overwrite_input=True), expected, 3)
    assert not np.array_equal(image, kept)  # prefiltered in place


def test_a_wrong_output_array_is_refused():
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        resample_image(np.zeros((2, 3, 4)), (4, 6, 8), out=np.zeros((4, 6, 8)))  # float64
    with pytest.raises(ValueError, match="out must be int16 of shape"):
        resample_label(np.zeros((2, 3, 4), np.int16), (4, 6, 8), out=np.zeros((4, 6, 7), np.int16))


@pytest.mark.parametrize("n_old, n_new", [(5, 12), (12, 5), (7, 7), (80, 400), (3, 1), (1, 4)])
def test_slice_sources_is_the_mapping_of_a_nearest_neighbour_zoom(n_old, n_new):
    ramp = np.broadcast_to(np.arange(n_old, dtype=np.float32)[:, None, None], (n_old, 2, 3))
    zoomed = ndimage.zoom(ramp, (n_new / n_old, 1, 1), order=0, mode="nearest", grid_mode=True)
    expected = zoomed[:, 0, 0].astype(int)
    mapped = np.full(n_new, -1)
    for source, targets in slice_sources(n_old, n_new):
        mapped[targets] = source
    assert np.array_equal(mapped, expected)
