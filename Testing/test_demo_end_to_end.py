"""``autoseg demo`` end to end: the quick preset on CPU trains a usable model on CT phantoms.

The one long test (7-10 minutes on 2 cores; marked ``demo``, so ``python -m pytest Testing`` leaves
it out and ``python -m pytest Testing -m demo`` runs it, as .ci/run does): phantoms -> verify -> plan ->
preprocess -> train ``3d_cpu`` with the quick preset -> predict the held-out cases -> evaluate.
It checks what a user of the demo is promised: every stage runs, training reaches a mean
foreground pseudo-Dice of at least 0.8, and the predictions of cases it never saw score a
mean foreground Dice of at least 0.8 in the original geometry of each input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from AutoSegLib.demo import DEMO_EPOCHS
from AutoSegLib.imageio import read_header
from AutoSegLib.training.schedule import QUICK

pytestmark = pytest.mark.demo

STAGES = ["make-phantoms", "verify", "plan", "preprocess", "train", "predict", "evaluate"]


def test_demo_trains_a_model_that_segments_held_out_phantoms(tmp_path):
    work = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "AutoSegLib", "demo", "-w", str(work), "--events"],
                            capture_output=True, text=True, timeout=1500, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    done = events[-1]
    assert done["event"] == "done" and done["stage"] == "demo"
    assert done["stages"] == {name: "done" for name in STAGES}
    assert "AutoSeg demo results" in result.stderr

    # issue 5: the quick preset on CPU reaches a mean foreground pseudo-Dice >= 0.8
    assert done["mean_pseudo_dice"] >= 0.8, done["pseudo_dice"]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert epochs and all("eta_s" in e and "pseudo_dice" in e for e in epochs)
    # the demo's own length, a quarter of the quick preset's, keeps it to a few minutes
    assert [(e["done"], e["of"]) for e in epochs] == [(n, DEMO_EPOCHS) for n in range(1, DEMO_EPOCHS + 1)]
    assert DEMO_EPOCHS < QUICK.epochs

    # issue 6: held-out cases, whole images through the predictor, scored in their own geometry
    assert done["mean_dice"] >= 0.8, done["dice"]
    dataset = work / "Dataset001_PhantomCT"
    inputs = sorted((dataset / "imagesTs").glob("*_0000.nii.gz"))
    assert len(inputs) >= 2
    for image in inputs:
        case = image.name[: -len("_0000.nii.gz")]
        prediction = work / "predictions" / f"{case}.nii.gz"
        uncertainty = work / "predictions" / f"{case}_uncertainty.nii.gz"
        assert prediction.is_file() and uncertainty.is_file()
        expected, got = read_header(image), read_header(prediction)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.geometry.spacing, expected.geometry.spacing, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.geometry.origin, expected.geometry.origin, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.geometry.direction), np.asarray(expected.geometry.direction),
                                   rtol=0, atol=1e-6)
    summary = json.loads((work / "predictions" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(inputs)
