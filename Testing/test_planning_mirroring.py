"""Labels that name a side are never mirrored across left-right (AutoSegLib/planning/mirroring.py):
the rule from names and headers, the plan entry, and the training and test-time mirroring it drives."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from AutoSegLib.fingerprint import extract_fingerprint
from AutoSegLib.planning import Plans, plan
from AutoSegLib.planning.mirroring import (left_right_axis, mirror_axes_without, names_a_side, planning_axes,
                                           side_labels)
from AutoSegLib.planning.plans import mirror_axes
from AutoSegLib.training.augmentation import training_pipeline
from test_planning import HEART, uniform

SIDED = {"background": 0, "liver": 1, "kidney_left": 2, "kidney_right": 3}


@pytest.mark.parametrize("name", ["kidney_left", "lung_upper_lobe_right", "iliac_artery_l", "femur_R", "rib_left_1",
                                  "Left-Hippocampus", "LeftKidney", "RightLung", "hand-rt", "lung R"])
def test_names_that_say_a_side(name):
    assert names_a_side(name)


@pytest.mark.parametrize("name", ["liver", "leftover", "bright", "brightness", "vertebrae_L1", "larynx", "spleen"])
def test_names_that_do_not(name):
    assert not names_a_side(name)


def test_side_labels_keep_order_and_skip_background_and_ignore():
    labels = {"background": 0, "kidney_right": 1, "liver": 2, "kidney_left": 3, "ignore": 4}
    assert side_labels(labels) == ["kidney_right", "kidney_left"]


def test_left_right_axis_from_the_direction_matrix():
    assert left_right_axis([1, 0, 0, 0, 1, 0, 0, 0, 1]) == 2  # axial: x index runs along left-right
    assert left_right_axis([0, 0, -1, 1, 0, 0, 0, -1, 0]) == 0  # sagittal: the slice axis (k) is left-right
    oblique = sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, np.radians(30)).GetMatrix()
    assert left_right_axis(oblique) == 2  # 30 degrees in plane: x is still the closest


def test_planning_axes_follow_the_transpose_and_say_when_assumed():
    assert planning_axes([0, 0, None], [2, 0, 1]) == ({1}, False)
    assert planning_axes([], [0, 1, 2]) == ({2}, True)
    assert mirror_axes_without({2}, 3) == [0, 1]
    assert mirror_axes_without({2}, 2) == [0]  # 2D patch axes are planning axes 1 and 2
    assert mirror_axes_without({0}, 2) == [0, 1]  # left-right across slices: 2D mirrors in plane as before


def test_plan_leaves_left_right_unmirrored_only_when_labels_name_a_side():
    fingerprint = uniform(**HEART)
    plain = plan(fingerprint, {0: "MRI"}, {"background": 0, "liver": 1, "spleen": 2})
    assert all("mirror_axes" not in c.to_dict() for c in plain.configurations.values())
    sided = plan(fingerprint | {"left_right_axes": [2] * HEART["n"]}, {0: "MRI"}, SIDED)
    for name, config in sided.configurations.items():
        expected = [0] if config.spatial_dims == 2 else [0, 1]
        assert config.mirror_axes == expected, name
    assert any("kidney_left" in n.get("message", "") and "left-right" in n.get("message", "")
               for n in sided.explanation)
    again = Plans.from_dict(sided.to_dict())  # the entry survives plans.json
    assert again.configurations["3d_fullres"].to_dict()["mirror_axes"] == [0, 1]


def test_nnunet_fingerprint_without_headers_assumes_x_and_says_so():
    sided = plan(uniform(**HEART), {0: "MRI"}, SIDED)
    assert sided.configurations["3d_fullres"].mirror_axes == [0, 1]
    assert any("assumed" in n.get("message", "") for n in sided.explanation)


def test_malformed_left_right_axes_is_a_clear_error():
    from AutoSegLib.planning import PlanningError
    with pytest.raises(PlanningError, match="left_right_axes"):
        plan(uniform(**HEART) | {"left_right_axes": [5]}, {0: "MRI"}, SIDED)


def test_training_mirrors_only_the_planned_axes():
    sided = plan(uniform(**HEART) | {"left_right_axes": [2] * HEART["n"]}, {0: "MRI"}, SIDED)
    config = sided.configurations["3d_fullres"].to_dict()
    mirrors = [t for t in training_pipeline(config).transform.transforms if type(t).__name__ == "MirrorTransform"]
    assert [tuple(t.allowed_axes) for t in mirrors] == [(0, 1)]
    assert mirror_axes(config) == (0, 1)
    del config["mirror_axes"]
    assert mirror_axes(config) == (0, 1, 2)  # without the entry, every axis (the method's default)


def test_fingerprint_records_each_case_left_right_axis(tmp_path):
    from AutoSegLib.synthetic import make_phantom_dataset
    dataset = make_phantom_dataset(tmp_path / "Dataset001_T", kind="ct", cases=2, test_cases=0, seed=0, size=0.5)
    fingerprint = extract_fingerprint(dataset, num_processes=1)
    assert fingerprint["left_right_axes"] == [2, 2]  # the phantoms are axial, x along left-right
