"""The predictor on hand-made model folders: geometry, ensembles, cascade, postprocessing, errors.

Model folders are written in code: a tiny plan (2 stages of 4-8 features), random weights
saved as real checkpoints. Nothing here needs a trained network: what is tested is where
the numbers go, not how good they are.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.fileutil import write_json
from AutoSegLib.imageio import Geometry
from AutoSegLib.inference import InputError, ModelCheckpointError, ModelFolderError, Predictor
from AutoSegLib.inference.probabilities import labels_from_probabilities
from AutoSegLib.models.folder import read_inference_plan
from AutoSegLib.network import build_network
from AutoSegLib.models.checkpoint import CheckpointError, save_checkpoint

LABELS = {"background": 0, "organ": 1, "tumour": 2}
RESAMPLING = {"image_order": 3, "label_order": 1, "label_encoding": "one_hot", "separate_z_anisotropy_threshold": 3.0,
              "out_of_plane_order": 0, "separate_z_for_typical_case": False}


def tiny_config(spacing, patch, **extra) -> dict:
    dims = len(patch)
    return {"spacing": list(spacing), "patch_size": list(patch), "batch_size": 2,
            "median_image_size_in_voxels": list(patch), "strides": [[1] * dims, [2] * dims],
            "kernel_sizes": [[3] * dims] * 2, "features_per_stage": [4, 8], "n_conv_per_stage_encoder": [1, 1],
            "n_conv_per_stage_decoder": [1], "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "resampling": dict(RESAMPLING),
            "network": {"architecture": "PlainConvUNet"}, **extra}


def tiny_plans(configurations: dict, channels: int = 1) -> dict:
    for config in configurations.values():
        config["normalization_schemes"] = ["ZScoreNormalization"] * channels
        config["use_mask_for_norm"] = [False] * channels
    return {"version": 1, "dataset_name": "Tiny", "gpu_memory_gb": 8.0, "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "num_training_cases": 4,
            "channel_names": {str(c): f"MR{c}" for c in range(channels)}, "labels": LABELS, "num_classes": 3,
            "original_median_spacing": [2.0, 1.0, 1.0], "original_median_shape": [12, 24, 24],
            "foreground_intensity_properties_per_channel": {
                str(c): {"mean": 0.0, "std": 1.0, "median": 0.0, "min": -3.0, "max": 3.0, "percentile_00_5": -2.5,
                         "percentile_99_5": 2.5} for c in range(channels)},
            "configurations": configurations}


def save_weights(model: Path, name: str, fold, config: dict, in_channels: int, seed: int,
                 kinds=("final",)) -> None:
    torch.manual_seed(seed)
    net = build_network(config, in_channels, len(LABELS))
    for kind in kinds:
        save_checkpoint(model / name / f"fold_{fold}" / f"checkpoint_{kind}.pt",
                        {"network_weights": net.state_dict(), "epoch": 1})


def make_model_folder(root: Path, configurations: dict | None = None, folds=(0, 1), channels: int = 1,
                      inference_plan: dict | None = None) -> Path:
    """WORK/model with the given (default: tiny 3d_fullres and 2d) configurations, folds trained."""
    configurations = configurations or {"3d_fullres": tiny_config((2.0, 1.0, 1.0), (8, 16, 16)),
                                        "2d": tiny_config((1.0, 1.0), (16, 16))}
    model = root / "model"
    model.mkdir(parents=True)
    write_json(model / "plans.json", tiny_plans(configurations, channels))
    write_json(model / "dataset.json", {"channel_names": {str(c): f"MR{c}" for c in range(channels)},
                                        "labels": LABELS, "numTraining": 4, "file_ending": ".nii.gz"})
    fg = len(LABELS) - 1
    for i, (name, config) in enumerate(configurations.items()):
        in_channels = channels + (fg if config.get("previous_stage") else 0)
        for fold in folds:
            save_weights(model, name, fold, config, in_channels, seed=10 * i + (fold if fold != "all" else 9))
    if inference_plan is not None:
        write_json(model / "inference_plan.json", inference_plan)
    return model


def oblique_geometry(spacing=(3.0, 0.8, 1.1)) -> Geometry:
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([1, -1, 1])
    return Geometry(tuple(spacing), (-12.5, 40.25, 7.0), tuple(rot.ravel()))


def blob_image(shape=(11, 23, 19), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return (100 * (z ** 2 + y ** 2 + x ** 2 < 0.5) + rng.normal(0, 10, shape) + 50).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- in-memory prediction ----------------------------------------------------------------------
@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_prediction_is_on_the_input_grid_for_anisotropic_oblique_images(model_dir, configuration):
    predictor = Predictor.from_model_dir(model_dir, configuration, device="cpu", tta=False)
    image = blob_image()
    labels, probabilities = predictor.predict([image], oblique_geometry(), return_probabilities=True)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert probabilities.shape == (3, *image.shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, probabilities.argmax(0))
    assert predictor.predict([image], oblique_geometry())[1] is None


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_labels_without_probabilities_are_the_argmax_of_the_probabilities(model_dir, configuration):
    # Without probabilities the labels are restored a class at a time (restore_labels): the
    # same labels as the argmax of the restored probabilities.
    predictor = Predictor.from_model_dir(model_dir, configuration, device="cpu", tta=False)
    image = blob_image((14, 31, 27), seed=3)
    labels, none = predictor.predict([image], oblique_geometry())
    probabilities = predictor.predict_probabilities([image], oblique_geometry())
    assert none is None and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, probabilities.argmax(0))


def test_labels_of_many_classes_are_taken_a_slab_at_a_time_and_equal_numpys_argmax():
    rng = np.random.default_rng(0)
    probabilities = rng.random((3, 20, 512, 512), dtype=np.float32)  # 5 Mi voxels: two slabs
    probabilities[2, 10:] = probabilities[1, 10:]  # exact ties: the lower class wins
    labels = labels_from_probabilities(probabilities)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, probabilities.argmax(0))
    assert labels_from_probabilities(rng.random((300, 2, 3, 4))).dtype == np.uint16


def test_3d_network_predicts_in_channels_last_layout_with_the_same_result(model_dir):
    predictor = Predictor.from_model_dir(model_dir, "3d_fullres", folds=[0], device="cpu", tta=False)
    network = predictor.stages[0].network
    assert network.encoder.stages[0][0].convs[0].conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    image = blob_image()
    fast = predictor.predict_probabilities([image], oblique_geometry())
    network.to(memory_format=torch.contiguous_format)
    plain = predictor.predict_probabilities([image], oblique_geometry())
    np.testing.assert_allclose(fast, plain, atol=1e-5)


def test_progress_covers_every_fold_and_ends_at_one(model_dir):
    fractions = []
    predictor = Predictor.from_model_dir(model_dir, "3d_fullres", folds=[0, 1], device="cpu", tta=False)
    predictor.predict([blob_image()], oblique_geometry(), progress=fractions.append)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(f == 0.5 for f in fractions)  # the first of two folds done: half the work


def test_gpu_out_of_memory_predicts_again_with_accumulators_in_host_memory(model_dir, monkeypatch):
    # The decision and the retry are device-independent code; the GPU is played by a stand-in
    # whose first attempt runs out of memory halfway, as a large image's accumulators would.
    predictor = Predictor.from_model_dir(model_dir, "3d_fullres", folds=[0, 1], device="cpu", tta=False)
    expected = predictor.predict_probabilities([blob_image()], oblique_geometry())
    real, attempts = Predictor._fold_mean_on, []

    def on_a_small_gpu(self, stage, data, passes, accumulators):
        attempts.append(accumulators.type)
        if accumulators.type == "cuda":
            passes.next_pass()(1, 2)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 11.72 GiB")
        self.device = torch.device("cpu")
        try:
            return real(self, stage, data, passes, accumulators)
        finally:
            self.device = torch.device("cuda")

    monkeypatch.setattr(Predictor, "_fold_mean_on", on_a_small_gpu)
    predictor.device = torch.device("cuda")
    fractions = []
    got = predictor.predict_probabilities([blob_image()], oblique_geometry(), progress=fractions.append)
    assert attempts == ["cuda", "cpu"] and predictor.host_accumulator_fallbacks == 1
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # never back, even when repeated


def test_an_out_of_memory_error_on_the_cpu_is_not_retried(model_dir, monkeypatch):
    predictor = Predictor.from_model_dir(model_dir, "3d_fullres", folds=[0], device="cpu", tta=False)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(Predictor, "_fold_mean_on", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        predictor.predict([blob_image()], oblique_geometry())
    assert predictor.host_accumulator_fallbacks == 0


def test_folds_are_ensembled_by_averaging_probabilities(model_dir):
    image, geometry = blob_image(), oblique_geometry()
    both = Predictor.from_model_dir(model_dir, "3d_fullres", folds=[0, 1], device="cpu", tta=False)
    single = [Predictor.from_model_dir(model_dir, "3d_fullres", folds=[f], device="cpu", tta=False) for f in (0, 1)]
    assert both.stages[0].folds == [0, 1]
    mean = (single[0].predict_probabilities([image], geometry) + single[1].predict_probabilities([image], geometry)) / 2
    np.testing.assert_allclose(both.predict_probabilities([image], geometry), mean, atol=1e-5)


def test_default_folds_are_every_trained_fold(model_dir):
    assert Predictor.from_model_dir(model_dir, "2d", device="cpu").stages[0].folds == [0, 1]


def test_tta_changes_the_prediction_of_an_untrained_network(model_dir):
    image, geometry = blob_image(), oblique_geometry()
    plain = Predictor.from_model_dir(model_dir, "3d_fullres", folds=[0], device="cpu", tta=False)
    tta = Predictor.from_model_dir(model_dir, "3d_fullres", folds=[0], device="cpu", tta=True)
    assert not np.allclose(plain.predict_probabilities([image], geometry), tta.predict_probabilities([image], geometry))


def test_inference_plan_ensembles_two_configurations_and_postprocesses(tmp_path, monkeypatch):
    plan = {"version": 1, "configurations": ["3d_fullres", "2d"], "folds": [0], "checkpoint": "final",
            "postprocessing": {"largest_component_foreground": True, "largest_component_classes": []},
            "scores": {"ignored": True}}
    model = make_model_folder(tmp_path, folds=(0,), inference_plan=plan)
    calls = []

    def apply_postprocessing(labels, spec):
        calls.append(spec)
        return np.zeros_like(labels)

    monkeypatch.setitem(sys.modules, "AutoSegLib.postprocessing",
                        types.SimpleNamespace(apply_postprocessing=apply_postprocessing))
    image, geometry = blob_image(), oblique_geometry()
    predictor = Predictor.from_model_dir(model, device="cpu", tta=False)
    assert predictor.configurations == ["3d_fullres", "2d"]
    parts = [Predictor.from_model_dir(model, c, device="cpu", tta=False).predict_probabilities([image], geometry)
             for c in ("3d_fullres", "2d")]
    labels, probabilities = predictor.predict([image], geometry, return_probabilities=True)
    np.testing.assert_allclose(probabilities, (parts[0] + parts[1]) / 2, atol=1e-5)
    assert calls == [plan["postprocessing"]] and not labels.any()


def test_postprocessing_is_not_imported_when_the_plan_asks_for_none(tmp_path, monkeypatch):
    plan = {"version": 1, "configurations": ["2d"], "folds": ["0"],
            "postprocessing": {"largest_component_foreground": False, "largest_component_classes": []}}
    model = make_model_folder(tmp_path, folds=(0,), inference_plan=plan)
    monkeypatch.setitem(sys.modules, "AutoSegLib.postprocessing", None)  # importing it would fail
    labels, _ = Predictor.from_model_dir(model, device="cpu", tta=False).predict([blob_image()], oblique_geometry())
    assert labels.shape == blob_image().shape


def test_an_explicit_configuration_ignores_the_inference_plan(tmp_path):
    plan = {"version": 1, "configurations": ["2d"], "folds": [0],
            "postprocessing": {"largest_component_foreground": True}}
    model = make_model_folder(tmp_path, folds=(0, 1), inference_plan=plan)
    predictor = Predictor.from_model_dir(model, "3d_fullres", device="cpu")
    assert predictor.configurations == ["3d_fullres"] and predictor.stages[0].folds == [0, 1]
    assert predictor.postprocessing is None


def test_without_an_inference_plan_two_trained_configurations_need_a_choice(model_dir):
    with pytest.raises(ModelFolderError) as info:
        Predictor.from_model_dir(model_dir, device="cpu")
    assert "-c 2d or -c 3d_fullres" in str(info.value) and "find-best" in str(info.value)


def test_without_an_inference_plan_the_only_trained_configuration_is_used(tmp_path):
    model = make_model_folder(tmp_path, {"2d": tiny_config((1.0, 1.0), (16, 16))}, folds=("all",))
    predictor = Predictor.from_model_dir(model, device="cpu")
    assert predictor.configurations == ["2d"] and predictor.stages[0].folds == ["all"]
    assert predictor.choice.reason == "the only trained configuration"


def test_an_inference_plan_with_problems_is_refused_naming_them(tmp_path):
    path = tmp_path / "inference_plan.json"
    path.write_text(json.dumps({"version": 2, "configurations": [], "folds": [], "checkpoint": "newest"}))
    with pytest.raises(ModelFolderError) as info:
        read_inference_plan(path)
    text = str(info.value)
    assert "inference_plan.json" in text and "version 2" in text and "'configurations'" in text
    assert "'folds'" in text and "newest" in text


# -- cascade ------------------------------------------------------------------------------------
def test_cascade_feeds_the_low_resolution_segmentation_as_one_hot_channels(tmp_path):
    configurations = {
        "3d_lowres": tiny_config((4.0, 2.0, 2.0), (8, 16, 16), next_stage="3d_cascade_fullres"),
        "3d_cascade_fullres": tiny_config((2.0, 1.0, 1.0), (8, 16, 16), previous_stage="3d_lowres"),
    }
    model = make_model_folder(tmp_path, configurations, folds=(0,))
    predictor = Predictor.from_model_dir(model, "3d_cascade_fullres", device="cpu", tta=False)
    stage = predictor.stages[0]
    assert stage.previous.name == "3d_lowres"
    assert stage.weights[0]["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 1 + 2  # image + 2 foreground
    seen = []

    def lowres(x):  # label 1 where the normalized image is bright, 2 nowhere
        return torch.cat([torch.zeros_like(x), 10 * x, torch.full_like(x, -100)], 1)

    def cascade(x):  # copies its one-hot input channels into the classes
        seen.append(x.shape[1])
        return torch.cat([torch.full_like(x[:, :1], 0.5), 10 * x[:, 1:]], 1)

    stage.previous.network, stage.network = lowres, cascade
    image, geometry = blob_image((12, 24, 26)), Geometry.identity((2.0, 1.0, 1.0))
    labels, _ = predictor.predict([image], geometry)
    low = Predictor.from_model_dir(model, "3d_lowres", device="cpu", tta=False)
    low.stages[0].network = lowres
    low_labels, _ = low.predict([image], geometry)
    assert set(seen) == {3} and low_labels.any() and not (low_labels == 2).any()
    assert np.mean(labels == low_labels) > 0.97  # equal up to resampling at the borders


# -- errors -------------------------------------------------------------------------------------
def test_wrong_number_of_channels_is_refused(model_dir):
    predictor = Predictor.from_model_dir(model_dir, "2d", device="cpu")
    with pytest.raises(InputError, match=r"takes 1 channel\(s\) \(MR0\), got 2"):
        predictor.predict([blob_image(), blob_image()], oblique_geometry())
    with pytest.raises(InputError, match="3D"):
        predictor.predict([np.zeros((4, 5))], Geometry.identity((1.0, 1.0)))


@pytest.mark.parametrize("missing", ["plans.json", "dataset.json"])
def test_a_model_folder_without_its_json_is_refused(tmp_path, missing):
    model = make_model_folder(tmp_path, folds=(0,))
    (model / missing).unlink()
    with pytest.raises(ModelFolderError, match=f"{missing} missing"):
        Predictor.from_model_dir(model, device="cpu")
    with pytest.raises(ModelFolderError, match="not found"):
        Predictor.from_model_dir(tmp_path / "nowhere", device="cpu")


def test_missing_fold_or_checkpoint_lists_what_exists(tmp_path):
    model = make_model_folder(tmp_path, folds=(0,))
    save_weights(model, "3d_fullres", 1, tiny_config((2.0, 1.0, 1.0), (8, 16, 16)), 1, 0, kinds=("latest",))
    with pytest.raises(ModelFolderError) as info:
        Predictor.from_model_dir(model, "3d_fullres", folds=[0, 3], device="cpu")
    assert "fold(s) [3]" in str(info.value) and "fold_0: final" in str(info.value)
    assert "fold_1: latest" in str(info.value)
    with pytest.raises(ModelFolderError, match="checkpoint_best.pt.*fold_0: final"):
        Predictor.from_model_dir(model, "3d_fullres", checkpoint="best", device="cpu")
    with pytest.raises(ModelFolderError, match="'3d_lowres' is not planned; planned: 3d_fullres, 2d"):
        Predictor.from_model_dir(model, "3d_lowres", device="cpu")
    assert Predictor.from_model_dir(model, "3d_fullres", folds=["1"], checkpoint="latest",
                                    device="cpu").stages[0].folds == [1]


def test_corrupt_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path):
    model = make_model_folder(tmp_path, folds=(0,))
    path = model / "2d" / "fold_0" / "checkpoint_final.pt"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ModelCheckpointError) as info:
        Predictor.from_model_dir(model, "2d", device="cpu")
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ReportedFailure)
    assert str(path) in str(info.value) and "corrupt or truncated" in str(info.value)


def test_checkpoint_of_another_network_is_refused(tmp_path):
    model = make_model_folder(tmp_path, folds=(0,))
    other = tiny_config((1.0, 1.0), (16, 16), features_per_stage=[4, 16])
    save_weights(model, "2d", 0, other, 1, 0)
    with pytest.raises(ModelCheckpointError, match="does not fit the network of .*plans.json"):
        Predictor.from_model_dir(model, "2d", device="cpu")


def test_bad_step_and_device_are_refused(model_dir):
    with pytest.raises(ValueError, match="step"):
        Predictor.from_model_dir(model_dir, "2d", device="cpu", step=1.5)
    with pytest.raises(ValueError, match="unknown device"):
        Predictor.from_model_dir(model_dir, "2d", device="tpu")


def test_fold_all_and_the_real_postprocessing(tmp_path):
    plan = {"version": 1, "configurations": ["3d_fullres"], "folds": ["all"],
            "postprocessing": {"largest_component_foreground": True, "largest_component_classes": []}}
    model = make_model_folder(tmp_path, folds=("all",), inference_plan=plan)
    predictor = Predictor.from_model_dir(model, device="cpu", tta=False)
    assert predictor.stages[0].folds == ["all"]
    labels, probabilities = predictor.predict([blob_image()], oblique_geometry(), return_probabilities=True)
    from scipy import ndimage

    raw = probabilities.argmax(0)
    assert ndimage.label(labels > 0, np.ones((3, 3, 3)))[1] <= 1 < ndimage.label(raw > 0, np.ones((3, 3, 3)))[1]


def test_cpu_batches_small_windows_and_gpu_uses_the_training_batch():
    from AutoSegLib.inference.predictor import default_batch_size

    assert default_batch_size({"patch_size": [80, 96], "batch_size": 12}, torch.device("cpu")) == 17
    assert default_batch_size({"patch_size": [40, 80, 96], "batch_size": 2}, torch.device("cpu")) == 1
    # windows of up to 2**17 voxels go two at a time (torch's slow kernel takes a batch of one)
    assert default_batch_size({"patch_size": [20, 56, 64], "batch_size": 2}, torch.device("cpu")) == 2
    assert default_batch_size({"patch_size": [32, 64, 64], "batch_size": 2}, torch.device("cpu")) == 2
    assert default_batch_size({"patch_size": [32, 64, 65], "batch_size": 2}, torch.device("cpu")) == 1
    assert default_batch_size({"patch_size": [40, 80, 96], "batch_size": 2}, torch.device("cuda")) == 2
