"""Predictor.refine: where it predicts, what it may change, and its errors.

Model folders are written in code with random weights (test_inference_predictor's helpers);
where the exact result matters, the network is replaced by a known function, so every
expected region and label is an exact integer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AutoSegLib.imageio import Geometry
from AutoSegLib.inference import Predictor
from AutoSegLib.inference.clicks import Click, ClickError, index_to_physical
from AutoSegLib.inference.refine import merge_labels, original_range, preprocessed_point
from AutoSegLib.planning.guidance import default_guidance

from test_inference_predictor import make_model_folder, save_weights, tiny_config

PATCH = (8, 16, 16)
GEOMETRY = Geometry((2.0, 1.0, 1.0), (10.0, -5.0, 2.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def image(shape=(20, 40, 36), seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) + 5).astype(np.float32)  # nonzero: no crop


def click(label, positive, index, geometry=GEOMETRY) -> Click:
    return Click(label, positive, index_to_physical(index, geometry))


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """A model folder made before guidance existed: no ``guidance`` entry, 1 input channel."""
    return make_model_folder(tmp_path_factory.mktemp("plain"), {"3d_fullres": tiny_config((2.0, 1.0, 1.0), PATCH)},
                             folds=(0,))


@pytest.fixture(scope="module")
def guided_model(tmp_path_factory):
    config = tiny_config((2.0, 1.0, 1.0), PATCH, guidance=default_guidance())
    model = make_model_folder(tmp_path_factory.mktemp("guided"), {"3d_fullres": config}, folds=(0,))
    save_weights(model, "3d_fullres", 0, config, 1 + 2 * 2, seed=4)  # image + 2 classes x (positive, negative)
    return model


class Organ(torch.nn.Module):
    """Class 1 everywhere; records the inputs it was given."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        out = torch.zeros((x.shape[0], 3, *x.shape[2:]))
        out[:, 1] = 10.0
        return out


def outside(region, shape) -> np.ndarray:
    mask = np.ones(shape, bool)
    mask[tuple(slice(region[2 * a], region[2 * a + 1]) for a in range(3))] = False
    return mask


def test_an_old_model_without_guidance_still_predicts_and_refines(plain_model):
    predictor = Predictor.from_model_dir(plain_model, tta=False, device="cpu")
    assert not predictor.guided
    labels, _ = predictor.predict([image()], GEOMETRY)
    result = predictor.refine([image()], GEOMETRY, labels, [click(1, True, (10, 20, 18))], scope="all")
    assert result.labels.dtype == labels.dtype and result.labels.shape == labels.shape
    z0, z1, y0, y1, x0, x1 = result.region
    assert z0 <= 10 < z1 and y0 <= 20 < y1 and x0 <= 18 < x1
    np.testing.assert_array_equal(result.labels[outside(result.region, labels.shape)],
                                  labels[outside(result.region, labels.shape)])


def test_the_window_is_centred_on_the_click_and_only_its_inner_part_changes(guided_model):
    predictor = Predictor.from_model_dir(guided_model, tta=False, device="cpu")
    organ = Organ()
    predictor.stages[0].network = organ
    previous = np.zeros((20, 40, 36), np.uint8)
    result = predictor.refine([image()], GEOMETRY, previous, [click(1, True, (10, 20, 18))], scope="all")
    # window start = click - patch // 2 = (6, 12, 10); inner part: an eighth of the patch less on each side
    assert result.region == (7, 13, 14, 26, 12, 24)
    expected = np.zeros_like(previous)
    expected[7:13, 14:26, 12:24] = 1
    np.testing.assert_array_equal(result.labels, expected)
    (x,) = organ.inputs
    assert x.shape == (1, 5, *PATCH)  # image + positive and negative maps of 2 classes
    assert x[0, 1, 4, 8, 8] == 1 and int(x[0, 1].sum()) == 33  # class 1, positive: a ball of radius 2
    assert int(x[0, 2:].sum()) == 0


def test_clicks_far_apart_get_a_window_each_and_nothing_else_changes(guided_model):
    predictor = Predictor.from_model_dir(guided_model, tta=False, device="cpu")
    organ = Organ()
    predictor.stages[0].network = organ
    previous = np.random.default_rng(1).integers(0, 3, (20, 40, 36)).astype(np.uint8)
    clicks = [click(2, False, (3, 3, 3)), click(1, True, (16, 35, 30))]
    result = predictor.refine([image()], GEOMETRY, previous, clicks, scope="all")
    assert result.windows == 2 and len(organ.inputs) == 1 and organ.inputs[0].shape[0] == 2
    assert result.region == (0, 20, 0, 40, 0, 36)  # the two windows touch opposite borders
    changed = result.labels != previous
    assert changed.any() and set(np.unique(result.labels[changed])) == {1}
    # between the windows (the union box's uncovered corner) nothing changed
    np.testing.assert_array_equal(result.labels[0:4, 30:40, 0:10], previous[0:4, 30:40, 0:10])


def test_the_clicked_scope_keeps_other_labels(guided_model):
    predictor = Predictor.from_model_dir(guided_model, tta=False, device="cpu")
    predictor.stages[0].network = Organ()
    previous = np.zeros((20, 40, 36), np.uint8)
    previous[8:12, 15:25, 13:23] = 2
    result = predictor.refine([image()], GEOMETRY, previous, [click(2, False, (10, 20, 18))])
    # the network says "1" everywhere: class 2 (clicked) gives way to it; background stays (1 was not clicked)
    assert np.all(result.labels[8:12, 15:25, 13:23] == 1)
    assert np.all(result.labels[previous == 0] == 0)


def test_merge_scope_clicked_changes_only_voxels_that_are_or_become_clicked():
    previous = np.array([[[0, 1, 2, 3]]], np.uint8)
    new = np.array([[[1, 0, 3, 2]]])
    take = np.ones(new.shape, bool)
    region = (slice(0, 1), slice(0, 1), slice(0, 4))
    assert merge_labels(previous, region, new, take, [1]).tolist() == [[[1, 0, 2, 3]]]
    assert merge_labels(previous, region, new, take, [1], scope="all").tolist() == [[[1, 0, 3, 2]]]
    with pytest.raises(ValueError, match="scope 'some'"):
        merge_labels(previous, region, new, take, [1], scope="some")


def test_original_points_map_into_the_cropped_transposed_resampled_grid():
    properties = {"transpose_forward": [2, 0, 1], "crop_bbox": [[2, 10], [0, 20], [5, 25]],
                  "shape_after_crop": [20, 8, 20], "shape_after_resampling": [40, 16, 40]}
    # (3, 4, 10) -> cropped (1, 4, 5) -> planning order (5, 1, 4) -> (c + 0.5) * 2 - 0.5
    np.testing.assert_allclose(preprocessed_point((3, 4, 10), properties), (10.5, 2.5, 8.5))
    assert original_range(0, 40, 20, 40) == (0, 20)
    assert original_range(10, 20, 20, 40) == (5, 10)  # voxel centres 5.25 .. 9.75 of the new grid's 10 .. 19.5


def test_points_and_regions_follow_the_canonical_view():
    from AutoSegLib.inference.refine import region_labels

    # stored axes (z, y, x) seen as (y, z, reversed x): a swapped, right-to-left stored case
    properties = {"transpose_forward": [0, 1, 2], "crop_bbox": [[2, 10], [0, 20], [5, 25]],
                  "orientation": {"axes": [1, 0, 2], "flip": [False, False, True]},
                  "shape_after_crop": [20, 8, 20], "shape_after_resampling": [20, 8, 20]}
    # (3, 4, 10) -> cropped (1, 4, 5) -> canonical (4, 1, 20 - 1 - 5)
    np.testing.assert_allclose(preprocessed_point((3, 4, 10), properties), (4, 1, 14))
    # a box of the canonical grid comes back as the stored voxels it views, labels in stored order
    probabilities = np.zeros((3, 2, 3, 4), np.float32)
    probabilities[1] = 1.0
    probabilities[2, 0, 0, 0] = 2.0  # the box's first voxel: canonical (4, 1, 12) -> stored (3, 4, 12)
    region, labels, take = region_labels(probabilities, np.ones((2, 3, 4), bool), (4, 1, 12), properties)
    assert region == (slice(3, 6), slice(4, 6), slice(9, 13))  # canonical x 12..15 -> cropped 7..4 -> 9..12
    assert labels.shape == take.shape == (3, 2, 4) and take.all()
    assert labels[0, 0, 3] == 2 and (labels == 2).sum() == 1


def test_bad_clicks_are_refused_naming_the_click(guided_model):
    predictor = Predictor.from_model_dir(guided_model, tta=False, device="cpu")
    previous = np.zeros((20, 40, 36), np.uint8)
    with pytest.raises(ClickError, match=r"positive click for label 1 at .* is outside the image"):
        predictor.refine([image()], GEOMETRY, previous, [click(1, True, (10, 41, 18))])
    with pytest.raises(ClickError, match=r"negative click for label 7 .*: the model has no label 7; its labels are 1, 2"):
        predictor.refine([image()], GEOMETRY, previous, [click(7, False, (10, 20, 18))])
    with pytest.raises(ClickError, match=r"previous labels have shape \(20, 40, 35\)"):
        predictor.refine([image()], GEOMETRY, previous[..., :35], [click(1, True, (10, 20, 18))])
    with pytest.raises(ClickError, match="at least one click"):
        predictor.refine([image()], GEOMETRY, previous, [])


def test_an_ensemble_cannot_refine(tmp_path):
    model = make_model_folder(tmp_path, folds=(0,))  # 3d_fullres and 2d
    predictor = Predictor.from_model_dir(model, configuration=["3d_fullres", "2d"], tta=False, device="cpu")
    with pytest.raises(ClickError, match="one configuration without a cascade"):
        predictor.prepare_refine([image()], GEOMETRY)


def test_a_shared_guided_model_stays_guided(guided_model, tmp_path):
    from AutoSegLib.sharing.exporter import export_model
    from AutoSegLib.sharing.importer import import_model

    export_model(guided_model, tmp_path / "guided.zip")
    import_model(tmp_path / "guided.zip", tmp_path / "imported")
    predictor = Predictor.from_model_dir(tmp_path / "imported", tta=False, device="cpu")
    assert predictor.guided and predictor.stages[0].guidance_channels == 4
    result = predictor.refine([image()], GEOMETRY, np.zeros((20, 40, 36), np.uint8), [click(1, True, (10, 20, 18))])
    assert result.region == (7, 13, 14, 26, 12, 24)


def test_windows_group_nearby_clicks_and_are_never_predicted_twice():
    from AutoSegLib.inference.refine import window_starts_for

    patch = (8, 16, 16)
    # the second click is inside the first window's central half: one window
    assert window_starts_for([np.array([10, 20, 20]), np.array([11, 22, 17])], (30, 40, 40), patch) == [(6, 12, 12)]
    # an image no larger than the patch: every window is the whole image, predicted once
    assert window_starts_for([np.array([0, 0, 0]), np.array([7, 15, 15])], (8, 16, 16), patch) == [(0, 0, 0)]
    assert window_starts_for([np.array([2, 2, 2]), np.array([27, 37, 37])], (30, 40, 40), patch) == \
        [(0, 0, 0), (22, 24, 24)]
