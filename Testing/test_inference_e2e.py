"""Train a tiny model for two iterations, then predict and validate with it, as a user would.

The network is tiny (patch 16x32x32, 3 stages of 4-16 features) and barely trained: the
test is about the pipeline's contracts (files, names, geometry, events), not accuracy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from AutoSegLib import cli
from AutoSegLib.fileutil import read_json, write_json
from AutoSegLib.imageio import read_header
from AutoSegLib.inference import validate_fold
from AutoSegLib.inference.validation import validation_checkpoint
from AutoSegLib.models.folder import ModelFolderError
from conftest import TINY

CONFIG = "3d_fullres"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Five CT phantoms (+1 test case), tiny 3d_fullres plan, fold 0 trained 1 epoch x 2 iterations."""
    root = tmp_path_factory.mktemp("e2e")
    dataset, work = root / "DS", root / "WORK"
    before = torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    try:
        quiet = ["--events"]
        assert cli.main(["make-phantoms", str(dataset), "--cases", "5", "--test-cases", "1", "--seed", "1",
                         *quiet]) == 0
        assert cli.main(["plan-and-preprocess", str(dataset), "-w", str(work), "-c", CONFIG, *quiet]) == 0
        plans = read_json(work / "plans.json")
        plans["configurations"][CONFIG].update(TINY)
        write_json(work / "plans.json", plans)
        assert cli.main(["train", str(dataset), CONFIG, "0", "-w", str(work), "--epochs", "1",
                         "--iterations-per-epoch", "2", "--device", "cpu", "--num-workers", "0", *quiet]) == 0
        yield dataset, work
    finally:
        mp.undo()
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


def test_predict_with_a_trained_model_folder(trained, tmp_path, capsys):
    dataset, work = trained
    out = tmp_path / "pred"
    capsys.readouterr()
    status = cli.main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "-m", str(work / "model"),
                       "-f", "0", "--no-tta", "--device", "cpu", "--uncertainty", "--events"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 0 and events[-1]["event"] == "done", events
    images = sorted((dataset / "imagesTs").iterdir())
    assert len(images) == 1
    case_id = images[0].name[: -len("_0000.nii.gz")]
    assert sorted(p.name for p in out.iterdir()) == [f"{case_id}.nii.gz", f"{case_id}_uncertainty.nii.gz"]
    source, labels = read_header(images[0]), read_header(out / f"{case_id}.nii.gz")
    assert labels.shape == source.shape and labels.geometry == source.geometry


def test_validate_fold_predicts_the_validation_cases_with_probabilities(trained):
    dataset, work = trained
    fold_dir = work / "model" / CONFIG / "fold_0"
    val_ids = read_json(work / "splits_final.json")[0]["val"]
    try:
        from AutoSegLib.evaluation import evaluate_folders  # noqa: F401  (written in parallel)
        has_evaluation = True
    except ImportError:
        has_evaluation = False
    if has_evaluation:
        summary = validate_fold(work, dataset, CONFIG, 0, device="cpu", tta=False)
        assert isinstance(summary, dict) and (fold_dir / "validation" / "summary.json").is_file()
    else:
        with pytest.raises(ImportError):
            validate_fold(work, dataset, CONFIG, 0, device="cpu", tta=False)
    found = sorted(p.name for p in (fold_dir / "validation").iterdir() if p.name != "summary.json")
    assert found == sorted([f"{c}.nii.gz" for c in val_ids] + [f"{c}.npz" for c in val_ids])
    for case_id in val_ids:
        label = read_header(dataset / "labelsTr" / f"{case_id}.nii.gz")
        prediction = read_header(fold_dir / "validation" / f"{case_id}.nii.gz")
        assert prediction.shape == label.shape and prediction.geometry == label.geometry
        probabilities = np.load(fold_dir / "validation" / f"{case_id}.npz")["probabilities"]
        assert probabilities.dtype == np.float16 and probabilities.shape == (6, *label.shape)


def test_validation_falls_back_to_best_and_names_what_is_missing(tmp_path):
    fold = tmp_path / "fold_0"
    fold.mkdir()
    (fold / "checkpoint_best.pt").write_bytes(b"x")
    assert validation_checkpoint(fold) == "best"
    (fold / "checkpoint_best.pt").unlink()
    (fold / "checkpoint_latest.pt").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="found: checkpoint_latest.pt"):
        validation_checkpoint(fold)
