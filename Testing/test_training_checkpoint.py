import os
from pathlib import Path

import numpy as np
import pytest
import torch

from AutoSegLib.models import checkpoint as ck
from AutoSegLib.models.checkpoint import (
    BEST,
    FINAL,
    LATEST,
    CheckpointError,
    UnsafeCheckpointError,
    check_state,
    find_resume_checkpoint,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)


def make_state(epoch: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    net(torch.randn(1, 1, 4, 4, 4)).sum().backward()
    opt.step()
    return {
        "network_weights": net.state_dict(),
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": None,
        "epoch": epoch,
        "logs": {"train_loss": [0.9, 0.7], "pseudo_dice": [[0.1, 0.2], [0.3, 0.4]]},
        "schedule": {"epochs": 20, "iterations_per_epoch": 25, "val_iterations": 5},
        "best_ema_dice": 0.25,
    }


def assert_same_state(loaded: dict, state: dict) -> None:
    assert loaded["epoch"] == state["epoch"]
    for key, tensor in state["network_weights"].items():
        assert torch.equal(loaded["network_weights"][key], tensor)
    assert loaded["optimizer_state"]["param_groups"] == state["optimizer_state"]["param_groups"]
    assert loaded["logs"] == state["logs"]


def test_round_trip_restores_model_and_optimizer(tmp_path):
    state = make_state(epoch=7)
    save_checkpoint(tmp_path / LATEST, state)
    loaded = load_checkpoint(tmp_path / LATEST)
    assert_same_state(loaded, state)
    assert loaded["checkpoint_version"] == ck.CHECKPOINT_VERSION
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    net.load_state_dict(loaded["network_weights"])
    opt.load_state_dict(loaded["optimizer_state"])
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"],
                       state["optimizer_state"]["state"][0]["momentum_buffer"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST]


def test_second_save_keeps_previous(tmp_path):
    save_checkpoint(tmp_path / LATEST, make_state(1))
    save_checkpoint(tmp_path / LATEST, make_state(2))
    save_checkpoint(tmp_path / LATEST, make_state(3))
    assert load_checkpoint(tmp_path / LATEST)["epoch"] == 3
    assert load_checkpoint(tmp_path / "checkpoint_latest.prev.pt")["epoch"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {LATEST, "checkpoint_latest.prev.pt"}
    assert previous_path(tmp_path / BEST) == tmp_path / "checkpoint_best.prev.pt"


def test_truncated_newest_falls_back_to_previous_and_names_it(tmp_path):
    save_checkpoint(tmp_path / LATEST, make_state(4))
    save_checkpoint(tmp_path / LATEST, make_state(5))
    data = (tmp_path / LATEST).read_bytes()
    (tmp_path / LATEST).write_bytes(data[: len(data) // 2])
    path, state, skipped = find_resume_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoint_latest.prev.pt" and state["epoch"] == 4
    assert [p for p, _ in skipped] == [tmp_path / LATEST]
    assert str(tmp_path / LATEST) in skipped[0][1] and "corrupt or truncated" in skipped[0][1]


def test_zero_byte_file(tmp_path):
    (tmp_path / LATEST).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint_latest.pt: empty file \(0 bytes\)"):
        load_checkpoint(tmp_path / LATEST)
    save_checkpoint(tmp_path / BEST, make_state(2))
    path, state, skipped = find_resume_checkpoint(tmp_path)
    assert path == tmp_path / BEST and [p.name for p, _ in skipped] == [LATEST]


def test_broken_latest_never_displaces_good_previous(tmp_path):
    save_checkpoint(tmp_path / LATEST, make_state(1))
    save_checkpoint(tmp_path / LATEST, make_state(2))
    (tmp_path / LATEST).write_bytes(b"")  # e.g. lost in a crash of the file system
    save_checkpoint(tmp_path / LATEST, make_state(3))
    assert load_checkpoint(tmp_path / LATEST)["epoch"] == 3
    assert load_checkpoint(tmp_path / "checkpoint_latest.prev.pt")["epoch"] == 1


def _touch_marker(path):
    Path(path).write_text("payload ran")


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch_marker, (self.marker,)


def test_pickled_object_is_refused_without_running(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"network_weights": {}, "optimizer_state": {}, "epoch": 1, "x": Payload(marker)}, tmp_path / LATEST)
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_latest.pt: refused: .*_touch_marker") as err:
        load_checkpoint(tmp_path / LATEST)
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="nothing to resume from.*refused"):
        find_resume_checkpoint(tmp_path)
    assert not marker.exists()
    # The payload is real: unsafe loading (which AutoSeg never does) would have run it.
    torch.load(tmp_path / LATEST, weights_only=False)
    assert marker.exists()


def test_numpy_values_are_refused_at_save_not_at_resume(tmp_path):
    state = make_state(1)
    state["logs"]["train_loss"].append(np.float64(0.5))  # a float subclass that pickles as numpy
    state["extra"] = np.zeros(3)
    state["paths"] = {Path("a"): 1}
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path / LATEST, state)
    message = str(err.value)
    assert "state['logs']['train_loss'][2] is numpy.float64" in message
    assert "state['extra'] is numpy.ndarray" in message
    assert "state['paths'] has a key of type pathlib" in message
    assert list(tmp_path.iterdir()) == []
    check_state(make_state(1))  # real model, SGD and logs pass


def test_kill_between_the_renames_leaves_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / LATEST, make_state(1))
    save_checkpoint(tmp_path / LATEST, make_state(2))
    calls = []
    real_replace = os.replace

    def replace_then_die(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:  # the rename of the new file into place
            raise OSError("simulated kill")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace_then_die)
    with pytest.raises(CheckpointError, match="simulated kill.*newest complete checkpoint is .*checkpoint_latest.prev.pt"):
        save_checkpoint(tmp_path / LATEST, make_state(3))
    monkeypatch.undo()
    assert calls == ["checkpoint_latest.prev.pt", LATEST]
    path, state, skipped = find_resume_checkpoint(tmp_path)
    assert path.name == "checkpoint_latest.prev.pt" and state["epoch"] == 2 and skipped == []


def test_disk_full_during_write_keeps_both_files(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / LATEST, make_state(1))
    save_checkpoint(tmp_path / LATEST, make_state(2))

    def partial_save(obj, handle):
        handle.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", partial_save)
    with pytest.raises(CheckpointError, match="No space left on device.*newest complete checkpoint is .*checkpoint_latest.pt"):
        save_checkpoint(tmp_path / LATEST, make_state(3))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / LATEST)["epoch"] == 2
    assert load_checkpoint(tmp_path / "checkpoint_latest.prev.pt")["epoch"] == 1
    assert {p.name for p in tmp_path.iterdir()} == {LATEST, "checkpoint_latest.prev.pt"}


def test_stray_temp_files_are_ignored_and_cleaned(tmp_path):
    save_checkpoint(tmp_path / LATEST, make_state(1))
    stray = tmp_path / ".tmp-0123abcd-checkpoint_latest.pt"  # complete but never renamed: not committed
    torch.save(make_state(9), stray)
    (tmp_path / ".tmp-89abcdef-checkpoint_latest.pt").write_bytes(b"PK partial")
    path, state, skipped = find_resume_checkpoint(tmp_path)
    assert path == tmp_path / LATEST and state["epoch"] == 1 and skipped == []
    save_checkpoint(tmp_path / LATEST, make_state(2))
    assert {p.name for p in tmp_path.iterdir()} == {LATEST, "checkpoint_latest.prev.pt"}


def test_resume_picks_highest_epoch_with_final_preferred_on_ties(tmp_path):
    save_checkpoint(tmp_path / BEST, make_state(6))
    save_checkpoint(tmp_path / LATEST, make_state(5))
    assert find_resume_checkpoint(tmp_path)[0] == tmp_path / BEST
    save_checkpoint(tmp_path / LATEST, make_state(6))
    assert find_resume_checkpoint(tmp_path)[0] == tmp_path / LATEST
    save_checkpoint(tmp_path / FINAL, make_state(6))
    assert find_resume_checkpoint(tmp_path)[0] == tmp_path / FINAL


def test_nothing_to_resume_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume from.*none of checkpoint_final.pt"):
        find_resume_checkpoint(tmp_path)
    (tmp_path / LATEST).write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"nothing to resume from.*checkpoint_latest.pt: corrupt or not a "
                                              r"checkpoint \(weights-only loading stopped: Unsupported operand 110\)"):
        find_resume_checkpoint(tmp_path)


def test_missing_keys_and_bad_values_are_named(tmp_path):
    torch.save({"network_weights": {"w": torch.zeros(1)}, "epoch": -1}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "a.pt")
    assert "missing ['optimizer_state']" in str(err.value)
    assert "'epoch' must be a non-negative integer, found -1" in str(err.value)
    torch.save({"network_weights": {"w": torch.ones(2)}}, tmp_path / "weights_only.pt")
    assert torch.equal(load_checkpoint(tmp_path / "weights_only.pt", required=("network_weights",))
                       ["network_weights"]["w"], torch.ones(2))
    torch.save([1, 2], tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        load_checkpoint(tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
