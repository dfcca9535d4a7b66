"""The clinician's loop through the module's logic, with real engine processes and a tiny network:
train -> predict -> segmentation in the scene -> add the corrected case -> fine-tune.

Skipped when the engine has no ``predict`` command. About a minute on a 2-core machine.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from AutoSegLib.dataset import load_spec
from AutoSegLogic import commands, labels, testing, volumes
from AutoSegLogic.session import Session

pytestmark = pytest.mark.skipif(not commands.engine_flags("predict"), reason="the engine has no predict command yet")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_RUN = ["--epochs", "2", "--iterations-per-epoch", "2", "--device", "cpu", "--num-workers", "1"]


def segment_names(node) -> list[str]:
    content = node.GetSegmentation()
    return [content.GetNthSegment(i).GetName() for i in range(content.GetNumberOfSegments())]


def test_train_predict_review_add_and_fine_tune(work_copy, scene):
    dataset, work = work_copy
    session = Session(scene, env=ENV, log_dir=work / "logs")
    train = session.start_steps([commands.Step(["train", str(dataset), "3d_fullres", "0", "-w", str(work), *TINY_RUN],
                                               "train fold 0")])
    testing.wait_until(session, timeout=180)
    assert train.succeeded, train.job.failure + "\n" + train.job.log_tail()
    assert session.curves.rows == 2

    # a new patient, scanned obliquely: predict it
    (volume,), truth = testing.phantom_case(scene, seed=5, index=3, name="new patient")
    nodes_before = scene.GetNumberOfNodes()
    job = session.start_prediction([volume], work / "model", "3d_fullres", ["0"], tta=False, device="cpu")
    testing.wait_until(session, timeout=180)
    assert job.succeeded, job.failure + "\n" + job.log_tail()
    result = session.prediction_result
    model_labels = load_spec(work / "model").labels
    assert segment_names(result.segmentation) == [n for n, _ in labels.foreground(model_labels)]
    assert result.segmentation.GetNodeReference("referenceImageGeometryRef") is volume
    assert np.allclose(volumes.ijk_to_ras(result.uncertainty), volumes.ijk_to_ras(volume))
    values = volumes.array_from_node(result.uncertainty)
    assert values.shape == volumes.array_from_node(volume).shape and 0 <= values.min() and values.max() <= 1
    engine = job.find("predict")
    assert not os.path.exists(engine.args[engine.args.index("-i") + 1])  # the exported input is cleaned up
    assert scene.GetNumberOfNodes() > nodes_before

    # the clinician corrects it (here: the ground truth stands in for the correction) and adds it
    splits_before = json.loads((work / "splits_final.json").read_text())
    result_, placed = session.add_case(dataset, [volume], truth, work=work)
    assert result_.case_ids == ["new_patient"] and list(placed) == ["new_patient"]
    splits_after = json.loads((work / "splits_final.json").read_text())
    for old, new in zip(splits_before, splits_after):
        assert set(old["val"]) <= set(new["val"])

    # fine-tune fold 0 from its weights on the grown dataset
    assert "--init-from" in commands.engine_flags("train")
    chain = session.start_fine_tune(dataset, "3d_fullres", work, ["0"], device="cpu", epochs=1,
                                    iterations_per_epoch=2)
    testing.wait_until(session, timeout=180)
    assert chain.succeeded, chain.job.failure + "\n" + chain.job.log_tail()
    assert [s.args[0] for s in chain.steps] == ["preprocess", "train"]


def test_a_failed_prediction_loads_nothing(tmp_path, scene):
    model = tmp_path / "model"
    model.mkdir()
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                    "numTraining": 1, "file_ending": ".nii.gz"}))
    # a fold that looks finished, so the job starts (the configuration rule checks only what exists)
    # and the engine process fails (no plans.json, a checkpoint that is not one)
    (model / "3d_fullres" / "fold_0").mkdir(parents=True)
    (model / "3d_fullres" / "fold_0" / "checkpoint_final.pt").write_bytes(b"not a checkpoint")
    (volume,), _ = testing.phantom_case(scene, seed=5, index=0)
    session = Session(scene, env=ENV, log_dir=tmp_path / "logs")
    before = scene.GetNumberOfNodes()
    job = session.start_prediction([volume], model, "3d_fullres", ["0"], tta=False, device="cpu")
    testing.wait_until(session, timeout=120)
    assert job.status == "failed" and job.failure
    assert session.prediction_result is None and scene.GetNumberOfNodes() == before
    # a model with nothing trained is refused before any process starts, naming what is missing
    (model / "3d_fullres" / "fold_0" / "checkpoint_final.pt").unlink()
    with pytest.raises(ValueError, match="no checkpoint_final.pt"):
        session.start_prediction([volume], model, "3d_fullres", ["0"], tta=False, device="cpu")
    assert scene.GetNumberOfNodes() == before
