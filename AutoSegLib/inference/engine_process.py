"""The client of ``autoseg engine``: one engine process with the model loaded, for click after click.

The Slicer logic (or any caller) keeps one :class:`EngineProcess` per model; the first call pays
for starting Python, importing torch and loading the weights, later ones only for the network
windows around the clicks. Arrays go through ``.npy`` files in a private temporary folder this
client owns and removes; the protocol is in :mod:`AutoSegLib.inference.engine_server`.

Example:
    >>> with EngineProcess("Dataset001.autoseg/model", configuration="3d_cpu") as engine:  # doctest: +SKIP
    ...     case = engine.open_case([ct_array], geometry)
    ...     result = engine.refine(case, labels, [Click(label=5, positive=True, point=(12.0, -40.5, 88.0))])
    ...     labels = result.labels  # changed only inside result.region

Failures raise :class:`EngineError` with the engine's own message (a bad click, an unknown
case: the process stays usable), or, when the process died or did not answer in time (it is
then stopped), its exit status and the last lines of its stderr.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.imageio import Geometry
from AutoSegLib.inference.clicks import Click, click_to_json
from AutoSegLib.inference.refine import RefineResult

START_TIMEOUT_S = 600.0  # torch import and model loading on a slow, busy machine
REQUEST_TIMEOUT_S = 300.0  # open_case preprocesses a whole image; a refine takes seconds
STDERR_LINES = 40


class EngineError(ReportedFailure):
    """The engine refused a request, died, or did not answer in time; the message says which."""


def engine_command(model_dir, configuration=None, folds=None, device: str = "cpu", tta: bool = False,
                   python: str | None = None) -> list[str]:
    command = [python or sys.executable, "-m", "AutoSegLib", "engine", str(model_dir), "--device", device]
    if configuration:
        command += ["--configuration", str(configuration)]
    if folds:
        command += ["--folds", *[str(f) for f in folds]]
    if tta:
        command.append("--tta")
    return command


def _engine_env(env: dict | None) -> dict:
    """The caller's environment, with this AutoSegLib first on PYTHONPATH (Slicer's Python has no
    installed package; the engine must run the same code as its client)."""
    env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class EngineProcess:
    """A running ``autoseg engine`` and the requests it answers (see module docstring).

    Args:
        model_dir: the model folder (``WORK/model``).
        configuration, folds: as for ``autoseg predict`` (one configuration: refine runs one).
        device: ``cpu`` (default), ``cuda``, ``mps`` or ``auto``.
        timeout: seconds to wait for an answer before the engine is stopped.
        start_timeout: seconds to wait for the model to load.
        tta: mirror each window (8x the work in 3D; off by default, for speed).
    """

    def __init__(self, model_dir, configuration: str | None = None, folds=None, device: str = "cpu",
                 timeout: float = REQUEST_TIMEOUT_S, start_timeout: float = START_TIMEOUT_S, tta: bool = False,
                 python: str | None = None, env: dict | None = None):
        self.timeout = float(timeout)
        self.folder = Path(tempfile.mkdtemp(prefix="autoseg-engine-"))
        self.ids = itertools.count(1)
        self.files = itertools.count(1)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self.lines: queue.Queue = queue.Queue()
        self.closed = False
        command = engine_command(model_dir, configuration, folds, device, tta, python)
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1,
                                        env=_engine_env(env))
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        try:
            self.ready = self._next_line(float(start_timeout), "loading the model")
            if not self.ready.get("ok"):
                raise EngineError(f"the engine could not load {model_dir}: {self.ready.get('error')}")
        except BaseException:
            self._stop()
            raise

    # -- requests -----------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def guided(self) -> bool:
        return bool(self.ready.get("guided"))

    def request(self, op: str, timeout: float | None = None, **fields) -> dict:
        """Send one request, return its answer; :class:`EngineError` when it failed."""
        if self.closed:
            raise EngineError("the engine process was closed")
        if self.process.poll() is not None:
            raise EngineError(self._death(f"before {op}"))
        request_id = next(self.ids)
        try:
            self.process.stdin.write(json.dumps({"id": request_id, "op": op, **fields}) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise EngineError(self._death(f"while sending {op}")) from None
        reply = self._next_line(self.timeout if timeout is None else timeout, op)
        if reply.get("id") != request_id:
            self._stop()
            raise EngineError(f"the engine answered request {reply.get('id')!r} to request {request_id} ({op}); "
                              "it was stopped")
        if not reply.get("ok"):
            raise EngineError(f"{op}: {reply.get('error')}")
        return reply

    def open_case(self, channels: list[np.ndarray], geometry: Geometry) -> str:
        """Send a case's images; the engine preprocesses them once. Returns the case id for refines."""
        paths = [self._write(np.asarray(c)) for c in channels]
        try:
            return self.request("open_case", channels=paths, geometry=geometry.to_dict())["case"]
        finally:
            for path in paths:
                Path(path).unlink(missing_ok=True)

    def refine(self, case_id: str, previous_labels: np.ndarray, clicks: list[Click],
               scope: str = "clicked") -> RefineResult:
        """Correct ``previous_labels`` with every click so far (:meth:`Predictor.refine`)."""
        previous = self._write(np.asarray(previous_labels))
        output = str(self.folder / f"labels-{next(self.files)}.npy")
        try:
            reply = self.request("refine", case=case_id, previous=previous, output=output, scope=scope,
                                 clicks=[click_to_json(c) for c in clicks])
            labels = np.load(output, allow_pickle=False)
        finally:
            Path(previous).unlink(missing_ok=True)
            Path(output).unlink(missing_ok=True)
        return RefineResult(labels, tuple(int(v) for v in reply["region"]), int(reply.get("windows", 0)),
                            float(reply.get("seconds", 0.0)), float(reply.get("network_seconds", 0.0)))

    def close_case(self, case_id: str) -> None:
        self.request("close_case", case=case_id)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the engine to stop (kill it if it does not), remove the temporary folder."""
        if self.closed:
            return
        try:
            if self.process.poll() is None:
                self.process.stdin.write(json.dumps({"id": "shutdown", "op": "shutdown"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
        self._stop()

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass

    # -- plumbing -----------------------------------------------------------------------
    def _write(self, array: np.ndarray) -> str:
        path = self.folder / f"array-{next(self.files)}.npy"
        np.save(path, array, allow_pickle=False)
        return str(path)

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of file: the process closed stdout (it died or exited)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_tail.append(line.rstrip("\n"))

    def _next_line(self, timeout: float, doing: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._stop()
                raise EngineError(f"the engine did not answer within {timeout:g} s ({doing}); it was stopped. "
                                  f"Its last messages:\n{self._tail()}") from None
            if line is None:
                raise EngineError(self._death(f"while {doing}" if doing == "loading the model" else f"during {doing}"))
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                self.stderr_tail.append(f"(stdout) {line.rstrip()}")  # not protocol: keep it for the report

    def _death(self, when: str) -> str:
        try:
            status = self.process.wait(5)
        except subprocess.TimeoutExpired:
            status = None
        time.sleep(0.05)  # let the stderr reader take the last lines
        self._stop()
        how = f"exit status {status}" if status is not None and status >= 0 else \
            f"killed by signal {-status}" if status is not None else "no exit status"
        return f"the engine process ended {when} ({how}). Its last messages:\n{self._tail()}"

    def _tail(self) -> str:
        return "\n".join(self.stderr_tail) or "(nothing on stderr)"

    def _stop(self) -> None:
        """Kill the process if it still runs and remove the temporary folder (idempotent)."""
        self.closed = True
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for stream in ("stdin",):
            handle = getattr(process, stream, None) if process is not None else None
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True) if getattr(self, "folder", None) else None
