"""find-best on fabricated cross-validation predictions: no training, only the files validation writes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from AutoSegLib.cli import main
from AutoSegLib.evaluation.selection import SelectionError, find_best
from AutoSegLib.events import Reporter
from AutoSegLib.imageio import Geometry, write_image
from conftest import write_dataset

GEOMETRY = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
CASES = ["c0", "c1", "c2", "c3"]
SPLITS = [{"train": ["c2", "c3"], "val": ["c0", "c1"]}, {"train": ["c0", "c1"], "val": ["c2", "c3"]}]


def soft(labelmap: np.ndarray, n_classes: int, confidence: float) -> np.ndarray:
    """Probabilities with ``confidence`` on each voxel's class and the rest shared by the others."""
    probabilities = np.full((n_classes, *labelmap.shape), (1 - confidence) / (n_classes - 1), np.float32)
    np.put_along_axis(probabilities, labelmap[None].astype(np.int64), confidence, axis=0)
    return probabilities


def make_project(tmp_path, ref: np.ndarray, labels: dict[str, int]):
    cases = {case: ([ref.astype(np.int16) * 50], ref) for case in CASES}
    dataset = write_dataset(tmp_path / "Dataset009_Fake", cases, geometry=GEOMETRY, labels=labels)
    work = tmp_path / "Dataset009_Fake.autoseg"
    work.mkdir()
    (work / "splits_final.json").write_text(json.dumps(SPLITS))
    return dataset, work


def write_validation(work, configuration: str, probabilities: np.ndarray, skip=()):
    """Validation outputs of every fold: argmax label file + float16 npz, for every held-out case."""
    for k, fold in enumerate(SPLITS):
        folder = work / "model" / configuration / f"fold_{k}" / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        for case in fold["val"]:
            if f"{case}.nii.gz" not in skip:
                write_image(np.argmax(probabilities, 0).astype(np.uint8), GEOMETRY, folder / f"{case}.nii.gz")
            if f"{case}.npz" not in skip:
                np.savez_compressed(folder / f"{case}.npz", probabilities=probabilities.astype(np.float16))


# -- two classes: the ensemble wins, per-class postprocessing --------------------------------
LIVER_KIDNEY = {"background": 0, "liver": 1, "kidney": 2}


def liver_kidney():
    ref = np.zeros((10, 12, 12), np.uint8)
    ref[1:6, 1:6, 1:6] = 1
    ref[1:4, 8:11, 8:11] = 2  # kidney A
    ref[6:9, 8:11, 1:3] = 2  # kidney B, smaller
    shared = ref.copy()
    shared[1:3, 8:10, 6:8] = 1  # both configurations see a liver island touching kidney A
    return ref, shared


def unsure_miss(shared: np.ndarray, region) -> np.ndarray:
    """Probabilities of ``shared`` except in ``region``, predicted as background without conviction."""
    missed = shared.copy()
    missed[region] = 0
    inside = np.zeros(shared.shape, bool)
    inside[region] = True
    return np.where(inside, soft(missed, 3, 0.5), soft(shared, 3, 0.8))


@pytest.fixture
def ensemble_project(tmp_path):
    ref, shared = liver_kidney()
    dataset, work = make_project(tmp_path, ref, LIVER_KIDNEY)
    # Each configuration misses a different structure; averaged, the other one's conviction wins.
    write_validation(work, "2d", unsure_miss(shared, np.s_[1:3, 1:6, 1:6]))
    write_validation(work, "3d_fullres", unsure_miss(shared, np.s_[1:4, 8:11, 8:11]))
    return dataset, work


def test_ensemble_wins_and_class_postprocessing_is_chosen(ensemble_project):
    dataset, work = ensemble_project
    plan = find_best(work, dataset)
    assert json.loads((work / "model" / "inference_plan.json").read_text()) == plan
    assert plan["version"] == 1 and plan["folds"] == [0, 1] and plan["checkpoint"] == "final"
    assert plan["configurations"] == ["2d", "3d_fullres"]
    cv = plan["cross_validation"]
    assert list(cv) == ["2d", "3d_fullres", "2d+3d_fullres"]
    assert cv["2d+3d_fullres"]["per_class"] == {"liver": pytest.approx(250 / 258), "kidney": 1.0}
    assert cv["2d"]["per_class"]["liver"] == pytest.approx(150 / 208)
    assert cv["3d_fullres"]["per_class"]["kidney"] == pytest.approx(36 / 63)
    # The foreground step would delete the kidneys (the liver is the largest component); removing
    # the liver's island helps; keeping one kidney would drop the other.
    assert plan["postprocessing"] == {"largest_component_foreground": False, "largest_component_classes": [1]}
    assert plan["postprocessing_evaluation"]["after"]["per_class"] == {"liver": 1.0, "kidney": 1.0}
    assert "ensemble 2d+3d_fullres" in plan["chosen_because"] and "liver" in plan["chosen_because"]
    pooled = json.loads((work / "model" / "crossval" / "2d+3d_fullres.json").read_text())
    assert [c["case"] for c in pooled["metric_per_case"]] == CASES


def test_cli_find_best_prints_the_candidates(ensemble_project, capsys):
    dataset, work = ensemble_project
    assert main(["find-best", str(dataset), "-w", str(work), "-np", "2", "--events"]) == 0
    captured = capsys.readouterr()
    done = json.loads(captured.out.splitlines()[-1])
    assert done["event"] == "done" and done["configurations"] == ["2d", "3d_fullres"]
    assert "2d+3d_fullres *" in captured.err


def test_corrupt_probabilities_are_named(ensemble_project):
    dataset, work = ensemble_project
    bad = work / "model" / "3d_fullres" / "fold_1" / "validation" / "c2.npz"
    np.savez_compressed(bad, probabilities=np.zeros((2, 10, 12, 12), np.float16))
    with pytest.raises(SelectionError, match=r"c2: .*c2\.npz: probabilities have shape \(2, 10, 12, 12\)"):
        find_best(work, dataset)
    assert not (work / "model" / "inference_plan.json").exists()


# -- one class: a single configuration wins, foreground postprocessing -----------------------
ORGAN = {"background": 0, "organ": 1}


@pytest.fixture
def single_project(tmp_path):
    ref = np.zeros((6, 10, 10), np.uint8)
    ref[1:5, 1:5, 1:5] = 1
    dataset, work = make_project(tmp_path, ref, ORGAN)
    with_island = ref.copy()
    with_island[5, 8:10, 8:10] = 1
    write_validation(work, "2d", soft(with_island, 2, 0.9))
    chunk_missing = ref.copy()
    chunk_missing[1:3] = 0  # half the organ missed, with conviction: it drags the ensemble down too
    write_validation(work, "3d_fullres", soft(chunk_missing, 2, 0.95))
    return dataset, work


def test_single_configuration_wins_and_foreground_postprocessing_is_chosen(single_project):
    dataset, work = single_project
    plan = find_best(work, dataset)
    assert plan["configurations"] == ["2d"]
    assert plan["cross_validation"]["2d"]["mean_foreground_dice"] == pytest.approx(128 / 132)
    assert plan["cross_validation"]["2d+3d_fullres"]["mean_foreground_dice"] < 128 / 132
    assert plan["postprocessing"] == {"largest_component_foreground": True, "largest_component_classes": []}
    assert plan["postprocessing_evaluation"]["after"]["mean_foreground_dice"] == 1.0
    assert plan["chosen_because"].startswith("2d has the highest mean foreground Dice in 2-fold cross-validation")


# -- incomplete cross-validation -------------------------------------------------------------
def test_incomplete_configuration_is_left_out_with_a_warning(single_project):
    dataset, work = single_project
    (work / "model" / "3d_fullres" / "fold_0" / "validation" / "c1.npz").unlink()
    out = io.StringIO()
    plan = find_best(work, dataset, reporter=Reporter(events=True, out=out, err=io.StringIO()))
    assert plan["configurations"] == ["2d"] and list(plan["cross_validation"]) == ["2d"]
    warnings = [json.loads(line) for line in out.getvalue().splitlines() if '"warning"' in line]
    assert "3d_fullres is left out" in warnings[0]["message"] and "c1.npz" in warnings[0]["message"]


def test_no_complete_configuration_lists_what_is_missing(tmp_path):
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    dataset, work = make_project(tmp_path, ref, ORGAN)
    write_validation(work, "3d_fullres", soft(ref, 2, 0.9), skip={"c1.npz", "c2.nii.gz"})
    (work / "model" / "2d" / "fold_1").mkdir(parents=True)
    with pytest.raises(SelectionError) as info:
        find_best(work, dataset)
    message = str(info.value)
    assert "2d: fold_0: not trained" in message and "fold_1: trained but not validated" in message
    assert "3d_fullres: fold_0:" in message and "c1.npz" in message and "c2.nii.gz" in message
    assert not (work / "model" / "inference_plan.json").exists()


def test_no_trained_configuration(tmp_path):
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    dataset, work = make_project(tmp_path, ref, ORGAN)
    with pytest.raises(SelectionError, match="no trained configuration found"):
        find_best(work, dataset)


def test_ties_go_to_the_candidate_with_fewer_members():
    from AutoSegLib.evaluation.selection import choose_candidate

    scores = {"2d": {"mean_foreground_dice": 0.8}, "3d_fullres": {"mean_foreground_dice": 0.9},
              "2d+3d_fullres": {"mean_foreground_dice": 0.9}}
    members = {"2d": ("2d",), "3d_fullres": ("3d_fullres",), "2d+3d_fullres": ("2d", "3d_fullres")}
    assert choose_candidate(scores, members) == "3d_fullres"
    scores["2d+3d_fullres"]["mean_foreground_dice"] = 0.90001
    assert choose_candidate(scores, members) == "2d+3d_fullres"
