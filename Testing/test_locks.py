"""One process per folder (AutoSegLib/locks.py): a second trainer, preprocessor or predictor of the
same folder is refused with a message naming the holder, and a holder killed with SIGKILL frees
the folder at once (the OS drops its lock; nothing stale to clean by hand).

Holders and contenders are real processes holding real OS locks. Where the contender must be
an ``autoseg`` command and the holder only has to hold the lock, the holder is a tiny Python
process that takes the folder's lock as the command does (``lock_folder``) and waits to be
killed: a preprocessing or prediction of the tiny data here ends before a contender could
start. Training is tested with two real trainers. Synchronisation is by lines a process
prints, with timeouts, never by sleeping.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from AutoSegLib import cli
from AutoSegLib.events import Reporter
from AutoSegLib.fileutil import read_json, write_json
from AutoSegLib.locks import LOCK_FILE, FolderBusy, LockFileError, lock_folder, read_holder
from conftest import box_case, write_dataset

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
TIMEOUT = 90.0  # generous: the test machine is shared; every wait here normally ends in seconds
CONFIG = "3d_fullres"
# Holds FOLDER's lock as an autoseg command would, says so, and waits (for its kill or stdin's end).
HOLD = ("import sys\nfrom AutoSegLib.locks import lock_folder\n"
        "lock = lock_folder(sys.argv[1], sys.argv[2])\nprint('held', flush=True)\nsys.stdin.read()\n")
# Tries FOLDER's lock once, without cleaning anything: prints "free", or the refusal and exits 1.
PROBE = ("import sys\nfrom AutoSegLib.locks import FolderBusy, lock_folder\n"
         "try:\n    lock_folder(sys.argv[1], 'probing', clean_temps=False)\n"
         "except FolderBusy as exc:\n    print(exc)\n    sys.exit(1)\nprint('free')\n")


def busy(folder: Path, pid: int, doing: str) -> str:
    """The one-line refusal, as a regular expression."""
    return (rf"^{re.escape(str(folder))}: another autoseg \(pid {pid}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\) "
            rf"is {doing}; wait for it or stop it$")


class Run:
    """A process whose stdout lines are queued by a reader thread (no blocking read in the test)."""

    def __init__(self, argv: list, stderr: Path):
        self.stderr = stderr
        self.proc = subprocess.Popen([sys.executable, *map(str, argv)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(stderr, "wb"), text=True, env=ENV,
                                     cwd=REPO, start_new_session=True)
        self.pid, self.out, self.lines = self.proc.pid, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, predicate, what: str) -> str:
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no {what} within {TIMEOUT} s; stderr: {self.stderr.read_text()[-2000:]}")
            if line is None:
                self.lines.put(None)
                raise AssertionError(f"ended (status {self.proc.wait()}) before {what}; "
                                     f"stderr: {self.stderr.read_text()[-2000:]}")
            self.out.append(line)
            if predicate(line):
                return line

    def wait_event(self, predicate, what: str) -> dict:
        line = self.wait_line(lambda text: text.startswith("{") and predicate(json.loads(text)), what)
        return json.loads(line)

    def finish(self) -> tuple[int, list[str], str]:
        """Exit status, all stdout lines, stderr."""
        status = self.proc.wait(TIMEOUT)
        while (line := self.lines.get(timeout=TIMEOUT)) is not None:
            self.out.append(line)
        return status, self.out, self.stderr.read_text()

    def kill(self) -> None:
        """SIGKILL to this process alone (not its session): what ``kill -9 PID`` does."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(TIMEOUT)


@pytest.fixture
def start(tmp_path):
    started: list[Run] = []

    def run(argv: list) -> Run:
        started.append(Run(argv, tmp_path / f"stderr-{len(started)}.txt"))
        return started[-1]

    yield run
    for process in started:
        if process.proc.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: it and anything it forked
            process.proc.wait(TIMEOUT)


def hold(start, folder: Path, doing: str) -> Run:
    holder = start(["-c", HOLD, folder, doing])
    holder.wait_line(lambda line: line == "held", "the holder's lock")
    return holder


def probe(folder: Path) -> tuple[int, str]:
    """Another process tries the lock: (0, "free") or (1, refusal)."""
    result = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, env=ENV,
                            cwd=REPO, timeout=TIMEOUT)
    return result.returncode, result.stdout.strip()


def autoseg(*args) -> list:
    return ["-m", "AutoSegLib", *args]


# ``autoseg ARGS`` (cli.main, as ``python -m AutoSegLib`` runs it) with its imports done first,
# started by a line on stdin: the run's 5 s of start-up overlap with other runs'.
WARM = ("import sys\nfrom AutoSegLib import cli\nimport AutoSegLib.training.trainer\nprint('ready', flush=True)\n"
        "sys.stdin.readline()\nsys.exit(cli.main(sys.argv[1:]))\n")


def warm(args: list) -> list:
    return ["-c", WARM, *args]


def go(run: "Run") -> None:
    run.wait_line(lambda line: line == "ready", "its imports")
    run.proc.stdin.write("go\n")
    run.proc.stdin.flush()


def in_process(capsys, argv: list) -> tuple[int, list[dict]]:
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    return status, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- the lock itself -----------------------------------------------------------------------
def test_a_held_folder_is_refused_naming_the_holder_and_its_kill_frees_it_at_once(start, tmp_path):
    folder = tmp_path / "model" / CONFIG / "fold_0"
    holder = hold(start, folder, "training this fold")
    assert read_holder(folder)["pid"] == holder.pid
    with pytest.raises(FolderBusy, match=busy(folder, holder.pid, "training this fold")):
        lock_folder(folder, "training this fold")
    holder.kill()  # no clean-up code runs: only the OS can release the lock now
    with lock_folder(folder, "training this fold"):
        assert read_holder(folder)["pid"] == os.getpid()
    assert names(folder) == [], "the lock file is removed when its last hold is released"


def test_holds_are_reentrant_in_a_process_and_the_last_release_frees_the_folder(tmp_path):
    folder = tmp_path / "out"
    first = lock_folder(folder, "writing predictions to this folder")
    second = lock_folder(folder, "validating")  # e.g. validation inside a training run: no deadlock
    assert probe(folder)[0] == 1
    first.release()
    first.release()  # a second release of one hold does nothing
    status, message = probe(folder)
    assert status == 1 and re.match(busy(folder, os.getpid(), "writing predictions to this folder"), message)
    second.release()
    assert probe(folder) == (0, "free")


def test_a_refused_or_tidied_lock_leaves_no_folder_behind(start, tmp_path):
    fresh = tmp_path / "model" / CONFIG / "fold_1"
    lock_folder(fresh, "training this fold").release(tidy=True)  # a run refused after locking
    assert not (tmp_path / "model").exists()
    held = tmp_path / "held"
    holder = hold(start, held, "training this fold")
    with pytest.raises(FolderBusy):
        lock_folder(held, "training this fold")
    assert names(held) == [LOCK_FILE]  # the refused process created and removed nothing
    holder.kill()


def test_a_folder_that_cannot_be_made_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(LockFileError, match=rf"^{re.escape(str(tmp_path / 'a_file' / 'out'))}: cannot make"):
        lock_folder(tmp_path / "a_file" / "out", "writing predictions to this folder")


def test_forked_workers_share_the_lock_until_the_last_of_them_ends(start, tmp_path):
    """A worker forked by a run (data loading, preprocessing) inherits the locked file: after
    ``kill -9`` of the run alone, the folder stays held while the worker may still write."""
    folder = tmp_path / "fold_0"
    script = ("import os, sys\nfrom AutoSegLib.locks import lock_folder\n"
              "lock = lock_folder(sys.argv[1], 'training this fold')\npid = os.fork()\n"
              "if pid == 0:\n    sys.stdin.read()\n    os._exit(0)\nprint('held', pid, flush=True)\nsys.stdin.read()\n")
    parent = start(["-c", script, folder])
    worker = int(parent.wait_line(lambda line: line.startswith("held"), "the lock").split()[1])
    try:
        parent.kill()
        status, message = probe(folder)
        assert status == 1 and f"pid {parent.pid}" in message and "that process has ended" in message
    finally:
        os.kill(worker, signal.SIGKILL)
    _wait_free(folder)


def _wait_free(folder: Path) -> None:
    # The killed worker is reaped by init, not by us: poll for the lock with a deadline.
    import time

    deadline = time.monotonic() + TIMEOUT
    while probe(folder)[0] != 0:
        assert time.monotonic() < deadline, f"{folder} still held {TIMEOUT} s after its holders were killed"


# -- the commands --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Five small box cases, planned, 3d_fullres preprocessed, with a tiny network: (dataset, work)."""
    from AutoSegLib.plan_dataset import plan_dataset
    from AutoSegLib.preprocessing.runner import preprocess_dataset

    root = tmp_path_factory.mktemp("locks")
    dataset = write_dataset(root / "Dataset004_Locks", {f"case_{i}": box_case(shape=(8, 16, 16), seed=i)
                                                        for i in range(5)})
    work = root / "work"
    quiet = Reporter(quiet=True)
    plan_dataset(dataset, work, num_processes=1, reporter=quiet)
    plans = read_json(work / "plans.json")
    plans["configurations"][CONFIG].update(features_per_stage=[4, 8, 16], n_conv_per_stage_encoder=[1, 1, 1],
                                           n_conv_per_stage_decoder=[1, 1])
    write_json(work / "plans.json", plans)
    preprocess_dataset(dataset, work, [CONFIG], num_processes=1, reporter=quiet)
    return dataset, work


@pytest.fixture
def work_copy(planned, tmp_path):
    dataset, work = planned
    shutil.copytree(work, tmp_path / "work")
    return dataset, tmp_path / "work"


TRAIN = ["--device", "cpu", "--events", "--epochs", "1000", "--iterations-per-epoch", "2", "--num-workers", "0",
         "--checkpoint-every-epochs", "1", "--no-validation"]


def is_epoch(done: int):
    return lambda event: event["event"] == "epoch" and event["done"] == done


def assert_refused(run: Run, folder: Path, pid: int, doing: str) -> None:
    status, out, err = run.finish()
    message = json.loads(out[-1])
    assert status == 1 and message["event"] == "error", (status, out, err)
    assert re.match(busy(folder, pid, doing), message["message"]), message["message"]
    assert err.rstrip("\n").splitlines()[-1] == f"ERROR: {message['message']}"


def test_a_second_trainer_of_a_fold_is_refused_and_after_kill_9_a_resume_starts(work_copy, start, capsys):
    from AutoSegLib.training.progress import read_log

    dataset, work = work_copy
    fold = work / "model" / CONFIG / "fold_0"
    train = ["train", dataset, CONFIG, "0", "-w", work, *TRAIN]
    # The later runs import torch while the first one starts, then wait for their turn.
    first = start(autoseg(*train))
    overwrite, again = start(warm([*train, "--overwrite"])), start(warm([*train, "--resume"]))
    first.wait_event(lambda e: e["event"] == "progress", "the first trainer's first step")  # it holds the fold
    (fold / "notes.txt").write_text("an --overwrite that ran would delete this")
    go(overwrite)  # --overwrite would delete the running fold
    assert_refused(overwrite, fold, first.pid, "training this fold")
    status, events = in_process(capsys, [*train, "--resume"])  # would train the running one's epochs again
    assert status == 1 and re.match(busy(fold, first.pid, "training this fold"), events[-1]["message"])
    # Epoch 1's checkpoint is saved before epoch 2 is reported.
    done = int(first.wait_event(lambda e: e["event"] == "epoch" and e["done"] >= 2, "epoch 2")["done"])
    assert (fold / "notes.txt").is_file() and (fold / "checkpoint_latest.pt").is_file()
    assert [r["epoch"] for r in read_log(fold)][:done] == list(range(done)), "one writer, epochs in order"

    first.kill()
    (fold / ".tmp-0123abcd-progress.png").write_bytes(b"half a plot")  # as a kill mid-write leaves it
    go(again)
    again.wait_line(lambda line: "Resuming from" in line, "the resume")
    resumed = again.wait_event(lambda e: e["event"] == "progress", "the first step after resuming")["epoch"]
    assert not (fold / ".tmp-0123abcd-progress.png").exists(), "the dead run's temporary file was removed"
    again.wait_event(is_epoch(resumed + 1), "an epoch of the resumed run")
    again.kill()
    epochs = [r["epoch"] for r in read_log(fold)]
    assert epochs == list(range(len(epochs))) and len(epochs) > resumed, f"epochs repeated or lost: {epochs}"


def test_preprocess_is_refused_while_a_configuration_folder_is_held_and_runs_after_a_kill(work_copy, start,
                                                                                          capsys):
    dataset, work = work_copy
    held = work / "preprocessed" / "3d_cpu"  # the last configuration in plan order
    holder = hold(start, held, "preprocessing this configuration")
    stale = held / ".tmp-0123abcd-case_0.npy"
    stale.write_bytes(b"the holder's own temporary file, then a dead run's")
    before = {p: names(p) for p in (work / "preprocessed").iterdir()}
    contender = start(autoseg("preprocess", dataset, "-w", work, "-np", "1", "--events"))  # every configuration
    assert_refused(contender, held, holder.pid, "preprocessing this configuration")
    # All or none: nothing written, no folder made for the configurations it could lock, temp kept.
    assert {p: names(p) for p in (work / "preprocessed").iterdir()} == before
    assert stale.is_file()

    holder.kill()
    status, events = in_process(capsys, ["preprocess", dataset, "-w", work, "-c", "3d_cpu", "-np", "1", "--events"])
    assert status == 0, events
    assert names(held) == [f"case_{i}{suffix}" for i in range(5) for suffix in (".json", ".npy", "_fg.npy",
                                                                                 "_seg.npy")]


def test_preprocess_in_a_process_holding_its_folder_runs_and_keeps_the_hold(work_copy):
    """Re-entrant: the demo (or any caller) holding a folder can preprocess into it."""
    from AutoSegLib.preprocessing.runner import preprocess_dataset

    dataset, work = work_copy
    folder = work / "preprocessed" / "3d_cpu"
    with lock_folder(folder, "running the demo"):
        summary = preprocess_dataset(dataset, work, ["3d_cpu"], num_processes=1)
        assert summary["3d_cpu"]["processed"] == 5
        assert probe(folder)[0] == 1, "the caller's hold outlives preprocessing's own"
    assert probe(folder) == (0, "free")


def test_predict_is_refused_while_its_output_folder_is_held_and_runs_after_a_kill(start, tmp_path, capsys):
    from test_inference_predictor import make_model_folder

    model = make_model_folder(tmp_path / "work", {CONFIG: _tiny_config()}, folds=(0,))
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = box_case(shape=(8, 16, 16))
    from AutoSegLib.imageio import Geometry, write_image

    write_image(image[0], Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                inputs / "case_7_0000.nii.gz")
    out = tmp_path / "out"
    holder = hold(start, out, "writing predictions to this folder")
    (out / ".tmp-0123abcd-case_7.nii.gz").write_bytes(b"")  # the holder's, then a dead run's
    argv = ["predict", "-i", inputs, "-o", out, "-m", model, "-c", CONFIG, "--no-tta", "--device", "cpu", "--events"]
    status, events = in_process(capsys, argv)  # this process is not the holder: refused like any other
    assert status == 1 and events[-1]["event"] == "error"
    assert re.match(busy(out, holder.pid, "writing predictions to this folder"), events[-1]["message"])
    assert names(out) == [".autoseg.lock", ".tmp-0123abcd-case_7.nii.gz"]  # nothing written, temp kept

    holder.kill()
    status, events = in_process(capsys, argv)
    assert status == 0, events
    assert names(out) == ["case_7.nii.gz"]  # the dead run's temporary file is gone, and so is the lock file


def _tiny_config() -> dict:
    from test_inference_predictor import tiny_config

    return tiny_config((2.0, 1.0, 1.0), (8, 16, 16))
