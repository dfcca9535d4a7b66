"""Largest-component postprocessing, and the cross-validation rule that decides whether to use it."""

from __future__ import annotations

import numpy as np
import pytest

from AutoSegLib.evaluation.selection import decide_postprocessing, postprocessing_variants
from AutoSegLib.postprocessing import apply_postprocessing, keep_largest_component


def test_keeps_the_largest_component_only():
    mask = np.zeros((5, 6, 6), bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[3:5, 3:6, 3:6] = True  # 18 voxels
    expected = np.zeros_like(mask)
    expected[3:5, 3:6, 3:6] = True
    np.testing.assert_array_equal(keep_largest_component(mask), expected)


def test_corner_contact_connects_components():
    mask = np.zeros((3, 5, 5), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # a diagonal line: one component in 26-connectivity
    mask[0, 4, 4] = True  # alone; the diagonal wins by size (with 6-connectivity all four would tie)
    kept = keep_largest_component(mask)
    assert kept.sum() == 3 and not kept[0, 4, 4]


def test_tied_largest_components_are_all_kept_and_empty_stays_empty():
    mask = np.zeros((1, 7), bool)
    mask[0, [0, 1, 3, 4, 6]] = True
    np.testing.assert_array_equal(keep_largest_component(mask)[0], [1, 1, 0, 1, 1, 0, 0])
    assert not keep_largest_component(np.zeros((3, 3), bool)).any()


def _two_class_case():
    # Class 1 touches class 2; a separate island of class 2 sits apart.
    labels = np.zeros((4, 8, 8), np.int16)
    labels[0:3, 0:3, 0:3] = 1
    labels[0:3, 3:5, 0:3] = 2
    labels[0:2, 6:8, 6:8] = 2  # island
    labels[3, 0, 7] = 1  # one stray class-1 voxel
    return labels


def test_foreground_step_treats_all_classes_as_one_component():
    labels = _two_class_case()
    out = apply_postprocessing(labels, {"largest_component_foreground": True, "largest_component_classes": []})
    expected = labels.copy()
    expected[0:2, 6:8, 6:8] = 0
    expected[3, 0, 7] = 0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == labels.dtype


def test_class_step_touches_only_its_class_and_input_is_not_modified():
    labels = _two_class_case()
    before = labels.copy()
    out = apply_postprocessing(labels, {"largest_component_foreground": False, "largest_component_classes": [2]})
    expected = labels.copy()
    expected[0:2, 6:8, 6:8] = 0
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(labels, before)
    np.testing.assert_array_equal(apply_postprocessing(labels, {}), labels)


@pytest.mark.parametrize("spec", [{"largest_component": True}, {"largest_component_classes": [0]},
                                  {"largest_component_classes": "1"}])
def test_bad_spec_is_refused(spec):
    with pytest.raises(ValueError, match="postprocessing"):
        apply_postprocessing(np.zeros((2, 2), np.uint8), spec)


# -- the decision rule -----------------------------------------------------------------------
ORGAN = {"background": 0, "organ": 1}


def _box(shape, box, value=1):
    array = np.zeros(shape, np.uint8)
    array[tuple(slice(a, b) for a, b in box)] = value
    return array


def test_removing_a_spurious_island_helps_and_is_chosen():
    ref = _box((6, 10, 10), ((1, 5), (1, 5), (1, 5)))
    pred = ref.copy()
    pred[5, 8:10, 8:10] = 1  # false positive far from the organ
    spec, steps, final = decide_postprocessing([postprocessing_variants(pred, ref, ORGAN)], ORGAN)
    assert spec == {"largest_component_foreground": True, "largest_component_classes": []}
    assert steps[0]["before"] == pytest.approx(128 / 132) and steps[0]["after"] == 1.0
    assert final[0]["organ"]["FP"] == 0


def test_removing_a_real_second_component_hurts_and_is_not_chosen():
    ref = _box((6, 10, 10), ((1, 5), (1, 4), (1, 4)))
    ref[1:3, 7:9, 7:9] = 1  # the organ really has two parts (say, a kidney pair)
    pred = ref.copy()
    spec, steps, final = decide_postprocessing([postprocessing_variants(pred, ref, ORGAN)], ORGAN)
    assert spec == {"largest_component_foreground": False, "largest_component_classes": []}
    assert steps[0]["after"] < steps[0]["before"] == 1.0
    assert final[0]["organ"]["Dice"] == 1.0


def test_class_step_is_chosen_per_class_when_the_foreground_step_would_hurt_another_class():
    labels = {"background": 0, "liver": 1, "kidney": 2}
    ref = np.zeros((10, 12, 12), np.uint8)
    ref[1:6, 1:6, 1:6] = 1
    ref[1:4, 8:11, 8:11] = 2  # kidney A
    ref[6:9, 8:11, 1:3] = 2  # kidney B, smaller
    pred = ref.copy()
    pred[1:3, 8:10, 6:8] = 1  # a liver island touching kidney A
    spec, steps, _ = decide_postprocessing([postprocessing_variants(pred, ref, labels)], labels)
    assert spec == {"largest_component_foreground": False, "largest_component_classes": [1]}
    assert [s["chosen"] for s in steps] == [False, True, False]
