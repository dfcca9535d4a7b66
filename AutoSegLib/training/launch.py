"""Starting training processes: a torchrun group for one fold, or several folds side by side.

``autoseg train DATASET CONFIG FOLD --nproc N`` (``--gpus N``) starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m AutoSegLib train ...``:
the same command, data-parallel (:mod:`.distributed`). ``autoseg train DATASET CONFIG 0-4
--devices 0,1`` trains folds in child processes, one per device at a time; each child is an
ordinary ``autoseg train`` of one fold, so the fold lock (AutoSegLib/locks.py) refuses a fold
another process trains, and its events come back with a ``fold`` field.

No scheduler of our own beyond that: clusters use torchrun's rendezvous or job arrays
(docs/scaling.md). Parsing and command building are pure functions; the processes are at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.events import Reporter

CV_FOLDS = 5
LAUNCH_OPTIONS = {"--devices": 1, "--gpus": 1, "--nproc": 1}  # ours: removed from the children's arguments


class LaunchError(ReportedFailure):
    """The processes cannot be started as asked (fold list, devices, GPU count); one line."""


class LaunchStopped(Exception):
    """The children ended with a failure or a signal; ``exit_status`` is the command's."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


# -- pure helpers ---------------------------------------------------------------------------
def parse_folds(text: str) -> list[str]:
    """``"3"`` -> ["3"], ``"all"`` -> ["all"], ``"0,2,4"`` and ``"0-4"`` -> several folds.

    ``all`` stays nnU-Net's fold "all" (train on every case): the five cross-validation folds
    are ``0-4``.

    Raises:
        LaunchError: a part that is not a fold number or range, or a fold named twice.
    """
    text = text.strip()
    if "," not in text and "-" not in text:
        return [text]
    folds: list[str] = []
    for part in text.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise LaunchError(f"fold list {text!r}: {part!r} is not a fold number or a range like 0-4")
        numbers = range(int(low), int(high) + 1) if dash else [int(low)]
        if dash and int(high) < int(low):
            raise LaunchError(f"fold list {text!r}: the range {part} is empty")
        folds += [str(n) for n in numbers]
    doubled = sorted({f for f in folds if folds.count(f) > 1}, key=int)
    if doubled:
        raise LaunchError(f"fold list {text!r} names fold(s) {', '.join(doubled)} more than once")
    return folds


@dataclass(frozen=True)
class Slot:
    """Where one child trains: ``--device`` and, for a GPU, the CUDA_VISIBLE_DEVICES it sees."""

    device: str  # "cuda" or "cpu" (or "mps")
    visible: str | None = None  # CUDA device index for CUDA_VISIBLE_DEVICES

    def __str__(self) -> str:
        return f"GPU {self.visible}" if self.visible is not None else self.device


def parse_devices(text: str) -> list[Slot]:
    """``"0,1"`` / ``"cuda:0,cuda:1"`` -> two GPUs; ``"cpu,cpu"`` -> two CPU processes at a time.

    Raises:
        LaunchError: an entry that is neither a GPU index, ``cuda:N``, ``cpu`` nor ``mps``, or a GPU twice.
    """
    slots = []
    for part in (p.strip().lower() for p in text.split(",")):
        index = part[5:] if part.startswith("cuda:") else part
        if index.isdigit():
            slots.append(Slot("cuda", str(int(index))))
        elif part in ("cpu", "mps"):
            slots.append(Slot(part))
        else:
            raise LaunchError(f"--devices {text!r}: {part!r} is not a GPU index (0, 1, ... or cuda:0), cpu or mps")
    gpus = [s.visible for s in slots if s.visible is not None]
    if len(set(gpus)) < len(gpus):
        raise LaunchError(f"--devices {text!r} names a GPU twice; one fold per GPU at a time")
    return slots


def check_gpus(slots: list[Slot], available: int) -> None:
    """Every GPU named exists (``available`` CUDA devices)."""
    missing = [s.visible for s in slots if s.visible is not None and int(s.visible) >= available]
    if missing:
        raise LaunchError(f"--devices names GPU(s) {', '.join(missing)} but this machine has {available} CUDA "
                          f"device(s)" + (" (none: use --devices cpu,cpu)" if not available else ""))


def strip_options(argv: list[str], options: dict[str, int]) -> list[str]:
    """``argv`` without the given options and their values (``--opt V`` and ``--opt=V``)."""
    out, skip = [], 0
    for token in argv:
        if skip:
            skip -= 1
            continue
        name = token.split("=", 1)[0]
        if name in options:
            skip = 0 if "=" in token else options[name]
            continue
        out.append(token)
    return out


def child_arguments(argv: list[str], fold_text: str, fold: str, slot: Slot) -> list[str]:
    """One fold's ``autoseg`` arguments: the fold list replaced by the fold, ``--device`` set by the slot."""
    args = strip_options(argv, {**LAUNCH_OPTIONS, "--device": 1})
    if args.count(fold_text) != 1:
        raise LaunchError(f"cannot find the fold list {fold_text!r} once among the arguments {' '.join(argv)}")
    args[args.index(fold_text)] = fold
    return [*args, "--device", slot.device]


def next_starts(pending: list[str], free: list[Slot]) -> list[tuple[str, Slot]]:
    """Folds to start now: the first pending ones, one per free device."""
    return list(zip(pending, free))


# -- a torchrun group for one fold --------------------------------------------------------------
def requested_ranks(gpus: int | None, nproc: int | None, device: str, cuda_count: int) -> tuple[int, str]:
    """How many ranks, on which device: ``--gpus N`` (CUDA, NCCL) or ``--nproc N`` (on ``--device``)."""
    if gpus is not None and nproc is not None:
        raise LaunchError("give --gpus N (one rank per GPU) or --nproc N (ranks on --device), not both")
    if gpus is not None:
        if device not in ("auto", "cuda"):
            raise LaunchError(f"--gpus with --device {device}: --gpus trains on CUDA GPUs; use --nproc N for "
                              "processes on the CPU")
        if gpus > cuda_count:
            raise LaunchError(f"--gpus {gpus}: this machine has {cuda_count} CUDA device(s)"
                              + ("; use --nproc N --device cpu for CPU processes (gloo)" if not cuda_count else ""))
        return gpus, "cuda"
    if (device == "cuda" or (device == "auto" and cuda_count)) and nproc > cuda_count:
        raise LaunchError(f"--nproc {nproc} on CUDA (--device {device}): this machine has {cuda_count} CUDA "
                          "device(s), one per rank; give fewer, or --device cpu")
    return nproc, device


def _forwarding_signals(processes: list[subprocess.Popen], received: list[int]):
    """Install SIGTERM/SIGINT handlers that pass the signal on to the children; returns the old ones."""
    def handler(signum, frame):
        received.append(signum)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def launch_group(argv: list[str], nproc: int, device: str, reporter: Reporter) -> None:
    """Run this ``autoseg train`` as a torchrun group of ``nproc`` ranks on this machine.

    Raises:
        LaunchStopped: torchrun failed (a rank's error, named by rank, is on stderr above) or was
            stopped by a signal (passed on to the ranks, which save one checkpoint).
    """
    from AutoSegLib.training.distributed import torchrun_command

    args = [*strip_options(argv, {**LAUNCH_OPTIONS, "--device": 1}), "--device", device]
    command = torchrun_command(nproc, args)
    reporter.log("train", f"Starting {nproc} ranks with torchrun ({'NCCL' if device == 'cuda' else 'gloo'}): "
                          + " ".join(command))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))
    received: list[int] = []
    processes: list[subprocess.Popen] = []
    previous = _forwarding_signals(processes, received)
    try:
        processes.append(subprocess.Popen(command, env=env))
        status = processes[0].wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        name = signal.Signals(received[0]).name
        raise LaunchStopped(f"stopped by {name}: passed on to the ranks, which saved a checkpoint; continue with "
                            "--resume", 128 + received[0])
    if status != 0:
        raise LaunchStopped(f"the torchrun group failed (exit status {status}); the failing rank's error is above",
                            status if status > 0 else 128 - status)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# -- several folds side by side -------------------------------------------------------------------
def _relay_events(stream, fold: str, out, lock: threading.Lock) -> None:
    """A child's stdout (events) on ours, each event with its ``fold``; its ``done`` becomes a log event.

    The command's own ``done`` comes once, at the end (docs/events.md).
    """
    for line in stream:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict):
            if event.get("event") == "done":
                event = {"event": "log", "stage": event.get("stage"), "message": f"fold {fold} finished",
                         "result": {k: v for k, v in event.items() if k not in ("event", "stage", "t")},
                         "t": event.get("t")}
            line = json.dumps({**event, "fold": fold}) + "\n"
        with lock:
            out.write(line)
            out.flush()


def _relay_text(stream, fold: str, err, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            err.write(f"[fold {fold}] {line}")
            err.flush()


def run_folds(argv: list[str], fold_text: str, folds: list[str], slots: list[Slot], reporter: Reporter,
              poll_s: float = 0.2) -> dict[str, int]:
    """Train ``folds`` in child ``autoseg train`` processes, one per slot at a time; exit status per fold.

    A SIGTERM/SIGINT is passed on to the running children (each saves its checkpoint) and no
    further fold starts.

    Raises:
        LaunchStopped: a fold failed or the run was stopped; the message names the folds.
    """
    pending, running, statuses = list(folds), {}, {}
    free = list(slots)
    received: list[int] = []
    children: list[subprocess.Popen] = []
    lock = threading.Lock()
    reporter.log("train", f"Training folds {', '.join(folds)} on {', '.join(map(str, slots))}, "
                          f"{len(slots)} at a time")
    previous = _forwarding_signals(children, received)
    try:
        while pending or running:
            for fold, slot in ([] if received else next_starts(pending, free)):
                pending.remove(fold)
                free.remove(slot)
                running[fold] = (_start_fold(argv, fold_text, fold, slot, lock), slot)
                children.append(running[fold][0][0])
                reporter.log("train", f"fold {fold}: started on {slot} (pid {running[fold][0][0].pid})", fold=fold)
            if received:
                pending.clear()
            for fold, ((process, threads), slot) in list(running.items()):
                if process.poll() is None:
                    continue
                for thread in threads:
                    thread.join(5)
                statuses[fold] = process.returncode
                free.append(slot)
                del running[fold]
                reporter.log("train", f"fold {fold}: exit status {process.returncode}", fold=fold)
            time.sleep(poll_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    failed = {f: s for f, s in statuses.items() if s != 0}
    if received:
        name = signal.Signals(received[0]).name
        raise LaunchStopped(f"stopped by {name}: folds {', '.join(statuses)} ended (each saved a checkpoint if it was "
                            "training); continue each with --resume", 128 + received[0])
    if failed:
        raise LaunchStopped("fold(s) " + ", ".join(f"{f} (exit status {s})" for f, s in failed.items())
                            + " failed; their errors are above (lines starting [fold N])", 1)
    return statuses


def _start_fold(argv, fold_text, fold, slot, lock):
    env = dict(os.environ)
    if slot.visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.visible
    command = [sys.executable, "-m", "AutoSegLib", *child_arguments(argv, fold_text, fold, slot)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               bufsize=1)
    threads = [threading.Thread(target=_relay_events, args=(process.stdout, fold, sys.stdout, lock), daemon=True),
               threading.Thread(target=_relay_text, args=(process.stderr, fold, sys.stderr, lock), daemon=True)]
    for thread in threads:
        thread.start()
    return process, threads
