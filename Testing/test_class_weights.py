"""Rare-class cross-entropy weights: the rule, the CPU plan's entry, and its validation."""

from __future__ import annotations

import pytest

from AutoSegLib.planning import Plans, plan
from AutoSegLib.planning.class_weights import (
    CAP,
    LAG_LIFT,
    MIN_RARITY,
    POWER,
    plan_class_weights,
    rare_class_weights,
)
from AutoSegLib.planning.rules import output_classes
from AutoSegLib.planning.validate import plans_problems


def test_rare_class_weights_lift_only_classes_well_below_the_median():
    # background, then foreground shares 0.08, 0.05, 0.02 (common), 0.01 (median), 0.004 (2.5x rarer: not
    # rare enough), 0.0025 (4x rarer), 1e-7 (capped)
    shares = [0.9, 0.08, 0.05, 0.02, 0.01, 0.004, 0.0025, 1e-7]
    weights = rare_class_weights(shares, power=0.5, cap=10.0, min_rarity=3.0)
    assert weights[:6] == [1.0] * 6
    assert weights[6] == pytest.approx(2.0)
    assert weights[7] == 10.0
    assert rare_class_weights(shares, power=1.0, min_rarity=2.0)[5] == pytest.approx(2.5)
    assert rare_class_weights([0.9, 0.01, 1e-9])[2] == CAP  # the default cap
    assert rare_class_weights([1.0, 0.0, 0.0]) == [1.0, 1.0, 1.0]  # nothing labelled: nothing weighed


def test_with_an_even_number_of_classes_the_median_lies_between_the_middle_two():
    # median of (0.1, 0.4) is 0.25: 0.1 is 2.5x rarer, 0.05 of (0.05, 0.4) is 4.5x rarer
    assert rare_class_weights([0.5, 0.4, 0.1], min_rarity=2.0) == [1.0, 1.0, pytest.approx(min(CAP, 2.5 ** POWER))]
    assert rare_class_weights([0.5, 0.4, 0.05]) == [1.0, 1.0, pytest.approx(min(CAP, 4.5 ** POWER))]
    assert rare_class_weights([0.5, 0.4, 0.1]) == [1.0, 1.0, 1.0]  # 2.5x is under MIN_RARITY
    assert MIN_RARITY > 2.5


LABELS = {"background": 0, "liver": 1, "renal_artery": 3, "ignore": 4, "kidney": 2}
RATIOS = {"background": 0.9, "liver": 0.08, "kidney": 0.004, "renal_artery": 0.0001, "ignore": 0.01}


def test_weights_follow_the_label_values_and_leave_ignore_out():
    assert output_classes(LABELS) == ["background", "liver", "kidney", "renal_artery"]
    weights, text = plan_class_weights(LABELS, RATIOS)
    # foreground shares 0.08, 0.004, 0.0001: median 0.004; the artery is 40x rarer
    artery = min(CAP, 40 ** POWER)
    assert weights == [1.0, 1.0, 1.0, pytest.approx(artery)]
    assert "1 of 3 class(es)" in text and f"renal_artery x{artery:.1f}" in text


def test_no_weights_without_the_fingerprints_shares_or_a_rare_class():
    assert plan_class_weights(LABELS, None) == (None, None)  # an nnU-Net v2 fingerprint
    assert plan_class_weights(LABELS, {"background": 0.9, "liver": 0.1}) == (None, None)  # classes missing
    even = {"background": 0.7, "liver": 0.1, "kidney": 0.1, "renal_artery": 0.1}
    assert plan_class_weights(LABELS, even) == (None, None)
    # the CT and MR phantoms' spread: kidneys 1.6x and lesion 2.5x rarer than the median class
    phantoms = {"background": 0.9, "liver": 0.06, "kidney": 0.0065, "renal_artery": 0.004}
    assert plan_class_weights(LABELS, phantoms) == (None, None)


def fingerprint(ratios: dict | None) -> dict:
    fp = {"spacings": [[2.0, 1.0, 1.0]] * 10, "shapes_after_crop": [[40, 90, 100]] * 10,
          "foreground_intensity_properties_per_channel": {}, "median_relative_size_after_cropping": 1.0}
    if ratios is not None:
        fp["class_voxel_ratios"] = ratios
    return fp


def test_only_the_cpu_configuration_weighs_rare_classes_and_explains_it():
    labels = {k: v for k, v in LABELS.items() if k != "ignore"}
    plans = plan(fingerprint(RATIOS), {0: "MRI"}, labels)
    cpu = plans.configurations["3d_cpu"]
    assert cpu.ce_class_weights == [1.0, 1.0, 1.0, pytest.approx(min(CAP, 40 ** POWER), abs=1e-4)]
    assert any("Cross-entropy weights for rare classes" in e["text"] for e in cpu.explanation)
    assert all(c.ce_class_weights is None for name, c in plans.configurations.items() if name != "3d_cpu")
    data = plans.to_dict()
    assert "ce_class_weights" not in data["configurations"]["3d_fullres"]  # absent, not null
    assert Plans.from_dict(data).configurations["3d_cpu"].ce_class_weights == cpu.ce_class_weights
    assert plan(fingerprint(None), {0: "MRI"}, labels).configurations["3d_cpu"].ce_class_weights is None


def test_the_cpu_configuration_lifts_lagging_classes_where_it_weighs_rare_ones_and_explains_it():
    labels = {k: v for k, v in LABELS.items() if k != "ignore"}
    plans = plan(fingerprint(RATIOS), {0: "MRI"}, labels)
    cpu = plans.configurations["3d_cpu"]
    assert cpu.lagging_class_lift == LAG_LIFT
    assert any("Lagging classes weigh more" in e["text"] for e in cpu.explanation)
    assert all(c.lagging_class_lift is None for name, c in plans.configurations.items() if name != "3d_cpu")
    data = plans.to_dict()
    assert "lagging_class_lift" not in data["configurations"]["3d_fullres"]
    assert Plans.from_dict(data).configurations["3d_cpu"].lagging_class_lift == LAG_LIFT
    # No class 3x rarer than the median (the five-class phantoms), or no shares (an nnU-Net v2
    # fingerprint): the method's loss, nothing lifted.
    even = {"background": 0.85, "liver": 0.08, "kidney": 0.04, "renal_artery": 0.03}
    for ratios in (even, None):
        cpu = plan(fingerprint(ratios), {0: "MRI"}, labels).configurations["3d_cpu"]
        assert cpu.ce_class_weights is None and cpu.lagging_class_lift is None
        assert not any("Lagging classes" in e["text"] for e in cpu.explanation)


@pytest.mark.parametrize("lift", [0.5, 0, -2, "4", True, float("inf"), 1e6])
def test_plans_with_a_wrong_lagging_class_lift_are_refused(lift):
    labels = {k: v for k, v in LABELS.items() if k != "ignore"}
    data = plan(fingerprint(RATIOS), {0: "MRI"}, labels).to_dict()
    data["configurations"]["3d_cpu"]["lagging_class_lift"] = lift
    problems = plans_problems(data)
    assert any("3d_cpu.lagging_class_lift" in p and "must be a number from 1 to" in p for p in problems), problems


def test_bad_shares_in_the_fingerprint_are_refused_by_name():
    with pytest.raises(ValueError, match="class_voxel_ratios"):
        plan(fingerprint({"background": 0.9, "liver": -0.1}), {0: "MRI"}, {"background": 0, "liver": 1})


@pytest.mark.parametrize("weights, problem", [
    ([1.0, 2.0], "has 2 weights for 4 classes"),
    ([1.0, 1.0, 0.0, 1.0], "must list positive numbers"),
    ([1.0, 1.0, "2", 1.0], "must list positive numbers"),
    ([], "must list positive numbers"),
])
def test_plans_with_wrong_class_weights_are_refused(weights, problem):
    labels = {k: v for k, v in LABELS.items() if k != "ignore"}
    data = plan(fingerprint(RATIOS), {0: "MRI"}, labels).to_dict()
    data["configurations"]["3d_cpu"]["ce_class_weights"] = weights
    problems = plans_problems(data)
    assert any("3d_cpu.ce_class_weights" in p and problem in p for p in problems), problems
