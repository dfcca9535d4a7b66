"""The faster CPU options of ``autoseg predict``: --fast, --tta-axes, --step (what they do and say)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from AutoSegLib import cli
from AutoSegLib.inference.predictor import Predictor
from test_inference_predictor import blob_image, oblique_geometry
from test_predict_pipeline import model_dir, one_thread, write_cases  # noqa: F401 (fixtures)


def speed(**given):
    args = argparse.Namespace(**{"no_tta": False, "tta_axes": None, "step": None, "fast": False, **given})
    return cli.prediction_speed(args)


def test_fast_fills_in_what_the_other_options_leave_unset():
    assert speed() == (True, None, 0.5)
    assert speed(fast=True) == (True, cli.FAST_TTA_AXES, cli.FAST_STEP)
    assert speed(fast=True, step=0.6) == (True, cli.FAST_TTA_AXES, 0.6)
    assert speed(fast=True, tta_axes=[0]) == (True, (0,), cli.FAST_STEP)
    assert speed(fast=True, no_tta=True) == (False, None, cli.FAST_STEP)
    with pytest.raises(ValueError, match="contradict"):
        speed(no_tta=True, tta_axes=[1])


def test_tta_axes_are_image_axes_mapped_through_the_plans_transpose(model_dir):
    three_d = Predictor.from_model_dir(model_dir, "3d_fullres", device="cpu", tta_axes=(0, 2))
    two_d = Predictor.from_model_dir(model_dir, "2d", device="cpu", tta_axes=(0, 2))
    assert three_d.mirror_axes(three_d.stages[0].config) == (0, 2)
    assert two_d.mirror_axes(two_d.stages[0].config) == (1,)  # a 2D patch holds image axes 1 and 2
    three_d.model.plans.transpose_forward = [2, 0, 1]  # planning axis a is image axis transpose[a]
    assert three_d.mirror_axes(three_d.stages[0].config) == (0, 1)
    assert Predictor.from_model_dir(model_dir, "3d_fullres", device="cpu").mirror_axes(
        three_d.stages[0].config) == (0, 1, 2)
    with pytest.raises(ValueError, match="image axes 0, 1, 2"):
        Predictor.from_model_dir(model_dir, "3d_fullres", device="cpu", tta_axes=(3,))


def test_every_axis_is_the_default_and_no_axis_is_no_tta(model_dir):
    image, geometry = blob_image((10, 20, 18)), oblique_geometry()

    def probabilities(**options):
        predictor = Predictor.from_model_dir(model_dir, "3d_fullres", device="cpu", **options)
        return predictor.predict([image], geometry, return_probabilities=True)[1]

    default = probabilities()
    np.testing.assert_array_equal(probabilities(tta_axes=(0, 1, 2)), default)
    np.testing.assert_array_equal(probabilities(tta_axes=()), probabilities(tta=False))
    assert np.abs(probabilities(tta_axes=(2,)) - default).max() > 1e-4  # fewer mirrors: a different mean


def test_fast_says_what_it_does(tmp_path, model_dir, capsys):
    inputs = write_cases(tmp_path / "in", ["a"])
    capsys.readouterr()
    status = cli.main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model_dir),
                       "-c", "3d_fullres", "--device", "cpu", "--fast", "--events"])
    assert status == 0
    logs = [json.loads(line)["message"] for line in capsys.readouterr().out.splitlines()
            if json.loads(line)["event"] == "log"]
    axes = ", ".join(map(str, cli.FAST_TTA_AXES))
    assert any(f"(TTA on, image axes {axes} only, step {cli.FAST_STEP})" in line for line in logs), logs


def test_help_states_the_measured_cost(capsys):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--fast", "--tta-axes", "--step", "--no-tta"):
        assert option in text
    assert "MEASURE" not in text and "Dice" in text and "2026-12-03" in text
