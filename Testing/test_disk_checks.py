"""Disk told up front (writable output folder, room for the outputs) and a full disk named in one line."""

from __future__ import annotations

import errno
import json
import os

import pytest

import AutoSegLib.resources as resources
from AutoSegLib.cli import main
from AutoSegLib.fileutil import DiskFullError, atomic_path, disk_full_error, write_json
from AutoSegLib.resources import ResourceError, check_disk, check_writable, mount_point

from test_memory_estimate import inputs, model_dir, run  # noqa: F401 (fixtures and the CLI runner, shared)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def refuse_writes(monkeypatch, code=errno.EROFS):
    """As a read-only folder behaves, also for root (whom chmod does not stop)."""
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        if "w" in mode and "write-probe" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(resources, "open", failing_open, raising=False)


# -- before the work ----------------------------------------------------------------------------
@pytest.mark.skipif(IS_ROOT or os.name == "nt", reason="root writes into a 0o500 folder (CI runs as root); "
                                                        "the injected-writer test below covers the same path")
def test_read_only_folder_is_refused_by_its_permissions(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(ResourceError, match="read-only or not writable"):
            check_writable(folder)
    finally:
        folder.chmod(0o700)


def test_probe_leaves_nothing_and_makes_the_folder(tmp_path):
    check_writable(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out").is_dir() and not list((tmp_path / "new" / "out").iterdir())


def test_read_only_output_is_refused_before_any_case(model_dir, inputs, tmp_path, capsys, monkeypatch):
    import AutoSegLib.inference.files as files

    refuse_writes(monkeypatch)
    monkeypatch.setattr(files, "predict_cases", lambda *a, **k: pytest.fail("predicted into a read-only folder"))
    out = tmp_path / "out"
    status, events = run(capsys, ["predict", "-i", str(inputs), "-o", str(out), "-m", str(model_dir),
                                  "--device", "cpu", "--events"])
    errors = [e["message"] for e in events if e["event"] == "error"]
    assert status == 1 and len(errors) == 1
    assert errors[0].startswith(f"{out}: output folder is read-only") and "\n" not in errors[0]


def test_full_disk_is_refused_before_any_case(model_dir, inputs, tmp_path, capsys, monkeypatch):
    import AutoSegLib.inference.files as files

    refuse_writes(monkeypatch, errno.ENOSPC)
    monkeypatch.setattr(files, "predict_cases", lambda *a, **k: pytest.fail("predicted onto a full disk"))
    status, events = run(capsys, ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model_dir),
                                  "--device", "cpu", "--events"])
    errors = [e["message"] for e in events if e["event"] == "error"]
    assert status == 1 and "disk full" in errors[0] and str(mount_point(tmp_path)) in errors[0]


def test_read_only_work_folder_is_refused_before_preprocessing(tmp_path, capsys, monkeypatch):
    from conftest import box_case, write_dataset

    dataset = write_dataset(tmp_path / "DS", {f"c{i}": box_case(seed=i) for i in range(2)})
    work = tmp_path / "WORK"
    assert main(["plan", str(dataset), "-w", str(work), "-np", "1"]) == 0
    capsys.readouterr()
    refuse_writes(monkeypatch)
    status, events = run(capsys, ["preprocess", str(dataset), "-w", str(work), "-np", "1", "--events"])
    errors = [e["message"] for e in events if e["event"] == "error"]
    assert status == 1 and "preprocessed data folder is read-only" in errors[0]
    assert not list((work / "preprocessed").rglob("*.npy"))


def test_too_little_room_warns_and_strict_refuses(model_dir, inputs, tmp_path, capsys, monkeypatch):
    import AutoSegLib.inference.memory as memory

    monkeypatch.setattr(resources, "free_disk", lambda path: 2 * resources.MiB)  # not full, but short
    monkeypatch.setattr(memory, "output_bytes", lambda *a: 10 * resources.MiB)  # as if the case were large
    argv = ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model_dir), "--device", "cpu",
            "--no-tta", "--events"]
    status, events = run(capsys, argv)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert status == 0 and len(warnings) == 1
    assert "the outputs of 1 case(s) need up to 10 MiB but only 2 MiB free on" in warnings[0]
    status, events = run(capsys, argv + ["--strict"])
    errors = [e["message"] for e in events if e["event"] == "error"]
    assert status == 1 and "refused: --strict" in errors[0]
    monkeypatch.setattr(resources, "free_disk", lambda path: 0)
    with pytest.raises(ResourceError, match="disk full"):
        check_disk(tmp_path, 1, "the outputs")


# -- during the work -----------------------------------------------------------------------------
def test_enospc_while_writing_is_one_line_naming_file_and_disk(tmp_path):
    target = tmp_path / "plans.json"
    with pytest.raises(DiskFullError) as caught:
        with atomic_path(target) as tmp:
            tmp.write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device")
    message = str(caught.value)
    assert message.startswith(f"disk full while writing {target} (") and f"free on {mount_point(tmp_path)}" in message
    assert "\n" not in message and caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert not target.exists() and not list(tmp_path.iterdir())  # no temporary left either


def test_writers_that_do_not_say_disk_full_are_recognised_by_free_space(tmp_path, monkeypatch):
    # numpy: "2635416 requested and 1100768 written"; torch: "unexpected pos 10816256 vs 10816144"
    vague = [OSError("2635416 requested and 1100768 written"), RuntimeError("unexpected pos 10816256 vs 10816144")]
    for exc in vague:
        assert disk_full_error(exc, tmp_path / "x.npy") is None  # plenty of room: not a full disk
    monkeypatch.setattr(resources, "free_disk", lambda path: 4096)
    for exc in vague:
        full = disk_full_error(exc, tmp_path / "x.npy")
        assert isinstance(full, DiskFullError) and str(full).startswith(f"disk full while writing {tmp_path / 'x.npy'}")
    assert disk_full_error(ValueError("bad value"), tmp_path / "x.npy") is None


def test_quota_and_other_errors(tmp_path):
    if hasattr(errno, "EDQUOT"):
        quota = disk_full_error(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path / "x")
        assert str(quota).startswith("disk quota exceeded while writing")
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "y.json"):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_checkpoint_save_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import torch

    from AutoSegLib.models.checkpoint import CheckpointError, save_checkpoint

    def full(obj, handle, *args, **kwargs):
        handle.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(resources, "free_disk", lambda path: 0)
    path = tmp_path / "fold_0" / "checkpoint_latest.pt"
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(path, {"network_weights": {}, "epoch": 3})
    message = str(caught.value)  # the checkpoint layer adds which checkpoint is still the newest
    assert f"(disk full while writing {path} (0 MB free on " in message and "\n" not in message
    assert isinstance(caught.value.__cause__, DiskFullError) and not path.exists()


def test_json_write_keeps_the_previous_file_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_json(target, {"old": True})
    real_write_text = type(target).write_text

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(type(target), "write_text", full)
    with pytest.raises(DiskFullError):
        write_json(target, {"new": True})
    monkeypatch.setattr(type(target), "write_text", real_write_text)
    assert json.loads(target.read_text()) == {"old": True}
