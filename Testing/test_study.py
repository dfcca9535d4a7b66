"""The architecture study's statistics and report on hand-made numbers with known answers."""

from __future__ import annotations

import json
import math

import pytest

from AutoSegLib.evaluation.study import (average_ranks, bootstrap_p_value, fold_wise_differences, mean_std,
                                         ranks_descending)
from AutoSegLib.evaluation.study_report import FOREGROUND, build_report, to_markdown


# -- fold-wise differences -------------------------------------------------------------------
def test_fold_wise_differences_pair_folds_and_skip_missing_ones():
    design = {"0": 0.80, "1": 0.70, "2": None, "3": 0.5}
    baseline = {"0": 0.75, "1": 0.72, "2": 0.9}
    assert fold_wise_differences(design, baseline) == [0.05, -0.02]  # fold 2 unscored, fold 3 no baseline


# -- bootstrap p-values ----------------------------------------------------------------------
def test_p_is_zero_when_every_fold_goes_the_same_way():
    assert bootstrap_p_value([0.01, 0.03, 0.02]) == 0.0
    assert bootstrap_p_value([-0.2, -0.1]) == 0.0


def test_p_is_one_for_no_difference_or_a_symmetric_one():
    assert bootstrap_p_value([0.0, 0.0, 0.0]) == 1.0
    # resampled means of (-1, 1) are -1, 0, 1 with 1/4, 1/2, 1/4: each side holds 3/4, capped at 1
    assert bootstrap_p_value([-1.0, 1.0]) == 1.0


def test_p_matches_the_exact_bootstrap_distribution():
    # Differences (1, 1, -1): a resampled mean is <= 0 when at least two of three draws are -1,
    # probability 3 * (1/3)^2 * (2/3) + (1/3)^3 = 7/27; it is never exactly 0. p = 2 * 7/27.
    p = bootstrap_p_value([1.0, 1.0, -1.0], resamples=40_000, seed=3)
    assert p == pytest.approx(14 / 27, abs=0.015)  # 3.5 standard errors of 40,000 draws


def test_p_is_seeded_and_none_without_folds():
    d = [0.02, -0.01, 0.03, 0.01]
    assert bootstrap_p_value(d, seed=7) == bootstrap_p_value(d, seed=7)
    assert bootstrap_p_value([]) is None


# -- ranks -----------------------------------------------------------------------------------
def test_ties_share_their_mean_rank_and_missing_values_rank_last():
    assert ranks_descending([0.9, 0.5, 0.7]) == [1.0, 3.0, 2.0]
    assert ranks_descending([0.5, 0.9, 0.5, None]) == [2.5, 1.0, 2.5, 4.0]
    assert ranks_descending([0.3, 0.3, 0.3]) == [2.0, 2.0, 2.0]
    assert ranks_descending([float("nan"), None, 0.1]) == [2.5, 2.5, 1.0]


def test_average_rank_over_classes():
    scores = {"unet": [0.9, 0.6, 0.5], "convskip": [0.8, 0.6, 0.7], "swin": [0.7, 0.4, 0.7]}
    # class 1: 1, 2, 3; class 2: 1.5, 1.5, 3; class 3: 3, 1.5, 1.5
    assert average_ranks(scores) == {"unet": pytest.approx(5.5 / 3), "convskip": pytest.approx(5 / 3),
                                     "swin": pytest.approx(7.5 / 3)}
    with pytest.raises(ValueError, match="a score per item"):
        average_ranks({"a": [1.0], "b": [1.0, 2.0]})


def test_mean_and_sample_std():
    assert mean_std([0.7, 0.8, 0.9]) == (pytest.approx(0.8), pytest.approx(0.1))
    assert mean_std([0.5, None]) == (0.5, None)
    assert mean_std([None]) == (None, None)


# -- the report ------------------------------------------------------------------------------
def records() -> list[dict]:
    """Two designs, two datasets, two folds; class Dice chosen so every figure is checkable."""
    dice = {("ct", "A", "0"): {"liver": 0.9, "aorta": 0.5}, ("ct", "A", "1"): {"liver": 0.8, "aorta": 0.7},
            ("ct", "B", "0"): {"liver": 0.7, "aorta": 0.6}, ("ct", "B", "1"): {"liver": 0.8, "aorta": 0.8},
            ("mr", "A", "0"): {"brain": 0.6}, ("mr", "A", "1"): {"brain": 0.6},
            ("mr", "B", "0"): {"brain": 0.7}, ("mr", "B", "1"): {"brain": 0.9}}
    return [{"dataset": d, "architecture": a, "fold": f, "dice": v, "parameters": 1e6 if a == "A" else 2e6,
             "gflop": 1.0, "iterations": 10, "seconds_per_iteration": 0.5, "seconds_per_case": 2.0}
            for (d, a, f), v in dice.items()]


def test_report_figures():
    report = build_report(records(), ["A", "B"], "A", {"configuration": "3d_cpu", "folds": ["0", "1"]})
    ct = report["datasets"]["ct"]
    assert ct["classes"] == ["liver", "aorta"]
    b = ct["designs"]["B"]
    assert b["dice"]["liver"]["per_fold"] == {"0": 0.7, "1": 0.8}
    assert b["dice"]["liver"]["mean"] == pytest.approx(0.75)
    assert b["dice"]["liver"]["std"] == pytest.approx(math.sqrt(0.005))
    assert b["difference_to_baseline"]["liver"]["per_fold"] == [-0.2, 0.0]
    assert b["difference_to_baseline"]["aorta"]["per_fold"] == [0.1, 0.1]
    assert b["difference_to_baseline"]["aorta"]["p_value"] == 0.0
    assert b["difference_to_baseline"][FOREGROUND]["per_fold"] == [-0.05, 0.05]
    # ct: liver means A 0.85 > B 0.75; aorta A 0.6 < B 0.7 -> both rank 1.5
    assert ct["designs"]["A"]["average_rank"] == 1.5 and b["average_rank"] == 1.5
    assert report["datasets"]["mr"]["designs"]["B"]["average_rank"] == 1.0
    # over the three classes of both datasets: A ranks 1, 2, 2; B 2, 1, 1
    assert report["average_rank_over_datasets"] == {"A": pytest.approx(5 / 3), "B": pytest.approx(4 / 3)}
    json.dumps(report, allow_nan=False)  # strict JSON


def test_markdown_names_every_design_and_the_overall_rank():
    text = to_markdown(build_report(records(), ["A", "B"], "A", {"configuration": "3d_cpu", "folds": ["0", "1"]}))
    assert "## ct" in text and "## mr" in text and "Average rank over every class of every dataset" in text
    assert "| B | 2.00 M | 1.0 | 0.50 | 10 | 2.0 | 0.725 ± 0.106 | 0.0000 (1.00) | 1.50 |" in text
