"""``autoseg preprocess`` over whole datasets: parallel, re-entrant, robust to damage and dead workers."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import box_case, write_dataset

from AutoSegLib.events import Reporter
from AutoSegLib.imageio import read_image
from AutoSegLib.plan_dataset import plan_dataset
from AutoSegLib.preprocessing import runner, storage
from AutoSegLib.preprocessing.case import restore_label
from AutoSegLib.preprocessing.runner import PreprocessError, data_identifier, load_plans, preprocess_dataset
from AutoSegLib.synthetic import make_phantom_dataset

FULLRES = ["3d_fullres"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A CT and a 2-channel MR phantom dataset (4 cases each), planned, not preprocessed."""
    root = tmp_path_factory.mktemp("phantoms")
    out = {}
    for kind, channels in (("ct", None), ("mr", 2)):
        dataset = make_phantom_dataset(root / f"Dataset_{kind}", kind=kind, cases=4, seed=0, channels=channels)
        plan_dataset(dataset, root / f"work_{kind}")
        out[kind] = (dataset, root / f"work_{kind}")
    return out


@pytest.fixture
def ct(planned, tmp_path):
    """A private copy of the planned CT work folder (tests change plans and outputs)."""
    dataset, work = planned["ct"]
    return dataset, Path(shutil.copytree(work, tmp_path / "work"))


def dice(a, b, value) -> float:
    a, b = a == value, b == value
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def preprocessed_ct(planned, tmp_path_factory):
    dataset, work = planned["ct"]
    work = Path(shutil.copytree(work, tmp_path_factory.mktemp("preprocessed") / "work"))
    preprocess_dataset(dataset, work, ["2d", "3d_fullres"], num_processes=2)
    return dataset, work


@pytest.fixture
def ct_done(preprocessed_ct, tmp_path):
    """A private copy of the CT work folder with 2d and 3d_fullres preprocessed."""
    dataset, work = preprocessed_ct
    return dataset, Path(shutil.copytree(work, tmp_path / "work"))


def events_of(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def edit_plans(work: Path, change) -> None:
    plans = json.loads((work / "plans.json").read_text())
    change(plans)
    (work / "plans.json").write_text(json.dumps(plans))


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_dataset_preprocesses_in_parallel_with_progress_and_complete_outputs(planned, tmp_path, kind):
    dataset, planned_work = planned[kind]
    work = Path(shutil.copytree(planned_work, tmp_path / "work"))
    plans = load_plans(work)
    out = io.StringIO()
    summary = preprocess_dataset(dataset, work, num_processes=2, reporter=Reporter(events=True, out=out))

    names = list(plans.configurations)
    assert set(names) >= {"2d", "3d_fullres"} and set(summary) == set(names)
    for name in names:
        assert summary[name]["processed"] == 4 and summary[name]["skipped"] == 0 and summary[name]["failed"] == 0
    events = events_of(out)
    starts = [e for e in events if e["event"] == "start"]
    finals = [e for e in events if e["event"] == "progress" and e["done"] == e["of"]]
    assert [e["of"] for e in starts] == [4] * len(names)
    assert [e["configuration"] for e in finals] == names and all(e["ok"] for e in finals)

    channels = 2 if kind == "mr" else 1
    for name in names:
        folder = work / "preprocessed" / name
        cases = storage.list_cases(folder)
        assert cases == [f"phantom_{kind}_{i:03d}" for i in range(4)]
        dims = plans.configurations[name].spatial_dims
        for case_id in cases:
            case = storage.open_case(folder, case_id)
            shape = tuple(case.properties["shape_after_resampling"])
            assert case.data.shape == (channels, *shape) and case.data.dtype == np.float32
            assert case.seg.shape == (1, *shape) and case.seg.dtype == np.int16
            assert isinstance(case.data, np.memmap)  # patches are read without loading the case
            assert np.isfinite(case.data).all()
            fg = case.foreground
            assert fg.shape[1] == 4 and len(fg) > 0
            assert np.array_equal(case.seg[0][tuple(fg[:, 1:].T)], fg[:, 0])
            assert case.properties["classes_present"] == sorted(set(fg[:, 0].tolist()))
            source_label, source_geometry = read_image(dataset / "labelsTr" / f"{case_id}.nii.gz")
            assert case.properties["original_geometry"] == source_geometry.to_dict()
            # The properties as stored (JSON) are enough for the way back.
            restored, restored_geometry = restore_label(case.seg[0], case.properties)
            assert restored_geometry == source_geometry and restored.shape == source_label.shape
            # liver; thin organs lose more on coarser grids, and 3d_cpu's grid is ~2x coarser by design
            assert dice(restored, source_label, 1) >= (0.9 if name == "3d_cpu" else 0.95)
            assert len(case.properties["target_spacing"]) == 3
            if dims == 2:
                assert shape[0] == case.properties["shape_after_crop"][0]

    # Rerun: everything is current; nothing is redone.
    out = io.StringIO()
    again = preprocess_dataset(dataset, work, num_processes=2, reporter=Reporter(events=True, out=out))
    for name in names:
        assert again[name]["processed"] == 0 and again[name]["skipped"] == 4
    assert not [e for e in events_of(out) if e["event"] == "progress"]
    assert any("already preprocessed" in e.get("message", "") for e in events_of(out))


def test_plan_changes_redo_only_the_affected_configuration(ct_done):
    dataset, work = ct_done
    before = {name: mtimes(work / "preprocessed" / name) for name in ("2d", "3d_fullres")}

    # Batch and patch size do not change the arrays: nothing to redo.
    edit_plans(work, lambda p: p["configurations"]["3d_fullres"].update(batch_size=7, patch_size=[16, 32, 32]))
    summary = preprocess_dataset(dataset, work, ["2d", "3d_fullres"], num_processes=2)
    assert [summary[n]["processed"] for n in ("2d", "3d_fullres")] == [0, 0]

    edit_plans(work, lambda p: p["configurations"]["3d_fullres"].update(spacing=[3.0, 1.5, 1.5]))
    summary = preprocess_dataset(dataset, work, ["2d", "3d_fullres"], num_processes=2)
    assert summary["2d"] == {**summary["2d"], "processed": 0, "skipped": 4}
    assert summary["3d_fullres"] == {**summary["3d_fullres"], "processed": 4, "skipped": 0}
    assert mtimes(work / "preprocessed" / "2d") == before["2d"]
    case = storage.open_case(work / "preprocessed" / "3d_fullres", "phantom_ct_000")
    assert case.properties["target_spacing"] == [3.0, 1.5, 1.5]

    # Intensity statistics belong to every configuration.
    edit_plans(work, lambda p: p["foreground_intensity_properties_per_channel"]["0"].update(mean=0.0))
    summary = preprocess_dataset(dataset, work, ["2d", "3d_fullres"], num_processes=2)
    assert [summary[n]["processed"] for n in ("2d", "3d_fullres")] == [4, 4]


def test_a_touched_source_file_redoes_that_case_only(ct_done, tmp_path):
    dataset, work = ct_done
    dataset = Path(shutil.copytree(dataset, tmp_path / "dataset"))  # copy2 keeps the modification times
    folder = work / "preprocessed" / "3d_fullres"
    before = mtimes(folder)
    image = dataset / "imagesTr" / "phantom_ct_002_0000.nii.gz"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    summary = preprocess_dataset(dataset, work, FULLRES, num_processes=2)
    assert (summary["3d_fullres"]["processed"], summary["3d_fullres"]["skipped"]) == (1, 3)
    after = mtimes(folder)
    assert [name for name in after if after[name] != before[name]] == ["phantom_ct_002.json"]


def test_damaged_or_half_written_cases_are_redone_and_never_read(ct_done):
    dataset, work = ct_done
    folder = work / "preprocessed" / "3d_fullres"
    paths = {i: storage.paths(folder, f"phantom_ct_{i:03d}") for i in range(4)}

    paths[0]["properties"].unlink()  # interrupted before the properties file: incomplete
    with open(paths[1]["data"], "r+b") as handle:  # truncated array file
        handle.truncate(paths[1]["data"].stat().st_size // 2)
    paths[2]["seg"].write_bytes(b"")  # zero-byte array file
    with open(paths[3]["foreground"], "r+b") as handle:
        handle.truncate(60)  # cut inside the .npy header

    assert storage.list_cases(folder) == ["phantom_ct_001", "phantom_ct_002", "phantom_ct_003"]
    for i in range(4):
        case_id = f"phantom_ct_{i:03d}"
        with pytest.raises(OSError, match=f"preprocessed case '{case_id}' .* missing or damaged"):
            storage.open_case(folder, case_id)
        signature = json.loads(paths[i]["properties"].read_text())["signature"] if i else "x"
        assert not storage.is_current(folder, case_id, signature)

    summary = preprocess_dataset(dataset, work, FULLRES, num_processes=1)  # in-process, for debugging
    assert (summary["3d_fullres"]["processed"], summary["3d_fullres"]["skipped"]) == (4, 0)
    for i in range(4):
        case = storage.open_case(folder, f"phantom_ct_{i:03d}")
        assert case.data.shape[1:] == case.seg.shape[1:]
    assert preprocess_dataset(dataset, work, FULLRES, num_processes=2)["3d_fullres"]["skipped"] == 4


def test_write_killed_midway_leaves_no_case_that_looks_complete(tmp_path, monkeypatch):
    folder = tmp_path / "pre"
    data, seg = np.zeros((1, 2, 3, 4), np.float32), np.zeros((1, 2, 3, 4), np.int16)
    fg = np.zeros((0, 4), np.int32)
    props = {"shape_after_resampling": [2, 3, 4], "signature": "s1"}
    storage.write_case(folder, "c", data, seg, fg, props)
    assert storage.is_current(folder, "c", "s1") and storage.list_cases(folder) == ["c"]

    real_save = storage._save

    def dies_at_seg(path, array):
        if path.name.endswith("_seg.npy"):
            raise KeyboardInterrupt  # stands in for the kill: nothing after this point runs
        real_save(path, array)

    monkeypatch.setattr(storage, "_save", dies_at_seg)
    with pytest.raises(KeyboardInterrupt):
        storage.write_case(folder, "c", data + 1, seg, fg, {**props, "signature": "s2"})
    # The new data file is in place but the case is not: no properties file, so not current.
    assert storage.list_cases(folder) == [] and not storage.is_current(folder, "c", "s1")
    with pytest.raises(OSError, match="preprocessed case 'c'"):
        storage.open_case(folder, "c")
    assert not list(folder.glob(".tmp-*"))  # the interrupted temporary file was removed


def test_a_failing_case_is_named_and_the_others_are_written(ct):
    dataset, work = ct
    dataset_copy = Path(shutil.copytree(dataset, work.parent / "dataset"))
    (dataset_copy / "imagesTr" / "phantom_ct_001_0000.nii.gz").write_bytes(b"not an image")
    with pytest.raises(PreprocessError) as info:
        preprocess_dataset(dataset_copy, work, FULLRES, num_processes=2)
    message = str(info.value)
    assert message.startswith("preprocessing failed for 1 case(s):")
    assert "3d_fullres case 'phantom_ct_001'" in message and "phantom_ct_001_0000.nii.gz" in message
    folder = work / "preprocessed" / "3d_fullres"
    assert storage.list_cases(folder) == ["phantom_ct_000", "phantom_ct_002", "phantom_ct_003"]


def test_a_killed_worker_is_named_and_a_rerun_redoes_only_that_case(ct, monkeypatch):
    dataset, work = ct
    real = runner.preprocess_one

    def killer(case, *args):
        if case.case_id == "phantom_ct_001":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(case, *args)

    monkeypatch.setattr(runner, "preprocess_one", killer)
    out = io.StringIO()
    with pytest.raises(PreprocessError) as info:
        preprocess_dataset(dataset, work, FULLRES, num_processes=2, reporter=Reporter(events=True, out=out))
    assert "3d_fullres case 'phantom_ct_001': the worker process was killed by SIGKILL" in str(info.value)
    assert "out-of-memory" in str(info.value)
    failed = [e for e in events_of(out) if e["event"] == "progress" and not e["ok"]]
    assert [e["case"] for e in failed] == ["phantom_ct_001"]
    folder = work / "preprocessed" / "3d_fullres"
    assert storage.list_cases(folder) == ["phantom_ct_000", "phantom_ct_002", "phantom_ct_003"]

    monkeypatch.setattr(runner, "preprocess_one", real)
    summary = preprocess_dataset(dataset, work, FULLRES, num_processes=2)
    assert (summary["3d_fullres"]["processed"], summary["3d_fullres"]["skipped"]) == (1, 3)


def test_cascade_shares_the_3d_fullres_data(ct):
    dataset, work = ct
    edit_plans(work, lambda p: p["configurations"].update(
        {"3d_cascade_fullres": {**p["configurations"]["3d_fullres"], "previous_stage": "3d_lowres"}}))
    plans = load_plans(work)
    assert data_identifier("3d_cascade_fullres", plans) == "3d_fullres"
    # Asked for in any order, the data is made once, under 3d_fullres.
    summary = preprocess_dataset(dataset, work, ["3d_cascade_fullres", "3d_fullres"], num_processes=2)
    assert summary["3d_cascade_fullres"] == {"shared_with": "3d_fullres"}
    assert summary["3d_fullres"]["processed"] == 4
    assert not (work / "preprocessed" / "3d_cascade_fullres").exists()
    # The cascade alone finds the shared data current.
    summary = preprocess_dataset(dataset, work, ["3d_cascade_fullres"], num_processes=2)
    assert (summary["3d_cascade_fullres"]["processed"], summary["3d_cascade_fullres"]["skipped"]) == (0, 4)

    plans.configurations["3d_cascade_fullres"].spacing = [9.0, 9.0, 9.0]
    assert data_identifier("3d_cascade_fullres", plans) == "3d_cascade_fullres"


def test_unknown_configuration_and_missing_plans_are_refused(ct, tmp_path):
    dataset, work = ct
    with pytest.raises(ValueError, match=r"\['3d_lowres'\] are not in the plans; planned: 2d, 3d_fullres"):
        preprocess_dataset(dataset, work, ["3d_lowres"])
    with pytest.raises(FileNotFoundError, match="run `autoseg plan DATASET` first"):
        preprocess_dataset(dataset, tmp_path / "empty")


# -- a real `autoseg preprocess` whose worker is killed by hand -----------------------------
def children_of(pid: int) -> list[tuple[int, int]]:
    """(start time in clock ticks, pid) of ``pid``'s child processes, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:  # fields[0] is the state, [1] the parent, [19] the start time
            found.append((int(fields[19]), int(entry.name)))
    return sorted(found)


def test_killing_a_worker_of_the_command_names_the_case_and_does_not_hang(tmp_path):
    # case_0 is large and upsampled 2x per axis (several seconds of work); the four small
    # cases take milliseconds. Workers start in case order, so while case_0 runs its worker
    # is the command's oldest child.
    big = box_case(shape=(48, 160, 160), box=((10, 40), (30, 130), (40, 120)))
    cases = {"case_0": big, **{f"case_{i}": box_case(seed=i) for i in range(1, 5)}}
    dataset = write_dataset(tmp_path / "Dataset", cases, ending=".nii")
    work = tmp_path / "work"
    plan_dataset(dataset, work)
    edit_plans(work, lambda p: p["configurations"]["3d_fullres"].update(spacing=[1.0, 0.5, 0.5]))

    command = subprocess.Popen([sys.executable, "-m", "AutoSegLib", "preprocess", str(dataset), "-w", str(work),
                                "-np", "2", "-c", "3d_fullres", "--events"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (children := children_of(command.pid)) and command.poll() is None:
            assert time.monotonic() < deadline, "no worker process appeared"
            time.sleep(0.01)
        assert children, "the command ended before a worker was seen"
        os.kill(children[0][1], signal.SIGKILL)
        killed_at = time.monotonic()
        stdout, stderr = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()
    assert time.monotonic() - killed_at < 30  # ends on its own, well before case_0 could finish
    assert command.returncode == 1
    events = [json.loads(line) for line in stdout.splitlines()]
    error = events[-1]
    assert error["event"] == "error" and error["stage"] == "preprocess"
    assert "3d_fullres case 'case_0': the worker process was killed by SIGKILL" in error["message"]
    assert "out-of-memory" in error["message"]
    assert "case_0" in stderr and "SIGKILL" in stderr
    folder = work / "preprocessed" / "3d_fullres"
    assert storage.list_cases(folder) == ["case_1", "case_2", "case_3", "case_4"]
    for case_id in storage.list_cases(folder):
        assert storage.is_current(folder, case_id, storage.open_case(folder, case_id).properties["signature"])
