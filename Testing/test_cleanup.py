"""What a killed run leaves is cleaned by the next run of the same folder, and only then
(AutoSegLib/fileutil.py remove_stale_temps, called by AutoSegLib/locks.py once the lock is
held); and ``predict -o NAME/`` always means a folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AutoSegLib import cli
from AutoSegLib.fileutil import atomic_path, remove_stale_temps
from AutoSegLib.imageio import Geometry, write_image
from AutoSegLib.locks import LOCK_FILE, lock_folder

GEOMETRY = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_only_the_temporary_files_of_atomic_writes_are_removed(tmp_path):
    (tmp_path / "validation").mkdir()
    ours = [tmp_path / ".tmp-0123abcd-progress.png", tmp_path / ".tmp-89abcdef-case_0.npy",
            tmp_path / "validation" / ".tmp-00ff00ff-case_0.npz"]
    theirs = [tmp_path / ".tmp-notes.txt", tmp_path / ".tmp-0123ABCD-x", tmp_path / ".tmp-0123abcd",
              tmp_path / "checkpoint_latest.pt", tmp_path / LOCK_FILE, tmp_path / "a.tmp-0123abcd-b"]
    for path in ours + theirs:
        path.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == ours[:2]  # this folder only, by default
    assert remove_stale_temps(tmp_path, recursive=True) == ours[2:]
    assert all(path.is_file() for path in theirs)
    assert remove_stale_temps(tmp_path / "missing") == []


def test_the_names_atomic_path_makes_are_the_names_cleaned(tmp_path):
    with atomic_path(tmp_path / "case_0.nii.gz") as tmp:
        tmp.write_bytes(b"complete")
        left = tmp.name
    (tmp_path / left).write_bytes(b"half")  # what a kill before the rename would have left
    assert remove_stale_temps(tmp_path) == [tmp_path / left]
    assert (tmp_path / "case_0.nii.gz").read_bytes() == b"complete"


def test_the_first_hold_cleans_the_folder_and_a_reentrant_one_does_not(tmp_path):
    stale = tmp_path / ".tmp-0123abcd-checkpoint_latest.pt"
    stale.write_bytes(b"a dead run's")
    with lock_folder(tmp_path, "training this fold"):
        assert not stale.exists()
        live = tmp_path / ".tmp-89abcdef-progress.png"
        live.write_bytes(b"this process is writing it")
        with lock_folder(tmp_path, "validating"):  # same process: its own files are live
            assert live.is_file()
    assert live.is_file()


# -- predict -o NAME/ ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from test_inference_predictor import make_model_folder, tiny_config

    return make_model_folder(tmp_path_factory.mktemp("work"), {"3d_fullres": tiny_config((2.0, 1.0, 1.0), (8, 16, 16))},
                             folds=(0,))


@pytest.fixture
def one_image(tmp_path):
    path = tmp_path / "in" / "liver_0000.nii.gz"
    path.parent.mkdir()
    write_image(np.full((8, 16, 16), 40, np.int16), GEOMETRY, path)
    return path


def predict(capsys, image, output: str, model) -> tuple[int, list[dict]]:
    capsys.readouterr()
    status = cli.main(["predict", "-i", str(image), "-o", output, "-m", str(model), "--no-tta", "--device", "cpu",
                       "--events"])
    return status, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_an_output_ending_in_a_slash_is_a_folder_even_when_named_like_a_file(tmp_path, one_image, model, capsys):
    status, events = predict(capsys, one_image, f"{tmp_path / 'dir.nii.gz'}/", model)
    assert status == 0, events
    assert (tmp_path / "dir.nii.gz").is_dir()
    assert sorted(p.name for p in (tmp_path / "dir.nii.gz").iterdir()) == ["liver.nii.gz"]


def test_an_output_named_like_a_file_is_the_label_file_unless_it_is_a_folder(tmp_path, one_image, model, capsys):
    status, events = predict(capsys, one_image, str(tmp_path / "seg.nii.gz"), model)
    assert status == 0, events
    assert (tmp_path / "seg.nii.gz").is_file()
    (tmp_path / "existing.nii.gz").mkdir()
    status, events = predict(capsys, one_image, str(tmp_path / "existing.nii.gz"), model)
    assert status == 0, events
    assert sorted(p.name for p in (tmp_path / "existing.nii.gz").iterdir()) == ["liver.nii.gz"]
