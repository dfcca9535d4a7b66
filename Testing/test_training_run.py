"""Training runs end to end: outputs, kills at any moment, resume, signals, unsafe files, time budget.

Runs go through the real command line in subprocesses where a process must die (SIGKILL,
SIGTERM) or its stdout is the contract (``--events``), and through ``cli.main`` or the
Trainer in this process where that is enough (it is the same code, without 4 s of imports).
Synchronisation is by the events a run prints, never by sleeping.

The network is a TINY version of the phantom plan's (patch 16x32x32, 3 stages of 4-16
features) so an iteration takes ~0.05 s; the mechanics under test do not depend on its size.

This file is also the program the kill tests start (``python test_training_run.py serve``):
a fork server that has imported torch once and forks one child per run, so a run to be
killed costs no interpreter start-up (4-5 s on the shared test machine). A child runs either
``autoseg`` itself (``cli.main``, the exit status becomes the child's) or the fault-injecting
driver, which trains like ``autoseg train`` but saves ``latest`` after every epoch and can
stop dead in the middle of a checkpoint write (``--fault mid-write``: half the bytes
written) or right after the previous ``latest`` was moved to ``.prev`` and before the new one
took its name (``--fault after-rotate``), printing a ``fault`` event and waiting there to be
killed. The children are real processes killed with real signals; the short run uses
``python -m AutoSegLib`` itself.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the driver runs as a script
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

from AutoSegLib import cli  # noqa: E402
from AutoSegLib.events import Reporter  # noqa: E402
from AutoSegLib.models import checkpoint as ckpt  # noqa: E402
from AutoSegLib.training.progress import read_log  # noqa: E402
from AutoSegLib.training.schedule import poly_lr  # noqa: E402
from AutoSegLib.training.setup import TrainOptions, setup_run  # noqa: E402
from AutoSegLib.training.trainer import INITIAL_LR, Trainer, TrainingInterrupted  # noqa: E402
from conftest import TINY  # noqa: E402

CONFIG = "3d_fullres"
# One thread: the network is tiny, and on a loaded 2-core machine OpenMP threads spin for cores
# other jobs hold (0.05 s per iteration with 1 thread, up to 2 s with 2).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
EVENT_TIMEOUT = 60.0  # generous: the machine is shared; a healthy step takes well under a second


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Five CT phantoms, planned and preprocessed for 3d_fullres, with the tiny network: (dataset, work)."""
    from AutoSegLib.fileutil import read_json, write_json
    from AutoSegLib.planning import Plans

    root = tmp_path_factory.mktemp("phantoms")
    dataset, work = root / "DS", root / "WORK"
    quiet = ["--events"]  # keeps tqdm bars out of the test output
    assert cli.main(["make-phantoms", str(dataset), "--cases", "5", "--seed", "1", *quiet]) == 0
    assert cli.main(["plan-and-preprocess", str(dataset), "-w", str(work), "-c", CONFIG, *quiet]) == 0
    plans = read_json(work / "plans.json")
    plans["configurations"][CONFIG].update(TINY)
    Plans.from_dict(plans)  # the tiny plan is a valid plan
    write_json(work / "plans.json", plans)
    return dataset, work


@pytest.fixture
def work_copy(phantoms, tmp_path):
    """A private copy of the planned work folder (each test trains its own folds)."""
    dataset, work = phantoms
    copy = tmp_path / "WORK"
    shutil.copytree(work, copy)
    return dataset, copy


@pytest.fixture
def one_thread(monkeypatch):
    """In-process training uses one thread, and leaves torch's setting as it found it."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


def fold_dir(work: Path, fold="0") -> Path:
    return work / "model" / CONFIG / f"fold_{fold}"


def train_argv(dataset, work, fold="0", *flags) -> list[str]:
    # The paper's schedule unless a test asks for another: these tests check its SGD state.
    preset = [] if "--preset" in flags else ["--preset", "paper"]
    return ["train", str(dataset), CONFIG, str(fold), "-w", str(work), "--device", "cpu", "--events", *preset,
            *map(str, flags)]


def never_predicted(event: dict) -> bool:
    """The validation's warnings about classes a few iterations did not learn (tested elsewhere)."""
    message = event.get("message", "")
    return "was never predicted" in message or "below Dice" in message


def run_in_process(capsys, argv) -> tuple[int, list[dict]]:
    """``autoseg ...`` in this process; returns the exit status and the events it printed."""
    capsys.readouterr()
    status = cli.main(argv)
    out = capsys.readouterr().out
    return status, [json.loads(line) for line in out.splitlines()]


# -- subprocesses --------------------------------------------------------------------------
class Process:
    """A run in its own session; its stdout is parsed as JSON events by a reader thread."""

    def __init__(self, argv: list[str], log: Path, stdin=None):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=open(log, "wb"), text=True, env=ENV, start_new_session=True)
        self.pid = self.proc.pid
        self.events: list[dict] = []
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _take(self, timeout: float) -> dict | None:
        line = self.lines.get(timeout=timeout)
        if line is None:
            self.lines.put(None)  # stay at end of stream
            return None
        event = json.loads(line)  # every stdout line must be an event
        self.events.append(event)
        return event

    def wait_for(self, predicate, what: str, timeout: float = EVENT_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._take(max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                event = None
                if time.monotonic() < deadline:
                    continue
                raise AssertionError(f"no {what} within {timeout} s; {self.describe()}") from None
            if event is None:
                self.proc.wait(10)
                raise AssertionError(f"the run ended (status {self.proc.returncode}) before {what}; {self.describe()}")
            if predicate(event):
                return event

    def finish(self, timeout: float = 120.0) -> int:
        status = self.proc.wait(timeout)
        while True:
            try:
                if self._take(5.0) is None:
                    return status
            except queue.Empty:
                return status

    def kill(self, signum=signal.SIGKILL) -> None:
        os.kill(self.pid, signum)

    def children(self) -> list[int]:
        return children_of(self.pid)

    def describe(self) -> str:
        err = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return f"events: {[e.get('event') for e in self.events][-30:]}\nstderr tail:\n{err}"

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only: the run and its workers
            self.proc.wait(10)


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class ForkServer:
    """``test_training_run.py serve`` in a subprocess: torch imported once, one forked child per run."""

    def __init__(self, log: Path):
        self.server = Process([str(Path(__file__).resolve()), "serve"], log, stdin=subprocess.PIPE)
        self.server.wait_for(lambda e: e["event"] == "ready", "the fork server", timeout=120)

    def start(self, kind: str, argv: list[str]) -> "Child":
        self.server.proc.stdin.write(json.dumps({"kind": kind, "argv": [str(a) for a in argv]}) + "\n")
        self.server.proc.stdin.flush()
        forked = self.server.wait_for(lambda e: e["event"] == "forked", "a forked run")
        return Child(self, forked["pid"])

    def close(self) -> None:
        self.server.cleanup()


class Child:
    """One run forked by the server; its events arrive on the server's stdout."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid, self.status = server, pid, None
        self.first = len(server.server.events)

    @property
    def events(self) -> list[dict]:
        return [e for e in self.server.server.events[self.first:] if e["event"] not in ("forked", "exited")]

    def wait_for(self, predicate, what: str, timeout: float = EVENT_TIMEOUT) -> dict:
        return self.server.server.wait_for(lambda e: e["event"] != "exited" and predicate(e), what, timeout)

    def finish(self, timeout: float = 120.0) -> int:
        if self.status is None:
            done = self.server.server.wait_for(lambda e: e["event"] == "exited" and e["pid"] == self.pid,
                                               f"the end of run {self.pid}", timeout)
            self.status = done["status"]
        return self.status

    def kill(self, signum=signal.SIGKILL) -> None:
        os.kill(self.pid, signum)

    def children(self) -> list[int]:
        return children_of(self.pid)

    def describe(self) -> str:
        return self.server.server.describe()

    def cleanup(self) -> None:
        if self.status is None and not gone(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            self.finish(30)


@pytest.fixture(scope="module")
def fork_server(phantoms, tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("server") / "stderr.txt")
    yield server
    server.close()


@pytest.fixture
def forked(fork_server):
    started: list[Child] = []

    def start(kind, argv):
        child = fork_server.start(kind, argv)
        started.append(child)
        return child

    yield start
    for child in started:
        child.cleanup()


def is_epoch(event) -> bool:
    return event["event"] == "epoch"


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie waiting for whoever inherited it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if not gone(p)]
        if not alive:
            return []
        time.sleep(0.1)  # polling /proc; nothing to wait on for a process we did not start
    return [p for p in pids if not gone(p)]


# -- checks --------------------------------------------------------------------------------
def assert_every_checkpoint_loads(folder: Path) -> dict[str, int]:
    """Nothing corrupt: each checkpoint_*.pt present loads; returns name -> epoch."""
    epochs = {}
    for path in sorted(folder.glob("checkpoint_*.pt")):
        epochs[path.name] = ckpt.load_checkpoint(path)["epoch"]  # raises naming the file if broken
    assert epochs, f"no checkpoint in {folder}: {sorted(p.name for p in folder.iterdir())}"
    return epochs


def assert_log_is_consistent(folder: Path, epochs: int) -> list[dict]:
    records = read_log(folder)
    assert [r["epoch"] for r in records] == list(range(epochs)), "epochs missing, repeated or out of order"
    return records


def restore_copy(dataset: Path, work: Path, tmp: Path) -> tuple[Path, dict, Trainer]:
    """What a resume of ``work`` would load, checked on a copy: the Trainer's weights after
    ``restore()`` equal the newest valid checkpoint's, byte for byte."""
    folder = fold_dir(work)
    path, state, skipped = ckpt.find_resume_checkpoint(folder)
    assert not skipped, f"a kill left a broken checkpoint: {skipped}"
    copy = tmp / f"restore-{time.monotonic_ns()}"
    shutil.copytree(work, copy)
    trainer = Trainer(setup_run(dataset, copy, TrainOptions(CONFIG, "0", resume=True, device="cpu")))
    assert trainer.restore() == fold_dir(copy) / path.name
    weights = trainer.network.state_dict()
    assert weights.keys() == state["network_weights"].keys()
    for key, value in state["network_weights"].items():
        assert torch.equal(weights[key], value), f"{key} differs from {path.name}"
    momentum = trainer.optimizer.state_dict()["state"]
    for index, saved in state["optimizer_state"]["state"].items():
        assert torch.equal(momentum[index]["momentum_buffer"], saved["momentum_buffer"])
    assert trainer.epoch == state["epoch"] and trainer.ema == state["ema_pseudo_dice"]
    shutil.rmtree(copy)
    return path, state, trainer


def assert_resumed_from(process: Process, path: Path, epoch: int) -> None:
    message = process.wait_for(lambda e: e["event"] == "log" and e["message"].startswith("Resuming from"),
                               "the resume message")["message"]
    assert message.startswith(f"Resuming from {path} at epoch {epoch} of"), message
    first = process.wait_for(lambda e: e["event"] in ("progress", "epoch"), "the first step after resuming")
    assert first["epoch"] == epoch, f"resumed at epoch {first['epoch']}, the checkpoint holds {epoch}"


# -- 1. a short run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(phantoms, tmp_path_factory):
    """``autoseg train`` for 3 epochs x 3 iterations in a subprocess, with a data worker."""
    dataset, work = phantoms
    root = tmp_path_factory.mktemp("short")
    copy = root / "WORK"
    shutil.copytree(work, copy)
    process = Process(["-m", "AutoSegLib", *train_argv(dataset, copy, 0, "--epochs", 3, "--iterations-per-epoch", 3,
                                                         "--num-workers", 1)], root / "stderr.txt")
    try:
        status = process.finish()
    finally:
        process.cleanup()
    assert status == 0, process.describe()
    return dataset, copy, process.events


def test_short_run_writes_checkpoints_log_plot_and_model_files(short_run):
    dataset, work, events = short_run
    folder = fold_dir(work)
    epochs = assert_every_checkpoint_loads(folder)
    assert epochs["checkpoint_final.pt"] == 3 and 1 <= epochs["checkpoint_best.pt"] <= 3
    final = ckpt.load_checkpoint(folder / "checkpoint_final.pt")
    assert final["schedule"] == {"epochs": 3, "iterations_per_epoch": 3, "val_iterations": 1, "optimizer": "sgd",
                                 "initial_lr": 0.01}
    assert final["configuration"] == CONFIG and final["fold"] == "0"

    records = assert_log_is_consistent(folder, 3)
    labels = [n for n in json.loads((dataset / "dataset.json").read_text())["labels"] if n != "background"]
    for record in records:
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])
        assert list(record["pseudo_dice"]) == labels
        assert all(d is None or 0.0 <= d <= 1.0 for d in record["pseudo_dice"].values())
        assert record["learning_rate"] == pytest.approx(poly_lr(record["epoch"], 3, INITIAL_LR))
        assert record["epoch_time_s"] > 0 and 0.0 <= record["ema_pseudo_dice"] <= 1.0
    assert records[0]["learning_rate"] == INITIAL_LR > records[1]["learning_rate"] > records[2]["learning_rate"] > 0
    # EMA = 0.9 old + 0.1 new, starting at the first epoch's mean
    ema = records[0]["mean_pseudo_dice"]
    for record in records[1:]:
        ema = 0.9 * ema + 0.1 * record["mean_pseudo_dice"]
        assert record["ema_pseudo_dice"] == pytest.approx(ema)
    assert final["ema_pseudo_dice"] == pytest.approx(ema)

    png = (folder / "progress.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 600 and height >= 600
    assert json.loads((work / "model" / "plans.json").read_text()) == json.loads((work / "plans.json").read_text())
    assert json.loads((work / "model" / "dataset.json").read_text())["labels"] == \
        json.loads((dataset / "dataset.json").read_text())["labels"]
    assert not list(folder.glob(".tmp-*")), "temporary files left behind"


def test_short_run_events_are_json_with_epochs_and_a_final_done(short_run):
    _, work, events = short_run
    assert all({"event", "stage", "t"} <= set(e) for e in events)
    epoch_events = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epoch_events] == [0, 1, 2] and [e["done"] for e in epoch_events] == [1, 2, 3]
    for event in epoch_events:
        assert event["of"] == 3 and event["eta_s"] >= 0 and "pseudo_dice" in event and "train_loss" in event
    assert epoch_events[-1]["eta_s"] == 0
    progress = [e for e in events if e["event"] == "progress" and e["stage"] == "train"]
    assert [(e["epoch"], e["iteration"]) for e in progress] == [(ep, it) for ep in range(3) for it in (1, 2, 3)]
    assert events[-1]["event"] == "done" and events[-1]["stage"] == "train"
    assert events[-1]["epochs"] == 3 and Path(events[-1]["checkpoint"]) == fold_dir(work) / "checkpoint_final.pt"
    assert not [e for e in events if e["event"] == "error" or (e["event"] == "warning" and not never_predicted(e))]


def test_the_plans_class_weights_weigh_the_cross_entropy(work_copy, one_thread):
    """``ce_class_weights`` of the configuration reach the loss; without them every class weighs 1."""
    from AutoSegLib.fileutil import read_json, write_json

    dataset, work = work_copy
    plain = Trainer(setup_run(dataset, work, TrainOptions(CONFIG, "0", device="cpu", num_workers=0)))
    assert plain.loss.loss.class_weights is None
    plans = read_json(work / "plans.json")
    weights = [1.0] * plans["num_classes"]
    weights[-1] = 3.5
    plans["configurations"][CONFIG]["ce_class_weights"] = weights
    write_json(work / "plans.json", plans)
    weighted = Trainer(setup_run(dataset, work, TrainOptions(CONFIG, "0", device="cpu", num_workers=0)))
    assert weighted.loss.loss.class_weights.tolist() == pytest.approx(weights)


def test_lagging_classes_weigh_more_and_keep_their_lift_through_a_resume(work_copy, one_thread):
    """With ``lagging_class_lift`` a class whose smoothed pseudo-Dice lags weighs more, on top of the
    plan's weight; the smoothed values are in every checkpoint and a resumed run sets the same weights."""
    from AutoSegLib.fileutil import read_json, write_json

    dataset, work = work_copy
    plans = read_json(work / "plans.json")
    assert "lagging_class_lift" not in plans["configurations"][CONFIG]  # a GPU configuration: the method's loss
    plain = Trainer(setup_run(dataset, work, TrainOptions(CONFIG, "0", device="cpu", num_workers=0)))
    assert plain.lift_lagging_classes({"liver": 0.9, "liver_lesion": 0.0}) == {}
    assert plain.loss.loss.class_weights is None

    plans["configurations"][CONFIG].update(ce_class_weights=[1.0, 1.0, 1.0, 1.0, 1.0, 2.0], lagging_class_lift=4.0)
    write_json(work / "plans.json", plans)
    trainer = train_in_process(dataset, work, epochs=2)
    smoothed = trainer.class_dice
    assert sorted(smoothed) == ["aorta", "kidneys", "liver", "liver_lesion", "spleen"]
    assert all(0.0 <= v <= 1.0 for v in smoothed.values())
    for record in read_log(fold_dir(work)):
        assert all(1.0 < lift <= 4.0 for lift in record.get("class_lift", {}).values()), record

    # An epoch where three classes are found (0.9), one is absent from the patches and one is missed:
    # smoothed 0.27 for the three and 0 for the other two; lags 0.73 and 1, mean 0.838, lift 1 / 0.838.
    trainer.class_dice = {}
    lifts = trainer.lift_lagging_classes({"liver": 0.9, "spleen": 0.9, "kidneys": 0.9, "aorta": None,
                                          "liver_lesion": 0.0})
    lift = 1 / ((3 * 0.73 + 2 * 1.0) / 5)
    assert lifts == {"aorta": pytest.approx(lift, abs=1e-3), "liver_lesion": pytest.approx(lift, abs=1e-3)}
    expected = [1.0, 1.0, 1.0, 1.0, lift, 2.0 * lift]  # background, liver, spleen, kidneys, aorta, lesion
    assert trainer.loss.loss.class_weights.tolist() == pytest.approx(expected, abs=1e-4)

    for name in ("final", "best"):  # a resume takes the newest valid checkpoint: make it this one
        (fold_dir(work) / f"checkpoint_{name}.pt").unlink(missing_ok=True)
    trainer.save("latest")
    resumed = Trainer(setup_run(dataset, work, TrainOptions(CONFIG, "0", resume=True, device="cpu", num_workers=0)))
    resumed.restore()
    assert resumed.class_dice == pytest.approx(trainer.class_dice)
    assert resumed.loss.loss.class_weights.tolist() == pytest.approx(expected, abs=1e-4)


# -- 2. SIGKILL at any moment, then --resume -----------------------------------------------
def test_sigkill_at_any_moment_then_resume_continues_from_the_last_checkpoint(work_copy, forked, tmp_path, capsys,
                                                                              one_thread):
    dataset, work = work_copy
    folder = fold_dir(work)
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    note = f"(random kill seed {seed})"

    # (12 epochs: no run below can reach the end before its kill, each advances at most 3 epochs)
    # a. `autoseg train` with data workers, killed the instant it reports its second epoch:
    #    the checkpoints of epoch 1 are complete, those of epoch 2 are being written.
    run = forked("cli", train_argv(dataset, work, 0, "--epochs", 12, "--iterations-per-epoch", 2, "--num-workers", 1))
    run.wait_for(lambda e: is_epoch(e) and e["done"] == 2, "the second epoch")
    workers = run.children()
    assert workers, "the run should have data workers"
    run.kill()
    assert run.finish(10) == -signal.SIGKILL
    assert not wait_gone(workers), "data workers outlived the killed training process"
    assert_every_checkpoint_loads(folder)
    path, state, _ = restore_copy(dataset, work, tmp_path)
    assert state["epoch"] >= 1

    # b.-e. Resumed runs that save after every epoch, killed inside a checkpoint write, between
    #    moving the old latest aside and renaming the new one, and twice at a random moment.
    for flags in (["--fault", "mid-write"], ["--fault", "after-rotate"], [], []):
        run = forked("drive", [dataset, work, "--resume", *flags])
        assert_resumed_from(run, path, state["epoch"])
        if flags:
            fault = run.wait_for(lambda e: e["event"] == "fault", f"the {flags[1]} fault")
            assert Path(fault["file"]).parent == folder
        else:
            run.wait_for(is_epoch, "an epoch")
            delay = rng.uniform(0.0, 0.8)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                time.sleep(0.01)  # the random moment itself, not a synchronisation
        run.kill()
        assert run.finish(10) == -signal.SIGKILL, note
        epochs = assert_every_checkpoint_loads(folder)
        path, state, _ = restore_copy(dataset, work, tmp_path)
        assert state["epoch"] == max(epochs.values()), f"resume must take the newest checkpoint {epochs} {note}"
        finished = max(e["done"] for e in run.events if is_epoch(e))
        assert state["epoch"] >= finished - 1, f"more than one save interval lost {note}"
        if flags == ["--fault", "mid-write"]:
            # the interrupted write is a temporary file, which no resume looks at
            assert Path(fault["file"]).name.startswith(".tmp-")
            assert Path(fault["file"]).stat().st_size == fault["written"] < fault["of"]
        if flags == ["--fault", "after-rotate"]:
            # the old latest is kept as .prev until the new one takes its name
            assert "checkpoint_latest.prev.pt" in epochs and "checkpoint_latest.pt" not in epochs

    # f. The command line resumes to the end.
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--resume", "--num-workers", 0))
    assert status == 0, events[-3:]
    message = next(e["message"] for e in events if e["event"] == "log" and e["message"].startswith("Resuming"))
    assert message.startswith(f"Resuming from {path} at epoch {state['epoch']} of 12")
    assert [e["epoch"] for e in events if is_epoch(e)] == list(range(state["epoch"], 12))
    assert events[-1]["event"] == "done" and events[-1]["epochs"] == 12
    assert assert_every_checkpoint_loads(folder)["checkpoint_final.pt"] == 12
    records = assert_log_is_consistent(folder, 12)
    assert [r["learning_rate"] for r in records] == pytest.approx([poly_lr(e, 12) for e in range(12)])


# -- 3. a truncated newest checkpoint ------------------------------------------------------
def train_in_process(dataset, work, fold="0", **options) -> Trainer:
    """A run that saves ``latest`` every epoch, in this process (no workers)."""
    options = {"epochs": 3, "iterations_per_epoch": 1, "num_workers": 0, "device": "cpu",
               "checkpoint_every_epochs": 1, "preset": "paper", **options}
    trainer = Trainer(setup_run(dataset, work, TrainOptions(CONFIG, str(fold), **options)))
    trainer.fit()
    return trainer


def test_truncated_newest_checkpoint_falls_back_to_the_previous_naming_it(work_copy, capsys, one_thread):
    dataset, work = work_copy
    folder = fold_dir(work)
    train_in_process(dataset, work)
    # A run killed after epoch 3's latest, whose newest file was then cut short (disk trouble,
    # a copy interrupted); best and final are gone so the fallback must be latest's .prev.
    for name in ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_best.prev.pt"):
        (folder / name).unlink(missing_ok=True)
    latest = folder / "checkpoint_latest.pt"
    assert ckpt.load_checkpoint(latest)["epoch"] == 3
    assert ckpt.load_checkpoint(folder / "checkpoint_latest.prev.pt")["epoch"] == 2
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])

    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--resume", "--num-workers", 0))
    assert status == 0, events[-3:]
    warnings = [e["message"] for e in events if e["event"] == "warning" and not never_predicted(e)]
    assert len(warnings) == 1 and str(latest) in warnings[0] and "truncated" in warnings[0], warnings
    resumed = next(e["message"] for e in events if e["event"] == "log" and e["message"].startswith("Resuming"))
    assert resumed.startswith(f"Resuming from {folder / 'checkpoint_latest.prev.pt'} at epoch 2 of 3")
    assert [e["epoch"] for e in events if is_epoch(e)] == [2]
    assert_log_is_consistent(folder, 3)
    assert ckpt.load_checkpoint(folder / "checkpoint_final.pt")["epoch"] == 3


def test_zero_byte_newest_checkpoint_falls_back_to_the_best(work_copy, one_thread):
    dataset, work = work_copy
    folder = fold_dir(work)
    train_in_process(dataset, work)
    (folder / "checkpoint_final.pt").unlink()
    (folder / "checkpoint_latest.pt").write_bytes(b"")
    (folder / "checkpoint_latest.prev.pt").unlink()
    best = ckpt.load_checkpoint(folder / "checkpoint_best.pt")
    messages = []

    class Collect(Reporter):
        def warning(self, stage, message, **fields):
            messages.append(message)

    trainer = Trainer(setup_run(dataset, work, TrainOptions(CONFIG, "0", resume=True, device="cpu")), Collect(quiet=True))
    assert trainer.restore() == folder / "checkpoint_best.pt" and trainer.epoch == best["epoch"]
    assert len(messages) == 1 and "checkpoint_latest.pt" in messages[0] and "empty file" in messages[0]


# -- 4. SIGTERM and SIGINT -----------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_and_exits_143_then_resume_finishes(work_copy, forked, capsys, one_thread):
    dataset, work = work_copy
    folder = fold_dir(work)
    run = forked("cli", train_argv(dataset, work, 0, "--epochs", 6, "--iterations-per-epoch", 2, "--num-workers", 1))
    run.wait_for(is_epoch, "the first epoch")
    workers = run.children()
    run.kill(signal.SIGTERM)
    sent = time.monotonic()
    status = run.finish(30)
    took = time.monotonic() - sent
    assert status == 143, run.describe()
    assert took < 10, f"took {took:.1f} s to stop"
    assert not wait_gone(workers, 5), "data workers left running after SIGTERM"
    last = run.events[-1]
    assert last["event"] == "error" and "SIGTERM" in last["message"] and "--resume" in last["message"]
    assert str(folder / "checkpoint_latest.pt") in last["message"]
    saved = ckpt.load_checkpoint(folder / "checkpoint_latest.pt")
    assert 1 <= saved["epoch"] < 6 and not [e for e in run.events if e["event"] == "done"]
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--resume", "--num-workers", 0))
    assert status == 0 and events[-1]["event"] == "done" and events[-1]["epochs"] == 6
    assert [e["epoch"] for e in events if is_epoch(e)][0] == saved["epoch"]
    assert_log_is_consistent(folder, 6)


def test_sigint_in_the_middle_of_an_epoch_saves_that_moment(work_copy, one_thread):
    """Ctrl+C after an iteration: latest holds the weights of that moment, at the unfinished epoch."""
    dataset, work = work_copy

    class InterruptAtSecondIteration(Reporter):
        def emit(self, event, stage, **fields):
            if event == "progress" and fields.get("epoch") == 1 and fields.get("iteration") == 2:
                os.kill(os.getpid(), signal.SIGINT)  # handled by the trainer: a flag, checked after the step

    run = setup_run(dataset, work, TrainOptions(CONFIG, "0", epochs=4, iterations_per_epoch=3, num_workers=0,
                                                device="cpu"))
    trainer = Trainer(run, InterruptAtSecondIteration(events=True, quiet=True))
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert info.value.exit_status == 130 and "SIGINT" in str(info.value) and "--resume" in str(info.value)
    saved = ckpt.load_checkpoint(run.run_folder / "checkpoint_latest.pt")
    assert saved["epoch"] == 1  # epoch 1 had begun but not finished: it is redone on resume
    for key, value in trainer.network.state_dict().items():
        assert torch.equal(saved["network_weights"][key], value)
    assert [r["epoch"] for r in read_log(run.run_folder)] == [0]


# -- 5. refusing to start fresh, or over a trained fold ------------------------------------
def test_resume_without_a_checkpoint_fails_and_starts_nothing(work_copy, capsys):
    dataset, work = work_copy
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--resume"))
    assert status == 1
    assert events[-1]["event"] == "error" and "nothing to resume" in events[-1]["message"]
    assert "run without --resume" in events[-1]["message"]
    assert not fold_dir(work).exists() and not (work / "model").exists()


def test_resume_when_every_checkpoint_is_broken_is_a_clean_error(work_copy, capsys, one_thread):
    dataset, work = work_copy
    folder = fold_dir(work)
    folder.mkdir(parents=True)
    (folder / "checkpoint_latest.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--resume", "--num-workers", 0))
    assert status == 1
    message = events[-1]["message"]
    assert "nothing to resume" in message and "checkpoint_latest.pt" in message and "internal error" not in message
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_latest.pt"]  # nothing started, nothing removed


def test_a_trained_fold_is_refused_without_resume_or_overwrite_and_overwrite_starts_over(short_run, tmp_path, capsys,
                                                                                          one_thread):
    dataset, trained, _ = short_run
    work = tmp_path / "WORK"
    shutil.copytree(trained, work)
    folder = fold_dir(work)
    def contents():
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    before = contents()
    assert "validation/summary.json" in before  # the run validated its fold at the end
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--epochs", 1))
    assert status == 1
    message = events[-1]["message"]
    assert events[-1]["event"] == "error" and "--resume" in message and "--overwrite" in message
    assert contents() == before

    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--overwrite", "--epochs", 1,
                                                       "--iterations-per-epoch", 1, "--num-workers", 0))
    assert status == 0, events[-3:]
    assert [e["epoch"] for e in events if is_epoch(e)] == [0]
    assert_log_is_consistent(folder, 1)
    assert assert_every_checkpoint_loads(folder) == {"checkpoint_best.pt": 1, "checkpoint_final.pt": 1}


def test_resume_keeps_the_runs_schedule_and_refuses_weights_of_another_network(work_copy, capsys, one_thread):
    from AutoSegLib.fileutil import read_json, write_json

    dataset, work = work_copy
    train_in_process(dataset, work, epochs=2)
    (fold_dir(work) / "checkpoint_final.pt").unlink()  # as if killed after epoch 2's latest
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--resume", "--epochs", 50,
                                                       "--num-workers", 0))
    assert status == 0 and events[-1]["epochs"] == 2
    warnings = [e["message"] for e in events if e["event"] == "warning" and not never_predicted(e)]
    assert len(warnings) == 1 and "continues the run's own schedule (2 epochs x 1 iterations)" in warnings[0]

    plans = read_json(work / "plans.json")  # planned again, with a wider network
    plans["configurations"][CONFIG]["features_per_stage"] = [8, 16, 32]
    write_json(work / "plans.json", plans)
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--resume", "--num-workers", 0))
    assert status == 1
    message = events[-1]["message"]
    assert "does not fit the network of the current plans" in message and "checkpoint_final.pt" in message
    assert "internal error" not in message


# -- the schedule's optimizer --------------------------------------------------------------
def test_quick_preset_trains_with_adamw_and_a_resume_keeps_the_runs_optimizer(work_copy, one_thread):
    dataset, work = work_copy
    trainer = train_in_process(dataset, work, epochs=2, preset="quick")
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    records = read_log(fold_dir(work))
    assert records[0]["learning_rate"] == pytest.approx(3e-3)
    assert records[1]["learning_rate"] == pytest.approx(poly_lr(1, 2, 3e-3))
    (fold_dir(work) / "checkpoint_final.pt").unlink()  # as if killed after epoch 2's latest
    resumed = Trainer(setup_run(dataset, work, TrainOptions(CONFIG, "0", preset="paper", resume=True, num_workers=0,
                                                            device="cpu")))
    resumed.restore()
    assert isinstance(resumed.optimizer, torch.optim.AdamW) and resumed.schedule.optimizer == "adamw"
    paper = Trainer(setup_run(dataset, work, TrainOptions(CONFIG, "1", preset="paper", num_workers=0, device="cpu")))
    assert isinstance(paper.optimizer, torch.optim.SGD)
    auto = setup_run(dataset, work, TrainOptions(CONFIG, "2", num_workers=0, device="cpu"))  # the default
    assert (auto.preset, auto.schedule.optimizer) == ("quick", "adamw") and "no GPU" in auto.preset_reason
    assert paper.optimizer.defaults["momentum"] == 0.99 and paper.optimizer.defaults["nesterov"]


# -- fine-tuning: a new run from another run's weights -------------------------------------
def test_init_from_starts_a_new_run_at_epoch_0_with_the_given_weights(work_copy, capsys, one_thread):
    dataset, work = work_copy
    source = train_in_process(dataset, work, epochs=2)
    start = work / "start.pt"
    shutil.copy2(fold_dir(work) / "checkpoint_final.pt", start)
    options = {"epochs": 1, "iterations_per_epoch": 1, "num_workers": 0, "device": "cpu", "overwrite": True,
               "init_from": start}
    trainer = Trainer(setup_run(dataset, work, TrainOptions(CONFIG, "0", **options)))
    trainer.initialize_from(start)
    for name, tensor in source.network.state_dict().items():
        assert torch.equal(trainer.network.state_dict()[name], tensor), name
    assert trainer.epoch == 0 and trainer.records == []
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--overwrite", "--init-from", start,
                                                       "--epochs", 1, "--iterations-per-epoch", 1,
                                                       "--num-workers", 0, "--no-validation"))
    assert status == 0 and events[-1]["event"] == "done" and events[-1]["epochs"] == 1
    assert any("Starting from the weights of" in e.get("message", "") for e in events)
    assert len(read_log(fold_dir(work))) == 1  # its own log, from epoch 0


def test_init_from_refuses_resume_missing_files_and_other_networks(work_copy, capsys, one_thread):
    from AutoSegLib.fileutil import read_json, write_json

    dataset, work = work_copy
    train_in_process(dataset, work, epochs=1)
    start = work / "start.pt"
    shutil.copy2(fold_dir(work) / "checkpoint_final.pt", start)
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--resume", "--init-from", start))
    assert status == 1 and "use one of them" in events[-1]["message"]
    status, events = run_in_process(capsys, train_argv(dataset, work, 1, "--init-from", work / "nothing.pt"))
    assert status == 1 and "nothing.pt: no such checkpoint file" in events[-1]["message"]
    plans = read_json(work / "plans.json")
    plans["configurations"][CONFIG]["features_per_stage"] = [8, 16, 32]
    write_json(work / "plans.json", plans)
    status, events = run_in_process(capsys, train_argv(dataset, work, 1, "--init-from", start, "--num-workers", 0))
    assert status == 1 and "start.pt: its weights do not fit the network" in events[-1]["message"]
    assert "internal error" not in events[-1]["message"]


# -- 6. a checkpoint that would run code ---------------------------------------------------
class Payload:
    """Unpickling this calls os.mkdir(marker): the visible side effect of code in a model file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path: Path, marker: Path, epoch: int = 99) -> None:
    state = {"network_weights": {}, "optimizer_state": {"state": {}, "param_groups": []}, "epoch": epoch,
             "note": Payload(marker)}
    with open(path, "wb") as handle:
        torch.save(state, handle)


def test_pickled_object_in_latest_is_refused_named_and_never_run(short_run, tmp_path, capsys, one_thread):
    dataset, trained, _ = short_run
    work = tmp_path / "WORK"
    shutil.copytree(trained, work)
    folder = fold_dir(work)
    marker = tmp_path / "payload-ran"
    evil = folder / "checkpoint_latest.pt"
    plant(evil, marker)

    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--resume", "--num-workers", 0))
    assert status == 0, events[-3:]
    assert not marker.exists(), "the pickled object's code ran"
    warnings = [e["message"] for e in events if e["event"] == "warning" and not never_predicted(e)]
    assert len(warnings) == 1 and str(evil) in warnings[0] and "pickled" in warnings[0] and "mkdir" in warnings[0]
    resumed = next(e["message"] for e in events if e["event"] == "log" and e["message"].startswith("Resuming"))
    assert resumed.startswith(f"Resuming from {folder / 'checkpoint_final.pt'} at epoch 3")  # not the 'epoch 99'

    # Alone in the folder it is an error, and still never runs.
    for path in folder.glob("checkpoint_*.pt"):
        if path != evil:
            path.unlink()
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--resume", "--num-workers", 0))
    assert status == 1 and str(evil) in events[-1]["message"] and "refused" in events[-1]["message"]
    assert not marker.exists()

    # The payload is live: loading it the unsafe way would have run it.
    torch.load(evil, weights_only=False)
    assert marker.is_dir()


# -- 8. time budget ------------------------------------------------------------------------
def test_time_budget_ends_training_early_with_the_learning_rate_decayed(work_copy, capsys, one_thread):
    dataset, work = work_copy
    budget_min = 0.15
    started = time.monotonic()
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--epochs", 1000, "--iterations-per-epoch", 3,
                                                       "--time-budget", budget_min, "--num-workers", 0))
    took = time.monotonic() - started
    assert status == 0, events[-3:]
    records = read_log(fold_dir(work))
    final = ckpt.load_checkpoint(fold_dir(work) / "checkpoint_final.pt")
    epochs = final["schedule"]["epochs"]
    assert 2 <= len(records) == epochs < 1000 and final["epoch"] == epochs
    assert any(e["event"] == "log" and "time budget" in e["message"] for e in events)
    # the poly decay followed the shortened schedule to (nearly) its end: the last rate is near 0
    # (the last step of a 10-epoch decay is 0.13 of the initial rate; stopping after half of it, 0.54)
    assert records[-1]["learning_rate"] < 0.3 * INITIAL_LR
    assert records[-1]["learning_rate"] <= poly_lr(epochs - 3, epochs)  # at most 2 epochs short of the plan
    assert [r["learning_rate"] for r in records] == sorted((r["learning_rate"] for r in records), reverse=True)
    assert took < budget_min * 60 * 2 + 15, f"{took:.0f} s for a {budget_min * 60:.0f} s budget"


def test_time_budget_shortens_a_first_epoch_that_cannot_fit(work_copy, capsys, one_thread):
    # One epoch of 100,000 iterations would run for hours: the budget must act inside it.
    dataset, work = work_copy
    budget_min = 0.15
    started = time.monotonic()
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--epochs", 50, "--iterations-per-epoch",
                                                       100000, "--time-budget", budget_min, "--num-workers", 0,
                                                       "--no-validation"))
    took = time.monotonic() - started
    assert status == 0, events[-3:]
    assert any(e["event"] == "log" and "instead of 50 of 100000" in e["message"] for e in events), \
        [e["message"] for e in events if e["event"] == "log"]
    final = ckpt.load_checkpoint(fold_dir(work) / "checkpoint_final.pt")
    assert final["schedule"]["iterations_per_epoch"] < 100000
    records = read_log(fold_dir(work))
    assert len(records) >= 2  # several short epochs, so the learning rate decayed in steps
    assert records[-1]["learning_rate"] < records[0]["learning_rate"]
    assert took < budget_min * 60 * 2 + 15, f"{took:.0f} s for a {budget_min * 60:.0f} s budget"


def test_time_budget_raises_adamws_starting_rate_unless_the_user_gave_one(work_copy, capsys, one_thread):
    # A budget of seconds leaves far fewer than the quick preset's 2,000 iterations: AdamW starts at 3x
    # its 3e-3 from the budget probe on (schedule.budget_lr_lift), the decay still ending near 0.
    dataset, work = work_copy
    flags = ("--preset", "quick", "--iterations-per-epoch", 3, "--time-budget", 0.1, "--num-workers", 0,
             "--no-validation")
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, *flags))
    assert status == 0, events[-3:]
    records = read_log(fold_dir(work))
    assert records[0]["learning_rate"] == pytest.approx(3 * 3e-3)
    rates = [r["learning_rate"] for r in records]
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.5 * rates[0]
    assert any(e["event"] == "log" and "instead of 2,000, so AdamW starts at 9.0e-03 instead of 3e-03" in e["message"]
               for e in events)
    final = ckpt.load_checkpoint(fold_dir(work) / "checkpoint_final.pt")
    assert final["schedule"]["initial_lr"] == pytest.approx(9e-3)  # a resumed run keeps it
    # --lr is the user's rate: kept as given under the same budget
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, *flags, "--lr", 3e-3, "--overwrite"))
    assert status == 0, events[-3:]
    assert read_log(fold_dir(work))[0]["learning_rate"] == pytest.approx(3e-3)
    assert not any(e["event"] == "log" and "AdamW starts at" in e["message"] for e in events)
    # a budget that holds the --epochs asked for cuts nothing, so lifts nothing
    status, events = run_in_process(capsys, train_argv(dataset, work, 0, "--preset", "quick", "--epochs", 2,
                                                       "--iterations-per-epoch", 3, "--time-budget", 30,
                                                       "--num-workers", 0, "--no-validation", "--overwrite"))
    assert status == 0, events[-3:]
    assert [r["learning_rate"] for r in read_log(fold_dir(work))] == pytest.approx([3e-3, poly_lr(1, 2, 3e-3)])
    assert not any(e["event"] == "log" and "AdamW starts at" in e["message"] for e in events)


# -- the fault-injecting driver (run as a script by the kill tests) ------------------------
def _emit(**fields) -> None:
    sys.stdout.write(json.dumps({**fields, "stage": "train", "t": round(time.time(), 3)}) + "\n")
    sys.stdout.flush()


def _wait_for_the_kill() -> None:
    while True:
        signal.pause()


def _install_fault(kind: str) -> None:
    if kind == "mid-write":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _emit(event="fault", where=kind, file=f.name, written=len(data) // 2, of=len(data))
            _wait_for_the_kill()

        torch.save = save
    elif kind == "after-rotate":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            if Path(dst).name == "checkpoint_latest.prev.pt":
                _emit(event="fault", where=kind, file=str(dst))
                _wait_for_the_kill()

        os.replace = replace


def drive(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="test_training_run.py drive")
    parser.add_argument("dataset")
    parser.add_argument("work")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--iterations-per-epoch", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fault", choices=["none", "mid-write", "after-rotate"], default="none")
    args = parser.parse_args(argv)
    _install_fault(args.fault)
    reporter = Reporter(events=True)
    options = TrainOptions(CONFIG, "0", epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
                           resume=args.resume, device="cpu", num_workers=0, checkpoint_every_epochs=1)
    try:
        result = Trainer(setup_run(args.dataset, args.work, options), reporter).fit()
    except TrainingInterrupted as exc:
        reporter.error("train", str(exc))
        return exc.exit_status
    reporter.done("train", **result)
    return 0


def serve() -> int:
    """Fork one child per command line on stdin ({"kind": "cli"|"drive", "argv": [...]}), one at a time."""
    import traceback

    # What every run imports on first use, imported once here: the optimizer's torch._dynamo
    # (2-3 s) and pyplot. Nothing here starts a thread, so forking stays safe.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    _emit(event="ready")
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                runner = cli.main if command["kind"] == "cli" else drive
                status = runner(command["argv"])
            except BaseException:  # noqa: BLE001 - a child must never return into the server loop
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _emit(event="forked", pid=pid)
        _, wait_status = os.waitpid(pid, 0)
        _emit(event="exited", pid=pid, status=os.waitstatus_to_exitcode(wait_status))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve())
    if sys.argv[1:2] == ["drive"]:
        sys.exit(drive(sys.argv[2:]))
    sys.exit("usage: test_training_run.py serve | drive DATASET WORK [--resume] [--fault mid-write|after-rotate]")
