"""The lift of lagging classes' cross-entropy weights (training/class_lift.py): pure functions."""

from __future__ import annotations

import pytest

from AutoSegLib.training.class_lift import SMOOTHING, lagging_lifts, lifted_weights, smooth_class_dice


def test_smoothing_starts_from_zero_and_a_class_absent_from_the_patches_keeps_its_value():
    first = smooth_class_dice({}, {"liver": 1.0, "vein": None})
    assert first == {"liver": pytest.approx(SMOOTHING), "vein": 0.0}
    second = smooth_class_dice({"liver": 0.5, "vein": 0.4}, {"liver": 0.0, "vein": None})
    assert second == {"liver": pytest.approx(0.5 * (1 - SMOOTHING)), "vein": pytest.approx(0.4)}


def test_a_class_lags_by_its_distance_from_the_mean_and_none_weighs_less_than_planned():
    lifts = lagging_lifts({"liver": 0.9, "spleen": 0.7, "vein": 0.2}, max_lift=4.0)
    mean_lag = (0.1 + 0.3 + 0.8) / 3
    assert lifts == {"liver": 1.0, "spleen": 1.0, "vein": pytest.approx(0.8 / mean_lag)}


def test_the_lift_stops_at_its_maximum():
    smoothed = {f"organ{i}": 0.95 for i in range(20)} | {"stomach": 0.0}
    assert lagging_lifts(smoothed, max_lift=4.0)["stomach"] == 4.0
    assert lagging_lifts(smoothed, max_lift=2.5)["stomach"] == 2.5


def test_classes_all_learned_or_all_equal_are_not_lifted():
    assert set(lagging_lifts({"a": 1.0, "b": 1.0}, 4.0).values()) == {1.0}
    assert set(lagging_lifts({"a": 0.0, "b": 0.0, "c": 0.0}, 4.0).values()) == {1.0}
    assert lagging_lifts({}, 4.0) == {}


def test_weights_are_the_plans_times_the_lift_and_background_keeps_its_own():
    names = ["liver", "vein", "node"]
    assert lifted_weights([1.0, 1.0, 5.0, 30.0], names, {"vein": 2.0}) == [1.0, 1.0, 10.0, 30.0]
    assert lifted_weights(None, names, {"node": 3.0, "liver": 1.0}) == [1.0, 1.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="3 class weights for 3 foreground classes"):
        lifted_weights([1.0, 1.0, 1.0], names, {})
