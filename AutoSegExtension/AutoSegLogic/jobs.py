"""Engine commands in background processes, observed through their ``--events`` lines.

A :class:`Job` runs ``python -m AutoSegLib <command> ... --events`` in its own process group
and never blocks its caller: a reader thread moves stdout lines into a queue, and
:meth:`Job.poll` (called from a GUI timer) drains the queue, updates progress, ETA, the last
message and the training curves, and notices when the process has ended. stderr (human
messages, tracebacks) goes to a log file.

Success is judged the way docs/events.md defines it: exit status 0 **and** a ``done`` event
for the command's top-level stage. Output files are never evidence: a job killed from outside
(status -9, the out-of-memory killer, a closed laptop) is a failure reported with the engine's
last message, and its results are not loaded.

:meth:`Job.cancel` sends SIGTERM to the engine process (training then saves a checkpoint and
exits with 143) and, if it has not ended after a grace period, SIGKILL to its whole process
group; :meth:`Job.resume` starts the same training again with ``--resume``. The SIGTERM goes to
the engine alone, not its group: data workers killed first would make the trainer fail on
its next batch before it could save.

A :class:`JobChain` runs several commands one after the other (verify, plan, train fold 0,
fold 1, ...), stopping at the first failure. A step may also be a :class:`ThreadJob`: work
that must leave Slicer's GUI thread but needs no engine process (writing a prediction's input
files, reading its result, writing a case), with the same interface.

Progress never moves back: a command's stages share its bar (training 0-95%, its final
validation 95-100%), a chain's steps share the chain's bar by weight, and a reported fraction
below an earlier one is not shown. The ETA is the engine's; until the engine has one, it is
estimated from the progress made since the stage started (so it is there after the first
epoch, or the first few iterations).

Example::

    job = Job(["verify", "Dataset001_Liver"]).start()
    # in a QTimer callback:
    for event in job.poll():
        print(job.progress, job.eta_s, job.message)
    if job.finished: print(job.status, job.failure)
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "pending", "running", "succeeded", "failed", "cancelled"
# The stage of the final `done` event, where it is not the command's own name.
TOP_STAGE = {"plan-and-preprocess": "preprocess"}
DEFAULT_GRACE_S = 30.0  # time to save a checkpoint after SIGTERM before SIGKILL
# Where each stage of a command sits on the command's progress bar (fractions of it).
STAGE_SHARES = {
    "train": {"train": (0.0, 0.95), "validate": (0.95, 1.0)},
    "plan-and-preprocess": {"fingerprint": (0.0, 0.4), "plan": (0.4, 0.45), "preprocess": (0.45, 1.0)},
}
_MIN_ESTIMATE_PROGRESS = 0.002  # progress (and ...)
_MIN_ESTIMATE_S = 2.0  # ... seconds since the stage started before an own ETA is shown
_EOF = object()
_EOF_WAIT_S = 5.0  # after exit, how long to wait for stdout to close (workers may hold it briefly)


def engine_path() -> str:
    """The folder holding the AutoSegLib package, for the child's PYTHONPATH."""
    import AutoSegLib

    return str(Path(AutoSegLib.__file__).resolve().parent.parent)


def logic_path() -> str:
    """The folder holding this package (the Slicer module's folder)."""
    return str(Path(__file__).resolve().parent.parent)


class JobState:
    """``finished`` and ``succeeded`` read from ``status``, the same for every kind of job
    (an engine process, a worker thread, a chain of steps)."""

    @property
    def finished(self) -> bool:
        return self.status in (SUCCEEDED, FAILED, CANCELLED)

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED


@dataclass(eq=False)  # a job is itself, not equal to another with the same arguments
class Job(JobState):
    """One engine command in a background process.

    Args:
        args: the command and its arguments, without ``--events`` (added), e.g.
            ``["train", "D", "3d_fullres", "0", "--preset", "quick"]``.
        python: interpreter to run it with (default: this one; Slicer's own inside Slicer).
        env: base environment (default ``os.environ``; in Slicer its startup environment).
        log_path: where stderr goes (default: a new temporary file).
        grace_s: seconds between cancel's SIGTERM and SIGKILL.
        title: shown to the user, e.g. "train fold 0".
    """

    args: Sequence[str]
    python: str | None = None
    env: dict | None = None
    log_path: Path | None = None
    grace_s: float = DEFAULT_GRACE_S
    title: str = ""
    cwd: str | None = None
    module: str = "AutoSegLib"  # what ``python -m`` runs; e.g. "pip" for installing packages
    events_protocol: bool = True  # False: any stdout is a log line; success is exit status 0 alone

    status: str = field(default=PENDING, init=False)
    events: list = field(default_factory=list, init=False)
    epochs: list = field(default_factory=list, init=False)  # the `epoch` events of a training run
    message: str = field(default="", init=False)  # last log/warning/error message
    error: str = field(default="", init=False)  # last error event's message
    errors: list = field(default_factory=list, init=False)  # every error event's message
    exit_status: int | None = field(default=None, init=False)
    done_event: dict | None = field(default=None, init=False)

    def __post_init__(self):
        self.args = [str(a) for a in self.args]
        self.command = self.args[0]
        self.stage = TOP_STAGE.get(self.command, self.command)
        self.title = self.title or self.command
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._eof = False
        self._exited_at: float | None = None
        self._cancel_sent: float | None = None
        self._killed = False
        self._fraction: float | None = None
        self._shown: float | None = None  # the highest fraction reported so far
        self._eta: tuple[float, float] | None = None  # (eta_s, at monotonic time)
        self._rate_from: tuple[float, float] | None = None  # (fraction, monotonic time) the own ETA counts from
        self._train_epochs: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def argv(self) -> list[str]:
        return [self.python or sys.executable, "-m", self.module, *self.args,
                *(["--events"] if self.events_protocol else [])]

    def start(self) -> "Job":
        if self._proc is not None:
            raise RuntimeError(f"job '{self.title}' was already started")
        env = dict(self.env if self.env is not None else os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [engine_path(), logic_path(), env.get("PYTHONPATH", "")] if p)
        env["PYTHONUNBUFFERED"] = "1"
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="autoseg-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        self.log_path = Path(self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                          env=env, cwd=self.cwd, **_new_group())
        self.status = RUNNING
        threading.Thread(target=_read_lines, args=(self._proc.stdout, self._queue), daemon=True,
                         name=f"autoseg-{self.command}-reader").start()
        return self

    def poll(self) -> list[dict]:
        """New events since the last call; never waits. Updates status when the process has ended."""
        if self._proc is None or self.finished:
            return []
        new = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is _EOF:
                self._eof = True
                break
            event = _parse(line)
            if event is not None:
                self._take(event)
                new.append(event)
        self._check_exit()
        return new

    def cancel(self) -> None:
        """Ask the engine to stop (SIGTERM; training saves a checkpoint). Returns at once."""
        if self.status != RUNNING or self._cancel_sent is not None:
            return
        self._cancel_sent = time.monotonic()
        if self._proc.poll() is None:
            _terminate(self._proc)

    def kill(self) -> None:
        """Stop the engine and all its workers now (SIGKILL to the process group)."""
        if self._proc is not None and self._proc.poll() is None:
            self._cancel_sent = self._cancel_sent or time.monotonic()
            self._killed = True
            _kill_group(self._proc)

    def resume(self) -> "Job":
        """A new (not started) job continuing this training run from its latest checkpoint."""
        if self.command != "train":
            raise ValueError(f"only training can be resumed, not '{self.command}'")
        args = [a for a in self.args if a != "--overwrite"]
        if "--resume" not in args:
            args.append("--resume")
        return Job(args, python=self.python, env=self.env, log_path=self.log_path, grace_s=self.grace_s,
                   title=self.title, cwd=self.cwd, module=self.module, events_protocol=self.events_protocol)

    # -- state -----------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def progress(self) -> float | None:
        """Fraction done (0-1) of the whole command, None until the engine has said; never decreases."""
        return 1.0 if self.succeeded else self._shown

    @property
    def eta_s(self) -> float | None:
        """Seconds left: the engine's last estimate counted down since it was made, else estimated
        from the progress rate since the stage started."""
        if self.finished:
            return None
        now = time.monotonic()
        if self._eta is not None:
            eta, at = self._eta
            return max(0.0, eta - (now - at))
        if self._rate_from is None or self._shown is None:
            return None
        start, since = self._rate_from
        advanced, elapsed = self._shown - start, now - since
        if advanced < _MIN_ESTIMATE_PROGRESS or elapsed < _MIN_ESTIMATE_S:
            return None
        return elapsed / advanced * (1.0 - self._shown)

    @property
    def failure(self) -> str:
        """Why the job did not succeed, in words (empty while running or on success)."""
        if not self.finished or self.succeeded:
            return ""
        last = self.error or self.message
        code = self.exit_status
        if self.status == CANCELLED:
            return f"cancelled{': ' + last if last else ''}"
        if code is not None and code < 0:
            name = _signal_name(-code)
            return (f"the engine process was killed by {name} from outside AutoSeg (for example by the system's "
                    f"out-of-memory killer); its last message: {last or '(none)'}")
        if code == 0:
            return f"the engine exited without reporting that '{self.stage}' finished; last message: {last or '(none)'}"
        if not last:
            return f"the engine failed with exit status {code}; see the log {self.log_path}"
        details = [e for e in self.errors[:-1] if e != last][:5]  # e.g. each problem `verify` found
        return "\n".join([last] + [f"- {e}" for e in details])

    @property
    def resumable(self) -> bool:
        return self.command == "train" and self.finished and not self.succeeded

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not Path(self.log_path).exists():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    # -- internals -------------------------------------------------------------------------------
    def _take(self, event: dict) -> None:
        self.events.append(event)
        kind = event.get("event")
        if kind == "start":
            self._eta = None  # the previous stage's estimate says nothing about this one
            self._rate_from = None
        if kind in ("log", "warning", "error") and event.get("message"):
            self.message = str(event["message"])
            if kind == "error":
                self.error = self.message
                self.errors.append(self.message)
        elif kind == "done" and event.get("stage") == self.stage:
            self.done_event = event
        elif kind == "start" and event.get("stage") == "train" and event.get("of"):
            self._train_epochs = int(event["of"])
            self._set_stage_fraction("train", (event.get("epoch") or 0) / self._train_epochs)
        elif kind == "epoch":
            self.epochs.append(event)
            self._train_epochs = event.get("of") or self._train_epochs
            self._set_fraction(event.get("stage", "train"), event.get("done"), event.get("of"))
        elif kind == "progress":
            if event.get("stage") == "train" and "iteration" in event and self._train_epochs:
                self._set_stage_fraction("train", (event["epoch"] + event["iteration"] / event["of"])
                                         / self._train_epochs)
            else:
                self._set_fraction(event.get("stage"), event.get("done"), event.get("of"))
        if event.get("eta_s") is not None:
            self._eta = (float(event["eta_s"]), time.monotonic())

    def _set_fraction(self, stage, done, of) -> None:
        if done is not None and of:
            self._set_stage_fraction(stage, float(done) / float(of))

    def _set_stage_fraction(self, stage, fraction: float) -> None:
        """Place a stage's fraction on the command's bar; the bar never moves back."""
        low, high = STAGE_SHARES.get(self.command, {}).get(stage, (0.0, 1.0))
        self._fraction = low + (high - low) * min(1.0, max(0.0, fraction))
        if self._shown is None or self._fraction > self._shown:
            self._shown = self._fraction
        if self._rate_from is None:
            self._rate_from = (self._shown, time.monotonic())

    def _check_exit(self) -> None:
        code = self._proc.poll()
        now = time.monotonic()
        if code is None:
            if self._cancel_sent is not None and not self._killed and now - self._cancel_sent > self.grace_s:
                self.kill()
            return
        if self._exited_at is None:
            self._exited_at = now
        if not self._eof and now - self._exited_at < _EOF_WAIT_S:
            return  # let the reader hand over the last lines first
        self.exit_status = code
        if code == 0 and (self.done_event is not None or not self.events_protocol):
            self.status = SUCCEEDED
        elif self._cancel_sent is not None:
            self.status = CANCELLED
        else:
            self.status = FAILED


def _read_lines(stream, out: queue.Queue) -> None:
    try:
        for line in iter(stream.readline, b""):
            out.put(line.decode("utf-8", errors="replace"))
    finally:
        out.put(_EOF)
        stream.close()


def _parse(line: str) -> dict | None:
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        event = None
    if not isinstance(event, dict) or "event" not in event:
        # stdout should hold events only; anything else is shown, not lost
        return {"event": "log", "stage": "", "message": line}
    return event


def _new_group() -> dict:
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _terminate(proc: subprocess.Popen) -> None:
    # On Windows there is no SIGTERM: terminate() ends the process at once (no checkpoint save;
    # the trainer's periodic checkpoints are what a resume then starts from).
    try:
        proc.terminate()
    except OSError:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        if os.name == "nt":
            subprocess.Popen(["taskkill", "/F", "/T", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # not waited for: the caller polls
        else:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we created: the engine and its workers
    except OSError:
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# -- several commands in a row ---------------------------------------------------------------------
@dataclass
class Step:
    """One step of a chain: an engine command's arguments and a title for the user.

    With ``work``, the step is a :class:`ThreadJob` running ``work(job)`` instead (``args``
    then only name it). ``weight`` is its share of the chain's progress bar.
    """

    args: list[str]
    title: str
    work: Callable | None = None
    weight: float = 1.0


class ThreadJob(JobState):
    """Work in a worker thread with a :class:`Job`'s interface (poll, cancel, progress, failure).

    For what must leave the GUI thread but needs no engine: writing or reading image files
    (SimpleITK and zlib release the GIL, so the GUI keeps running). ``work(job)`` may call
    :meth:`report` and should return early when :attr:`cancel_requested` is set; what it
    returns is :attr:`result`, what it raises is the failure. The state changes only in
    :meth:`poll`, as a :class:`Job`'s does.
    """

    def __init__(self, work: Callable[["ThreadJob"], object], title: str = "", args: Sequence[str] = ()):
        self.work, self.title = work, title or getattr(work, "__name__", "work")
        self.args = list(args) or [self.title]
        self.command = self.args[0]
        self.status = PENDING
        self.events: list = []
        self.epochs: list = []
        self.message = self.error = ""
        self.errors: list = []
        self.exit_status = None
        self.done_event = None
        self.log_path = None
        self.pid = None
        self.result = None
        self.cancel_requested = False
        self._outcome: tuple | None = None  # (status, result or message), set by the worker thread
        self._fraction: float | None = None
        self._started_at: float | None = None

    def start(self) -> "ThreadJob":
        if self.status != PENDING:
            raise RuntimeError(f"job '{self.title}' was already started")
        self.status, self._started_at = RUNNING, time.monotonic()
        threading.Thread(target=self._run, daemon=True, name=f"autoseg-{self.command}").start()
        return self

    def _run(self) -> None:
        try:
            result = self.work(self)
            self._outcome = (CANCELLED, "cancelled") if self.cancel_requested else (SUCCEEDED, result)
        except BaseException as exc:  # reported as the job's failure, like an engine error event
            self._outcome = (CANCELLED if self.cancel_requested else FAILED, str(exc) or type(exc).__name__)

    def report(self, done: float, of: float, message: str = "") -> None:
        """From the worker: progress (and a message) for the GUI's next poll."""
        if of:
            self._fraction = max(self._fraction or 0.0, min(1.0, done / of))
        if message:
            self.message = message

    def poll(self) -> list[dict]:
        if self.status == RUNNING and self._outcome is not None:
            status, value = self._outcome
            self.status = status
            if status == SUCCEEDED:
                self.result, self.exit_status = value, 0
                self.done_event = {"event": "done", "stage": self.command}
            else:
                self.error = self.message = value
                self.errors.append(value)
                self.exit_status = 1
        return []

    def cancel(self) -> None:
        self.cancel_requested = True

    kill = cancel

    @property
    def progress(self) -> float | None:
        return 1.0 if self.succeeded else self._fraction

    @property
    def eta_s(self) -> float | None:
        return None

    @property
    def failure(self) -> str:
        if not self.finished or self.succeeded:
            return ""
        return f"cancelled: {self.title}" if self.status == CANCELLED else f"{self.title}: {self.error}"

    @property
    def resumable(self) -> bool:
        return False

    def log_tail(self, lines: int = 20) -> str:
        return self.error


class JobChain(JobState):
    """Run steps one after the other; stop at the first that does not succeed.

    ``make_job(step)`` builds each step's (unstarted) Job, so the caller decides the
    interpreter, environment and log file. :meth:`resume` continues a chain that stopped in a
    training step from that step's checkpoint, then runs the remaining steps.
    """

    def __init__(self, steps: Sequence[Step], make_job: Callable[[Step], Job], title: str = "",
                 first_job: Job | None = None):
        if not steps:
            raise ValueError("a chain needs at least one step")
        self.steps, self.make_job, self.title = list(steps), make_job, title
        self.index = 0
        self.jobs: list[Job] = []
        self.job: Job | None = None
        self._first_job = first_job
        self._shown: float | None = None

    def start(self) -> "JobChain":
        self._launch(self._first_job or self.make_job(self.steps[0]))
        return self

    def _launch(self, job: Job) -> None:
        self.job = job
        self.jobs.append(job)
        job.start()

    def poll(self) -> list[dict]:
        if self.job is None:
            return []
        events = self.job.poll()
        if self.job.succeeded and self.index + 1 < len(self.steps):
            self.index += 1
            self._launch(self.make_job(self.steps[self.index]))
        return events

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def kill(self) -> None:
        if self.job is not None:
            self.job.kill()

    @property
    def status(self) -> str:
        if self.job is None:
            return PENDING
        if self.job.succeeded and self.index + 1 == len(self.steps):
            return SUCCEEDED
        return self.job.status if self.job.finished else RUNNING

    @property
    def resumable(self) -> bool:
        return self.finished and self.job is not None and self.job.resumable

    def done_events(self, stage: str) -> list[dict]:
        """The ``done`` events of this chain's jobs of ``stage`` (e.g. every trained fold's)."""
        return [job.done_event for job in self.jobs
                if job.done_event is not None and job.done_event.get("stage") == stage]

    @property
    def progress(self) -> float | None:
        """The whole chain's fraction done, steps weighted by :attr:`Step.weight`; never decreases."""
        if self.job is None:
            return None
        if self.succeeded:
            return 1.0
        total = sum(s.weight for s in self.steps)
        current = self.job.progress
        if current is None and self.index == 0:
            return self._shown
        done = sum(s.weight for s in self.steps[:self.index]) + self.steps[self.index].weight * (current or 0.0)
        fraction = done / total if total else 0.0
        self._shown = fraction if self._shown is None else max(self._shown, fraction)
        return self._shown

    @property
    def eta_s(self) -> float | None:
        return self.job.eta_s if self.job is not None else None

    @property
    def message(self) -> str:
        return self.job.message if self.job is not None else ""

    @property
    def failure(self) -> str:
        return self.job.failure if self.job is not None and self.finished else ""

    def log_tail(self, lines: int = 20) -> str:
        return self.job.log_tail(lines) if self.job is not None else ""

    def find(self, command: str):
        """The job of this chain that ran ``command`` (None if it has not started)."""
        return next((j for j in self.jobs if j.command == command), None)

    @property
    def step_text(self) -> str:
        return f"step {self.index + 1}/{len(self.steps)}: {self.steps[self.index].title}"

    def resume(self) -> "JobChain":
        """A new chain: the stopped training step with ``--resume``, then the steps after it."""
        if not self.resumable:
            raise ValueError("only a chain stopped in a training step can be resumed")
        return JobChain(self.steps[self.index:], self.make_job, self.title, first_job=self.job.resume())
