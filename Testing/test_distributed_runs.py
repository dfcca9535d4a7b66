"""Data-parallel runs that stop and continue, and folds trained side by side (docs/scaling.md).

Apart from test_distributed.py so the two files run in parallel (pytest-xdist, ``--dist
loadfile``); the helpers and the phantoms are that file's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

from test_distributed import (
    ITERATIONS,
    RUN_TIMEOUT,
    fold_dir,
    run_group,
    torchrun,
    train_args,
)
from test_training_run import ENV, Process, phantoms  # noqa: F401 - phantoms is a fixture

from AutoSegLib import cli


def test_sigterm_to_one_rank_saves_one_checkpoint_and_stops_both_then_resume_with_2_ranks(phantoms, tmp_path,
                                                                                         capsys):
    from AutoSegLib.models import checkpoint as ckpt
    from AutoSegLib.training.progress import read_log

    dataset, work = phantoms
    shutil.copytree(work, tmp_path / "WORK")
    work = tmp_path / "WORK"
    epochs = 6
    flags = ("--epochs", epochs, "--iterations-per-epoch", ITERATIONS, "--checkpoint-every-epochs", 100)
    group = Process(torchrun("-m", "AutoSegLib", *train_args(dataset, work, "0", *flags)), tmp_path / "first.txt")
    try:
        started = group.wait_for(lambda e: "pids" in e.get("message", ""), "the group's pids")
        pids = [int(p) for p in started["message"].split("pids ")[1].split(";")[0].split(", ")]
        group.wait_for(lambda e: e["event"] == "epoch", "the first epoch")
        # The fold lock holds while a group trains it: a second trainer of the fold is refused.
        assert cli.main(train_args(dataset, work, "0", *flags)) == 1
        assert "is training this fold; wait for it or stop it" in capsys.readouterr().err
        os.kill(pids[1], signal.SIGTERM)  # one rank only
        status = group.finish(RUN_TIMEOUT)
    finally:
        group.cleanup()
    stderr = (tmp_path / "first.txt").read_text(errors="replace")
    assert status != 0
    assert "rank 0 of 2: stopped by SIGTERM" in stderr and "rank 1 of 2: stopped by SIGTERM" in stderr, stderr[-3000:]
    folder = fold_dir(work)
    saved = ckpt.load_checkpoint(folder / "checkpoint_latest.pt")
    assert not (folder / "checkpoint_latest.prev.pt").exists()  # saved once, by rank 0 only
    assert 1 <= saved["epoch"] < epochs
    assert not (folder / "checkpoint_final.pt").exists()

    # --resume with 2 ranks, through the convenience launcher (torchrun --standalone picks its own port)
    status, events, stderr = run_group(["-m", "AutoSegLib", *train_args(dataset, work, "0", "--resume", "--nproc", 2)],
                                       tmp_path / "resume.txt")
    assert status == 0, stderr[-3000:]
    assert any(f"at epoch {saved['epoch']} of {epochs}" in e.get("message", "") for e in events)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == list(range(saved["epoch"], epochs))
    assert [r["epoch"] for r in read_log(folder)] == list(range(epochs))
    assert ckpt.load_checkpoint(folder / "checkpoint_final.pt")["epoch"] == epochs


def test_folds_train_side_by_side_over_devices(phantoms, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    dataset, work = phantoms
    shutil.copytree(work, tmp_path / "WORK")
    work = tmp_path / "WORK"
    capsys.readouterr()
    status = cli.main([*train_args(dataset, work, "0,1", "--epochs", 1, "--iterations-per-epoch", 2),
                       "--devices", "cpu,cpu"])
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert status == 0, captured.err[-3000:]
    assert events[-1]["event"] == "done" and events[-1]["folds"] == {"0": 0, "1": 0}
    assert [e["event"] for e in events].count("done") == 1  # the folds' own done events came as logs
    assert {e["fold"] for e in events if e["event"] == "epoch"} == {"0", "1"}
    for fold in ("0", "1"):
        assert (fold_dir(work, fold) / "checkpoint_final.pt").is_file()
    started = [e for e in events if "started on cpu" in e.get("message", "")]
    assert len(started) == 2
