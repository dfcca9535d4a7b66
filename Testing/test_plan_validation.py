"""Plans are input: every bad value a model folder's JSON can hold is a one-line error naming the
file, the key and the value, before anything is built; every real plan passes.

Model folders here hold only their JSON (no checkpoints): validation must refuse them before
any checkpoint is looked for.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_inference_predictor import LABELS, tiny_config, tiny_plans
from test_planning import CT_STATS, LIVER, acdc, heart, hippocampus, liver, uniform

from AutoSegLib.cli import main
from AutoSegLib.fileutil import write_json
from AutoSegLib.imageio import Geometry, write_image
from AutoSegLib.inference import ModelFolderError
from AutoSegLib.models.folder import ModelFolder
from AutoSegLib.planning import PlanningError, Plans, plan
from AutoSegLib.planning.validate import (
    MAX_ACTIVATIONS,
    MAX_PARAMETERS,
    configuration_problems,
    network_size,
    plans_problems,
)

REPO = Path(__file__).resolve().parents[1]
DATASET_JSON = {"channel_names": {"0": "MR0"}, "labels": LABELS, "numTraining": 4, "file_ending": ".nii.gz"}


def good_plans() -> dict:
    return tiny_plans({"3d_fullres": tiny_config((2.0, 1.0, 1.0), (8, 16, 16)),
                       "2d": tiny_config((1.0, 1.0), (16, 16))})


def model_folder(root: Path, plans, dataset: dict | None = None, inference_plan: dict | None = None) -> Path:
    model = root / "model"
    model.mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(plans))  # json.dumps writes NaN as NaN, as a damaged file may
    write_json(model / "dataset.json", dataset or DATASET_JSON)
    if inference_plan is not None:
        write_json(model / "inference_plan.json", inference_plan)
    return model


def setter(path: str, value):
    """Change ``a.b.c`` (list indices as numbers) of a plans dict."""
    def change(plans: dict) -> dict:
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        target = plans
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        return plans
    return change


def assert_one_line(message: str, *parts: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    for part in parts:
        assert part in message, (part, message)


# (change, key named, value named): the adversarial tester's findings first.
BAD_PLANS = {
    "zero spacing": (setter("configurations.3d_fullres.spacing", [0.0, 1.0, 1.0]),
                     "configurations.3d_fullres.spacing", "[0.0, 1.0, 1.0]"),
    "negative spacing": (setter("configurations.3d_fullres.spacing", [-2.0, 1.0, 1.0]),
                         "configurations.3d_fullres.spacing", "[-2.0, 1.0, 1.0]"),
    "NaN spacing": (setter("configurations.2d.spacing", [math.nan, 1.0]), "configurations.2d.spacing", "nan"),
    "transpose not a permutation": (setter("transpose_forward", [0, 0, 5]), "transpose_forward", "[0, 0, 5]"),
    "transpose_backward not the inverse": (setter("transpose_backward", [1, 2, 0]), "transpose_backward",
                                           "[1, 2, 0]"),
    "plans holding a list": (lambda plans: [1, 2], "(top level)", "[1, 2]"),
    "mirror axes out of range": (setter("configurations.3d_fullres.mirror_axes", [7, -9]),
                                 "configurations.3d_fullres.mirror_axes", "[7, -9]"),
    "huge features": (setter("configurations.3d_fullres.features_per_stage", [100000, 100000]),
                      "configurations.3d_fullres.features_per_stage", "[100000, 100000]"),
    "weights beyond any machine": (setter("configurations.3d_fullres.features_per_stage", [8192, 8192]),
                                   "configurations.3d_fullres.features_per_stage", "weights"),
    "activations beyond any machine": (
        lambda p: setter("configurations.3d_fullres.batch_size", 4000)(
            setter("configurations.3d_fullres.patch_size", [256, 512, 512])(p)),
        "configurations.3d_fullres", "activations"),
    "batch size 0": (setter("configurations.2d.batch_size", 0), "configurations.2d.batch_size", "0"),
    "float patch": (setter("configurations.2d.patch_size", [16.5, 16]), "configurations.2d.patch_size", "16.5"),
    "patch not divisible": (setter("configurations.2d.patch_size", [15, 16]), "configurations.2d.patch_size",
                            "[15, 16]"),
    "even kernel": (setter("configurations.2d.kernel_sizes.1", [4, 4]), "configurations.2d.kernel_sizes[1]",
                    "[4, 4]"),
    "stride of the wrong length": (setter("configurations.3d_fullres.strides.1", [2, 2]),
                                   "configurations.3d_fullres.strides[1]", "[2, 2]"),
    "decoder list too long": (setter("configurations.2d.n_conv_per_stage_decoder", [1, 1]),
                              "configurations.2d.n_conv_per_stage_decoder", "[1, 1]"),
    "unknown architecture": (setter("configurations.2d.network.architecture", "os.system"),
                             "configurations.2d.network.architecture", "'os.system'"),
    "unknown network option": (setter("configurations.2d.network.eval", "rm -rf"), "configurations.2d.network",
                               "['eval']"),
    "other normalization option": (setter("configurations.2d.network.norm", "BatchNorm"),
                                   "configurations.2d.network.norm", "'BatchNorm'"),
    "unknown normalization": (setter("configurations.2d.normalization_schemes", ["EvalNormalization"]),
                              "configurations.2d.normalization_schemes", "['EvalNormalization']"),
    "resampling order": (setter("configurations.2d.resampling.image_order", 9),
                         "configurations.2d.resampling.image_order", "9"),
    "unknown configuration": (setter("configurations.3d_evil", tiny_config((1.0, 1.0), (16, 16))),
                              "configurations", "['3d_evil']"),
    "number of classes": (setter("num_classes", 10 ** 9), "num_classes", "1000000000"),
    "CT without statistics": (
        lambda p: setter("foreground_intensity_properties_per_channel", {})(
            setter("configurations.2d.normalization_schemes", ["CTNormalization"])(p)),
        "foreground_intensity_properties_per_channel.0", "None"),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_a_bad_plans_value_is_one_line_naming_file_key_and_value(tmp_path, case):
    change, key, value = BAD_PLANS[case]
    model = model_folder(tmp_path, change(good_plans()))
    with pytest.raises(ModelFolderError) as caught:
        ModelFolder.open(model)
    assert_one_line(str(caught.value), str(model / "plans.json"), key, value)


@pytest.mark.parametrize("case", ["zero spacing", "transpose not a permutation", "mirror axes out of range",
                                  "huge features"])
def test_predict_refuses_a_bad_plan_with_exit_1_and_no_traceback(tmp_path, capsys, case):
    change, key, value = BAD_PLANS[case]
    model = model_folder(tmp_path, change(good_plans()))
    inputs = tmp_path / "in"
    geometry = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    write_image(np.zeros((6, 10, 12), np.float32), geometry, inputs / "c_0000.nii.gz")
    status = main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model), "-c", "3d_fullres"])
    captured = capsys.readouterr()
    assert status == 1
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if str(model / "plans.json") in line]
    assert len(errors) == 1, captured.err
    assert_one_line(errors[0], key, value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_predict_in_a_new_process_refuses_a_plans_file_holding_a_list(tmp_path):
    model = model_folder(tmp_path, [1, 2])
    (tmp_path / "in").mkdir()
    result = subprocess.run([sys.executable, "-m", "AutoSegLib", "predict", "-i", str(tmp_path / "in"), "-o",
                             str(tmp_path / "out"), "-m", str(model)], check=False, capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert_one_line(result.stderr.strip().splitlines()[-1], str(model / "plans.json"), "(top level)", "[1, 2]",
                    "not a list")


def test_a_cascade_in_a_model_folder_must_follow_a_planned_stage(tmp_path):
    plans = good_plans()
    plans["configurations"]["3d_cascade_fullres"] = tiny_config((2.0, 1.0, 1.0), (8, 16, 16),
                                                                previous_stage="3d_lowres")
    plans = tiny_plans(plans["configurations"])
    folder = ModelFolder.open(model_folder(tmp_path, plans))  # a work folder may plan 3d_lowres later
    with pytest.raises(ModelFolderError) as caught:
        folder.configuration("3d_cascade_fullres")
    assert_one_line(str(caught.value), "plans.json", "configurations.3d_cascade_fullres.previous_stage",
                    "'3d_lowres'", "not planned")
    assert folder.configuration("2d")["patch_size"] == [16, 16]


def test_mirror_axes_that_fit_are_kept(tmp_path):
    plans = setter("configurations.3d_fullres.mirror_axes", [1, 2])(good_plans())
    assert ModelFolder.open(model_folder(tmp_path, plans)).configuration("3d_fullres")["mirror_axes"] == [1, 2]


@pytest.mark.parametrize("dataset, key, value", [
    ({**DATASET_JSON, "channel_names": {"0": "MR0", "1": "MR1"}}, "channel_names", "2 channel(s) but plans.json"),
    ({**DATASET_JSON, "labels": {"background": 0, "organ": 1}}, "labels", "2 classes but plans.json"),
    ({**DATASET_JSON, "channel_names": {"0": 7}}, "'channel_names'", "{'0': 7}"),
    ({**DATASET_JSON, "numTraining": True}, "'numTraining'", "True"),
    ({**DATASET_JSON, "labels": {"background": 0, **{f"l{i}": i for i in range(1, 1200)}}}, "'labels'", "1200"),
])
def test_a_bad_dataset_json_is_named(tmp_path, dataset, key, value):
    model = model_folder(tmp_path, good_plans(), dataset=dataset)
    with pytest.raises(ModelFolderError) as caught:
        ModelFolder.open(model)
    assert_one_line(str(caught.value), str(model / "dataset.json"), key, value)


def test_a_bad_inference_plan_is_named(tmp_path):
    plan_json = {"version": 1, "configurations": ["2d", "2d"], "folds": [0, "seven"]}
    model = model_folder(tmp_path, good_plans(), inference_plan=plan_json)
    with pytest.raises(ModelFolderError) as caught:
        ModelFolder.open(model)
    assert_one_line(str(caught.value), str(model / "inference_plan.json"), "['2d', '2d']", "'seven'")


# -- every real plan passes -----------------------------------------------------------------------
@pytest.mark.parametrize("make", [heart, hippocampus, liver, acdc])
def test_the_planners_plans_for_the_reference_datasets_pass(make):
    data = make().to_dict()
    assert plans_problems(data) == []
    assert Plans.from_dict(json.loads(json.dumps(data))).to_dict() == data


def test_a_plan_for_an_80_gb_gpu_passes():
    big = plan(uniform(**LIVER, intensity=CT_STATS), {0: "CT"}, {"background": 0, "liver": 1, "cancer": 2},
               gpu_memory_gb=80)
    assert plans_problems(big.to_dict()) == []


def v2_config(patch, features, encoder, batch, architecture="PlainConvUNet") -> dict:
    dims, n = len(patch), len(features)
    strides = [[1] * dims] + [[2] * dims] * (n - 1)
    config = tiny_config([1.0] * dims, patch, batch_size=batch, strides=strides, kernel_sizes=[[3] * dims] * n,
                         features_per_stage=features, n_conv_per_stage_encoder=encoder,
                         n_conv_per_stage_decoder=[2] * (n - 1))
    config["network"] = {"architecture": architecture}
    return config


@pytest.mark.parametrize("name, config", [
    ("3d 320^3, 7 stages", v2_config([320, 320, 320], [32, 64, 128, 256, 320, 320], [2] * 6, 2)),
    ("3d ResEnc XL-like", v2_config([192, 192, 192], [32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6], 2,
                                    "ResidualEncoderUNet")),
    ("2d 512x512, 8 stages", v2_config([512, 512], [32, 64, 128, 256, 512, 512, 512, 512], [2] * 8, 12)),
    ("2d small patch, batch 366", v2_config([56, 40], [32, 64, 128], [2] * 3, 366)),
    ("2d 1024x1024, batch 16", v2_config([1024, 1024], [32, 64, 128, 256, 512, 512, 512, 512, 512], [2] * 9, 16)),
])
def test_nnunet_v2_sized_configurations_pass(name, config):
    assert configuration_problems("3d_fullres" if len(config["patch_size"]) == 3 else "2d", config, 1, None, 3) == []
    weights, activations = network_size(config, 1, 3)
    assert weights < MAX_PARAMETERS / 5 and activations < MAX_ACTIVATIONS / 5  # well inside the limits


def test_the_network_size_estimate_counts_the_real_weights():
    torch = pytest.importorskip("torch")  # noqa: F841
    from AutoSegLib.network import build_network
    from AutoSegLib.network.registry import count_parameters

    for make in (heart, hippocampus):
        for name, config in make().to_dict()["configurations"].items():
            weights, _ = network_size(config, 1, 3)
            real = count_parameters(build_network(config, 1, 3))
            assert 0.9 < weights / real < 1.1, (name, weights, real)


def test_plans_from_dict_names_every_problem_on_one_line():
    data = good_plans()
    data["configurations"]["2d"]["spacing"] = [0, 1]
    data["transpose_forward"] = [0, 0, 5]
    with pytest.raises(PlanningError) as caught:
        Plans.from_dict(copy.deepcopy(data))
    assert_one_line(str(caught.value), "transpose_forward: [0, 0, 5]", "configurations.2d.spacing: [0, 1]")
