"""The Grow-from-seeds baseline: Slicer's filter on hand-made arrays, the seeds a user would paint,
and the rule that applies a correction to one class only."""

from __future__ import annotations

import numpy as np
import pytest

from AutoSegLib.evaluation.grow_from_seeds import (K_SEED, OTHER_SEED, GrowFromSeedsError, available, click_box,
                                                   correction_seeds, grow_correction, grow_from_seeds, merge_class)

needs_slicer = pytest.mark.skipif(not available(), reason="Slicer's grow-from-seeds filter comes with slicer-core")


def two_regions(shape=(8, 12, 16), edge=9, seed=0):
    """A dark left part and a bright right part (x < edge / x >= edge), with mild noise."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 3, shape).astype(np.float32)
    image[:, :, edge:] += 200
    return image


@needs_slicer
def test_two_regions_separated_by_an_edge_each_take_their_seeds_label():
    image = two_regions()
    seeds = np.zeros(image.shape, np.uint8)
    seeds[4, 6, 2] = 1
    seeds[4, 6, 13] = 2
    grown = grow_from_seeds(image, seeds)
    expected = np.where(np.arange(16) < 9, 1, 2)[None, None, :].repeat(8, 0).repeat(12, 1)
    np.testing.assert_array_equal(grown, expected)
    assert grown.dtype == np.uint8


@needs_slicer
def test_labels_above_255_and_seeds_on_the_image_border_grow():
    image = two_regions()
    seeds = np.zeros(image.shape, np.uint16)
    seeds[0, 0, 0] = 300  # a corner voxel: Slicer's filter alone never grows from the outer layer
    seeds[7, 11, 15] = 7
    grown = grow_from_seeds(image, seeds)
    assert grown.dtype == np.uint16
    assert (grown[:, :, :9] == 300).all() and (grown[:, :, 9:] == 7).all()


@needs_slicer
def test_only_the_region_grows_and_seeds_outside_it_are_ignored():
    image = two_regions()
    seeds = np.zeros(image.shape, np.uint8)
    seeds[4, 6, 6] = 1
    seeds[4, 6, 12] = 2
    seeds[0, 0, 0] = 3  # outside the region
    region = (2, 6, 3, 9, 5, 14)
    grown = grow_from_seeds(image, seeds, region)
    inside = grown[2:6, 3:9, 5:14]
    assert (inside[:, :, :4] == 1).all() and (inside[:, :, 4:] == 2).all()  # the edge at x = 9
    outside = grown.copy()
    outside[2:6, 3:9, 5:14] = 0
    assert not outside.any()


@needs_slicer
def test_bad_inputs_are_refused_with_the_reason():
    image = two_regions()
    with pytest.raises(GrowFromSeedsError, match="one shape"):
        grow_from_seeds(image, np.zeros((8, 12, 15), np.uint8))
    with pytest.raises(GrowFromSeedsError, match="no seed"):
        grow_from_seeds(image, np.zeros(image.shape, np.uint8))
    seeds = np.zeros(image.shape, np.int16)
    seeds[1, 1, 1] = -1
    with pytest.raises(GrowFromSeedsError, match="0..65535"):
        grow_from_seeds(image, seeds)
    with pytest.raises(GrowFromSeedsError, match="outside the image"):
        grow_from_seeds(image, seeds.clip(0), (0, 9, 0, 12, 0, 16))
    with pytest.raises(GrowFromSeedsError, match="integers"):
        grow_from_seeds(image, np.ones(image.shape, np.float32))


def test_click_box_is_the_clicks_box_with_a_margin_in_mm_clipped_to_the_image():
    box = click_box([(True, (2, 10, 10)), (False, (3, 5, 30))], (10, 40, 40), spacing=(3.0, 1.0, 2.0), margin_mm=6)
    assert box == (0, 6, 0, 17, 7, 34)


def test_seeds_are_the_shrunk_automatic_result_and_the_click_discs():
    automatic = np.zeros((5, 20, 20), np.uint8)
    automatic[:, 5:15, 5:15] = 2  # class 2, a 10x10 square in every slice
    automatic[:, :, 17:] = 1  # another class
    seeds, region = correction_seeds(automatic, 2, [(False, (2, 10, 10))], spacing=(1, 1, 1),
                                     region=(0, 5, 0, 20, 0, 20),
                                     erosion_mm=2.0, clear_mm=0.0, disc_radius=1)
    assert region == (0, 5, 0, 20, 0, 20)
    square = np.zeros((20, 20), bool)
    square[7:13, 7:13] = True  # more than 2 mm inside the square (in-plane; z does not erode at the box edge)
    disc = np.zeros((20, 20), bool)
    disc[[9, 10, 10, 10, 11], [10, 9, 10, 11, 10]] = True
    np.testing.assert_array_equal(seeds[0] == K_SEED, square)
    np.testing.assert_array_equal(seeds[2] == K_SEED, square & ~disc)
    np.testing.assert_array_equal(seeds[2] == OTHER_SEED, disc | (automatic[2] != 2) & ~_grown(automatic[2] == 2, 2))


def _grown(mask, steps):
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~mask)
    return distance <= steps


def test_a_click_erases_the_automatic_seeds_it_contradicts_nearby():
    automatic = np.zeros((1, 30, 30), np.uint8)
    automatic[0, 5:25, 5:25] = 1
    seeds, _ = correction_seeds(automatic, 1, [(False, (0, 15, 15))], spacing=(1, 1, 1),
                                region=(0, 1, 0, 30, 0, 30), erosion_mm=1.0, clear_mm=4.0, disc_radius=0)
    distance = np.hypot(*np.meshgrid(np.arange(30) - 15, np.arange(30) - 15, indexing="ij"))
    assert not (seeds[0][distance <= 4] == K_SEED).any()
    assert (seeds[0][(distance > 4) & (distance < 8)] == K_SEED).all()
    assert seeds[0, 15, 15] == OTHER_SEED


def test_merge_changes_one_class_inside_the_region_only():
    previous = np.array([[[0, 1, 1, 2, 2, 3]]], np.uint8)
    proposed = np.array([[[1, 0, 3, 1, 2, 1]]], np.uint8)
    merged = merge_class(previous, proposed, 1, (0, 1, 0, 1, 0, 5))
    # gains 0 and 3 (from background and class 2), loses 1 to background (not to 3), x=5 is outside
    np.testing.assert_array_equal(merged, [[[1, 0, 0, 1, 2, 3]]])
    assert previous[0, 0, 0] == 0  # the input is left as it was


@needs_slicer
def test_a_positive_click_in_a_missed_part_grows_the_class_to_its_edge():
    image = np.zeros((6, 24, 24), np.float32)
    image[:, 4:20, 4:20] = 100  # the true organ
    image[:, 10:14, 22:] = 100  # a bright spot of another class, outside the box
    automatic = np.zeros(image.shape, np.uint8)
    automatic[:, 4:20, 4:12] = 1  # the model found the left half only
    automatic[:, 10:14, 22:] = 2
    # clear_mm reaches every automatic "other" seed inside the missed half (at most 10.8 mm from the
    # click): grow-cut seeds in a uniform region tie, so one left there would compete for it
    labels, region = grow_correction(image, automatic, 1, [(True, (3, 12, 16))], spacing=(2.0, 1.0, 1.0),
                                     region=(0, 6, 0, 24, 0, 21), clear_mm=11.0)
    assert region == (0, 6, 0, 24, 0, 21)
    expected = automatic.copy()
    expected[:, 4:20, 4:20] = 1
    np.testing.assert_array_equal(labels, expected)
