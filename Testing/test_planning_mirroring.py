"""Left-right mirroring in canonical plans (AutoSegLib/planning/mirroring.py): left out when labels name a
side or classes keep to one side of the patient; kept where arrays are used as stored."""

from __future__ import annotations

import numpy as np
import pytest

from AutoSegLib.fingerprint import class_sides, extract_fingerprint
from AutoSegLib.planning import Plans, PlanningError, plan
from AutoSegLib.planning.mirroring import mirror_axes_without, names_a_side, side_labels
from AutoSegLib.preprocessing.orientation import left_right_axis
from AutoSegLib.planning.plans import mirror_axes
from AutoSegLib.training.augmentation import training_pipeline
from test_planning import HEART, uniform

SIDED = {"background": 0, "liver": 1, "kidney_left": 2, "kidney_right": 3}
CANONICAL = {"orientation": "canonical"}


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


def test_mirror_axes_without_left_right_in_3d_and_2d():
    assert mirror_axes_without(2, 3) == [0, 1]
    assert mirror_axes_without(2, 2) == [0]  # 2D patch axes are planning axes 1 and 2
    assert mirror_axes_without(0, 2) == [0, 1]  # left-right across slices: 2D mirrors in plane as before


def test_canonical_plan_with_sided_labels_does_not_mirror_left_right():
    sided = plan(uniform(**HEART) | CANONICAL, {0: "MRI"}, SIDED)
    for name, config in sided.configurations.items():
        assert config.mirror_axes == ([0] if config.spatial_dims == 2 else [0, 1]), name
    assert any("kidney_left" in n.get("message", "") and "left-right" in n.get("message", "")
               for n in sided.explanation)
    again = Plans.from_dict(sided.to_dict())  # the entry survives plans.json
    assert again.configurations["3d_fullres"].to_dict()["mirror_axes"] == [0, 1]


def test_stored_orientation_and_unsided_labels_mirror_every_axis():
    stored = plan(uniform(**HEART), {0: "MRI"}, SIDED)  # an nnU-Net v2 fingerprint: arrays as stored
    plain = plan(uniform(**HEART) | CANONICAL, {0: "MRI"}, {"background": 0, "tumour": 1})
    for plans in (stored, plain):
        assert all("mirror_axes" not in c.to_dict() for c in plans.configurations.values())


def test_classes_on_one_side_stop_left_right_mirroring_in_canonical_plans():
    labels = {"background": 0, "liver": 1, "spleen": 2, "aorta": 3}
    sides = {"class_sides": {"liver": -0.12, "spleen": 0.25, "aorta": 0.02}}
    canonical = plan(uniform(**HEART) | CANONICAL | sides, {0: "MRI"}, labels)
    assert canonical.configurations["3d_fullres"].mirror_axes == [0, 1]
    text = next(n["message"] for n in canonical.explanation if "left-right" in n.get("message", ""))
    assert "liver right" in text and "spleen left" in text and "aorta" not in text
    stored = plan(uniform(**HEART) | sides, {0: "MRI"}, labels)
    assert stored.configurations["3d_fullres"].mirror_axes is None


def test_malformed_class_sides_is_a_clear_error():
    with pytest.raises(PlanningError, match="class_sides"):
        plan(uniform(**HEART) | CANONICAL | {"class_sides": {"liver": 2.0}}, {0: "MRI"}, SIDED)


def test_training_mirrors_only_the_planned_axes():
    config = plan(uniform(**HEART) | CANONICAL, {0: "MRI"}, SIDED).configurations["3d_fullres"].to_dict()
    mirrors = [t for t in training_pipeline(config).transform.transforms if type(t).__name__ == "MirrorTransform"]
    assert [tuple(t.allowed_axes) for t in mirrors] == [(0, 1)]
    assert mirror_axes(config) == (0, 1)
    del config["mirror_axes"]
    assert mirror_axes(config) == (0, 1, 2)  # without the entry, every axis (the method's default)


def test_class_sides_say_where_a_class_lies_across_the_patient_in_any_orientation():
    label = np.zeros((4, 6, 20), np.uint8)
    label[:, :, 14:18] = 1  # towards the patient's left in an LPS-stored image (x runs to the left)
    label[:, :, 9:11] = 2  # the middle
    lps = class_sides(label, [1, 0, 0, 0, 1, 0, 0, 0, 1], [1, 2, 3])
    assert lps["1"] == pytest.approx((15.5 + 0.5) / 20 - 0.5) and lps["2"] == pytest.approx(0.0)
    assert "3" not in lps  # absent classes are not measured
    ras = class_sides(label[:, :, ::-1], [-1, 0, 0, 0, -1, 0, 0, 0, 1], [1, 2])  # the same patient stored RAS
    assert ras["1"] == pytest.approx(lps["1"])


def test_fingerprint_is_canonical_and_places_the_phantom_spleen_left(tmp_path):
    from AutoSegLib.synthetic import make_phantom_dataset
    dataset = make_phantom_dataset(tmp_path / "Dataset001_T", kind="ct", cases=2, test_cases=0, seed=0, size=0.5)
    fingerprint = extract_fingerprint(dataset, num_processes=1)
    assert fingerprint["orientation"] == "canonical"
    assert fingerprint["class_sides"]["spleen"] > 0.1 > abs(fingerprint["class_sides"]["aorta"])
    assert fingerprint["class_sides"]["liver"] < -0.05
