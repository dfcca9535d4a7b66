"""``autoseg predict`` on files: naming, geometry and format kept, events, errors, atomic outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from AutoSegLib import cli
from AutoSegLib.fileutil import TMP_PREFIX
from AutoSegLib.imageio import Geometry, read_header, read_image, write_image
from AutoSegLib.inference import PredictionError, predict_files
from AutoSegLib.inference import files as files_module
from test_inference_predictor import blob_image, make_model_folder, oblique_geometry, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"), folds=(0,))


@pytest.fixture(scope="module")
def two_channel_model(tmp_path_factory):
    # one configuration only: predict chooses it without -c
    return make_model_folder(tmp_path_factory.mktemp("model2"), {"3d_fullres": tiny_config((2.0, 1.0, 1.0), (8, 16, 16))},
                             folds=(0,), channels=2)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_inputs(folder, cases: dict, channels: int = 1):
    """{case_id: (shape, geometry, ending)} -> {case}_{XXXX}{ending} files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (case_id, (shape, geometry, ending)) in enumerate(cases.items()):
        for c in range(channels):
            write_image(blob_image(shape, seed=i + c).astype(np.int16), geometry, folder / f"{case_id}_{c:04d}{ending}")
    return folder


def run(capsys, argv) -> tuple[int, list[dict]]:
    capsys.readouterr()
    status = cli.main(argv)
    return status, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_folder_keeps_names_geometry_and_format(tmp_path, model_dir, capsys):
    oblique, flipped = oblique_geometry(), Geometry((2.5, 0.7, 0.9), (1.0, 2.0, 3.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    inputs = write_inputs(tmp_path / "in", {"liver_001": ((11, 23, 19), oblique, ".nii.gz"),
                                            "liver_002": ((9, 20, 17), flipped, ".nrrd")})
    write_image(np.zeros((4, 4, 4), np.int16), flipped, inputs / "notes.nii.gz")  # not {case}_{XXXX}: skipped
    out = tmp_path / "out"
    status, events = run(capsys, ["predict", "-i", str(inputs), "-o", str(out), "-m", str(model_dir), "-c", "2d",
                                  "--no-tta", "--save-probabilities", "--uncertainty", "--device", "cpu", "--events"])
    assert status == 0, events
    assert sorted(p.name for p in out.iterdir()) == ["liver_001.nii.gz", "liver_001.npz",
                                                     "liver_001_uncertainty.nii.gz", "liver_002.npz",
                                                     "liver_002.nrrd", "liver_002_uncertainty.nrrd"]
    for case_id, ending in (("liver_001", ".nii.gz"), ("liver_002", ".nrrd")):
        source = read_header(inputs / f"{case_id}_0000{ending}")
        labels = read_header(out / f"{case_id}{ending}")
        assert labels.shape == source.shape and labels.is_integer
        assert labels.geometry == source.geometry  # spacing, origin, direction bit for bit
        probabilities = np.load(out / f"{case_id}.npz")["probabilities"]
        assert probabilities.dtype == np.float16 and probabilities.shape == (3, *source.shape)
        np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1.0, atol=5e-3)
        uncertainty, geometry = read_image(out / f"{case_id}_uncertainty{ending}")
        assert uncertainty.dtype == np.float32 and geometry == source.geometry
        assert 0 <= uncertainty.min() and uncertainty.max() <= 1
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and events[-1]["cases"] == 2 and "start" in kinds
    assert any(e["event"] == "warning" and "notes.nii.gz" in e["message"] for e in events)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["done"] == 2 and progress[-1]["of"] == 2 and "eta_s" in progress[-1]


def test_a_case_predicted_again_in_host_memory_is_reported(tmp_path, model_dir, capsys, monkeypatch):
    from AutoSegLib.inference.predictor import Predictor
    real = Predictor.run_network

    def network_after_a_fallback(self, *args, **kwargs):
        self.host_accumulator_fallbacks += 1  # what running out of GPU memory on this case does
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "run_network", network_after_a_fallback)
    inputs = write_inputs(tmp_path / "in", {"big": ((9, 20, 18), oblique_geometry(), ".nii.gz")})
    status, events = run(capsys, ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model_dir),
                                  "-c", "2d", "--no-tta", "--device", "cpu", "--events"])
    assert status == 0 and (tmp_path / "out" / "big.nii.gz").is_file()
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["case"] == "big" and "out of GPU memory" in warnings[0]["message"]


def test_progress_events_move_inside_a_case(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr("AutoSegLib.events._MIN_EVENT_INTERVAL_S", 0.0)  # every forward pass
    # 3d_fullres: patch 8x16x16, 64 windows per forward pass; these cases take several passes
    inputs = write_inputs(tmp_path / "in", {"a": ((30, 60, 60), oblique_geometry(), ".nii.gz"),
                                            "b": ((30, 60, 60), oblique_geometry(), ".nii.gz")})
    status, events = run(capsys, ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model_dir),
                                  "-c", "3d_fullres", "--no-tta", "--device", "cpu", "--events"])
    assert status == 0, events
    done = [e["done"] for e in events if e["event"] == "progress"]
    inside = [d for d in done if d != int(d)]
    assert inside and all(0 < d < 2 for d in inside)
    assert done == sorted(done) and done[-1] == 2
    assert {e["case"] for e in events if e["event"] == "progress" and e["done"] in inside} == {"a", "b"}


def test_single_file_to_a_named_output_file(tmp_path, model_dir):
    image = tmp_path / "scan.nrrd"
    write_image(blob_image().astype(np.int16), oblique_geometry(), image)
    result = predict_files(image, tmp_path / "seg" / "scan_labels.nrrd", model_dir, configuration="2d",
                           device="cpu", tta=False, uncertainty=True)
    assert result["cases"] == 1
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["scan_labels.nrrd", "scan_labels_uncertainty.nrrd"]
    assert read_header(tmp_path / "seg" / "scan_labels.nrrd").geometry == read_header(image).geometry


def test_single_channel_suffix_is_dropped_from_the_case_name(tmp_path, model_dir):
    inputs = write_inputs(tmp_path / "in", {"c7": ((6, 12, 12), oblique_geometry(), ".mha")})
    predict_files(inputs / "c7_0000.mha", tmp_path / "out", model_dir, configuration="2d", device="cpu", tta=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["c7.mha"]


def test_multi_channel_model_reads_every_channel(tmp_path, two_channel_model):
    inputs = write_inputs(tmp_path / "in", {"a": ((6, 12, 12), oblique_geometry(), ".nii.gz")}, channels=2)
    predict_files(inputs, tmp_path / "out", two_channel_model, configuration="3d_fullres", device="cpu", tta=False)
    assert (tmp_path / "out" / "a.nii.gz").is_file()


def test_a_case_missing_a_channel_fails_before_anything_is_written(tmp_path, two_channel_model, capsys):
    inputs = write_inputs(tmp_path / "in", {"a": ((6, 12, 12), oblique_geometry(), ".nii.gz"),
                                            "b": ((6, 12, 12), oblique_geometry(), ".nii.gz")}, channels=2)
    (inputs / "b_0001.nii.gz").unlink()
    write_image(np.zeros((6, 12, 12), np.int16), oblique_geometry(), inputs / "a_0002.nii.gz")
    status, events = run(capsys, ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"),
                                  "-m", str(two_channel_model), "--device", "cpu", "--events"])
    assert status == 1 and events[-1]["event"] == "error"
    message = events[-1]["message"]
    assert "case 'b' is missing channel file(s) b_0001" in message
    assert "case 'a' has channel(s) 0002 but the model takes 2 channel(s)" in message
    assert not (tmp_path / "out").exists()


def test_single_file_for_a_multi_channel_model_is_refused(tmp_path, two_channel_model):
    inputs = write_inputs(tmp_path / "in", {"a": ((6, 12, 12), oblique_geometry(), ".nii.gz")})
    with pytest.raises(PredictionError, match="takes 2 channels; give a folder"):
        predict_files(inputs / "a_0000.nii.gz", tmp_path / "out", two_channel_model, device="cpu")


def test_output_into_the_input_folder_is_refused(tmp_path, model_dir):
    inputs = write_inputs(tmp_path / "in", {"a": ((6, 12, 12), oblique_geometry(), ".nii.gz")})
    with pytest.raises(PredictionError, match="other than the input folder"):
        predict_files(inputs, inputs, model_dir, configuration="2d", device="cpu")


def test_missing_model_folder_exits_1_with_an_error_event(tmp_path, capsys):
    inputs = write_inputs(tmp_path / "in", {"a": ((6, 12, 12), oblique_geometry(), ".nii.gz")})
    status, events = run(capsys, ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"),
                                  "-m", str(tmp_path / "model"), "--events"])
    assert status == 1 and events[-1]["event"] == "error" and "model folder not found" in events[-1]["message"]


def test_a_failing_case_leaves_no_finished_looking_file(tmp_path, model_dir, monkeypatch, capsys):
    """The npz write fails (disk full) after the label image was written under its temporary name."""
    inputs = write_inputs(tmp_path / "in", {"a": ((6, 12, 12), oblique_geometry(), ".nii.gz"),
                                            "b": ((6, 12, 12), oblique_geometry(), ".nii.gz")})
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.nii.gz").write_bytes(b"an earlier result")  # must not pass for this run's result
    real = np.savez_compressed

    def failing(handle, **arrays):
        if "a.npz" in handle.name:
            handle.write(b"half")
            raise OSError(28, "No space left on device")
        return real(handle, **arrays)

    monkeypatch.setattr(files_module.np, "savez_compressed", failing)
    status, events = run(capsys, ["predict", "-i", str(inputs), "-o", str(out), "-m", str(model_dir), "-c", "2d",
                                  "--save-probabilities", "--device", "cpu", "--events"])
    assert status == 1
    errors = [e for e in events if e["event"] == "error"]
    assert errors[0]["case"] == "a" and "No space left" in errors[0]["message"]
    assert "1 of 2 case(s)" in errors[-1]["message"]
    assert sorted(p.name for p in out.iterdir()) == ["b.nii.gz", "b.npz"]  # nothing of 'a', no temporaries
    assert not any(p.name.startswith(TMP_PREFIX) for p in out.iterdir())
