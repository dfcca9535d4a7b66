"""Canonical orientation (AutoSegLib/preprocessing/orientation.py): the same patient stored in any
orientation preprocesses to the same arrays, and every restore goes back to the stored grid exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from AutoSegLib.imageio import Geometry
from AutoSegLib.planning import Plans, PlanningError, plan
from AutoSegLib.planning.rules import resampling_settings
from AutoSegLib.preprocessing.case import preprocess_case, restore_label, restore_labels, restore_probabilities
from AutoSegLib.preprocessing.orientation import (CANONICAL, Orientation, canonical_index, canonical_orientation,
                                                  canonical_view, stored_array)
from test_planning import HEART, uniform

SIGNED_PERMUTATIONS = [(perm, signs) for perm in itertools.permutations(range(3))
                       for signs in itertools.product((1, -1), repeat=3)]


def direction_of(perm, signs, tilt=(0.1, -0.05, 0.2)) -> np.ndarray:
    """An ITK direction: index axis i along world axis perm[i] with sign signs[i], then tilted (oblique)."""
    axes = np.zeros((3, 3))
    for i in range(3):
        axes[perm[i], i] = signs[i]
    return np.asarray(sitk.Euler3DTransform((0, 0, 0), *tilt).GetMatrix()).reshape(3, 3) @ axes


@pytest.mark.parametrize("perm,signs", SIGNED_PERMUTATIONS)
def test_canonical_view_equals_simpleitk_lps_reorientation(perm, signs):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 100, size=(4, 5, 6)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetDirection(direction_of(perm, signs).ravel().tolist())
    image.SetSpacing((1.0, 2.0, 3.0))
    reference = sitk.DICOMOrient(image, "LPS")
    orientation = canonical_orientation(image.GetDirection())
    view = canonical_view(array, orientation)
    assert np.array_equal(view, sitk.GetArrayFromImage(reference))
    assert orientation.spacing((3.0, 2.0, 1.0)) == pytest.approx(reference.GetSpacing()[::-1])
    assert np.array_equal(stored_array(view, orientation), array)
    index = (1, 3, 4)
    inside = canonical_index(index, array.shape, orientation).astype(int)
    assert view[tuple(inside)] == array[index]


def test_an_lps_scan_is_left_as_stored():
    assert canonical_orientation(np.eye(3).ravel()).is_identity
    assert Orientation.from_dict(None).is_identity  # properties written before orientation existed


def patient(shape=(12, 14, 16)):
    """An asymmetric patient (stored LPS): a body, a 'liver' on one side and a 'spleen' on the other."""
    z, y, x = np.indices(shape)
    body = ((y - 7) / 6.0) ** 2 + ((x - 8) / 7.0) ** 2 <= 1
    image = np.where(body, 100.0 + 3 * z + 2 * y + x, 0).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[3:9, 4:9, 3:7] = 1
    label[5:8, 5:8, 11:14] = 2
    return image, label


def config(spacing):
    return {"spacing": list(spacing), "patch_size": [8, 8, 8], "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "resampling": resampling_settings((1.0, 1.0, 1.0))}


@pytest.mark.parametrize("perm,signs", [((0, 1, 2), (-1, -1, 1)), ((1, 0, 2), (1, 1, 1)), ((2, 0, 1), (1, -1, -1))])
@pytest.mark.parametrize("target", [(1.0, 1.0, 1.0), (1.5, 0.8, 1.2)])
def test_any_stored_orientation_preprocesses_like_lps_and_restores_exactly(perm, signs, target):
    image, label = patient()
    spacing = (1.0, 1.0, 1.0)
    stored_image = sitk.GetImageFromArray(image)
    stored_image.SetDirection(direction_of(perm, signs, tilt=(0, 0, 0)).ravel().tolist())
    stored_label = sitk.GetImageFromArray(label)
    stored_label.CopyInformation(stored_image)
    lps_image = sitk.DICOMOrient(stored_image, "LPS")
    # the file as stored in its own orientation
    geometry = Geometry(spacing, stored_image.GetOrigin(), stored_image.GetDirection())
    stats = {"0": None}
    data, seg, properties = preprocess_case([image], label, geometry, config(target), [0, 1, 2], stats, CANONICAL)
    lps_geometry = Geometry(tuple(lps_image.GetSpacing()[::-1]), lps_image.GetOrigin(), lps_image.GetDirection())
    lps_data, lps_seg, _ = preprocess_case([sitk.GetArrayFromImage(lps_image)],
                                           sitk.GetArrayFromImage(sitk.DICOMOrient(stored_label, "LPS")),
                                           lps_geometry, config(target), [0, 1, 2], stats, CANONICAL)
    assert np.array_equal(seg, lps_seg)
    np.testing.assert_allclose(data, lps_data, atol=1e-5)
    # back to the file's own grid: each restore equals restoring along LPS and reorienting the result back
    lps_properties = preprocess_case([sitk.GetArrayFromImage(lps_image)], None, lps_geometry, config(target),
                                     [0, 1, 2], stats, CANONICAL)[2]
    one_hot = np.stack([(seg[0] == k).astype(np.float32) for k in range(3)])

    def as_stored(lps_result: np.ndarray) -> np.ndarray:
        back = sitk.GetImageFromArray(lps_result)
        back.CopyInformation(lps_image)
        return sitk.GetArrayFromImage(sitk.DICOMOrient(back, sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            stored_image.GetDirection())))

    restored, restored_geometry = restore_label(seg, properties)
    assert restored.shape == label.shape and restored_geometry == geometry
    assert np.array_equal(restored, as_stored(restore_label(seg, lps_properties)[0]))
    if target == spacing:
        assert np.array_equal(restored, label)
    labels, _ = restore_labels(one_hot, properties)
    assert np.array_equal(labels, as_stored(restore_labels(one_hot, lps_properties)[0]))
    probabilities, _ = restore_probabilities(one_hot, properties)
    lps_probabilities = restore_probabilities(one_hot, lps_properties)[0]
    for k in range(3):
        np.testing.assert_allclose(probabilities[k], as_stored(lps_probabilities[k]), atol=1e-6)


def test_without_orientation_nothing_moves():
    image, label = patient()
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(direction_of((0, 1, 2), (-1, -1, 1), (0, 0, 0)).ravel()))
    data, seg, properties = preprocess_case([image], label, geometry, config((1.0, 1.0, 1.0)), [0, 1, 2], {"0": None})
    assert properties["orientation"] == {"axes": [0, 1, 2], "flip": [False, False, False]}
    crop = tuple(slice(a, b) for a, b in properties["crop_bbox"])
    assert np.array_equal(np.maximum(seg[0], 0), label[crop])  # the stored axes, only cropped
    assert np.array_equal(restore_label(seg, properties)[0], label)
    with pytest.raises(ValueError, match="orientation"):
        preprocess_case([image], label, geometry, config((1.0, 1.0, 1.0)), [0, 1, 2], {"0": None}, "RAS")


def test_plans_record_canonical_orientation_from_our_fingerprint_only():
    ours = plan(uniform(**HEART) | {"orientation": CANONICAL}, {0: "MRI"}, {"background": 0, "liver": 1})
    assert ours.orientation == CANONICAL and ours.to_dict()["orientation"] == CANONICAL
    assert any("same anatomical axes" in n.get("message", "") for n in ours.explanation)
    assert Plans.from_dict(ours.to_dict()).orientation == CANONICAL
    theirs = plan(uniform(**HEART), {0: "MRI"}, {"background": 0, "liver": 1})  # nnU-Net v2 fingerprint
    assert theirs.orientation is None and "orientation" not in theirs.to_dict()
    bad = ours.to_dict() | {"orientation": "RAS"}
    with pytest.raises(PlanningError, match="orientation"):
        Plans.from_dict(bad)


def test_fingerprint_measures_along_canonical_axes(tmp_path):
    from AutoSegLib.fingerprint import case_measurements

    image, label = patient()
    swapped = direction_of((1, 0, 2), (1, 1, 1), (0, 0, 0)).ravel()  # rows and columns swapped
    measured = case_measurements([image], label, (3.0, 2.0, 1.0), [0, 1, 2], [1, 2], 10, 0, tuple(swapped))
    assert measured["spacing"] == [3.0, 1.0, 2.0]
    assert measured["shape_before_crop"] == [12, 16, 14]
    assert measured["canonical"] and set(measured["class_side"]) == {"1", "2"}
