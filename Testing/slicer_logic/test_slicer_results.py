"""Predictions into the scene, training curves, folds that only grow, dependency checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AutoSegLib.imageio import write_image
from AutoSegLib.training import splits as engine_splits
from AutoSegLogic import dataset_export, dependencies, folds, labels, results, testing, volumes
from AutoSegLogic.curves import TrainingCurves

from slicer_logic.test_slicer_dataset_export import LABEL, SHAPE, oblique_matrix, volume_node

MODEL_LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}


def segment_table(node) -> list[tuple[str, tuple]]:
    content = node.GetSegmentation()
    return [(content.GetNthSegment(i).GetName(), tuple(round(c, 3) for c in content.GetNthSegment(i).GetColor()))
            for i in range(content.GetNumberOfSegments())]


def model_folder(tmp_path, labels_=MODEL_LABELS):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels_,
                                                    "numTraining": 5, "file_ending": ".nii.gz"}))
    return model


# -- predictions -------------------------------------------------------------------------------------
def test_prediction_becomes_named_coloured_segments_on_the_input_grid(scene):
    matrix = oblique_matrix()
    volume = volume_node(scene, np.zeros(SHAPE, np.int16), matrix, "input")
    geometry = volumes.geometry_from_matrix(matrix)
    before = scene.GetNumberOfNodes()
    node = results.segmentation_from_labels(scene, LABEL, geometry, MODEL_LABELS, "pred", volume)

    names = [name for name, _ in segment_table(node)]
    assert names == ["liver", "spleen", "kidney"]  # value order; kidney (absent) as an empty segment to paint
    colours = dict(segment_table(node))
    assert colours["liver"] == tuple(round(c, 3) for c in labels.colour_of("liver", 1))
    again = results.segmentation_from_labels(scene, LABEL, geometry, MODEL_LABELS, "pred 2", volume)
    assert segment_table(again) == segment_table(node)  # same names, same colours, every time
    assert scene.GetNumberOfNodes() - before == 2 * 2 + 1  # 2 x (segmentation + display) + subject hierarchy

    index, segment_names = dataset_export.rasterize(scene, node, volume)
    lookup = np.array([0] + [MODEL_LABELS[n] for n in segment_names])
    assert np.array_equal(lookup[index], LABEL)  # back on the input's voxels, value for value
    assert node.GetNodeReference("referenceImageGeometryRef") is volume  # the Segment Editor edits on the input grid


def test_colours_are_fixed_by_name_then_by_value():
    assert labels.colour_of("Liver", 7) == labels.colour_of("liver", 1)
    assert labels.colour_of("structure_a", 1) == labels.colour_of("structure_b", 1)
    assert labels.colour_of("structure_a", 1) != labels.colour_of("structure_a", 2)
    assert labels.colour_of("ignore", 4) == labels.IGNORE_COLOUR


def test_load_prediction_reads_label_and_uncertainty_and_shows_the_overlay(scene, tmp_path):
    import slicer

    matrix = oblique_matrix()
    volume = volume_node(scene, np.zeros(SHAPE, np.int16), matrix, "CT 1")
    views = [scene.AddNode(slicer.vtkMRMLSliceCompositeNode()) for _ in range(3)]
    geometry = volumes.geometry_from_matrix(matrix)
    out = tmp_path / "out"
    write_image(LABEL, geometry, out / "case.nii.gz")
    uncertainty = np.linspace(0, 1, LABEL.size, dtype=np.float32).reshape(SHAPE)
    write_image(uncertainty, geometry, out / "case_uncertainty.nii.gz")

    prediction = results.load_prediction(scene, out, "case", model_folder(tmp_path), volume)
    assert prediction.segmentation.GetName() == "CT 1 AutoSeg"
    assert [n for n, _ in segment_table(prediction.segmentation)] == ["liver", "spleen", "kidney"]
    overlay = prediction.uncertainty
    assert np.allclose(volumes.ijk_to_ras(overlay), matrix)
    assert np.allclose(volumes.array_from_node(overlay), uncertainty)
    assert all(v.GetForegroundVolumeID() == overlay.GetID() and v.GetForegroundOpacity() == 0.5 for v in views)
    display = overlay.GetDisplayNode()
    assert display.GetColorNode().GetName() == results.UNCERTAINTY_COLOURS
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    second = results.load_prediction(scene, out, "case", model_folder(tmp_path), volume)
    assert second.uncertainty.GetDisplayNode().GetColorNode() is display.GetColorNode()  # one colour table


def test_missing_prediction_is_an_error_naming_the_folder(scene, tmp_path):
    volume = volume_node(scene, np.zeros(SHAPE, np.int16), oblique_matrix(), "v")
    with pytest.raises(FileNotFoundError, match="no prediction for case 'case'"):
        results.load_prediction(scene, tmp_path, "case", model_folder(tmp_path), volume)


# -- curves ------------------------------------------------------------------------------------------
def epoch(done, loss, dice=None):
    return {"event": "epoch", "stage": "train", "epoch": done - 1, "done": done, "of": 4, "train_loss": loss,
            "val_loss": loss + 0.1, "mean_pseudo_dice": 0.5, "ema_pseudo_dice": 0.4,
            "pseudo_dice": dice or {"liver": 0.6, "spleen": None}}


def test_curves_fill_a_table_and_a_chart_and_restart_after_a_resume(scene):
    curves = TrainingCurves(scene, "run")
    for e in (epoch(1, 1.0), epoch(2, 0.8), epoch(3, 0.7), epoch(3, 0.65), epoch(4, 0.6, {"liver": 0.7, "aorta": 0.2})):
        curves.add_epoch(e)
    assert curves.column("epoch") == [1, 2, 3, 4]
    assert curves.column("train_loss") == [1.0, 0.8, 0.65, 0.6]  # the resumed run's epoch 3 replaced the old one
    assert np.isnan(curves.column("dice spleen")).all()
    assert curves.column("dice aorta")[:3] == pytest.approx([np.nan] * 3, nan_ok=True)
    assert curves.chart.GetNumberOfPlotSeriesNodes() == 4
    series = curves.chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNode() is curves.table and series.GetXColumnName() == "epoch"


def test_each_training_run_gets_a_chart_and_no_epoch_is_lost_between_steps(scene):
    from types import SimpleNamespace

    from AutoSegLogic.jobs import Job
    from AutoSegLogic.session import Session

    session = Session(scene)
    fold0, fold1 = Job(["train", "D", "3d_fullres", "0"]), Job(["train", "D", "3d_fullres", "1"])
    session.training = SimpleNamespace(job=fold0)
    fold0.epochs.append(epoch(1, 1.0))
    session._follow_curves()
    first = session.curves
    fold0.epochs.append(epoch(2, 0.9))  # arrives in the same poll in which the chain moves on
    session.training.job = fold1
    fold1.epochs.append(epoch(1, 1.1))
    session._follow_curves()
    assert first.column("train_loss") == [1.0, 0.9] and session.curves is not first
    assert session.curves.column("train_loss") == [1.1]
    resumed = fold1.resume()
    session.training.job = resumed
    resumed.epochs.append(epoch(2, 1.0))
    session._follow_curves()
    assert session.curves.column("train_loss") == [1.1, 1.0]  # the resumed run continues its chart


def test_cases_are_not_added_while_training_runs(scene, tmp_path):
    from types import SimpleNamespace

    from AutoSegLogic.session import Session

    session = Session(scene)
    session.training = SimpleNamespace(finished=False)
    volume = volume_node(scene, np.zeros(SHAPE, np.int16), oblique_matrix(), "v")
    with pytest.raises(RuntimeError, match="training is still running"):
        session.add_case(tmp_path / "DS", [volume], None, ["CT"])
    assert not (tmp_path / "DS").exists()


# -- folds -------------------------------------------------------------------------------------------
def test_new_cases_join_the_folds_without_moving_old_ones(scene, tmp_path):
    folder, work = tmp_path / "DS", tmp_path / "work"
    cases = [dataset_export.SceneCase([volume_node(scene, np.zeros(SHAPE, np.int16), oblique_matrix(), f"c{i}")],
                                      testing.segmentation_from_array(
                                          scene, LABEL, volumes.geometry_from_matrix(oblique_matrix()),
                                          {"liver": 1, "spleen": 2}, f"s{i}"))
             for i in range(6)]
    dataset_export.export_cases(folder, cases[:5], scene, ["CT"])
    assert folds.add_new_cases(folder, work) == {}  # no splits yet: the first training makes them
    original = engine_splits.load_or_create_splits(work, [c.case_id for c in dataset_export.list_cases(folder)])
    dataset_export.export_cases(folder, cases[5:], scene)
    placed = folds.add_new_cases(folder, work)
    assert list(placed) == ["c5"]
    grown = json.loads((work / "splits_final.json").read_text())
    for old, new in zip(original, grown):
        assert set(old["val"]) <= set(new["val"])  # every case keeps its fold
    assert folds.fold_of(work, "c5") == placed["c5"] and "c5" in grown[placed["c5"]]["val"]
    assert sum("c5" in fold["train"] for fold in grown) == 4


# -- dependencies ------------------------------------------------------------------------------------
def test_requirements_match_pyproject():
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    declared = {}
    for spec in project["project"]["dependencies"]:
        name, minimum = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([\d.]+)", spec).groups()
        declared[name] = minimum
    assert {r.distribution: r.minimum for r in dependencies.REQUIREMENTS} == declared


def test_missing_reports_absent_and_too_old_packages():
    versions = {"torch": "2.9.1+cu121", "numpy": "2.0.0"}
    found = {"torch", "numpy"}
    reqs = [dependencies.Requirement("torch", "torch", "2.10"), dependencies.Requirement("numpy", "numpy", "1.24"),
            dependencies.Requirement("tqdm", "tqdm", "4.60")]
    missing = dependencies.missing(reqs, find=lambda m: m if m in found else None, version_of=versions.__getitem__)
    assert [r.distribution for r in missing] == ["torch", "tqdm"]
    assert dependencies.describe(missing) == "torch>=2.10, tqdm>=4.60"
    assert dependencies.version_tuple("2.10.0rc1") == (2, 10, 0)
