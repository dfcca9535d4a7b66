"""Memory estimates of prediction and preprocessing, and the warning / --strict refusal they drive."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from AutoSegLib.cli import main
from AutoSegLib.imageio import Geometry, write_image
from AutoSegLib.inference.memory import estimate_prediction, network_bytes
from AutoSegLib.resources import (AVAILABLE_MEMORY_ENV, MiB, ResourceError, available_memory,
                                  available_memory_override, check_memory, estimate_preprocess_case, peak_of,
                                  pixel_bytes)

from test_inference_predictor import blob_image, make_model_folder, tiny_config

CONFIG = {"spacing": [2.0, 2.0, 2.0], "patch_size": [32, 64, 64], "features_per_stage": [16, 32, 64]}
IDENTITY = [0, 1, 2]


def estimate(shape=(200, 200, 200), classes=4, configurations=None, names=("3d",), **options):
    configurations = configurations or {"3d": CONFIG}
    return estimate_prediction(configurations, list(names), classes, shape, (1.0, 1.0, 1.0), IDENTITY, **options)


# -- the estimator -------------------------------------------------------------------------------
def test_phases_count_the_arrays_of_the_code_path_exactly():
    shape, k = (20, 30, 40), 3
    n0, n1 = 20 * 30 * 40, 10 * 15 * 20  # 1 mm to 2 mm
    result = estimate(shape, k, base=0, batch_size=1, tta=False)
    heap = network_bytes(CONFIG, 1, k, 1, False)  # kept by the allocator
    # labels only: restored a class at a time (one class, the running maximum, a boolean, the labels)
    assert "labels" not in result.phases
    assert result.phases["3d restore"] == n0 * 2 + k * n1 * 4 + n0 * 4 * 2 + n0 + n0 + heap
    # probabilities kept: all of them on the input grid, the labels taken from them a slab at a time
    kept = estimate(shape, k, base=0, batch_size=1, tta=False, save_probabilities=True)
    assert kept.phases["3d restore"] == n0 * 2 + k * n1 * 4 + k * n0 * 4 + heap
    assert kept.phases["labels"] == n0 * 2 + k * n0 * 4 + n0 + heap
    assert result.phases["3d preprocess"] == n0 * 2 + n0 + n0 * 4 + n1 * 4  # inputs, mask, scratch, data
    padded = 32 * 64 * 64  # the image is smaller than a patch: accumulators have the patch's size
    assert result.phases["3d softmax"] == n0 * 2 + n1 * 4 + padded * 4 + k * padded * 4  # softmax in place
    assert result.peak == result.added and result.phase == max(result.phases, key=result.phases.get)


def test_grows_with_image_size_and_classes():
    sizes = [estimate((s, s, s)).added for s in (64, 128, 256, 512)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    classes = [estimate(classes=k).added for k in (2, 5, 20, 100)]
    assert classes == sorted(classes) and len(set(classes)) == 4
    # on a large image the input grid dominates: with probabilities kept, K float32 values per voxel;
    # labels only, 10 bytes per voxel whatever K (restore_labels)
    n0 = 400 * 512 * 512
    big = estimate((400, 512, 512), classes=6, save_probabilities=True)
    assert big.phases["3d restore"] - big.phases["3d sliding window"] > 6 * n0 * 4 - 6 * 200 * 256 * 256 * 4
    lean = [estimate((400, 512, 512), classes=k).phases["3d restore"] for k in (6, 30)]
    assert estimate((400, 512, 512), classes=6).phase == "3d restore"
    # only the fold mean (2 mm grid) and the network batch's outputs grow with K
    assert lean[1] - lean[0] == 24 * 200 * 256 * 256 * 4 + network_bytes(CONFIG, 1, 30) - network_bytes(CONFIG, 1, 6)


def test_tta_barely_matters_batch_and_folds_add_what_they_hold():
    with_tta, without = estimate(tta=True).added, estimate(tta=False).added
    assert without <= with_tta <= 1.03 * without  # time x8, memory: one flipped batch
    one, two, four = (estimate((300, 300, 300), batch_size=b).phases["3d sliding window"] for b in (1, 2, 4))
    assert four - two == pytest.approx(network_bytes(CONFIG, 1, 4, 4, True) / 2, rel=1e-6)
    # a small window on the CPU goes through the network with a flipped copy: two samples a pass
    assert one == two
    alone, default = (estimate((300, 300, 300), batch_size=b, tta=False).phases["3d sliding window"] for b in (1, None))
    assert alone < default  # without flips, what the user asks for; by default two windows a pass
    single, folds = (estimate((300, 300, 300), folds=f).phases["3d softmax"] for f in (1, 5))
    assert folds - single == 4 * 150 ** 3 * 4  # the running fold sum, K float32 per resampled voxel
    assert estimate(folds=5).added >= estimate(folds=1).added


def test_outputs_ensembles_cascades_and_devices():
    plain = estimate((300, 300, 300))
    assert estimate((300, 300, 300), save_probabilities=True).phases["outputs"] > plain.phases["outputs"]
    assert estimate((300, 300, 300), uncertainty=True).phases["uncertainty"] > plain.phases["outputs"]
    coarse = dict(CONFIG, spacing=[4.0, 4.0, 4.0])
    pair = estimate((300, 300, 300), configurations={"3d": CONFIG, "coarse": coarse}, names=("3d", "coarse"))
    kept = estimate((300, 300, 300), save_probabilities=True)
    assert pair.phases["coarse restore"] > kept.phases["3d restore"]  # the first one's sum is held
    assert pair.phases["labels"] - kept.phases["labels"] == network_bytes(coarse, 1, 4)  # each run's heap stays
    assert plain.phases["3d sliding window"] > estimate((300, 300, 300), configurations={"c": coarse},
                                                        names=("c",)).phases["c sliding window"]
    cascade = dict(CONFIG, previous_stage="coarse")
    chained = estimate((300, 300, 300), configurations={"coarse": coarse, "3d": cascade})
    assert {"coarse sliding window", "coarse restore", "3d one-hot", "3d sliding window"} <= set(chained.phases)
    assert chained.phases["coarse restore"] < kept.phases["3d restore"]  # the first stage is restored to labels
    gpu = estimate((300, 300, 300), device="cuda")
    assert gpu.phases["3d sliding window"] < plain.phases["3d sliding window"]


def test_2d_configuration_on_a_3d_image_keeps_the_slice_axis():
    config = {"spacing": [1.0, 1.0], "patch_size": [128, 128], "features_per_stage": [32]}
    result = estimate((50, 256, 256), configurations={"2d": config}, names=("2d",), classes=2, base=0)
    assert result.phases["2d softmax"] >= 2 * 50 * 256 * 256 * 4  # logits (then probabilities) at full size


def test_preprocess_estimate_matches_the_measured_peaks_of_case_py():
    # AutoSegLib/preprocessing/case.py: 400x512x512 int16 CT with a label, peaks above the inputs
    # of 708 MiB without resampling (case A) and 916 MiB resampled to 1.5x1x1 mm (case B).
    shape, spacing, inputs = (400, 512, 512), (1.0, 0.78, 0.78), 400 * 512 * 512 * 3
    same = estimate_preprocess_case(shape, spacing, {"spacing": list(spacing)}, IDENTITY, 1, 2, 1)
    coarser = estimate_preprocess_case(shape, spacing, {"spacing": [1.5, 1.0, 1.0]}, IDENTITY, 1, 2, 1)
    assert (same.added - inputs) / MiB == pytest.approx(708, rel=0.15)
    assert (coarser.added - inputs) / MiB == pytest.approx(916, rel=0.15)
    unlabelled = estimate_preprocess_case(shape, spacing, {"spacing": [1.5, 1.0, 1.0]}, IDENTITY, 1, 2, None)
    assert unlabelled.added < coarser.added


def test_peak_of_and_the_memory_check():
    result = peak_of([("a", {"x": 10, "y": 5}), ("b", {"x": 12})], base=100)
    assert (result.phase, result.added, result.peak, result.phases) == ("a", 15, 115, {"a": 15, "b": 12})
    assert check_memory(result, 15, "work") is None and check_memory(result, None, "work") is None
    warning = check_memory(result, 14, "work", "Do less.")
    assert "work needs about" in warning and "Do less." in warning
    with pytest.raises(ResourceError, match="Refused"):
        check_memory(result, 14, "work", strict=True)


def test_pixel_bytes_from_itk_pixel_types():
    assert [pixel_bytes(t) for t in ("8-bit unsigned integer", "16-bit signed integer", "32-bit float",
                                     "64-bit float")] == [1, 2, 4, 8]
    assert pixel_bytes("vector of 8-bit unsigned integer", 3) == 3


def test_available_memory_reads_meminfo_and_a_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  24000000 kB\nMemFree:  1000 kB\nMemAvailable:   8000000 kB\n")
    assert available_memory(str(meminfo), str(tmp_path / "none")) == 8000000 * 1024
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert available_memory(str(meminfo), str(tmp_path)) == 3 << 30  # the container's room, not the host's
    (tmp_path / "memory.max").write_text("max\n")
    assert available_memory(str(meminfo), str(tmp_path)) == 8000000 * 1024
    assert available_memory() is None or available_memory() > 0  # this machine, whatever it is


def test_unknown_available_memory_degrades_to_telling_the_estimate(monkeypatch, tmp_path):
    import AutoSegLib.resources as resources

    def no_sysconf(name):
        raise ValueError(name)  # macOS has no SC_AVPHYS_PAGES
    monkeypatch.setattr(resources.os, "sysconf", no_sysconf)
    monkeypatch.setattr(resources.sys, "platform", "darwin")
    assert available_memory(str(tmp_path / "no-meminfo"), str(tmp_path)) is None
    assert check_memory(estimate(), None, "work", strict=True) is None  # nothing to compare: no refusal


def test_override_from_the_environment_is_parsed_at_the_boundary():
    assert available_memory_override({}) is None
    assert available_memory_override({AVAILABLE_MEMORY_ENV: "1500"}) == 1500 * MiB
    with pytest.raises(ValueError, match=AVAILABLE_MEMORY_ENV):
        available_memory_override({AVAILABLE_MEMORY_ENV: "lots"})


# -- through the command line --------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"), {"3d_fullres": tiny_config((2.0, 1.0, 1.0),
                                                                                        (8, 16, 16))}, folds=(0,))


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(blob_image((12, 24, 20)), Geometry((2.0, 1.0, 1.0), (0, 0, 0), tuple(np.eye(3).ravel())),
                folder / "a_0000.nii.gz")
    return folder


def run(capsys, argv):
    status = main(argv)
    out = capsys.readouterr().out
    return status, [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_predict_tells_the_estimate_and_warns_when_memory_is_short(model_dir, inputs, tmp_path, capsys, monkeypatch):
    argv = ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model_dir), "--device", "cpu",
            "--no-tta", "--events"]
    status, events = run(capsys, argv)
    told = [e for e in events if e["event"] == "log" and "estimate_bytes" in e]
    assert status == 0 and len(told) == 1 and "'a' (12x24x20)" in told[0]["message"]
    assert not [e for e in events if e["event"] == "warning"]
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, "1")
    status, events = run(capsys, argv)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert status == 0 and (tmp_path / "out" / "a.nii.gz").is_file()
    assert len(warnings) == 1 and "1 MiB is available" in warnings[0]
    assert "--step and --no-tta change the time, not the memory" in warnings[0]


def test_predict_strict_refuses_before_any_case(model_dir, inputs, tmp_path, capsys, monkeypatch):
    import AutoSegLib.inference.files as files

    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, "1")
    monkeypatch.setattr(files, "predict_cases", lambda *a, **k: pytest.fail("predicted despite --strict"))
    status, events = run(capsys, ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model_dir),
                                  "--device", "cpu", "--strict", "--events"])
    errors = [e["message"] for e in events if e["event"] == "error"]
    assert status == 1 and len(errors) == 1 and "Refused (--strict)" in errors[0] and "case 'a'" in errors[0]
    assert not (tmp_path / "out" / "a.nii.gz").exists()


def test_preprocess_tells_workers_memory_and_strict_refuses(tmp_path, capsys, monkeypatch):
    from conftest import box_case, write_dataset

    dataset = write_dataset(tmp_path / "DS", {f"c{i}": box_case(seed=i) for i in range(3)})
    work = tmp_path / "WORK"
    assert main(["plan", str(dataset), "-w", str(work), "-np", "1"]) == 0
    capsys.readouterr()
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, "0")
    status, events = run(capsys, ["preprocess", str(dataset), "-w", str(work), "-np", "2", "--strict", "--events"])
    errors = [e["message"] for e in events if e["event"] == "error"]
    assert status == 1 and "Preprocessing with 2 worker(s)" in errors[0] and "Refused (--strict)" in errors[0]
    assert not list((work / "preprocessed").rglob("*.npy"))
    monkeypatch.delenv(AVAILABLE_MEMORY_ENV)
    status, events = run(capsys, ["preprocess", str(dataset), "-w", str(work), "-np", "2", "--strict", "--events"])
    told = [e["message"] for e in events if e["event"] == "log" and "estimate_bytes" in e]
    assert status == 0 and len(told) == 1 and "2 worker(s) at once" in told[0]
    assert math.isfinite(events[-1].get("t", 0))
