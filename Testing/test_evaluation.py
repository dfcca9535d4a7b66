"""Metrics against hand-computed values, the summary document, evaluate_folders and the CLI."""

from __future__ import annotations

import json
import math
from itertools import product

import numpy as np
import pytest

from AutoSegLib.cli import main
from AutoSegLib.evaluation import EvaluationError, case_metrics, evaluate_folders
from AutoSegLib.evaluation.metrics import surface_distances, surface_metrics
from AutoSegLib.evaluation.summary import class_means, foreground_mean, format_table, never_predicted
from AutoSegLib.imageio import Geometry, write_image

LABELS = {"background": 0, "organ": 1}


def cube(shape=(6, 6, 6), start=(1, 1, 1), size=3, value=1) -> np.ndarray:
    array = np.zeros(shape, np.uint8)
    array[tuple(slice(s, s + size) for s in start)] = value
    return array


# -- overlap ---------------------------------------------------------------------------------
def test_overlap_of_offset_cubes():
    # 3x3x3 cubes shifted by one voxel share 18 voxels: Dice 36/54, IoU 18/36.
    m = case_metrics(cube(start=(2, 1, 1)), cube(), LABELS, surface=False)["organ"]
    assert m == {"Dice": pytest.approx(2 / 3), "IoU": 0.5, "TP": 18, "FP": 9, "FN": 9, "n_pred": 27, "n_ref": 27}


def test_empty_prediction_and_reference_conventions():
    empty = np.zeros((6, 6, 6), np.uint8)
    both_empty = case_metrics(empty, empty, LABELS, (1, 1, 1))["organ"]
    assert all(math.isnan(both_empty[k]) for k in ("Dice", "IoU", "HD95", "NSD"))
    assert both_empty["FP"] == both_empty["FN"] == 0

    missed = case_metrics(empty, cube(), LABELS, (1, 1, 1))["organ"]
    assert (missed["Dice"], missed["IoU"], missed["FN"], missed["NSD"]) == (0.0, 0.0, 27, 0.0)
    assert math.isnan(missed["HD95"])
    hallucinated = case_metrics(cube(), empty, LABELS, (1, 1, 1))["organ"]
    assert (hallucinated["Dice"], hallucinated["FP"], hallucinated["NSD"]) == (0.0, 27, 0.0)


def test_ignore_label_voxels_are_not_scored():
    labels = {"background": 0, "organ": 1, "ignore": 2}
    ref = cube()
    ref[:, :, 4:] = 2  # unannotated slab
    pred = cube()
    pred[:, :, 4:] = 1  # anything predicted there counts neither way
    m = case_metrics(pred, ref, labels, (1, 1, 1))["organ"]
    assert (m["Dice"], m["FP"], m["FN"], m["HD95"], m["NSD"]) == (1.0, 0, 0, 0.0, 1.0)
    assert "ignore" not in case_metrics(pred, ref, labels, surface=False)


def test_background_is_not_scored_and_absent_labels_are_nan():
    result = case_metrics(cube(), cube(), {"background": 0, "organ": 1, "tumour": 2}, surface=False)
    assert set(result) == {"organ", "tumour"}
    assert math.isnan(result["tumour"]["Dice"]) and result["organ"]["Dice"] == 1.0


# -- surface distances ---------------------------------------------------------------------
@pytest.mark.parametrize("axis, spacing, expected", [(0, (2.0, 1.0, 1.0), 2.0), (2, (2.0, 1.0, 0.5), 0.5)])
def test_hd95_of_offset_cubes_is_one_voxel_step_in_mm(axis, spacing, expected):
    # Shifted one voxel along `axis`: 16 of the 26 surface voxels of each cube lie on the other's
    # surface, one (the centre of the shifted face) is one in-plane step away, nine (the far
    # face) are one step along `axis` away: the 95th percentile is that step in mm.
    start = [1, 1, 1]
    start[axis] += 1
    m = case_metrics(cube(start=tuple(start)), cube(), LABELS, spacing)["organ"]
    assert m["HD95"] == pytest.approx(expected)


def test_hd95_between_single_voxels_uses_anisotropic_spacing():
    pred, ref = np.zeros((4, 2, 3), bool), np.zeros((4, 2, 3), bool)
    pred[0, 0, 0] = ref[2, 0, 1] = True
    assert surface_metrics(pred, ref, (3.0, 1.0, 0.5))["HD95"] == pytest.approx(math.sqrt(6.0**2 + 0.5**2))


def test_hd95_ignores_a_distant_outlier_below_five_percent():
    ref = cube((12, 12, 12), (1, 1, 1), 5)
    pred = ref.copy()
    pred[11, 11, 11] = 1  # one of 99 surface voxels, far away: the maximum distance, not the 95th percentile
    assert case_metrics(pred, ref, LABELS, (1, 1, 1))["organ"]["HD95"] == 0.0


@pytest.mark.parametrize("tolerance, expected", [(1.0, 34 / 52), (1.99, 34 / 52), (2.0, 1.0)])
def test_normalized_surface_dice_tolerance(tolerance, expected):
    # Distances of each cube's 26 surface voxels to the other's surface: 16 x 0, 1 x 1 mm, 9 x 2 mm.
    m = case_metrics(cube(start=(2, 1, 1)), cube(), LABELS, (2.0, 1.0, 1.0), tolerance_mm=tolerance)["organ"]
    assert m["NSD"] == pytest.approx(expected)


def _brute_surface_distances(a, b, spacing):
    def surface(mask):
        padded = np.pad(mask, 1)
        points = []
        for z, y, x in zip(*np.nonzero(mask)):
            neighbours = [padded[z + 1 + dz, y + 1 + dy, x + 1 + dx]
                          for dz, dy, dx in product((-1, 0, 1), repeat=3) if abs(dz) + abs(dy) + abs(dx) == 1]
            if not all(neighbours):
                points.append((z, y, x))
        return np.array(points, float) * spacing

    pa, pb = surface(a), surface(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return np.sort(d.min(1)), np.sort(d.min(0))


def test_surface_distances_equal_brute_force_on_random_blobs():
    rng = np.random.default_rng(3)
    a, b = rng.random((7, 8, 9)) > 0.6, rng.random((7, 8, 9)) > 0.6
    spacing = np.array([2.5, 1.0, 0.7])
    ours = [np.sort(d) for d in surface_distances(a, b, spacing)]
    brute = _brute_surface_distances(a, b, spacing)
    for mine, expected in zip(ours, brute):
        np.testing.assert_allclose(mine, expected, atol=1e-9)


# -- summary -------------------------------------------------------------------------------
def test_means_skip_undefined_values_and_weigh_classes_equally():
    per_case = [{"metrics": {"a": {"Dice": 1.0, "FP": 0}, "b": {"Dice": math.nan, "FP": 0}}},
                {"metrics": {"a": {"Dice": 0.5, "FP": 4}, "b": {"Dice": 0.2, "FP": 2}}}]
    means = class_means(per_case, ["a", "b"])
    assert means == {"a": {"Dice": 0.75, "FP": 2.0}, "b": {"Dice": 0.2, "FP": 1.0}}
    assert foreground_mean(means) == {"Dice": pytest.approx(0.475), "FP": 1.5}


# -- folders ---------------------------------------------------------------------------------
GEOMETRY = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))


def _write_pair(root, case, pred, ref, pred_geometry=GEOMETRY):
    write_image(pred, pred_geometry, root / "pred" / f"{case}.nii.gz")
    write_image(ref, GEOMETRY, root / "gt" / f"{case}.nii.gz")


@pytest.fixture
def folders(tmp_path):
    labels = {"background": 0, "organ": 1, "tumour": 2}
    _write_pair(tmp_path, "a", cube(start=(2, 1, 1)), cube())
    tumour = cube()
    tumour[2, 2, 2] = 2
    _write_pair(tmp_path, "b", tumour, tumour)
    return tmp_path, labels


def test_evaluate_folders_writes_the_summary(folders):
    root, labels = folders
    summary = evaluate_folders(root / "pred", root / "gt", labels, output=root / "summary.json")
    assert json.loads((root / "summary.json").read_text()) == summary
    assert summary["version"] == 1 and summary["nsd_tolerance_mm"] == 1.0
    assert [c["case"] for c in summary["metric_per_case"]] == ["a", "b"]
    first = summary["metric_per_case"][0]
    assert first["prediction"].endswith("pred/a.nii.gz") and first["reference"].endswith("gt/a.nii.gz")
    assert first["metrics"]["organ"]["HD95"] == 2.0
    assert first["metrics"]["tumour"]["Dice"] is None  # absent from both: JSON null, excluded from the mean
    assert summary["mean"]["tumour"]["Dice"] == 1.0
    assert summary["mean"]["organ"]["Dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(((2 / 3 + 1) / 2 + 1) / 2)
    assert "foreground mean" in format_table(summary)


def test_evaluate_folders_in_worker_processes_gives_the_same_result(folders):
    root, labels = folders
    one = evaluate_folders(root / "pred", root / "gt", labels)
    two = evaluate_folders(root / "pred", root / "gt", labels, num_processes=2, case_ids=["a", "b"])
    assert one == two


def test_missing_prediction_is_named(folders):
    root, labels = folders
    (root / "pred" / "b.nii.gz").unlink()
    with pytest.raises(EvaluationError, match=r"1 of 2 prediction\(s\) missing: .*pred/b\.nii\.gz"):
        evaluate_folders(root / "pred", root / "gt", labels)


def test_geometry_mismatch_names_both_files_and_values(tmp_path):
    other = Geometry((3.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    _write_pair(tmp_path, "a", cube(), cube(), pred_geometry=other)
    with pytest.raises(EvaluationError) as info:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", LABELS)
    message = str(info.value)
    assert "pred/a.nii.gz" in message and "gt/a.nii.gz" in message and "spacing (3, 1, 1) vs (2, 1, 1)" in message


def test_cli_evaluate_prints_the_table_and_reports_done(folders, capsys):
    root, labels = folders
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert main(["evaluate", str(root / "pred"), str(root / "gt"), "-np", "1", "--events"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["cases"] == 2
    assert (root / "pred" / "summary.json").is_file()
    assert main(["evaluate", str(root / "pred"), str(root / "gt"), "-o", str(root / "s.json"), "-np", "1"]) == 0
    assert "tumour" in capsys.readouterr().out


# -- a class never predicted ---------------------------------------------------------------
def test_a_class_present_in_references_but_never_predicted_is_named():
    per_case = [{"metrics": {"organ": {"n_pred": 5, "n_ref": 4}, "tumour": {"n_pred": 0, "n_ref": 3}}},
                {"metrics": {"organ": {"n_pred": 0, "n_ref": 2}, "tumour": {"n_pred": 0, "n_ref": 0}}}]
    assert never_predicted(per_case, ["organ", "tumour"]) == {"tumour": 1}
    # absent from every reference: nothing to learn, no warning
    assert never_predicted([{"metrics": {"tumour": {"n_pred": 0, "n_ref": 0}}}], ["tumour"]) == {}


def test_cli_evaluate_warns_naming_the_class_never_predicted(tmp_path, capsys):
    labels = {"background": 0, "organ": 1, "tumour": 2}
    reference = cube()
    reference[2, 2, 2] = 2
    _write_pair(tmp_path, "a", cube(), reference)  # the prediction has no tumour voxel
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "-np", "1", "--events"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "class 'tumour' was never predicted" in warnings[0]
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["never_predicted"] == {"tumour": 1}
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "-np", "1"]) == 0
    assert "WARNING: class 'tumour' was never predicted" in capsys.readouterr().err


def test_classes_are_ranked_lowest_first_and_the_weak_ones_named():
    from AutoSegLib.evaluation.summary import class_ranking, weak_classes_warning

    summary = {"mean": {"liver": {"Dice": 0.95}, "vessel": {"Dice": 0.12}, "nerve": {"Dice": 0.12},
                        "spleen": {"Dice": 0.49}, "absent": {"Dice": None}, "nan": {"Dice": math.nan}}}
    assert class_ranking(summary) == [("nerve", 0.12), ("vessel", 0.12), ("spleen", 0.49), ("liver", 0.95)]
    message = weak_classes_warning(summary)
    assert message.startswith("3 of 4 class(es) below Dice 0.50 on validation, lowest first: "
                              "nerve 0.12, vessel 0.12, spleen 0.49.")
    assert weak_classes_warning(summary, threshold=0.1) is None
    assert weak_classes_warning({"mean": {}}) is None
