"""Sliding-window prediction: window placement, the Gaussian map, stitching, mirroring.

Stitching is checked with known functions in place of a network: the input channels hold
each voxel's own coordinates, so a pointwise "network" must give back exactly those
coordinates everywhere, whatever the windows, padding or slicing did.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from AutoSegLib.inference.sliding import predict_window_batch, sliding_window_logits, softmax
from AutoSegLib.inference.windows import (gaussian_importance, mirror_combinations, padding_for, sliding_windows,
                                          window_starts)
from AutoSegLib.network import build_network


def coordinates(shape) -> torch.Tensor:
    """(ndim, *shape) float32: channel a holds each voxel's index along axis a."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return torch.stack(grids)


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """A 'network' with no spatial context: the coordinates and a nonlinear function of them."""
    return torch.cat([x, (x ** 2).sum(1, keepdim=True) / 100], 1)


def expected_pointwise(shape) -> torch.Tensor:
    c = coordinates(shape)
    return torch.cat([c, (c ** 2).sum(0, keepdim=True) / 100])


# -- window placement -------------------------------------------------------------------
@pytest.mark.parametrize("size,patch,step", [(10, 4, 0.5), (37, 16, 0.5), (16, 16, 0.5), (100, 32, 0.25),
                                             (33, 8, 1.0), (9, 8, 0.5)])
def test_windows_cover_the_axis_evenly_and_end_at_the_border(size, patch, step):
    starts = window_starts(size, patch, step)
    assert starts[0] == 0 and starts[-1] + patch == size
    gaps = np.diff(starts)
    assert all(g <= math.ceil(patch * step) for g in gaps), "consecutive windows overlap as asked"
    assert len(starts) == math.ceil((size - patch) / (patch * step)) + 1  # nnU-Net's count


def test_window_starts_refuse_a_bad_step_and_a_too_small_axis():
    with pytest.raises(ValueError, match="step"):
        window_starts(10, 4, 0)
    with pytest.raises(ValueError, match="pad"):
        window_starts(3, 4, 0.5)


def test_2d_windows_on_3d_images_are_single_slices():
    windows = sliding_windows((3, 20, 16), (16, 16))
    assert {w[0] for w in windows} == {0, 1, 2}
    assert all(isinstance(w[0], int) and w[1].stop - w[1].start == 16 for w in windows)


def test_padding_centres_the_image_and_only_where_needed():
    assert padding_for((5, 20, 7), (8, 16, 16)) == [(1, 2), (0, 0), (4, 5)]
    assert padding_for((3, 10, 20), (16, 16)) == [(0, 0), (3, 3), (0, 0)]  # slice axis never padded


# -- Gaussian importance map -----------------------------------------------------------------
def test_gaussian_peaks_in_the_centre_and_has_sigma_one_eighth_of_the_patch():
    patch = (9, 17, 33)
    g = gaussian_importance(patch)
    assert g.shape == patch and g.dtype == np.float32
    centre = tuple(p // 2 for p in patch)
    assert g[centre] == pytest.approx(10.0) and g.max() == pytest.approx(10.0)
    assert g.min() > 0
    for axis, size in enumerate(patch):  # odd sizes: symmetric, decreasing away from the centre
        profile = g[tuple(slice(None) if a == axis else c for a, c in enumerate(centre))]
        assert np.allclose(profile, profile[::-1])
        assert np.all(np.diff(profile[: size // 2 + 1]) > 0)
    # one sigma away along the longest axis: exp(-1/2) of the peak (discrete kernel, within 1%)
    sigma = 33 / 8
    x = np.arange(33) - 16
    profile = g[centre[0], centre[1]]
    assert np.interp(sigma, x, profile) == pytest.approx(10 * math.exp(-0.5), rel=0.01)


def test_gaussian_has_no_zeros_even_in_float16():
    g16 = gaussian_importance((64, 64, 64), dtype=np.float16)
    assert g16.dtype == np.float16 and g16.min() > 0
    g32 = gaussian_importance((64, 64, 64))
    assert g32.min() > 0
    assert g32[0, 0, 0] == g32.min()  # the corners are the least trusted voxels


# -- stitching with known functions --------------------------------------------------------------
@pytest.mark.parametrize("shape,patch,step", [
    ((13, 37, 21), (8, 16, 16), 0.5),   # odd sizes, several windows per axis
    ((8, 16, 16), (8, 16, 16), 0.5),    # exactly one patch
    ((5, 7, 30), (8, 16, 16), 0.5),     # smaller than a patch on two axes: zero padding
    ((19, 19, 19), (8, 8, 8), 0.3),     # another step
    ((7, 23, 40), (16, 16), 0.5),       # 2D configuration: slice by slice
    ((3, 9, 11), (16, 16), 0.5),        # 2D and padded
])
def test_stitched_output_equals_the_function_everywhere(shape, patch, step):
    data = coordinates(shape)
    for batch_size in (1, 4):
        logits = sliding_window_logits(pointwise, data, patch, step, batch_size=batch_size)
        assert logits.shape == (len(shape) + 1, *shape) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected_pointwise(shape), rtol=1e-5, atol=1e-4)


def test_progress_counts_windows_after_each_forward_pass():
    calls = []
    sliding_window_logits(pointwise, coordinates((20, 20, 20)), (8, 8, 8), 0.5, batch_size=3,
                          progress=lambda done, of: calls.append((done, of)))
    total = 4 ** 3  # windows per axis: 20 at step 4 from 0 to 12
    assert calls == [(min(n, total), total) for n in range(3, total + 3, 3)]


def test_network_device_gets_the_windows_and_the_accumulators_stay_with_the_data():
    seen = []

    def network(x):
        seen.append((x.device.type, x.dtype))
        return pointwise(x)

    data = coordinates((9, 20, 20)).double()  # host data in float64 shows which side accumulated
    logits = sliding_window_logits(network, data, (8, 8, 8), 0.5, network_device=torch.device("cpu"),
                                   accumulate_dtype=torch.float64)
    assert logits.dtype == torch.float64 and seen and all(s == ("cpu", torch.float64) for s in seen)
    torch.testing.assert_close(logits, expected_pointwise((9, 20, 20)).double(), rtol=1e-5, atol=1e-4)


def test_float16_accumulators_give_nearly_the_float32_result():
    data = coordinates((11, 20, 20)) / 20
    half = sliding_window_logits(pointwise, data, (8, 16, 16), accumulate_dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), expected_pointwise((11, 20, 20)) / torch.tensor([20, 20, 20, 400.]
                                                                                              ).view(-1, 1, 1, 1),
                               rtol=1e-2, atol=1e-2)


def test_windows_are_weighted_by_the_gaussian():
    """A 'network' that outputs 1 in the second of two overlapping windows, 0 in the first."""
    calls = []

    def net(x):
        calls.append(len(calls))
        return torch.full((x.shape[0], 1, 8), float(len(calls) - 1))

    out = sliding_window_logits(net, torch.zeros(1, 12), (8,), step=0.5)[0]
    g = torch.from_numpy(gaussian_importance((8,)))
    # windows at 0 and 4: voxel v of the overlap weighs the second window by g[v - 4]
    expected = torch.tensor([0.0] * 4 + [float(g[v - 4] / (g[v] + g[v - 4])) for v in range(4, 8)] + [1.0] * 4)
    torch.testing.assert_close(out, expected)


# -- the same as a whole-image forward pass ------------------------------------------------
TINY = {"patch_size": [8, 16, 16], "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2,
        "features_per_stage": [4, 8], "n_conv_per_stage_encoder": [1, 1], "n_conv_per_stage_decoder": [1],
        "network": {"architecture": "PlainConvUNet"}}


def tiny_net(seed=0, patch=(8, 16, 16), channels=2, classes=3):
    torch.manual_seed(seed)
    config = {**TINY, "patch_size": list(patch), "strides": [[1] * len(patch), [2] * len(patch)],
              "kernel_sizes": [[3] * len(patch)] * 2}
    net = build_network(config, channels, classes, deep_supervision=False)
    return net.eval()


def test_one_patch_sized_input_equals_a_direct_forward_pass():
    net = tiny_net()
    data = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        direct = net(data[None])[0]
    torch.testing.assert_close(sliding_window_logits(net, data, (8, 16, 16)), direct, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        mirrored = torch.stack([torch.flip(net(torch.flip(data[None], a)), a)[0]
                                for a in [(), *mirror_combinations((2, 3, 4))]]).mean(0)
    torch.testing.assert_close(sliding_window_logits(net, data, (8, 16, 16), mirror_axes=(0, 1, 2)), mirrored,
                               rtol=1e-5, atol=1e-5)


def test_2d_network_slice_by_slice_equals_a_forward_pass_per_slice():
    net = tiny_net(patch=(16, 16))
    data = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        direct = net(data.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)  # slices as the batch
    torch.testing.assert_close(sliding_window_logits(net, data, (16, 16), batch_size=2), direct,
                               rtol=1e-5, atol=1e-5)


def test_softmax_sums_to_one_in_float32():
    p = softmax(torch.randn(4, 3, 5, 6).half())
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(0), torch.ones(3, 5, 6))


# -- test-time mirroring ---------------------------------------------------------------------
def test_mirroring_leaves_a_mirror_equivariant_network_unchanged():
    data = coordinates((10, 20, 18))
    plain = sliding_window_logits(pointwise, data, (8, 16, 16))
    mirrored = sliding_window_logits(pointwise, data, (8, 16, 16), mirror_axes=(0, 1, 2))
    torch.testing.assert_close(mirrored, plain)


def test_mirrored_outputs_are_flipped_back_along_the_right_axes():
    """out = input + a ramp along the patch's first axis, fixed to the window (not equivariant).

    Flipping the input and flipping the output back returns the input exactly, but the ramp
    comes back reversed whenever axis 0 was flipped: half of the flips, so it averages to its
    mean, (p - 1) / 2. Flips not including axis 0 leave the ramp as it is.
    """
    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1)

    def net(x):
        return x + ramp

    x = torch.randn(2, 1, 8, 4, 6)
    both = predict_window_batch(net, x, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(both, x + 3.5)
    in_plane = predict_window_batch(net, x, mirror_axes=(1, 2))
    torch.testing.assert_close(in_plane, x + ramp)
    assert len(mirror_combinations((0, 1, 2))) == 7


@pytest.mark.parametrize("windows,axes,calls", [(1, (0, 1, 2), [2, 2, 2, 2]), (1, (1, 2), [2, 2]),
                                                 (1, (0,), [2]), (2, (0, 1), [2, 2, 2, 2]), (1, (), [1])])
def test_a_lone_window_goes_through_the_network_with_its_flips(windows, axes, calls):
    """With ``min_samples=2`` a batch of one window and its flipped copies share network calls (torch's
    CPU convolutions take a slow kernel for one sample); the mean is that of one call per flip."""
    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1)
    seen = []

    def net(x):
        seen.append(x.shape[0])
        return torch.cat([x + ramp, x * ramp], 1)  # not mirror-equivariant: a wrong flip-back shows

    x = torch.randn(windows, 1, 8, 4, 6)
    together = predict_window_batch(net, x, mirror_axes=axes, min_samples=2)
    assert seen == calls
    seen.clear()
    one_by_one = predict_window_batch(net, x, mirror_axes=axes)
    assert seen == [windows] * (len(mirror_combinations(axes)) + 1)
    torch.testing.assert_close(together, one_by_one, rtol=1e-6, atol=1e-6)
    assert together.shape == (windows, 2, 8, 4, 6)


def test_a_non_equivariant_network_changes_under_mirroring():
    net = tiny_net(channels=1, classes=2)
    data = torch.randn(1, 8, 16, 16)
    plain = sliding_window_logits(net, data, (8, 16, 16))
    mirrored = sliding_window_logits(net, data, (8, 16, 16), mirror_axes=(0, 1, 2))
    assert not torch.allclose(plain, mirrored, atol=1e-4)


def test_softmax_of_float32_logits_overwrites_them_with_torchs_values():
    logits = torch.randn(5, 20, 512, 512) * 4  # 5 Mi voxels per class: two slabs
    expected = torch.softmax(logits, dim=0)
    probabilities = softmax(logits)
    assert probabilities.data_ptr() == logits.data_ptr() and torch.equal(probabilities, expected)
    padded = torch.randn(3, 9, 12, 14)
    view = padded[:, 1:8, 2:11, :13]  # an accumulator's unpadded view, not contiguous
    expected = torch.softmax(view, dim=0)
    assert torch.equal(softmax(view), expected)
